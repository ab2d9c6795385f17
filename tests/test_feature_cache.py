"""The frozen-backbone feature cache: training the head on features computed once gives
the results of training through the frozen backbone."""

import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.errors import UserError
from fedjax_sim.models import with_trainable
from fedjax_sim.simulation.feature_cache import feature_cache_blocker as _feature_cache_blocker


def _digits_clients():
    train, test = fs.data.load_digits()
    return fs.data.partition(train, train["y"], "dirichlet", 10, seed=0, alpha=0.5), test


def _both(model, clients, test, **kw):
    algo = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=10)
    args = dict(rounds=3, clients_per_round=5, eval_data=test, eval_every=3, progress=False, **kw)
    return (fs.simulate(model, algo, clients, feature_cache=True, **args),
            fs.simulate(model, algo, clients, feature_cache=False, **args))


def _assert_same_run(cached, direct, atol):
    for a, b in zip(jax.tree_util.tree_leaves(cached.params), jax.tree_util.tree_leaves(direct.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0)
    np.testing.assert_allclose([h["train_loss"] for h in cached.history],
                               [h["train_loss"] for h in direct.history], rtol=1e-6)
    assert cached.summary["final"]["test_accuracy"] == direct.summary["final"]["test_accuracy"]
    # the result is the whole model's: its frozen backbone comes back with the head
    assert jax.tree_util.tree_structure(cached.model_state) == jax.tree_util.tree_structure(direct.model_state)


def test_cached_features_train_the_head_as_the_frozen_backbone_would():
    clients, test = _digits_clients()
    model = with_trainable(fs.models.get_model("mlp", (8, 8, 1), 10), "head")
    cached, direct = _both(model, clients, test)
    _assert_same_run(cached, direct, atol=1e-6)
    info = cached.summary["feature_cache"]
    assert info["feature_shape"] == [200]
    assert info["examples"] == clients.num_examples + len(test["y"])
    assert direct.summary["feature_cache"] is False


def test_feature_cache_applies_only_where_results_would_not_change():
    clients, test = _digits_clients()
    algo = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=10)
    run = lambda model, **kw: fs.simulate(model, algo, clients, rounds=1, clients_per_round=2,
                                          progress=False, feature_cache=True, **kw)
    mlp = fs.models.get_model("mlp", (8, 8, 1), 10)
    with pytest.raises(UserError, match="outside the head .*with_trainable"):
        run(mlp)
    with pytest.raises(UserError, match="augmentation"):
        run(with_trainable(mlp, "head"),
            preprocess=fs.data.Preprocess(flip=True))
    with pytest.raises(UserError, match="feature_cache must be"):
        fs.simulate(mlp, algo, clients, rounds=1, clients_per_round=2, feature_cache="yes")
    # dropout in the CNN's backbone: training-mode features differ from cached ones
    cnn = with_trainable(fs.models.get_model("cnn", (8, 8, 1), 10), "head")
    params = jax.eval_shape(cnn.init, jax.random.key(0))[0]
    assert "dropout" in _feature_cache_blocker(cnn, params, None)
    # BatchNorm: only with frozen statistics
    resnet = with_trainable(fs.models.resnet20((8, 8, 1), 10, width=4), "head")
    params = jax.eval_shape(resnet.init, jax.random.key(0))[0]
    assert "batch_norm='frozen'" in _feature_cache_blocker(resnet, params, None)
    assert _feature_cache_blocker(resnet.freeze_stats(), params, None) is None


@pytest.mark.slow  # a ResNet-20 through its backbone every step: ~1 min on a 2-core CPU
def test_cached_features_match_a_frozen_batchnorm_resnet_with_a_hidden_head():
    clients, test = _digits_clients()
    model = with_trainable(fs.models.resnet20((8, 8, 1), 10, width=4, head_hidden=8), "head")
    cached, direct = _both(model, clients, test)
    assert cached.summary["batch_norm"] == "frozen" and set(cached.params) == {"fc_hidden", "fc"}
    _assert_same_run(cached, direct, atol=1e-6)
