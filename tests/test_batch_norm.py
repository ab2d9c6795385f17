"""BatchNorm in federated training: frozen, averaged and local (FedBN) statistics,
checked against hand-computed running statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fedjax_sim as fs
from fedjax_sim.errors import UserError
from fedjax_sim.models import from_nnx, with_trainable
from fedjax_sim.simulation.setup import batch_norm_mode as _batch_norm_mode

MOMENTUM = 0.9  # flax convention: running = 0.9 * running + 0.1 * batch


class _Net(nnx.Module):
    def __init__(self, rngs, norm=fs.models.MaskedBatchNorm):
        self.hidden = nnx.Linear(4, 3, rngs=rngs)
        self.bn = norm(3, momentum=MOMENTUM, rngs=rngs)
        self.out = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.bn(self.hidden(x))))


def _model(norm=fs.models.MaskedBatchNorm):
    return from_nnx(lambda rngs: _Net(rngs, norm), (4,), name="bn_net")


SIZES = (5, 12, 23)
BATCH = 5


def _clients():
    """Client i holds SIZES[i] copies of one example x_i, so every batch (padding slots
    included, which copy the client's first row) has batch mean h(x_i) and variance 0."""
    rng = np.random.default_rng(0)
    points = rng.normal(size=(len(SIZES), 4)).astype(np.float32)
    x = np.concatenate([np.repeat(points[i:i + 1], n, axis=0) for i, n in enumerate(SIZES)])
    y = rng.integers(0, 2, size=x.shape[0]).astype(np.int32)
    client = np.concatenate([np.full(n, i) for i, n in enumerate(SIZES)])
    return fs.data.FederatedData.from_client_column({"x": x, "y": y}, client), points


def _fixed(model):
    """The model with fixed initial params/state, so the test knows the hidden layer."""
    params, state = model.init(jax.random.key(3))
    return with_trainable(model, "all", params=params, state=state), params, state


def _reference_stats(params, points):
    """Each client's running statistics after its ceil(n/B) steps at learning rate 0:
    mean_k = (1 - 0.9^k) h(x_i), var_k = 0.9^k (from mean 0, var 1; batch variance 0)."""
    h = points @ np.asarray(params["hidden"]["kernel"]) + np.asarray(params["hidden"]["bias"])
    steps = np.ceil(np.asarray(SIZES) / BATCH)
    decay = MOMENTUM ** steps
    return (1 - decay)[:, None] * h, np.broadcast_to(decay[:, None], h.shape)


def _run(model, data, mode, **kw):
    algo = fs.algorithms.fedavg(optax.sgd(0.0), batch_size=BATCH)
    return fs.simulate(model, algo, data, rounds=1, clients_per_round=len(SIZES), eval_every=1,
                       progress=False, batch_norm=mode, **kw)


@pytest.mark.parametrize("chunk", [None, pytest.param(1, marks=pytest.mark.slow)])
def test_averaged_statistics_are_the_client_weighted_mean_of_local_updates(chunk):
    data, points = _clients()
    model, params, _ = _fixed(_model())
    res = _run(model, data, "averaged", engine=fs.EngineOptions(clients_per_chunk=chunk))
    mean, var = _reference_stats(params, points)
    w = np.asarray(SIZES, np.float64)[:, None]
    stats = res.model_state["model"]["bn"]
    np.testing.assert_allclose(stats["mean"], (w * mean).sum(0) / w.sum(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"], (w * var).sum(0) / w.sum(), rtol=1e-5, atol=1e-6)
    assert res.summary["batch_norm"] == "averaged"


def test_local_statistics_stay_with_each_client_and_evaluate_per_client():
    data, points = _clients()
    model, params, state = _fixed(_model())
    res = _run(model, data, "local", client_eval_data=data)
    mean, var = _reference_stats(params, points)
    own = res.client_states["stats"]["model"]["bn"]
    np.testing.assert_allclose(own["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(own["var"], var, rtol=1e-5, atol=1e-6)
    # the global statistics never change; nothing about them reached the server
    np.testing.assert_array_equal(res.model_state["model"]["bn"]["mean"], state["bn"]["mean"])
    # each client's model is evaluated with its own statistics: recompute client 2's loss
    x = np.asarray(data.client(2)["x"])
    y = np.asarray(data.client(2)["y"])
    personal_state = {"frozen": {}, "model": {"bn": {"mean": own["mean"][2], "var": own["var"][2]}}}
    logits, _ = model.apply(res.params, personal_state, x, train=False)
    logp = jax.nn.log_softmax(logits)
    loss = -float(jnp.mean(logp[np.arange(len(y)), y]))
    np.testing.assert_allclose(res.client_metrics["personal"]["loss"][2], loss, rtol=1e-5)
    assert "test_accuracy" not in res.history[-1]  # no global model to test


def test_frozen_statistics_never_change_and_training_normalises_with_them():
    data, _ = _clients()
    model, params, state = _fixed(_model())
    frozen = model.freeze_stats()
    x = np.asarray(data.features["x"][:7])
    train_out, new_state = frozen.apply(params, {"frozen": {}, "model": state}, x, train=True,
                                        rng=jax.random.key(0))
    eval_out, _ = frozen.apply(params, {"frozen": {}, "model": state}, x, train=False)
    np.testing.assert_array_equal(train_out, eval_out)
    np.testing.assert_array_equal(new_state["model"]["bn"]["mean"], state["bn"]["mean"])
    res = _run(model, data, "frozen")
    for leaf in ("mean", "var"):
        np.testing.assert_array_equal(res.model_state["model"]["bn"][leaf], state["bn"][leaf])


def test_auto_mode_and_bad_input():
    data, _ = _clients()
    model, params, state = _fixed(_model())
    dp = fs.privacy.ClientLevelDP(noise_multiplier=1.0, delta=1e-3, clip_norm=1.0)
    assert _batch_norm_mode("auto", model, None) == "averaged"
    assert _batch_norm_mode("auto", model, dp) == "frozen"
    head_only = with_trainable(_model(), "head", params=params, state=state)
    assert _batch_norm_mode("auto", head_only, None) == "frozen"
    with pytest.raises(UserError, match="batch_norm must be one of"):
        _run(model, data, "fedbn")
    with pytest.raises(UserError, match="not private.*without clipping or noise"):
        _run(model, data, "averaged",
             privacy=fs.privacy.ClientLevelDP(noise_multiplier=1.0, delta=1e-3, clip_norm=1.0))
    with pytest.raises(UserError, match="not private.*per-example"):
        _run(model, data, "local",
             privacy=fs.privacy.ExampleLevelDP(clip_norm=1.0, noise_multiplier=1.0,
                                              sampling_rate=0.2, delta=1e-3))
    # a model without statistics ignores the mode
    assert _batch_norm_mode("local", fs.models.get_model("mlp", (4,), 2), dp) is None


def _padded_clients():
    rng = np.random.default_rng(1)
    sizes = (3, 7, 12)
    x = rng.normal(size=(sum(sizes), 4)).astype(np.float32)
    y = rng.integers(0, 2, size=x.shape[0]).astype(np.int32)
    data = fs.data.FederatedData.from_client_column(
        {"x": x, "y": y}, np.repeat(np.arange(len(sizes)), sizes))
    return data, sizes


def _full_batch_stats(norm):
    """(averaged statistics after one full-batch step per client, the numpy reference over
    each client's real rows): clients of sizes 3, 7, 12 padded to one batch of 12."""
    data, sizes = _padded_clients()
    model, params, _ = _fixed(_model(norm))
    algo = fs.algorithms.fedavg(optax.sgd(0.0), batch_size=None)  # one full-batch step
    res = fs.simulate(model, algo, data, rounds=1, clients_per_round=3, progress=False,
                      batch_norm="averaged")
    w = np.asarray(sizes, np.float64)[:, None]
    h = [data.client(i)["x"] @ np.asarray(params["hidden"]["kernel"]) + np.asarray(params["hidden"]["bias"])
         for i in range(len(sizes))]
    mean = np.stack([(1 - MOMENTUM) * hi.mean(0) for hi in h])
    var = np.stack([MOMENTUM + (1 - MOMENTUM) * hi.var(0) for hi in h])
    return res.model_state["model"]["bn"], ((w * mean).sum(0) / w.sum(), (w * var).sum(0) / w.sum())


def test_batch_statistics_leave_out_padding_slots():
    """Every client's statistics are its real examples' mean and biased variance, as numpy
    computes them over those rows alone, though the smaller clients' batches are padded."""
    stats, (mean, var) = _full_batch_stats(fs.models.MaskedBatchNorm)
    np.testing.assert_allclose(stats["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"], var, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # the control: shows the reference above is sensitive to the padding
def test_a_plain_batchnorm_counts_the_padding_slots():
    stats, (mean, _) = _full_batch_stats(nnx.BatchNorm)
    assert not np.allclose(stats["mean"], mean, rtol=1e-3)
