"""Pretrained-weight loading: torchvision names and layouts, npz, orbax, refusing pickles.

The target trees are built by hand in the ResNet naming contract (no model code), and the
expected values are transposed by hand from PyTorch layouts with plain numpy.
"""

import os
import pickle
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from fedjax_sim.errors import UserError
from fedjax_sim.models.pretrained import LoadReport, load_pretrained, torchvision_name
from fedjax_sim.simulation.checkpoint import export_params
from fedjax_sim.simulation import Result

# name -> channels of every BatchNorm in the tiny model
BNS = {"bn1": 4, "layer1/0/bn1": 4, "layer2/0/bn1": 8, "layer2/0/downsample/1": 8}
# name -> HWIO shape of every conv
CONVS = {"conv1": (7, 7, 3, 4), "layer1/0/conv1": (3, 3, 4, 4), "layer2/0/conv1": (3, 3, 4, 8),
         "layer2/0/downsample/0": (1, 1, 4, 8)}


def _nest(flat: dict) -> dict:
    """{'layer1/0/conv1/kernel': x} -> {'layer1': {0: {'conv1': {'kernel': x}}}}; integer
    parts become int keys, as in Flax NNX pure dicts."""
    out: dict = {}
    for path, x in flat.items():
        *parents, leaf = [int(p) if p.isdigit() else p for p in path.split("/")]
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = x
    return out


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _target(classes=10, batch_norm=True):
    """A tiny resnet-like (params, state) in the contract layout, all zeros (float32)."""
    params = {f"{c}/kernel": jnp.zeros(s, jnp.float32) for c, s in CONVS.items()}
    for bn, c in BNS.items():
        params[f"{bn}/scale"] = jnp.zeros(c, jnp.float32)
        params[f"{bn}/bias"] = jnp.zeros(c, jnp.float32)
    params["fc/kernel"] = jnp.zeros((8, classes), jnp.float32)
    params["fc/bias"] = jnp.zeros(classes, jnp.float32)
    state = {}
    if batch_norm:
        for bn, c in BNS.items():
            state[f"{bn}/mean"] = jnp.zeros(c, jnp.float32)
            state[f"{bn}/var"] = jnp.zeros(c, jnp.float32)
    return _nest(params), _nest(state)


def _torch_file(classes=10, seed=0):
    """A torchvision-style state dict (PyTorch names and layouts) with random values."""
    rng = np.random.default_rng(seed)
    sd = {}
    for c, (h, w, i, o) in CONVS.items():
        sd[c.replace("/", ".") + ".weight"] = rng.normal(size=(o, i, h, w)).astype(np.float32)
    for bn, c in BNS.items():
        name = bn.replace("/", ".")
        sd[f"{name}.weight"] = rng.normal(size=c).astype(np.float32)
        sd[f"{name}.bias"] = rng.normal(size=c).astype(np.float32)
        sd[f"{name}.running_mean"] = rng.normal(size=c).astype(np.float32)
        sd[f"{name}.running_var"] = rng.uniform(0.5, 2, size=c).astype(np.float32)
        sd[f"{name}.num_batches_tracked"] = np.array(100, np.int64)
    sd["fc.weight"] = rng.normal(size=(classes, 8)).astype(np.float32)
    sd["fc.bias"] = rng.normal(size=classes)  # float64: cast to the model's float32
    return sd


def _expected(sd):
    """The state dict converted by hand: (params, state) as flat path -> numpy."""
    params, state = {}, {}
    for c in CONVS:
        params[f"{c}/kernel"] = sd[c.replace("/", ".") + ".weight"].transpose(2, 3, 1, 0)
    for bn in BNS:
        name = bn.replace("/", ".")
        params[f"{bn}/scale"] = sd[f"{name}.weight"]
        params[f"{bn}/bias"] = sd[f"{name}.bias"]
        state[f"{bn}/mean"] = sd[f"{name}.running_mean"]
        state[f"{bn}/var"] = sd[f"{name}.running_var"]
    params["fc/kernel"] = sd["fc.weight"].T
    params["fc/bias"] = sd["fc.bias"].astype(np.float32)
    return params, state


def _write(tmp_path, sd, name="resnet.safetensors"):
    path = str(tmp_path / name)
    save_file(sd, path)
    return path


def test_safetensors_torchvision_names_and_layouts(tmp_path):
    sd = _torch_file()
    params0, state0 = _target()
    params, state, report = load_pretrained(params0, state0, _write(tmp_path, sd), strict=True)
    want_params, want_state = _expected(sd)
    got_params, got_state = _flat(params), _flat(state)
    assert set(got_params) == set(want_params) and set(got_state) == set(want_state)
    for path, want in {**want_params, **want_state}.items():
        got = got_params.get(path, got_state.get(path))
        assert got.dtype == jnp.float32 and isinstance(got, type(jnp.zeros(1))), path
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=path)
    # running statistics went to state, everything else to params
    assert set(want_state) <= set(report.loaded) and set(want_params) <= set(report.loaded)
    assert report.missing == [] and report.kept == []
    assert sorted(report.skipped) == sorted(n for n in sd if n.endswith("num_batches_tracked"))
    assert "counter" in report.reasons["bn1.num_batches_tracked"]
    n_params = sum(v.size for v in want_params.values())
    assert report.params_loaded == report.params_total == n_params
    assert report.state_loaded == sum(v.size for v in want_state.values())
    assert f"{n_params:,} of {n_params:,} parameters" in str(report)
    # the inputs are untouched
    assert all(not np.asarray(x).any() for x in _flat(params0).values())
    assert all(not np.asarray(x).any() for x in _flat(state0).values())


def test_imagenet_head_is_skipped_for_a_new_head(tmp_path):
    sd = _torch_file(classes=1000)
    params, state, report = load_pretrained(*_target(classes=10), _write(tmp_path, sd),
                                            strict=True)
    flat = _flat(params)
    assert not np.asarray(flat["fc/kernel"]).any() and flat["fc/kernel"].shape == (8, 10)
    assert not np.asarray(flat["fc/bias"]).any()
    assert {"fc.weight", "fc.bias"} <= set(report.skipped)
    assert "new head" in report.reasons["fc.weight"] and "[8, 1000]" in report.reasons["fc.weight"]
    assert sorted(report.kept) == ["fc/bias", "fc/kernel"] and report.missing == []
    np.testing.assert_array_equal(np.asarray(flat["layer2/0/conv1/kernel"]),
                                  _expected(sd)[0]["layer2/0/conv1/kernel"])
    assert report.params_loaded == report.params_total - 8 * 10 - 10
    text = str(report)
    assert "kept at initial values on purpose (2)" in text and "fc.weight (new head" in text


def test_skip_keeps_a_matching_head_fresh(tmp_path):
    sd = _torch_file()
    params, _, report = load_pretrained(*_target(), _write(tmp_path, sd), skip=("fc",),
                                        strict=True)
    assert not np.asarray(_flat(params)["fc/kernel"]).any()
    assert report.reasons["fc.weight"] == "listed in skip"
    assert sorted(report.kept) == ["fc/bias", "fc/kernel"]


def test_wrong_backbone_shape_names_the_tensor(tmp_path):
    sd = _torch_file()
    sd["layer1.0.conv1.weight"] = np.zeros((4, 4, 5, 5), np.float32)
    with pytest.raises(UserError, match=r"'layer1\.0\.conv1\.weight'.*\[5, 5, 4, 4\].*"
                                        r"layer1/0/conv1/kernel is \[3, 3, 4, 4\]"):
        load_pretrained(*_target(), _write(tmp_path, sd))


def test_missing_leaves_kept_or_strict_error(tmp_path):
    sd = _torch_file()
    del sd["layer2.0.downsample.0.weight"]
    path = _write(tmp_path, sd)
    params, _, report = load_pretrained(*_target(), path)
    assert report.missing == ["layer2/0/downsample/0/kernel"]
    assert not np.asarray(_flat(params)["layer2/0/downsample/0/kernel"]).any()
    assert "missing from the file" in str(report)
    with pytest.raises(UserError, match=r"strict=True.*layer2/0/downsample/0/kernel"):
        load_pretrained(*_target(), path, strict=True)


def test_groupnorm_target_skips_running_stats(tmp_path):
    sd = _torch_file()
    params, state, report = load_pretrained(*_target(batch_norm=False), _write(tmp_path, sd),
                                            strict=True)
    assert state == {}
    np.testing.assert_array_equal(np.asarray(_flat(params)["bn1/scale"]), sd["bn1.weight"])
    assert {"bn1.running_mean", "layer2.0.downsample.1.running_var"} <= set(report.skipped)
    assert "running statistics" in report.reasons["bn1.running_var"]
    assert report.state_loaded == 0


def test_linen_batch_stats_and_prefix_and_callable_names(tmp_path):
    sd = {f"module.{k}": v for k, v in _torch_file().items()}
    path = _write(tmp_path, sd)
    params, state = _target()
    linen_state = {"batch_stats": state}
    _, new_state, report = load_pretrained(params, linen_state, path, strip_prefix="module.")
    np.testing.assert_array_equal(np.asarray(new_state["batch_stats"]["bn1"]["mean"]),
                                  sd["module.bn1.running_mean"])
    assert "batch_stats/bn1/mean" in report.loaded

    def names(name, array):  # drop the head, convert the rest as torchvision does
        return None if name.startswith("module.fc.") else torchvision_name(name[7:], array)

    _, _, report = load_pretrained(params, state, path, names=names)
    assert sorted(report.missing) == ["fc/bias", "fc/kernel"]
    assert report.reasons["module.fc.weight"] == "dropped by names="


def test_npz_round_trip_and_prefix(tmp_path):
    params, state = _target()
    rng = np.random.default_rng(1)
    trained = {k: rng.normal(size=np.shape(v)).astype(np.float32) for k, v in _flat(params).items()}
    path = str(tmp_path / "final.npz")
    export_params(_nest(trained), path)
    loaded, same_state, report = load_pretrained(params, state, path)
    assert report.format == "npz" and report.names == "identity"
    for k, v in _flat(loaded).items():
        np.testing.assert_array_equal(np.asarray(v), trained[k], err_msg=k)
    assert same_state is not state and sorted(report.missing) == sorted(_flat(state))

    bit = str(tmp_path / "bit.npz")  # big_vision-style names under a prefix
    np.savez(bit, **{f"params/{k}": v for k, v in trained.items()})
    loaded, _, _ = load_pretrained(params, state, bit, strip_prefix="params/")
    np.testing.assert_array_equal(np.asarray(_flat(loaded)["fc/kernel"]), trained["fc/kernel"])
    with pytest.raises(UserError, match=r"nothing in bit\.npz matched.*strip_prefix"):
        load_pretrained(params, state, bit)


def test_orbax_result_round_trip(tmp_path):
    params, state = _target()
    rng = np.random.default_rng(2)
    p = _nest({k: rng.normal(size=np.shape(v)).astype(np.float32)
               for k, v in _flat(params).items()})
    s = _nest({k: rng.uniform(size=np.shape(v)).astype(np.float32)
               for k, v in _flat(state).items()})
    result_dir = str(tmp_path / "result")
    Result(params=p, model_state=s, server_state={"params": p, "round": np.int32(3)},
           history=[], summary={}).save(result_dir)
    for where in (result_dir, os.path.join(result_dir, "arrays")):
        new_p, new_s, report = load_pretrained(params, state, where, strict=True)
        assert report.format == "orbax" and report.skipped == []
        for k, v in _flat(p).items():
            np.testing.assert_array_equal(np.asarray(_flat(new_p)[k]), v, err_msg=k)
        for k, v in _flat(s).items():
            np.testing.assert_array_equal(np.asarray(_flat(new_s)[k]), v, err_msg=k)


class _Exploit:
    """Unpickling this creates a marker file: proof that a pickle was executed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name, kind", [("resnet50.pth", "pickle"), ("weights.bin", "pickle"),
                                        ("weights.data", "pickle"), ("weights.npz", "torch-zip"),
                                        ("weights.safetensors", "pickle")])
def test_pytorch_pickles_are_refused_without_unpickling(tmp_path, name, kind):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"conv1.weight": _Exploit(str(marker))}, protocol=2)
    path = tmp_path / name
    if kind == "pickle":
        path.write_bytes(payload)
    else:  # the layout of torch.save's zip archives: <name>/data.pkl
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", payload)
    with pytest.raises(UserError, match=r"never unpickles.*safetensors\.torch\.save_file") as e:
        load_pretrained(*_target(), str(path))
    assert name in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("name, content", [
    ("random.safetensors", os.urandom(256)), ("random.dat", os.urandom(256)),
    ("notes.txt", b"these are not weights\n"), ("notes.npz", b"not a zip either\n")],
    ids=["random.safetensors", "random.dat", "notes.txt", "notes.npz"])  # same ids in every worker
def test_non_checkpoint_files_are_refused(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=name.replace(".", r"\.")):
        load_pretrained(*_target(), str(path))


def test_bad_arguments(tmp_path):
    with pytest.raises(UserError, match="no checkpoint at"):
        load_pretrained(*_target(), str(tmp_path / "absent.safetensors"))
    with pytest.raises(UserError, match="neither a saved Result"):
        load_pretrained(*_target(), str(tmp_path))
    path = _write(tmp_path, _torch_file())
    with pytest.raises(UserError, match="format='pt' is not supported"):
        load_pretrained(*_target(), path, format="pt")
    with pytest.raises(UserError, match="names='keras' is not a naming scheme"):
        load_pretrained(*_target(), path, names="keras")
    assert isinstance(load_pretrained(*_target(), path, format="safetensors")[2], LoadReport)
