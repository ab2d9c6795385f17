"""Transfer learning: a backbone pretrained on digits 0-4, saved with orbax, loaded with
load_pretrained, and trained federatedly on digits 5-9 with only its head trainable."""

import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.errors import UserError
from fedjax_sim.models.trainable import count_parameters, with_trainable


def _digits(classes, seed=0):
    train, test = fs.data.load_digits(seed=seed)
    pick = lambda d: {k: v[np.isin(d["y"], classes)] for k, v in d.items()}
    train, test = pick(train), pick(test)
    for d in (train, test):
        d["y"] = (d["y"] - classes[0]).astype(np.int32)
    return train, test


def _pretrained(tmp_path):
    """A CNN trained centrally (one client holding everything) on digits 0-4, saved."""
    train, _ = _digits([0, 1, 2, 3, 4])
    model = fs.models.get_model("cnn", (8, 8, 1), 5)
    data = fs.data.partition(train, train["y"], "iid", 1, seed=0)
    res = fs.simulate(model, fs.algorithms.fedavg(optax.sgd(0.1), batch_size=16, local_epochs=2),
                      data, rounds=15, clients_per_round=1, progress=False, eval_every=15)
    res.save(str(tmp_path / "pretrained"))
    return model, str(tmp_path / "pretrained")


@pytest.mark.slow  # four federated runs and a pretraining: ~40 s on a 2-core CPU
def test_head_only_transfer_updates_only_the_head_and_beats_random_init(tmp_path):
    model, path = _pretrained(tmp_path)
    train, test = _digits([5, 6, 7, 8, 9])
    clients = fs.data.partition(train, train["y"], "dirichlet", 20, seed=0, alpha=1.0)
    params, state = model.init(jax.random.key(1))
    params, state, report = fs.models.load_pretrained(params, state, path, skip=("out",))
    assert all(not p.startswith("out") for p in report.loaded) and report.loaded
    frozen_model = with_trainable(model, "head", params=params, state=state)
    counts = count_parameters(frozen_model)
    assert counts.trainable == 128 * 5 + 5 and counts.frozen == model.num_params(params) - counts.trainable
    algo = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=10)
    kw = dict(rounds=5, clients_per_round=5, eval_data=test, eval_every=5, progress=False)
    transfer = fs.simulate(frozen_model, algo, clients, **kw)
    random_params, random_state = model.init(jax.random.key(1))
    random_head_only = fs.simulate(
        with_trainable(model, "head", params=random_params, state=random_state), algo, clients, **kw)
    finetuned = fs.simulate(with_trainable(model, "all", params=params, state=state), algo,
                            clients, **kw)
    scratch = fs.simulate(model, algo, clients, **kw)
    # (a) only the head trained: every frozen leaf is bit-for-bit the loaded value
    frozen = transfer.model_state["frozen"]
    for name in ("conv1", "conv2", "dense"):
        for leaf in ("kernel", "bias"):
            np.testing.assert_array_equal(np.asarray(frozen[name][leaf]), np.asarray(params[name][leaf]))
    assert set(transfer.params) == {"out"}
    assert not np.array_equal(np.asarray(transfer.params["out"]["kernel"]),
                              np.asarray(params["out"]["kernel"]))
    # (b) pretrained beats random initialisation at the same round budget: head-only on the
    # pretrained backbone vs head-only on a random one, and full training from each
    acc = lambda r: r.summary["final"]["test_accuracy"]
    assert acc(transfer) > acc(random_head_only) + 0.1, (acc(transfer), acc(random_head_only))
    assert acc(finetuned) > acc(scratch), (acc(finetuned), acc(scratch))


def test_selector_and_outputs_unchanged():
    model = fs.models.get_model("mlp", (8, 8, 1), 5, hidden=[16, 8])
    params, state = model.init(jax.random.key(0))
    wrapped = with_trainable(model, "hidden/1+head", params=params, state=state)
    p, s = wrapped.init(jax.random.key(1))
    assert set(p) == {"hidden", "out"} and set(p["hidden"]) == {1}
    assert set(s["frozen"]["hidden"]) == {0}
    x = np.random.default_rng(0).random((2, 8, 8, 1), np.float32)
    np.testing.assert_array_equal(np.asarray(model.apply(params, state, x)[0]),
                                  np.asarray(wrapped.apply(p, s, x)[0]))
    assert set(with_trainable(model, ["out"], params=params, state=state).init(None)[0]) == {"out"}
    assert count_parameters(with_trainable(model, "all")).frozen == 0
    assert count_parameters(wrapped).trainable == 16 * 8 + 8 + 8 * 5 + 5
    with pytest.raises(UserError, match="selects no parameter"):
        with_trainable(model, "layer9+head")
    with pytest.raises(UserError, match="trainable must be"):
        with_trainable(model, [])


def test_config_loads_pretrained_weights_and_trains_the_head_on_cached_features(tmp_path):
    """config.model.pretrained / trainable through the config runner: the backbone comes
    from the file and stays as loaded, the new head trains on cached features."""
    from fedjax_sim.cli.experiment import run
    from fedjax_sim.cli.config import load_config
    from fedjax_sim.simulation.checkpoint import export_params

    source = fs.models.get_model("mlp", (8, 8, 1), 5, hidden=(32,))  # another 5-class task
    weights, _ = source.init(jax.random.key(7))
    path = str(tmp_path / "backbone.npz")
    export_params(weights, path)
    config = load_config("configs/digits_fedavg.py", {"rounds": "2", "eval_every": "2",
                                                       "model.args.hidden": "[32]"})
    config.model.trainable = "head"
    config.model.pretrained = {"path": path, "skip": ["out"]}
    result = run(config, workdir=None, progress=False)
    frozen = result.model_state["frozen"]["hidden"][0]
    np.testing.assert_array_equal(np.asarray(frozen["kernel"]), np.asarray(weights["hidden"][0]["kernel"]))
    assert set(result.params) == {"out"} and result.params["out"]["kernel"].shape == (32, 10)
    assert result.summary["feature_cache"]["feature_shape"] == [32]
    assert result.summary["final"]["test_accuracy"] > 0.1


def test_a_head_only_result_loads_back_whole_into_the_plain_model(tmp_path):
    """A saved run of a with_trainable model holds its frozen backbone in the model state;
    load_pretrained gives it back as parameters of the underlying model."""
    train, _ = _digits([0, 1, 2, 3, 4])
    data = fs.data.partition(train, train["y"], "iid", 4, seed=0)
    base = fs.models.get_model("mlp", (8, 8, 1), 5, hidden=(16,))
    params, state = base.init(jax.random.key(3))
    res = fs.simulate(with_trainable(base, "head", params=params, state=state),
                      fs.algorithms.fedavg(optax.sgd(0.1)), data, rounds=1, clients_per_round=2,
                      progress=False)
    res.save(str(tmp_path / "run"))
    fresh, fresh_state = base.init(jax.random.key(4))
    loaded, _, report = fs.models.load_pretrained(fresh, fresh_state, str(tmp_path / "run"),
                                                  strict=True)
    np.testing.assert_array_equal(loaded["hidden"][0]["kernel"], params["hidden"][0]["kernel"])
    np.testing.assert_array_equal(loaded["out"]["kernel"], res.params["out"]["kernel"])
    assert report.params_loaded == report.params_total
