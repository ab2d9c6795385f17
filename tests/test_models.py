"""Models: adapters against direct Flax calls, CPU conv/dense kernels against references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax import lax

import fedjax_sim as fs
from fedjax_sim.models import from_linen, get_model
from fedjax_sim.models import dense
from fedjax_sim.models.conv import matmul_conv


@pytest.mark.parametrize("shape,kernel,strides,padding,dilation", [
    ((9, 9, 3), (3, 3), (1, 1), "VALID", (1, 1)),
    ((10, 7, 2), (3, 2), (2, 1), "SAME", (1, 1)),
    ((11, 11, 3), (3, 3), (2, 2), ((1, 2), (0, 1)), (2, 1)),
    ((8, 8, 1), (5, 5), (1, 1), "SAME", (1, 1)),
])
def test_matmul_conv_equals_xla_conv_and_its_gradient(shape, kernel, strides, padding, dilation):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, *shape)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(*kernel, shape[-1], 4)), jnp.float32)
    dn = ("NHWC", "HWIO", "NHWC")

    def f(conv, x, k):
        return jnp.sum(jnp.sin(conv(x, k, strides, padding, rhs_dilation=dilation,
                                    dimension_numbers=dn)))

    ref = lax.conv_general_dilated(x, k, strides, padding, rhs_dilation=dilation, dimension_numbers=dn)
    out = matmul_conv(x, k, strides, padding, rhs_dilation=dilation, dimension_numbers=dn)
    np.testing.assert_allclose(out, ref, atol=1e-4)
    g_ref = jax.grad(lambda k: f(lax.conv_general_dilated, x, k))(k)
    g_out = jax.grad(lambda k: f(matmul_conv, x, k))(k)
    np.testing.assert_allclose(g_out, g_ref, atol=1e-3, rtol=1e-4)


def test_cnn_matmul_and_xla_implementations_agree():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 28, 28, 1)), jnp.float32)
    a = get_model("cnn", (28, 28, 1), 10, conv_impl="matmul")
    b = get_model("cnn", (28, 28, 1), 10, conv_impl="xla")
    params, state = a.init(jax.random.key(0))
    assert a.num_params(params) == 1_199_882  # conv32-conv64-dense128-dense10 on 28x28x1
    out_a, _ = a.apply(params, state, x)
    out_b, _ = b.apply(params, state, x)
    np.testing.assert_allclose(out_a, out_b, atol=1e-4)


@pytest.mark.parametrize("lhs_shape,out", [((7, 5), 3), ((2, 4, 6), 3), ((50, 6), 4), ((40, 2000), 50)])
def test_explicit_transpose_dense_matches_numpy_matmul_and_gradients(lhs_shape, out):
    """Values and both gradients against numpy (x^T g, g W^T) for every path of the weight
    gradient: a sum of outer products (up to OUTER_PRODUCT_MAX_ROWS rows: the first two
    cases), an explicit transposed copy (50 rows), and XLA's folded transpose (operands
    above TRANSPOSE_MAX_ELEMENTS)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=lhs_shape).astype(np.float32)
    w = rng.normal(size=(lhs_shape[-1], out)).astype(np.float32)
    c = rng.normal(size=(*lhs_shape[:-1], out)).astype(np.float32)  # d loss / d y
    dims = (((len(lhs_shape) - 1,), (0,)), ((), ()))
    loss = lambda x, w: jnp.sum(dense.explicit_transpose_dot_general(x, w, dims) * c)
    y = dense.explicit_transpose_dot_general(jnp.asarray(x), jnp.asarray(w), dims)
    np.testing.assert_allclose(y, x @ w, rtol=1e-4, atol=1e-3)
    gx, gw = jax.grad(loss, (0, 1))(jnp.asarray(x), jnp.asarray(w))
    x2, c2 = x.reshape(-1, x.shape[-1]).astype(np.float64), c.reshape(-1, out).astype(np.float64)
    np.testing.assert_allclose(gw, x2.T @ c2, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(gx, (c2 @ w.T.astype(np.float64)).reshape(x.shape), rtol=1e-4, atol=1e-3)
    # vmapped per-client weights (how the engine runs it) equal a loop over clients
    ws = np.stack([w, 2 * w, -w])
    per_client = jax.vmap(jax.grad(loss, 1), (None, 0))(jnp.asarray(x), jnp.asarray(ws))
    for i in range(3):
        np.testing.assert_allclose(per_client[i], jax.grad(loss, 1)(jnp.asarray(x), jnp.asarray(ws[i])),
                                   rtol=1e-5, atol=1e-4)


def test_dense_impls_train_identically():
    """The zoo MLP with explicit-transpose dense layers trains like XLA's own dot."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 6)).astype(np.float32)
    y = rng.integers(0, 3, 60).astype(np.int32)
    data = fs.data.FederatedData({"x": x, "y": y}, np.arange(0, 61, 10), tuple("abcdef"))
    alg = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=4)
    results = [fs.simulate(get_model("mlp", (6,), 3, hidden=(8,), dense_impl=impl), alg, data,
                           rounds=4, clients_per_round=3, seed=0, progress=False)
               for impl in ("explicit_transpose", "xla")]
    for a, b in zip(jax.tree_util.tree_leaves(results[0].params), jax.tree_util.tree_leaves(results[1].params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_nnx_adapter_splits_trainable_from_state_and_dropout_uses_rng():
    model = get_model("mlp", (4,), 2, hidden=(16,), dropout=0.5)
    params, state = model.init(jax.random.key(0))
    assert set(params) == {"hidden", "out"} and "dropout" in state
    x = jnp.ones((5, 4))
    eval1, _ = model.apply(params, state, x)
    eval2, _ = model.apply(params, state, x)
    np.testing.assert_array_equal(eval1, eval2)
    tr1, _ = model.apply(params, state, x, train=True, rng=jax.random.key(1))
    tr1b, _ = model.apply(params, state, x, train=True, rng=jax.random.key(1))
    tr2, _ = model.apply(params, state, x, train=True, rng=jax.random.key(2))
    np.testing.assert_array_equal(tr1, tr1b)
    assert not np.allclose(tr1, tr2)
    # An MLP with no hidden dropout in eval mode is x @ W1 -> relu -> @ W2 (numpy reference).
    h = np.maximum(np.asarray(x) @ params["hidden"][0]["kernel"] + params["hidden"][0]["bias"], 0)
    np.testing.assert_allclose(eval1, h @ params["out"]["kernel"] + params["out"]["bias"], atol=1e-5)


class _LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(8)(x.reshape(x.shape[0], -1))
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(3)(nn.relu(x))


def test_linen_adapter_matches_direct_apply_and_trains_in_simulate():
    module = _LinenNet()
    model = from_linen(module, (6,), train_kwarg="train")
    params, state = model.init(jax.random.key(0))
    assert "batch_stats" in state
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)), jnp.float32)
    out, _ = model.apply(params, state, x)
    direct = module.apply({"params": params, **state}, x, train=False)
    np.testing.assert_allclose(out, direct, atol=1e-6)
    _, new_state = model.apply(params, state, x, train=True, rng=jax.random.key(1))
    assert not np.allclose(new_state["batch_stats"]["BatchNorm_0"]["mean"], 0)

    rng = np.random.default_rng(0)
    data = fs.data.FederatedData({"x": rng.normal(size=(40, 6)).astype(np.float32),
                                  "y": rng.integers(0, 3, 40).astype(np.int32)},
                                 np.array([0, 10, 25, 40]), ("a", "b", "c"))
    import optax
    res = fs.simulate(model, fs.algorithms.fedavg(optax.sgd(0.1), batch_size=5), data,
                      rounds=3, clients_per_round=2, progress=False)
    assert np.isfinite(res.history[-1]["train_loss"])


def test_unknown_model_and_bad_options_are_user_errors():
    with pytest.raises(fs.UserError, match="unknown model 'resnet9'"):
        get_model("resnet9", (8, 8, 1), 10)
    with pytest.raises(fs.UserError, match="bad options for model 'mlp'"):
        get_model("mlp", (8,), 10, widths=3)
    with pytest.raises(fs.UserError, match="conv_impl"):
        get_model("cnn", (28, 28, 1), 10, conv_impl="fft")


def test_accuracy_equals_argmax_including_ties():
    rng = np.random.default_rng(0)
    logits = rng.integers(0, 3, size=(500, 4)).astype(np.float32)  # many ties
    labels = rng.integers(0, 4, size=500)
    acc = fs.models.classification().metrics["accuracy"](jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_array_equal(np.asarray(acc), (logits.argmax(1) == labels).astype(np.float32))
