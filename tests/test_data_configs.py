"""The shipped configs for public and natural datasets run end to end on small files
written here in the real layouts (TFF HDF5, LEAF JSON) or on mocked TFDS data."""

import json
import os

import jax
import numpy as np
import pytest

import fedjax_sim as fs

from fedjax_sim.cli.main import main
from test_data_files import write_leaf, write_tff
from test_data_tfds import _mocked

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
QUICK = ["--config.rounds=2", "--config.eval_every=2", "--no-progress"]


def _train(capsys, config, workdir, *overrides):
    code = main(["train", "--config", f"{CONFIGS}/{config}", "--workdir", str(workdir),
                 *QUICK, *overrides])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "done: 2 rounds" in out
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


def _emnist_files(tmp_path, rng):
    def clients(sizes):
        return {f"f{i:04d}_{i}": {"pixels": rng.random((n, 28, 28)).astype(np.float32),
                                  "label": rng.integers(0, 62, n).astype(np.int32)}
                for i, n in enumerate(sizes)}
    train = write_tff(tmp_path / "fed_emnist_train.h5", clients([12, 9, 15, 7, 10, 11]))
    test = write_tff(tmp_path / "fed_emnist_test.h5", clients([3, 2, 4, 2, 3, 1]))
    return train, test


@pytest.mark.slow
def test_emnist_tff_config(tmp_path, capsys):
    train, test = _emnist_files(tmp_path, np.random.default_rng(0))
    summary = _train(capsys, "emnist_tff.py", tmp_path / "run", f"--config.data.train_path={train}",
                     f"--config.data.test_path={test}", "--config.clients_per_round=3",
                     "--config.model.name=mlp")  # the zoo CNN is tested in test_models
    final = summary["final"]
    assert summary["data"]["num_clients"] == 6 and summary["data"]["num_examples"] == 64
    assert 0 <= final["test_accuracy"] <= 1 and final["client_test_count"] == 6


def _femnist_dir(path, rng, users):
    os.makedirs(path)
    half = len(users) // 2
    for k, part in enumerate((users[:half], users[half:])):
        write_leaf(os.path.join(path, f"all_data_{k}_niid_0_keep_0_train_9.json"),
                   {u: (rng.random((n, 784)).round(3).tolist(), rng.integers(0, 62, n).tolist())
                    for u, n in part})
    return str(path)


@pytest.mark.slow
def test_femnist_leaf_config_with_heldout_writers(tmp_path, capsys):
    rng = np.random.default_rng(1)
    users = [(f"f_{i}", n) for i, n in enumerate([8, 12, 6, 10, 9, 7, 11, 5, 10, 8])]
    train = _femnist_dir(tmp_path / "train", rng, users)
    test = _femnist_dir(tmp_path / "test", rng, [(u, 3) for u, _ in users])
    summary = _train(capsys, "femnist_leaf.py", tmp_path / "run", f"--config.data.train_path={train}",
                     f"--config.data.test_path={test}", "--config.clients_per_round=3",
                     "--config.model.name=mlp")
    final = summary["final"]
    assert summary["data"]["num_clients"] == 9  # 10% of the 10 writers held out
    assert final["heldout_test_count"] == 1 and 0 <= final["heldout_test_accuracy_mean"] <= 1
    assert final["client_test_count"] == 9 and "test_accuracy" in final


def _shakespeare_dir(path, rng, users):
    os.makedirs(path)
    text = "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind " * 20
    data = {}
    for u, n in users:
        starts = rng.integers(0, len(text) - 81, n)
        data[u] = ([text[s:s + 80] for s in starts], [text[s + 80] for s in starts])
    write_leaf(os.path.join(path, "all_data_niid_0_keep_0_train_9.json"), data)
    return str(path)


@pytest.mark.slow
def test_shakespeare_leaf_config(tmp_path, capsys):
    rng = np.random.default_rng(2)
    users = [(f"THE_TEMPEST_{r}", n) for r, n in zip("ABCDE", [6, 9, 4, 7, 5])]
    train = _shakespeare_dir(tmp_path / "train", rng, users)
    test = _shakespeare_dir(tmp_path / "test", rng, [(u, 2) for u, _ in users])
    summary = _train(capsys, "shakespeare_leaf.py", tmp_path / "run",
                     f"--config.data.train_path={train}", f"--config.data.test_path={test}",
                     "--config.clients_per_round=2", "--config.algorithm.local_steps=2",
                     "--config.model.args.hidden=16", "--config.model.args.num_layers=1")
    final = summary["final"]
    assert summary["data"]["num_clients"] == 5
    assert 0 <= final["test_accuracy"] <= 1 and np.isfinite(final["test_loss"])
    # describe understands token targets (padding excluded)
    code = main(["data", "describe", "--config", f"{CONFIGS}/shakespeare_leaf.py", "--no-png",
                 f"--config.data.train_path={train}", f"--config.data.test_path={test}"])
    out = capsys.readouterr().out
    assert code == 0 and "5 clients" in out and "tokens" in out


def test_cifar10_dirichlet_config_on_mock_tfds(tmp_path, capsys):
    with _mocked(tmp_path, "cifar10", 120) as data_dir:
        summary = _train(capsys, "cifar10_dirichlet.py", tmp_path / "run",
                         f"--config.data.data_dir={data_dir}", "--config.data.download=False",
                         "--config.data.num_clients=4", "--config.data.partition_args.alpha=5.0",
                         "--config.clients_per_round=2",
                         "--config.model.name=mlp",  # crop and flip still run on device
                         "--config.model.args={}")
    assert summary["data"]["num_clients"] == 4 and summary["data"]["num_examples"] == 120
    assert 0 <= summary["final"]["test_accuracy"] <= 1


def _error(capsys, config, *overrides):
    code = main(["train", "--config", f"{CONFIGS}/{config}", *QUICK, *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_data_gives_one_line_errors(tmp_path, capsys):
    missing = tmp_path / "nope.h5"
    assert "nope.h5" in _error(capsys, "emnist_tff.py", f"--config.data.train_path={missing}")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"users": ["a", "b"], "num_samples": [1],
                               "user_data": {"a": {"x": [[0.0] * 784], "y": [1]}}}))
    line = _error(capsys, "femnist_leaf.py", f"--config.data.train_path={bad}",
                  "--config.data.test_path=None")
    assert "bad.json" in line and "num_samples" in line
    line = _error(capsys, "cifar10_dirichlet.py", "--config.data.name=cifar11",
                  "--config.data.download=False")
    assert "cifar11" in line and "cifar10" in line
    assert "dataset" in _error(capsys, "femnist_leaf.py", "--config.data.dataset=mnist")


def _torchvision_resnet_file(path, model):
    """A torchvision-layout safetensors file (OIHW convs, [out, in] linears, running_mean /
    running_var, num_batches_tracked, a 1000-class fc) holding `model`'s initial values."""
    from safetensors.numpy import save_file

    from fedjax_sim.trees import path_names

    params, state = model.init(jax.random.key(11))
    sd = {}
    for tree in (params, state):
        for name, leaf in zip(path_names(tree), jax.tree_util.tree_leaves(tree)):
            *parents, last = name.split("/")
            arr = np.asarray(leaf)
            if last == "kernel":
                last, arr = "weight", np.transpose(arr, (*range(arr.ndim - 2, arr.ndim)[::-1], *range(arr.ndim - 2)))
            else:
                last = {"scale": "weight", "mean": "running_mean", "var": "running_var"}.get(last, last)
            sd[".".join([*parents, last])] = np.ascontiguousarray(arr)
            if last == "running_mean":
                sd[".".join([*parents, "num_batches_tracked"])] = np.array(10, np.int64)
    save_file(sd, str(path))


@pytest.mark.slow  # ResNet-50 compilations on XLA:CPU: ~45 s on 2 cores
def test_cifar10_resnet50_transfer_config_on_mock_tfds(tmp_path, capsys):
    """The transfer config as shipped but for a narrow ResNet-50 (width 4) at 32x32: the
    file's 1000-class head is skipped, the backbone is frozen with its statistics, and the
    rounds train the new hidden + output head on cached features."""
    weights = tmp_path / "resnet50.safetensors"
    _torchvision_resnet_file(weights, fs.models.resnet50((32, 32, 3), 1000, width=4))
    with _mocked(tmp_path, "cifar10", 60) as data_dir:
        summary = _train(capsys, "cifar10_resnet50_transfer.py", tmp_path / "run",
                         f"--config.data.data_dir={data_dir}", "--config.data.download=False",
                         f"--config.model.pretrained.path={weights}",
                         "--config.model.args.width=4", "--config.model.args.head_hidden=16",
                         "--config.preprocess.resize=None", "--config.algorithm.batch_size=8")
    assert summary["batch_norm"] == "frozen"
    assert summary["feature_cache"]["feature_shape"] == [128]  # 8 * width * 4 channels
    assert summary["num_params"] == 128 * 16 + 16 + 16 * 10 + 10  # the head alone trains
    assert 0 <= summary["final"]["test_accuracy"] <= 1
