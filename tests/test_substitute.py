"""The zoo's CPU kernels in any model (models/substitute.py): a rewritten model computes
what the model as written computes, its gradients included, and the engine then treats
it like the zoo's model of the same architecture."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from jax import lax

import fedjax_sim as fs
from fedjax_sim.engine.options import has_convolution
from fedjax_sim.models import from_linen, from_nnx, get_model
from fedjax_sim.models.substitute import substitute_kernels
from fedjax_sim.simulation.setup import RunRequest, plan_run


def _primitives(fn, *args) -> list[str]:
    """Every primitive of fn's program, sub-programs included."""
    names = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            names.append(eqn.primitive.name)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return names


def _assert_same_outputs_and_gradients(model, reference, params, state, x):
    """`model` against `reference` (the same model as written): outputs in both modes, and
    the gradient of a training-mode loss (dropout with the same key) w.r.t. every parameter."""
    key = jax.random.key(5)

    def outputs_and_gradient(params, apply):
        loss = lambda p: jnp.sum(jnp.sin(apply(p, state, x, train=True, rng=key)[0]))
        return (apply(params, state, x)[0], apply(params, state, x, train=True, rng=key)[0],
                jax.grad(loss)(params))

    run = jax.jit(outputs_and_gradient, static_argnums=1)
    got, want = run(params, model.apply), run(params, reference.apply)
    for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(r).max())))


class _LinenConvs(nn.Module):
    """Strided, 'SAME' and 'VALID' padded, dilated convolutions, dropout and dense layers."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2), padding="SAME")(x))
        x = nn.relu(nn.Conv(5, (3, 2), padding="VALID", kernel_dilation=(2, 1))(x))
        x = nn.Conv(3, (2, 2), padding=((1, 0), (0, 1)))(x)
        x = nn.Dropout(0.3, deterministic=not train)(x)
        x = nn.relu(nn.Dense(6)(x.reshape(x.shape[0], -1)))
        return nn.Dense(3)(x)


def test_linen_cnn_substituted_matches_as_written():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 11, 10, 2)), jnp.float32)
    model = from_linen(_LinenConvs(), (11, 10, 2), train_kwarg="train")
    reference = from_linen(_LinenConvs(), (11, 10, 2), train_kwarg="train", kernels="as_written")
    params, state = model.init(jax.random.key(0))
    _assert_same_outputs_and_gradients(model, reference, params, state, x)
    # On the CPU backend 'auto' substitutes: no XLA convolution is left, nor in its gradient.
    assert not has_convolution(model, params, state, x)
    assert has_convolution(reference, params, state, x)
    grad = jax.grad(lambda p: jnp.sum(model.apply(p, state, x, train=True, rng=jax.random.key(1))[0]))
    assert "conv_general_dilated" not in _primitives(grad, params)


class _NNXConvs(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(2, 4, (3, 3), strides=2, padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(4, 4, (3, 3), padding="VALID", kernel_dilation=2, rngs=rngs)
        self.drop = nnx.Dropout(0.25, rngs=rngs)
        self.out = nnx.Linear(4 * 2 * 2, 3, rngs=rngs)

    def features(self, x):
        x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
        return self.drop(x).reshape(x.shape[0], -1)

    def head(self, f):
        return self.out(f)

    def __call__(self, x):
        return self.head(self.features(x))


def test_nnx_cnn_substituted_matches_as_written():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 12, 12, 2)), jnp.float32)
    model = from_nnx(_NNXConvs, (12, 12, 2), head=("out",))
    reference = from_nnx(_NNXConvs, (12, 12, 2), head=("out",), kernels="as_written")
    params, state = model.init(jax.random.key(0))
    _assert_same_outputs_and_gradients(model, reference, params, state, x)
    assert not has_convolution(model, params, state, x)
    features = jax.jit(model.head_split.features)(params, state, x)
    np.testing.assert_allclose(features, jax.jit(reference.head_split.features)(params, state, x),
                               rtol=1e-5, atol=1e-5)
    assert "conv_general_dilated" not in _primitives(
        lambda p: model.head_split.features(p, state, x), params)


class _Unsupported(nn.Module):
    """A depthwise convolution (feature groups) and a channels-first one, which the im2col
    kernel does not handle, beside one it does."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), feature_group_count=2, padding="SAME")(x)
        k = self.param("nchw", nn.initializers.lecun_normal(), (3, 4, 2, 2))  # OIHW
        y = lax.conv_general_dilated(jnp.transpose(x, (0, 3, 1, 2)), k, (1, 1), "VALID",
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))
        y = nn.Conv(2, (2, 2))(jnp.transpose(y, (0, 2, 3, 1)))
        return y.reshape(y.shape[0], -1)


def test_unsupported_layouts_fall_back_to_xla_and_still_match():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 7, 7, 2)), jnp.float32)
    model = from_linen(_Unsupported(), (7, 7, 2))
    reference = from_linen(_Unsupported(), (7, 7, 2), kernels="as_written")
    params, state = model.init(jax.random.key(0))
    _assert_same_outputs_and_gradients(model, reference, params, state, x)
    forward = lambda p: model.apply(p, state, x)[0]
    assert _primitives(forward, params).count("conv_general_dilated") == 2  # the last one went
    assert _primitives(lambda p: reference.apply(p, state, x)[0], params).count(
        "conv_general_dilated") == 3


def test_raw_function_sub_programs_are_followed():
    """A plain function whose convolutions sit under jit, remat, a scan and a cond; a
    convolution inside a custom_vjp function keeps its author's definition."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 3)) / 3, jnp.float32)
    dn = ("NHWC", "HWIO", "NHWC")
    conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)

    @jax.custom_vjp
    def custom(x, w):
        return conv(x, w)

    custom.defvjp(lambda x, w: (conv(x, w), (x, w)),
                  lambda res, g: jax.vjp(conv, *res)[1](g))

    def fn(w, x, flip: bool):
        h = jax.jit(conv)(x, w)
        h = jax.checkpoint(lambda h: jnp.tanh(conv(h, w)))(h)
        h = lax.scan(lambda c, _: (jnp.tanh(conv(c, w)), None), h, None, length=2)[0]
        h = lax.cond(flip, lambda h: conv(h, w), lambda h: -conv(h, -w), h)
        return custom(h, w)

    rewritten = substitute_kernels(fn)

    def value_and_gradient(f):
        loss = lambda w: jnp.sum(f(w, x, jnp.asarray(False)) ** 2)
        return jax.jit(lambda w: (f(w, x, True), jax.grad(loss)(w)))(w)

    for got, want in zip(value_and_gradient(rewritten), value_and_gradient(fn)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    names = _primitives(lambda w: rewritten(w, x, jnp.asarray(False)), w)
    assert names.count("conv_general_dilated") == 1  # the custom_vjp one
    assert _primitives(lambda w: fn(w, x, jnp.asarray(False)), w).count("conv_general_dilated") == 6


def test_kernels_argument_is_checked():
    with pytest.raises(fs.UserError, match="from_linen\\(kernels=...\\) must be 'auto'"):
        from_linen(_LinenConvs(), (8, 8, 2), kernels="matmul")
    with pytest.raises(fs.UserError, match="from_nnx\\(kernels=...\\) must be 'auto'"):
        from_nnx(_NNXConvs, (12, 12, 2), kernels=True)


class _LinenEmnistCNN(nn.Module):
    """The zoo's CNN (models/zoo.py) written with plain Linen layers."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(32, (3, 3), padding="VALID")(x))
        x = nn.relu(nn.Conv(64, (3, 3), padding="VALID")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.Dropout(0.25, deterministic=not train)(x).reshape(x.shape[0], -1)
        x = nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Dense(128)(x)))
        return nn.Dense(10)(x)


def test_engine_treats_a_user_linen_cnn_like_the_zoo_cnn():
    """simulate()'s planning (simulation/setup.py) resolves the same engine choices for the
    Linen CNN as for the zoo's CNN of the same architecture, and other ones for the
    Linen CNN as written (its XLA convolutions)."""
    rng = np.random.default_rng(4)
    data = fs.data.FederatedData({"x": rng.normal(size=(60, 10, 10, 1)).astype(np.float32),
                                  "y": rng.integers(0, 10, 60).astype(np.int32)},
                                 np.arange(0, 61, 10), tuple("abcdef"))

    def engine(model):
        request = RunRequest(model, fs.algorithms.fedavg(optax.sgd(0.1), batch_size=5), data,
                             rounds=1, clients_per_round=3, progress=False)
        return plan_run(request).engine

    zoo = engine(get_model("cnn", (10, 10, 1), 10))
    assert engine(from_linen(_LinenEmnistCNN(), (10, 10, 1), train_kwarg="train")) == zoo
    as_written = from_linen(_LinenEmnistCNN(), (10, 10, 1), train_kwarg="train",
                            kernels="as_written")
    assert engine(as_written) != zoo
