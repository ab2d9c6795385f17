"""Compression parts against independent references: the quantizer's mean within a bound
from its own variance, scipy's Hadamard matrix, numpy re-implementations of top-k, random-k
and the scaled sign, hand-counted bits on the wire, error feedback's conservation of what
was meant to be sent, and short FedAvg runs on digits through `simulate`."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

import fedjax_sim as fs
from fedjax_sim.aggregators import Message, chain
from fedjax_sim.aggregators import compression as c


def _flat(tree):
    leaves = jax.tree_util.tree_leaves(tree)
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in leaves])


def _delta(seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return {"kernel": jnp.asarray(rng.normal(size=(6, 4)) * scale, jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(5,)) * scale, jnp.float32)}  # d = 29


def _send(p, delta, rng, residual=None):
    """One client's transform of `p` (state from p.init), and the decoded sum of it alone
    (one compiled program: far quicker than running the ops one by one)."""
    def run(delta, rng, residual):
        state = p.init(delta)
        if p.client_init is None:
            sent, report = p.client(delta, state, rng)
            residual = None
        else:
            residual = p.client_init(delta) if residual is None else residual
            sent, report, residual = p.client(delta, state, rng, residual)
        decoded = p.finalize(sent, jnp.float32(1), {"clients": jnp.float32(1)}, state, rng)[0]
        return sent, decoded, report, residual
    return jax.jit(run)(delta, rng, residual)


# -- quantization ---------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_quantizer_is_unbiased_and_rounds_to_a_neighbouring_level(bits):
    rng = np.random.default_rng(bits)
    x = rng.normal(size=40).astype(np.float32)
    x[5] = 0.0  # masked out below: stays zero, not in the range
    mask = x != 0
    draws = 20_000
    keys = jax.random.split(jax.random.key(bits), draws)
    for m in (None, mask):
        q = np.asarray(jax.jit(jax.vmap(lambda k: c.stochastic_quantize(
            jnp.asarray(x), bits, k, None if m is None else jnp.asarray(m))))(keys), np.float64)
        sel = np.ones_like(mask) if m is None else mask
        lo, hi = x[sel].min(), x[sel].max()
        step = (float(hi) - float(lo)) / (2 ** bits - 1)
        t = (x.astype(np.float64) - lo) / step
        below, frac = lo + np.floor(t) * step, t - np.floor(t)
        # every draw is the level just below or just above (float32 rounding aside)
        tol = 1e-5 * (hi - lo)
        near = (np.abs(q - below) <= tol) | (np.abs(q - (below + step)) <= tol)
        assert near[:, sel].all()
        if m is not None:
            assert (q[:, ~mask] == 0).all()
        # mean within 6 standard errors of the per-coordinate variance s^2 p (1 - p)
        std_err = np.sqrt(step ** 2 * frac * (1 - frac) / draws)
        assert (np.abs(q.mean(0) - x)[sel] <= 6 * std_err[sel] + tol).all()


def test_constant_and_two_valued_vectors_are_sent_exactly():
    for x in (np.full(7, 0.3, np.float32), np.array([-1, 2, 2, -1], np.float32)):
        q = jax.jit(c.stochastic_quantize, static_argnums=1)(jnp.asarray(x), 1, jax.random.key(0))
        np.testing.assert_array_equal(q, x)


def test_fwht_equals_scipy_hadamard():
    rng = np.random.default_rng(0)
    for n in (1, 2, 8, 64):
        x = rng.normal(size=(3, n))
        np.testing.assert_allclose(jax.jit(c.fwht)(jnp.asarray(x, jnp.float32)),
                                   x @ scipy.linalg.hadamard(n).T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="power-of-two"):
        c.fwht(jnp.zeros(6))


@pytest.mark.parametrize("d", [5, 16])
def test_hadamard_rotation_is_orthogonal_and_invertible(d):
    n = c.padded_size(d)
    key = jax.random.key(d)
    # the rotation's matrix on R^n (rows of the identity padded past d are rotated too)
    rows = np.asarray(jax.jit(jax.vmap(lambda e: c.rotate(e, key)))(jnp.eye(n)), np.float64)
    rot = rows.T  # column j = R e_j
    np.testing.assert_allclose(rot @ rot.T, np.eye(n), atol=1e-6)
    # R = H D / sqrt(n) with D a diagonal of signs
    signs = np.diag(scipy.linalg.hadamard(n).T @ rot) / math.sqrt(n)
    np.testing.assert_allclose(np.abs(signs), 1.0, atol=1e-6)
    np.testing.assert_allclose(rot, scipy.linalg.hadamard(n) * np.round(signs) / math.sqrt(n),
                               atol=1e-6)
    x = np.random.default_rng(d).normal(size=(4, d)).astype(np.float32)
    y = jax.jit(c.rotate)(jnp.asarray(x), key)
    assert y.shape == (4, n)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)
    np.testing.assert_allclose(jax.jit(c.unrotate, static_argnums=2)(y, key, d), x, atol=1e-5)
    other = jax.jit(jax.vmap(lambda e: c.rotate(e, jax.random.key(d + 1))))(jnp.eye(n))
    assert not np.allclose(np.asarray(other).T, rot)  # another round, another rotation


def test_rotated_quantize_is_unbiased_and_decoded_in_the_deltas_structure():
    delta = _delta(1)
    p = c.quantize(2, rotation="hadamard", seed=3)
    state = p.init(delta)
    draws = 20_000
    keys = jax.random.split(jax.random.key(0), draws)
    sent, _ = jax.jit(jax.vmap(lambda k: p.client(delta, state, k)))(keys)
    assert isinstance(sent, c.Rotated) and sent.vector.shape == (draws, 32)
    # the decoder is linear: decode the mean of the encodings, once
    mean = jax.tree_util.tree_map(lambda v: jnp.mean(v, axis=0), sent)
    decoded, _, new_state, _ = p.finalize(mean, jnp.float32(1), {}, state, jax.random.key(1))
    assert jax.tree_util.tree_structure(decoded) == jax.tree_util.tree_structure(delta)
    assert not np.array_equal(new_state.key, state.key)  # a fresh rotation next round
    # per decoded coordinate: Var = (1/d') sum_i s^2 p_i (1 - p_i), p_i from the rotated y
    y = np.asarray(c.rotate(c.flatten(delta), jax.random.wrap_key_data(state.key)), np.float64)
    step = (y.max() - y.min()) / 3
    frac = (y - y.min()) / step % 1.0
    std_err = math.sqrt(np.sum(step ** 2 * frac * (1 - frac)) / 32 / draws)
    assert np.abs(_flat(decoded) - _flat(delta)).max() <= 6 * std_err + 1e-5


def test_rotation_narrows_the_range_of_a_peaked_update():
    """Suresh et al.'s point: a rotated spike spreads over every coordinate, so k-bit
    levels are finer and the error smaller (here: one large entry among small ones)."""
    x = (0.1 * np.random.default_rng(0).normal(size=255)).astype(np.float32)
    x[7] = 10.0
    delta = {"w": jnp.asarray(x)}
    errors = {}
    for rotation in (None, "hadamard"):
        p = c.quantize(4, rotation=rotation)
        keys = jax.random.split(jax.random.key(0), 200)
        decoded = jax.jit(jax.vmap(lambda k: _send(p, delta, k)[1]["w"]))(keys)
        errors[rotation] = float(np.mean(np.sum((np.asarray(decoded) - x) ** 2, axis=1)))
    # the unrotated bound, d (hi - lo)^2 / (4 (2^4 - 1)^2)
    assert errors[None] <= 255 * float(x.max() - x.min()) ** 2 / 900
    assert errors["hadamard"] < errors[None] / 5


# -- sign, top-k, random-k against numpy ----------------------------------------------------
def test_sign_top_k_and_random_k_equal_numpy():
    delta = _delta(2)
    x = _flat(delta)
    d = x.size
    key = jax.random.key(5)
    # scaled sign: ||x||_1 / d * sign(x)
    _, decoded, _, _ = _send(c.sign(error_feedback=False), delta, key)
    np.testing.assert_allclose(_flat(decoded), np.abs(x).sum() / d * np.where(x >= 0, 1, -1),
                               rtol=1e-6)
    # top-k: k = ceil(0.2 * 29) = 6 largest magnitudes (distinct here)
    sent, decoded, _, _ = _send(c.top_k(0.2, error_feedback=False), delta, key)
    assert isinstance(sent, c.Sparse)
    ref = np.zeros(d)
    top = np.argsort(-np.abs(x))[:6]
    ref[top] = x[top]
    np.testing.assert_allclose(_flat(decoded), ref, rtol=1e-6)
    # random-k: the indices the 32-bit seed names, scaled by d / k without error feedback
    for feedback, scale in ((False, d / 7), (True, 1.0)):
        sent, decoded, _, _ = _send(c.random_k(k=7, error_feedback=feedback), delta, key)
        seed = jax.random.bits(key, (), jnp.uint32)  # the part's documented draw
        idx = np.asarray(c.random_k_indices(seed, d, 7))
        assert len(set(idx.tolist())) == 7
        ref = np.zeros(d)
        ref[idx] = x[idx] * scale
        np.testing.assert_allclose(_flat(decoded), ref, rtol=1e-6)


def test_random_k_picks_uniform_subsets_and_is_unbiased():
    d, k, draws = 12, 3, 10_000
    x = np.linspace(-1, 2, d).astype(np.float32)
    p = c.random_k(k=k, error_feedback=False)
    keys = jax.random.split(jax.random.key(1), draws)
    sent = jax.jit(jax.vmap(lambda r: p.client({"w": jnp.asarray(x)}, (), r)[0].values["w"]))(keys)
    sent = np.asarray(sent)
    chosen = sent != 0
    assert (chosen.sum(1) == k).all()
    # each index is chosen with probability k / d: a binomial count within 6 sigma
    q = k / d
    assert (np.abs(chosen.sum(0) - draws * q) <= 6 * math.sqrt(draws * q * (1 - q))).all()
    # E[C(x)] = x: per coordinate Var = x^2 (d/k)^2 q (1 - q)
    std_err = np.abs(x) * (d / k) * math.sqrt(q * (1 - q) / draws)
    assert (np.abs(sent.mean(0) - x) <= 6 * std_err + 1e-6).all()
    # large updates draw k of d like a cohort, or the d - k left out where k > d / 2
    draws = 300
    seeds = jnp.arange(draws, dtype=jnp.uint32)
    for d, k in ((5000, 100), (5000, 4000)):
        idx = np.sort(np.asarray(jax.jit(jax.vmap(lambda s: c.random_k_indices(s, d, k)))(seeds)))
        assert (np.diff(idx, axis=1) > 0).all() and idx.min() >= 0 and idx.max() < d
        counts = np.bincount(idx.ravel(), minlength=d)
        q = k / d
        assert (np.abs(counts - draws * q) <= 6 * math.sqrt(draws * q * (1 - q))).all()


def test_quantize_and_sign_after_a_sparsifier_encode_only_the_sent_entries():
    delta = _delta(3)
    x = _flat(delta)
    key = jax.random.key(2)
    top5 = c.top_k(k=5, error_feedback=False)
    sent, decoded, _, _ = _send(chain(top5, c.quantize(2)), delta, key)
    assert isinstance(sent, c.Sparse)
    top = np.argsort(-np.abs(x))[:5]
    out = _flat(decoded)
    assert set(np.flatnonzero(out).tolist()) <= set(top.tolist())
    lo, hi = x[top].min(), x[top].max()  # the range of the 5 sent values, not of all 29
    levels = lo + np.arange(4) * (hi - lo) / 3
    assert np.abs(out[top][:, None] - levels[None]).min(1).max() <= 1e-5
    _, decoded, _, _ = _send(chain(top5, c.sign(error_feedback=False)), delta, key)
    ref = np.zeros_like(x)
    ref[top] = np.abs(x[top]).mean() * np.sign(x[top])
    np.testing.assert_allclose(_flat(decoded), ref, rtol=1e-6)
    # a sparsifier after a rotation (keeping all 32 rotated entries): decoded back into the
    # update's structure, within the 8-bit error, ||error|| <= sqrt(d') s
    both = chain(c.quantize(8, rotation="hadamard"), c.top_k(k=32, error_feedback=False))
    sent, decoded, _, _ = _send(both, delta, key)
    assert isinstance(sent, c.Sparse) and isinstance(sent.values, c.Rotated)
    assert jax.tree_util.tree_structure(decoded) == jax.tree_util.tree_structure(delta)
    y = np.asarray(c.rotate(c.flatten(delta), jax.random.wrap_key_data(both.init(delta)[0].key)))
    assert np.linalg.norm(_flat(decoded) - x) <= math.sqrt(32) * (y.max() - y.min()) / 255


# -- error feedback ---------------------------------------------------------------------------
def _numpy_top_k(x, k):
    out = np.zeros_like(x)
    top = np.argsort(-np.abs(x))[:k]
    out[top] = x[top]
    return out


@pytest.mark.parametrize("name,make,reference", [
    ("top_k", lambda: c.top_k(0.1), lambda x: _numpy_top_k(x, 3)),  # ceil(0.1 * 29) = 3
    ("sign", lambda: c.sign(), lambda x: np.abs(x).mean() * np.where(x >= 0, 1, -1)),
    ("random_k", lambda: c.random_k(k=4), None)])
def test_error_feedback_loses_nothing_over_rounds(name, make, reference):
    p = make()
    residual, sent_total, input_total, own = None, 0.0, 0.0, np.zeros(29)
    for t in range(6):
        delta = _delta(10 + t, scale=1 + t)
        sent, _, report, residual = _send(p, delta, jax.random.key(t), residual)
        if reference is not None:  # numpy error feedback: send C(x + e), keep x + e - C(x + e)
            expected = reference(_flat(delta) + own)
            own = _flat(delta) + own - expected
            np.testing.assert_allclose(_flat(sent), expected, rtol=1e-5, atol=1e-5)
        sent_total = sent_total + _flat(sent)
        input_total = input_total + _flat(delta)
        np.testing.assert_allclose(float(report[f"{name}_residual_norm"]),
                                   np.linalg.norm(np.asarray(residual)), rtol=1e-5)
    # sum of what was sent + the final residual = sum of what was meant to be sent
    final = np.asarray(residual, np.float64)
    np.testing.assert_allclose(sent_total + final, input_total, atol=1e-4)
    assert np.linalg.norm(final) > 0


def test_error_feedback_with_an_update_smaller_than_the_model():
    """An algorithm that sends part of the model (FedPer's body) uses the residual's first
    entries; the rest stays zero."""
    p = c.top_k(k=3)
    params = {"a": jnp.zeros((10,)), "b": jnp.zeros((4,))}
    residual = p.client_init(params)
    assert residual.shape == (14,) and residual.dtype == jnp.float32
    delta = (jnp.arange(1.0, 7.0),)
    sent, _, residual = p.client(delta, (), jax.random.key(0), residual)
    np.testing.assert_allclose(_flat(sent), [0, 0, 0, 4, 5, 6])
    np.testing.assert_allclose(residual, [1, 2, 3] + [0] * 11)


# -- bits on the wire ---------------------------------------------------------------------------
def test_uplink_bits_match_a_hand_count():
    m, d = Message(1000, 32), 1000

    def up(p):
        return p.uplink(m, 10)

    assert up(c.quantize(8)) == Message(1000, 8, 0, 64)  # 8064 bits
    assert up(c.quantize(8)).bytes == 1008
    assert up(c.quantize(3, rotation="hadamard")) == Message(1024, 3, 0, 64)  # padded to 2^10
    assert up(c.quantize(3, rotation="hadamard")).bytes == (1024 * 3 + 64) // 8
    assert up(c.sign()).bytes == math.ceil((d + 32) / 8)  # 129
    assert up(c.top_k(0.01)) == Message(10, 32, 10, 0)  # ceil(log2 1000) = 10 index bits
    assert up(c.top_k(0.01)).bytes == math.ceil(10 * 42 / 8)  # 53
    assert up(c.random_k(k=10)).bytes == (10 * 32 + 32) // 8  # values + the seed: 44
    for entries, index_bits in ((1, 0), (2, 1), (1000, 10), (1024, 10), (1025, 11)):
        assert c.top_k(k=1).uplink(Message(entries, 32), 1).index_bits == index_bits
    # compositions: k quantized values + k indices + the range
    both = chain(c.top_k(0.01), c.quantize(4))
    assert both.uplink(m, 10) == Message(10, 4, 10, 64)
    assert both.uplink(m, 10).bytes == math.ceil((10 * (4 + 10) + 64) / 8)  # 26
    rotated = chain(c.quantize(8, rotation="hadamard"), c.top_k(0.5, error_feedback=False))
    assert rotated.uplink(m, 10) == Message(512, 8, 10, 64)
    signs = chain(c.random_k(0.1), c.sign(error_feedback=False))
    assert signs.uplink(m, 10) == Message(100, 1, 0, 64)  # 100 bits + seed + scale


@pytest.mark.parametrize("d", [1, 17, 29, 100])
def test_the_entries_sent_are_the_entries_counted(d):
    delta = {"w": jnp.asarray(np.random.default_rng(d).normal(size=d) + 3.0, jnp.float32)}
    for p in (c.top_k(0.25), c.random_k(0.25, error_feedback=False), c.top_k(k=1)):
        sent, _, _, _ = _send(p, delta, jax.random.key(0))
        assert int(np.count_nonzero(_flat(sent))) == p.uplink(Message(d, 32), 1).entries


# -- bad arguments ---------------------------------------------------------------------------
def test_bad_arguments_give_one_line_user_errors():
    bad = [lambda: c.quantize(0), lambda: c.quantize(17), lambda: c.quantize(8.0),
           lambda: c.quantize(True), lambda: c.quantize(8, rotation="dct"),
           lambda: c.top_k(), lambda: c.top_k(0.1, k=3), lambda: c.top_k(0.0),
           lambda: c.top_k(1.5), lambda: c.random_k(k=0), lambda: c.random_k(fraction=-0.1),
           lambda: c.sign(error_feedback=1)]
    for make in bad:
        with pytest.raises(fs.UserError) as err:
            make()
        assert "\n" not in str(err.value)
    delta = _delta()
    with pytest.raises(fs.UserError, match="exceeds the update's 29 entries"):
        _send(c.top_k(k=30, error_feedback=False), delta, jax.random.key(0))
    with pytest.raises(fs.UserError, match="before top_k"):
        _send(chain(c.top_k(k=3), c.quantize(8, rotation="hadamard")), delta, jax.random.key(0))
    with pytest.raises(fs.UserError, match="as the algorithm sends it"):
        _send(chain(c.quantize(8, rotation="hadamard"), c.top_k(k=3)), delta, jax.random.key(0))
    with pytest.raises(fs.UserError, match="one of top_k and random_k"):
        _send(chain(c.top_k(k=3), c.random_k(k=2, error_feedback=False)), delta, jax.random.key(0))


# -- through simulate -----------------------------------------------------------------------
def _digits_run(aggregator, rounds=8, evaluate=True, **kw):
    train, test = fs.data.load_digits()
    clients = fs.data.partition(train, train["y"], "dirichlet", 12, seed=0, alpha=1.0)
    model = fs.models.get_model("logistic_regression", (8, 8, 1), 10)  # 650 entries
    alg = fs.algorithms.fedavg(optax.sgd(0.3), batch_size=20)
    return fs.simulate(model, alg, clients, rounds=rounds, clients_per_round=6, seed=1,
                       eval_data=test if evaluate else None, eval_every=rounds, progress=False,
                       aggregator=aggregator, **kw)


@pytest.mark.slow  # three runs, each compiled (~7 s apiece on a 2-core CPU)
def test_8_bit_quantized_fedavg_stays_close_to_uncompressed_and_counts_its_bytes():
    plain = _digits_run(None)
    quantized = _digits_run(chain(c.quantize(8)))
    rotated = _digits_run(chain(c.quantize(8, rotation="hadamard")))
    ref = _flat(plain.params)
    for run in (quantized, rotated):
        # 8 bits: each coordinate's error is at most a level (range / 255) per client
        assert np.linalg.norm(_flat(run.params) - ref) <= 0.02 * np.linalg.norm(ref)
        assert abs(run.history[-1]["test_accuracy"] - plain.history[-1]["test_accuracy"]) <= 0.02
    # bytes per client: 650 values of 8 bits + 64 bits of range; rotated: 1024 values
    assert quantized.history[0]["uplink_bytes_per_client"] == (650 * 8 + 64) / 8
    assert rotated.history[0]["uplink_bytes_per_client"] == (1024 * 8 + 64) / 8
    assert plain.history[0]["uplink_bytes_per_client"] == 650 * 4
    assert quantized.history[0]["uplink_bytes"] == 6 * (650 * 8 + 64) / 8


def test_a_compressed_run_counts_its_bytes_and_keeps_its_residuals():
    run = _digits_run(chain(c.top_k(0.1), c.quantize(8)), rounds=4, evaluate=False)
    for h in run.history:
        # k = 65 of 650 values at 8 bits, ceil(log2 650) = 10-bit indices, 64 bits of range
        assert h["uplink_bytes_per_client"] == math.ceil((65 * (8 + 10) + 64) / 8)
        assert h["uplink_bytes"] == 6 * h["uplink_bytes_per_client"]
        assert 0 < h["top_k_residual_norm"] < np.inf
    assert run.history[-1]["train_loss"] < run.history[0]["train_loss"]


@pytest.mark.slow  # two runs, each compiled
def test_error_feedback_states_on_device_and_on_the_host_give_the_same_run():
    aggregator = chain(c.top_k(0.1), c.quantize(8))
    # 4 rounds of 6 of the 12 clients: clients come back and send with their residuals
    runs = [_digits_run(aggregator, rounds=4, evaluate=False,
                        engine=fs.EngineOptions(client_states=where, rounds_per_call=2))
            for where in ("device", "host")]
    np.testing.assert_array_equal(_flat(runs[0].params), _flat(runs[1].params))
    for a, b in zip(*(r.history for r in runs)):
        assert a["train_loss"] == b["train_loss"]
        assert a["top_k_residual_norm"] == b["top_k_residual_norm"] > 0
        # k = 65 of 650 values at 8 bits, 10-bit indices, 64 bits of range
        assert a["uplink_bytes_per_client"] == math.ceil((65 * (8 + 10) + 64) / 8)
