"""Text models: the token-level sequence task against numpy, and the character LSTM and
transformer (shapes, causality, a numpy LSTM reference, training, bad inputs)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.models import classification, get_model, get_task, regression, sequence

# Tiny configurations: the defaults (TFF's 2x256 LSTM) are too slow to compile for tests.
TINY = {"char_lstm": dict(embed_dim=4, hidden=8, num_layers=2),
        "char_transformer": dict(dim=16, heads=2, layers=2, mlp_dim=32)}
T, V = 7, 11


@functools.cache
def _tiny(name):
    """A tiny zoo model over [T] token ids of a V-token vocabulary, and its initial values."""
    model = get_model(name, (T,), V, **TINY[name])
    params, state = jax.jit(model.init)(jax.random.key(0))
    return model, params, state


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


# -- the sequence task --------------------------------------------------------------------
def test_sequence_task_sums_are_token_sums_over_real_tokens():
    """Loss and accuracy sums over the real tokens of the real examples, `count` their
    number; per-example values are token means; a fully padded sequence counts nothing."""
    rng = np.random.default_rng(0)
    labels = np.array([[1, 2, 3, 0, 0],     # 3 real tokens, then padding
                       [0, 0, 0, 0, 0],     # fully padded sequence
                       [3, 1, 0, 2, 2],     # a pad in the middle is masked out too
                       [2, 2, 1, 1, 3]],    # a real sequence in a padding slot (mask False)
                      np.int32)
    mask = np.array([True, True, True, False])
    # Integer logits make ties; the accuracy keeps argmax's first-maximum rule.
    logits = rng.integers(0, 3, size=(4, 5, 4)).astype(np.float32)
    task = sequence()
    sums = jax.jit(task.masked_sums)(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))

    real = (labels != 0) & mask[:, None]
    token_loss = -np.take_along_axis(_log_softmax(logits.astype(np.float64)), labels[..., None],
                                     axis=-1)[..., 0]
    hits = logits.argmax(axis=-1) == labels
    assert float(sums["count"]) == real.sum() == 7
    np.testing.assert_allclose(sums["loss"], token_loss[real].sum(), rtol=1e-6)
    np.testing.assert_allclose(sums["accuracy"], hits[real].sum(), rtol=1e-6)

    per_example = np.asarray(task.loss(jnp.asarray(logits), jnp.asarray(labels)))
    per_example_acc = np.asarray(task.metrics["accuracy"](jnp.asarray(logits), jnp.asarray(labels)))
    np.testing.assert_array_equal(task.example_weight(jnp.asarray(labels)), [3, 0, 4, 5])
    for i in (0, 2, 3):
        tokens = labels[i] != 0
        np.testing.assert_allclose(per_example[i], token_loss[i][tokens].mean(), rtol=1e-6)
        np.testing.assert_allclose(per_example_acc[i], hits[i][tokens].mean(), rtol=1e-6)
    assert per_example[1] == 0 and per_example_acc[1] == 0
    # The engine's mean (Problem.loss) is the mean over real tokens, and it is finite and
    # differentiable with a fully padded sequence in the batch.
    mean = lambda z: (lambda s: s["loss"] / s["count"])(task.masked_sums(z, labels, mask))
    value, grad = jax.jit(jax.value_and_grad(mean))(jnp.asarray(logits))
    np.testing.assert_allclose(value, token_loss[real].mean(), rtol=1e-6)
    assert np.all(np.isfinite(grad))
    assert get_task("sequence", pad_id=0).name == "sequence"


def test_sequence_accuracy_equals_argmax_including_ties_and_another_pad_id():
    rng = np.random.default_rng(1)
    logits = rng.integers(0, 3, size=(40, 9, 5)).astype(np.float32)  # many ties
    labels = rng.integers(0, 5, size=(40, 9))
    labels[rng.random(labels.shape) < 0.3] = -1  # pad_id=-1: every id in [0, 5) is real
    acc = sequence(pad_id=-1).metrics["accuracy"](jnp.asarray(logits), jnp.asarray(labels))
    hits, real = logits.argmax(-1) == labels, labels != -1
    expected = np.where(real.any(1), (hits & real).sum(1) / np.maximum(real.sum(1), 1), 0)
    np.testing.assert_allclose(acc, expected, rtol=1e-6)


def test_classification_and_regression_sums_are_unchanged():
    """No example weight: `count` is the number of real examples and sums are plain."""
    rng = np.random.default_rng(2)
    mask = np.array([True, False, True, True, False])
    logits = rng.normal(size=(5, 4)).astype(np.float32)
    labels = rng.integers(0, 4, size=5).astype(np.int32)
    task = classification()
    assert task.example_weight is None
    sums = task.masked_sums(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    ce = -np.take_along_axis(_log_softmax(logits.astype(np.float64)), labels[:, None], 1)[:, 0]
    assert float(sums["count"]) == 3
    np.testing.assert_allclose(sums["loss"], ce[mask].sum(), rtol=1e-6)
    np.testing.assert_allclose(sums["accuracy"], (logits.argmax(1) == labels)[mask].sum())
    # Bit for bit the unweighted formula.
    w = jnp.asarray(mask).astype(jnp.float32)
    np.testing.assert_array_equal(sums["loss"], jnp.sum(task.loss(logits, labels) * w))

    outputs = rng.normal(size=(5, 2)).astype(np.float32)
    targets = rng.normal(size=(5, 2)).astype(np.float32)
    task = regression()
    assert task.example_weight is None
    sums = task.masked_sums(jnp.asarray(outputs), jnp.asarray(targets), jnp.asarray(mask))
    sq = np.square(outputs.astype(np.float64) - targets).mean(1)
    assert float(sums["count"]) == 3
    np.testing.assert_allclose(sums["loss"], sq[mask].sum(), rtol=1e-6)
    np.testing.assert_allclose(sums["mae"], np.abs(outputs - targets).mean(1)[mask].sum(), rtol=1e-6)


def test_sequence_check_rejects_bad_outputs_and_labels():
    check = sequence().check
    labels = np.array([[1, 2, 0], [3, 3, 3]], np.int32)
    check((2, 3, 4), labels)  # fine
    with pytest.raises(fs.UserError, match=r"\[batch, length, vocabulary\].*char_lstm"):
        check((2, 4), labels)
    with pytest.raises(fs.UserError, match="integer token labels"):
        check((2, 3, 4), labels.astype(np.float32))
    with pytest.raises(fs.UserError, match="integer token labels"):
        check((2, 3, 4), labels[:, 0])
    with pytest.raises(fs.UserError, match="length 5 but labels have length 3"):
        check((2, 5, 4), labels)
    with pytest.raises(fs.UserError, match=r"range over \[1, 3\].*model.num_outputs.*at least 4"):
        check((2, 3, 3), labels)
    with pytest.raises(fs.UserError, match="padding id 0"):
        check((2, 3, 4), np.zeros((2, 3), np.int32))
    # Pad ids outside the vocabulary are fine: only real tokens are range-checked.
    sequence(pad_id=-1).check((2, 3, 4), np.array([[1, -1, -1], [0, 3, -1]]))


# -- the models ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["char_lstm", "char_transformer"])
def test_text_models_are_causal_with_per_position_logits(name):
    model, params, state = _tiny(name)
    assert params["embed"]["embedding"].shape == (V, TINY[name].get("embed_dim", 16))
    assert params["out"]["kernel"].shape[-1] == V
    x = np.random.default_rng(0).integers(0, V, size=(3, T)).astype(np.int32)
    apply = jax.jit(lambda p, x: model.apply(p, state, x)[0])
    out = apply(params, x)
    assert out.shape == (3, T, V) and out.dtype == jnp.float32
    for t in (0, 3, T - 1):
        changed = x.copy()
        changed[:, t] = (changed[:, t] + 1) % V
        out2 = apply(params, changed)
        np.testing.assert_allclose(out2[:, :t], out[:, :t], atol=1e-6)
        assert not np.allclose(out2[:, t], out[:, t])


def test_char_lstm_default_is_tffs_shakespeare_model():
    """Embedding 8, two LSTMs of 256 units, dense vocabulary: Keras's parameter count."""
    model = get_model("char_lstm", (80,), 90)
    shapes = jax.eval_shape(model.init, jax.random.key(0))[0]
    lstm = lambda i, h: 4 * (i + h + 1) * h
    assert model.num_params(shapes) == 90 * 8 + lstm(8, 256) + lstm(256, 256) + 256 * 90 + 90
    assert set(shapes["lstm"][1]) == {"kernel", "recurrent_kernel", "bias"}


def _numpy_lstm(params, tokens):
    """Embed, LSTM layers (gates i, f, g, o), dense; float64."""
    sigmoid = lambda z: 1 / (1 + np.exp(-z))
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    x = p["embed"]["embedding"][tokens]
    for layer in (p["lstm"][i] for i in sorted(p["lstm"])):
        hidden = layer["recurrent_kernel"].shape[0]
        h = np.zeros((x.shape[0], hidden))
        c = np.zeros((x.shape[0], hidden))
        outputs = []
        for t in range(x.shape[1]):
            z = x[:, t] @ layer["kernel"] + h @ layer["recurrent_kernel"] + layer["bias"]
            i, f, g, o = np.split(z, 4, axis=-1)
            c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
            h = sigmoid(o) * np.tanh(c)
            outputs.append(h)
        x = np.stack(outputs, axis=1)
    return x @ p["out"]["kernel"] + p["out"]["bias"]


@pytest.mark.parametrize("dense_impl", ["explicit_transpose", "xla"])
def test_char_lstm_matches_numpy_lstm(dense_impl):
    _, params, state = _tiny("char_lstm")
    model = get_model("char_lstm", (T,), V, dense_impl=dense_impl, **TINY["char_lstm"])
    # Forget-gate bias starts at 1 (Keras's unit_forget_bias), the other gates at 0.
    np.testing.assert_array_equal(params["lstm"][0]["bias"], np.repeat([0.0, 1.0, 0.0, 0.0], 8))
    # Nonzero biases so that every parameter matters in the comparison.
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32), params)
    tokens = rng.integers(0, V, size=(2, T)).astype(np.int32)
    out = jax.jit(lambda p: model.apply(p, state, tokens)[0])(params)
    np.testing.assert_allclose(out, _numpy_lstm(params, tokens), atol=1e-5, rtol=1e-5)


def test_char_lstm_sgd_learns_a_repeating_text():
    """A few SGD steps on next-character prediction of 'abcd' repeated lower the token loss."""
    text = np.tile(np.arange(1, 5), 10).astype(np.int32)  # ids 1..4; 0 is padding
    x = np.stack([text[i:i + 8] for i in range(4)])
    y = np.stack([text[i + 1:i + 9] for i in range(4)])
    y[0, 6:] = 0  # a padded tail
    model = get_model("char_lstm", (8,), 5, embed_dim=4, hidden=16, num_layers=1)
    params, state = jax.jit(model.init)(jax.random.key(0))
    task, mask = sequence(), jnp.ones(4, bool)

    def loss(p):
        sums = task.masked_sums(model.apply(p, state, x)[0], y, mask)
        return sums["loss"] / sums["count"]

    opt = optax.sgd(1.0)

    @jax.jit
    def step(p, s):
        value, g = jax.value_and_grad(loss)(p)
        updates, s = opt.update(g, s)
        return optax.apply_updates(p, updates), s, value

    opt_state = opt.init(params)
    losses = []
    for _ in range(30):
        params, opt_state, value = step(params, opt_state)
        losses.append(float(value))
    assert losses[0] > 1.4  # about log(5) at the start
    assert losses[-1] < 0.5 * losses[0], losses


def test_text_models_reject_bad_shapes_and_options():
    with pytest.raises(fs.UserError, match=r"char_lstm needs token-id inputs of shape \[sequence_length\]"):
        get_model("char_lstm", (8, 1), 5)
    with pytest.raises(fs.UserError, match="char_transformer needs token-id inputs"):
        get_model("char_transformer", (28, 28, 1), 10)
    with pytest.raises(fs.UserError, match="dim divisible by heads"):
        get_model("char_transformer", (8,), 5, dim=10, heads=4)
    with pytest.raises(fs.UserError, match="hidden to be an integer >= 1"):
        get_model("char_lstm", (8,), 5, hidden=0)
    with pytest.raises(fs.UserError, match="bad options for model 'char_lstm'"):
        get_model("char_lstm", (8,), 5, width=3)
