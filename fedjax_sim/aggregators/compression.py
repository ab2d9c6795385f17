"""Compression of what clients send up (client -> server), as aggregator parts.

Each part encodes a client's update inside the vmap, as the client would before sending
it, and says what that costs on the wire (`uplink`: bits per value, index bits, side
information); the server decodes once, on the round's sum. Every part works on the update
flattened into one float32 vector x in R^d (its leaves in `jax.tree_util` order).

`quantize(bits)`: stochastic uniform k-bit quantization (Suresh et al. 2017, "Distributed
Mean Estimation with Limited Communication", ICML). With lo = min_j x_j, hi = max_j x_j,
s = (hi - lo) / (2^k - 1), the levels are B_r = lo + r s (r = 0 .. 2^k - 1), and an entry
in [B_r, B_r+1] is rounded up to B_r+1 with probability p = (x_j - B_r) / s, else down, so

    E[Q(x)] = x,   Var Q(x)_j = s^2 p (1 - p) <= s^2 / 4,
    E||Q(x) - x||^2 <= d (hi - lo)^2 / (4 (2^k - 1)^2).

Sends d values of k bits, plus lo and hi as float32 (64 bits). One (lo, hi) per client for
the whole update, as in the paper: per-leaf ranges would cost 64 bits a leaf and serve
only the unrotated case (after a rotation every coordinate has the same spread).

`quantize(bits, rotation="hadamard")`: the same after a random rotation (the paper's
pi_srk). x is padded with zeros to d' (the next power of two) and rotated,
R x = H D x / sqrt(d'), where H is the d' x d' Walsh-Hadamard matrix (entries +-1,
H H^T = d' I) and D a diagonal of random signs; R is orthogonal, so norms are kept, and
its coordinates spread evenly: hi - lo shrinks from up to 2 ||x|| to O(||x|| sqrt(log d' / d')),
and the error to O(log d' / (2^k - 1)^2) ||x||^2 (the paper's Theorem 3). H x takes
log2 d' butterfly passes of d' additions (`fwht`), O(d' log d'), no d' x d' matrix. D
comes from a seed that is public per round (the part's state, fresh every round), so all
clients of a round share it and no bits are sent for it; the server inverts R once on the
round's sum, sum_i w_i R^-1 Q(R x_i) = R^-1 sum_i w_i Q(R x_i) with R^-1 = D H / sqrt(d').
Sends d' values of k bits plus 64 bits.

`sign()`: scaled sign (EF-signSGD, Karimireddy et al. 2019, "Error Feedback Fixes SignSGD
and other Gradient Compression Schemes", ICML): C(x) = (||x||_1 / d) sign(x), sign(0) = +1
(one bit per entry). Sends d one-bit values and the scale as float32 (32 bits).

`top_k(fraction | k)`: the k entries of largest magnitude (Stich et al. 2018, "Sparsified
SGD with Memory", NeurIPS). Sends k values and k indices of ceil(log2 d) bits each.

`random_k(fraction | k)`: k entries chosen uniformly at random. The client draws a 32-bit
seed and the indices from it (`random_k_indices`), and sends the seed instead of the
indices: k values plus 32 bits. Without error feedback the values are scaled by d / k,
which makes it unbiased, E[C(x)] = x; with error feedback they are sent as they are.

Error feedback (`error_feedback=True`, the default of `sign`, `top_k` and `random_k`;
Stich et al. 2018, Karimireddy et al. 2019): each client keeps a residual e (its per-client
state, `client_init`; zero at first, a float32 vector as long as the model) and in every
round it takes part sends C(x + e) and keeps e <- x + e - C(x + e), what it meant to send
minus what it sent. Nothing is lost, only delayed: after T rounds,
sum_t C(x_t + e_t) + e_T = sum_t x_t. With it, biased compressors (top-k, sign) converge at
uncompressed SGD's asymptotic rate (Karimireddy et al. 2019). Each such part reports
`<name>_residual_norm` (the mean ||e|| over the round's clients).

Composing parts (`chain`), client transforms run in order and the bytes compose
(`uplink`): `chain(top_k(0.01), quantize(8))` sends k 8-bit values, k indices and 64 bits.
- A sparsifier marks its output `Sparse` (dense, zero where nothing is sent); `quantize`
  or `sign` after it encode only the sent entries (their range and scale are taken over
  them; an entry that is exactly zero is not sent). One sparsifier per chain.
- `quantize(rotation=...)` turns the update into one rotated vector of d' entries
  (`Rotated`), which its finalize maps back to the update's structure; it must see the
  dense update (put it before a sparsifier), and a chain holds one rotation.
- An error-feedback part must see the update as the algorithm sends it: put it before a
  rotation, and do not put it after a sparsifier.
The residual of an error-feedback part is what that part meant to send minus what it
passed on: a quantizer after it adds its own (unbiased) error on top. The residuals take
one float32 row per client of the population (C x d); for large populations keep them on
the host (`EngineOptions(client_states='host')`).

With client-level differential privacy, clip what is sent: `chain(quantize(8), clip(C),
gaussian(z, ...))`. Compressing after clipping can raise an update's norm above C (a
quantized or sign-compressed vector can be longer than its input), and the noise would
no longer match the sensitivity. Clipping a compressed update only rescales it, which the
message of the same size carries (its range, scale or values scaled).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sim.engine.contracts import AggregatorPart, Message
from fedjax_sim.engine.round import sample_cohort, tree_entries
from fedjax_sim.errors import UserError

PyTree = Any
FLOAT_BITS = 32  # a float32 scale, min or max
SEED_BITS = 32  # random_k's seed
ROTATIONS = (None, "hadamard")


# -- what a client transform hands on ----------------------------------------------------
@jax.tree_util.register_pytree_node_class
class Sparse:
    """An update of which only some entries are sent: stored dense (zero where nothing is
    sent), so the engine's weighted sum adds it like any update. Decoders unwrap it."""

    def __init__(self, values: PyTree):
        self.values = values

    def tree_flatten(self):
        return (self.values,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        del aux
        return cls(children[0])


@jax.tree_util.register_pytree_node_class
class Rotated:
    """An update as one rotated, zero-padded float32 vector [d']. `layout` (static: the
    update's tree structure and leaf shapes) maps it back to the update's structure."""

    def __init__(self, vector: jax.Array, layout: tuple):
        self.vector, self.layout = vector, layout

    def tree_flatten(self):
        return (self.vector,), self.layout

    @classmethod
    def tree_unflatten(cls, layout, children):
        return cls(children[0], layout)


def dense(tree: PyTree) -> PyTree:
    """`tree` without its `Sparse` marker (what the server adds up is dense anyway)."""
    return tree.values if isinstance(tree, Sparse) else tree


# -- flat vectors -------------------------------------------------------------------------
def flatten(tree: PyTree) -> jax.Array:
    """Every leaf of `tree` raveled and concatenated into one float32 vector."""
    return jnp.concatenate([jnp.ravel(x).astype(jnp.float32)
                            for x in jax.tree_util.tree_leaves(tree)])


def _layout(tree: PyTree) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple(tuple(jnp.shape(x)) for x in leaves)


def unflatten(vector: jax.Array, layout: tuple) -> PyTree:
    """The inverse of `flatten` for a tree of `layout` (leaves of the vector's dtype)."""
    treedef, shapes = layout
    leaves, start = [], 0
    for shape in shapes:
        size = math.prod(shape)
        leaves.append(vector[start:start + size].reshape(shape))
        start += size
    return treedef.unflatten(leaves)


def layout_entries(layout: tuple) -> int:
    """How many values a tree of `layout` holds (what `unflatten` reads)."""
    return sum(math.prod(shape) for shape in layout[1])


# -- quantization ---------------------------------------------------------------------------
def stochastic_quantize(x: jax.Array, bits: int, rng: jax.Array,
                        mask: jax.Array | None = None) -> jax.Array:
    """Q(x): x [n] rounded at random to one of 2^bits levels evenly spread over
    [min x, max x], up with probability (x_j - B_r) / s, so E[Q(x)] = x (module doc).

    `mask` [n] bool: only those entries are sent (the range is theirs; the others stay 0).
    """
    levels = 2 ** bits - 1
    if mask is None:
        lo, hi = jnp.min(x), jnp.max(x)
    else:
        some = jnp.any(mask)
        lo = jnp.where(some, jnp.min(jnp.where(mask, x, jnp.inf)), 0.0)
        hi = jnp.where(some, jnp.max(jnp.where(mask, x, -jnp.inf)), 0.0)
    step = (hi - lo) / levels
    # A constant vector (step 0) is sent exactly: every entry is lo.
    t = (x - lo) / jnp.where(step > 0, step, 1.0)
    low = jnp.floor(t)
    up = jax.random.uniform(rng, x.shape, jnp.float32) < (t - low)
    out = lo + jnp.clip(low + up, 0, levels) * step
    return out if mask is None else jnp.where(mask, out, 0.0)


def fwht(x: jax.Array) -> jax.Array:
    """H x along the last axis (length n, a power of two), H the Sylvester-ordered
    Walsh-Hadamard matrix (scipy.linalg.hadamard(n)): log2 n butterfly passes,
    (a, b) -> (a + b, a - b) over pairs h apart for h = 1, 2, 4, ..., n/2."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    batch, h = x.shape[:-1], 1
    while h < n:
        pairs = x.reshape(*batch, n // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = jnp.stack([a + b, a - b], axis=-2).reshape(*batch, n)
        h *= 2
    return x


def padded_size(d: int) -> int:
    """d', the smallest power of two >= d."""
    return 1 << max(d - 1, 0).bit_length()


def _signs(key: jax.Array, n: int) -> jax.Array:
    return jax.random.rademacher(key, (n,), jnp.float32)


def rotate(x: jax.Array, key: jax.Array) -> jax.Array:
    """R x = H D x / sqrt(d') for x [..., d] padded with zeros to d' = padded_size(d);
    D = diag of random signs drawn from `key`."""
    d = x.shape[-1]
    n = padded_size(d)
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - d)])
    return fwht(x * _signs(key, n)) / math.sqrt(n)


def unrotate(y: jax.Array, key: jax.Array, d: int) -> jax.Array:
    """R^-1 y = D H y / sqrt(d'), cut to the first d entries (the inverse of `rotate`)."""
    n = y.shape[-1]
    return (fwht(y) * (_signs(key, n) / math.sqrt(n)))[..., :d]


class RotationState(NamedTuple):
    key: jax.Array  # uint32 key data of this round's rotation (public: no bits sent)


def _key_data(key: jax.Array) -> jax.Array:
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def check_quantizer(name: str, bits, rotation, seed, example: str) -> None:
    """One-line errors for a quantizer's arguments (`quantize`, the algorithms'
    `compressed_broadcast`): bits in 1..16, rotation None or 'hadamard', an integer seed."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise UserError(f"{name} bits must be an integer from 1 to 16, got {bits!r}; "
                        f"e.g. {example}")
    if rotation not in ROTATIONS:
        raise UserError(f"{name} rotation must be None or 'hadamard', got {rotation!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"{name} seed must be an integer, got {seed!r}")


def quantize(bits: int, *, rotation: str | None = None, seed: int = 0) -> AggregatorPart:
    """Stochastic uniform `bits`-bit quantization of each client's update, unbiased
    (module doc); `rotation="hadamard"` rotates it first (randomized Hadamard, shared by
    the round's clients and undone once on the sum). `seed` draws round 0's rotation;
    later rounds' come from the run's aggregator keys.

    Sends (d or d') x bits + 64 bits (the range, two float32)."""
    from fedjax_sim.aggregators import part

    check_quantizer("quantize", bits, rotation, seed, "quantize(8)")

    def init(params):
        del params
        return RotationState(jax.random.key_data(jax.random.key(seed))) if rotation else ()

    def client(delta, state, rng):
        vector = flatten(delta)
        if rotation is None:
            mask = (vector != 0) if isinstance(delta, Sparse) else None
            return unflatten(stochastic_quantize(vector, bits, rng, mask), _layout(delta)), {}
        if isinstance(delta, (Sparse, Rotated)):
            raise UserError("quantize(rotation='hadamard') must see the dense update: put it "
                            "before top_k/random_k, and use one rotation per chain")
        rotated = rotate(vector, jax.random.wrap_key_data(state.key))
        return Rotated(stochastic_quantize(rotated, bits, rng), _layout(delta)), {}

    def finalize(total, denominator, reports, state, rng):
        del reports
        total = dense(total)
        if rotation is None:
            return total, denominator, state, {}
        if not isinstance(total, Rotated):
            raise UserError("quantize(rotation='hadamard') found no rotated sum to undo: a "
                            "part between it and the sum changed the update's structure")
        layout = total.layout
        d = layout_entries(layout)
        vector = unrotate(total.vector, jax.random.wrap_key_data(state.key), d)
        # the next round's rotation: fresh, public, from the round's aggregator key
        next_key = _key_data(jax.random.fold_in(rng, 1))
        return unflatten(vector, layout), denominator, RotationState(next_key), {}

    def uplink(message, cohort_slots):
        del cohort_slots
        entries = padded_size(message.entries) if rotation else message.entries
        return Message(entries, bits, message.index_bits, message.extra_bits + 2 * FLOAT_BITS)

    return part(init=init, client=client, finalize=finalize, uplink=uplink)


# -- sign and sparsification, with error feedback ------------------------------------------
def scaled_sign(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """(||x||_1 / n) sign(x) with sign(0) = +1, n the entries sent (`mask`, or all of x)."""
    signs = jnp.where(x >= 0, 1.0, -1.0)
    if mask is None:
        return jnp.sum(jnp.abs(x)) / x.size * signs
    count = jnp.sum(mask.astype(jnp.float32))
    scale = jnp.sum(jnp.where(mask, jnp.abs(x), 0.0)) / jnp.maximum(count, 1.0)
    return jnp.where(mask, scale * signs, 0.0)


def top_k_vector(x: jax.Array, k: int) -> jax.Array:
    """x with all but its k entries of largest magnitude set to zero."""
    _, idx = jax.lax.top_k(jnp.abs(x), k)
    return jnp.zeros_like(x).at[idx].set(x[idx])


def random_k_indices(seed: jax.Array, d: int, k: int) -> jax.Array:
    """The k distinct indices in [0, d) that a 32-bit `seed` names, every k-subset equally
    likely: what the server regenerates from the seed a client sends.

    Drawn like a cohort (`engine.round.sample_cohort`, O(k log k) for k <= d / 2); for
    k > d / 2, the d - k indices left out are drawn instead. For d = 10^6, k = 10^4 this
    takes 6 ms a client on a 2-core x86-64 CPU (XLA:CPU, jax 0.10.2); `random.choice`
    without replacement, which permutes all d, took 1.4 s."""
    key = jax.random.key(seed.astype(jnp.uint32))
    if k == d:
        return jnp.arange(d, dtype=jnp.int32)
    if 2 * k <= d:
        return sample_cohort(key, d, k)
    kept = jnp.ones(d, bool).at[sample_cohort(key, d, d - k)].set(False)
    return jnp.nonzero(kept, size=k)[0].astype(jnp.int32)


def _count(fraction, k, d: int, name: str) -> int:
    if k is not None:
        if k > d:
            raise UserError(f"{name}(k={k}) exceeds the update's {d} entries; use a smaller k "
                            f"or a fraction")
        return k
    return max(1, min(d, math.ceil(round(fraction * d, 6))))


def _check_count(fraction, k, name: str) -> None:
    if (fraction is None) == (k is None):
        raise UserError(f"{name} needs exactly one of fraction= or k=, e.g. {name}(fraction=0.01)")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise UserError(f"{name} k must be an integer >= 1, got {k!r}")
    if fraction is not None and (isinstance(fraction, bool)
                                 or not isinstance(fraction, (int, float))
                                 or not 0 < fraction <= 1):
        raise UserError(f"{name} fraction must be in (0, 1], got {fraction!r}; e.g. 0.01")


def _compressor(name: str, encode: Callable, error_feedback: bool, sparsifies: bool,
                uplink: Callable) -> AggregatorPart:
    """A part from `encode(vector, rng, mask) -> what is sent` (a dense vector, zero where
    nothing is sent), with the client's residual kept as its state under error feedback."""
    from fedjax_sim.aggregators import part

    def wrap(sent, delta):
        out = unflatten(sent, _layout(delta))
        return Sparse(out) if sparsifies else out

    def check_input(delta):
        if sparsifies and isinstance(delta, Sparse):
            raise UserError(f"{name} after another sparsifier: a chain holds one of top_k "
                            f"and random_k; keep one")

    def client(delta, state, rng):
        del state
        check_input(delta)
        vector = flatten(delta)
        mask = (vector != 0) if isinstance(delta, Sparse) else None
        return wrap(encode(vector, rng, mask), delta), {}

    def feedback_client(delta, state, rng, residual):
        del state
        check_input(delta)
        if isinstance(delta, (Sparse, Rotated)):
            raise UserError(f"{name}(error_feedback=True) must see the update as the "
                            f"algorithm sends it: put it before quantize(rotation=...), "
                            f"top_k and random_k in the chain")
        vector = flatten(delta)
        d = vector.size
        if d > residual.size:
            raise UserError(f"{name}: the update has {d} entries, more than the model's "
                            f"{residual.size}; use error_feedback=False")
        carried = vector + residual[:d]
        sent = encode(carried, rng, None)
        left = carried - sent
        new_residual = left if d == residual.size else residual.at[:d].set(left)
        return wrap(sent, delta), {f"{name}_residual_norm": jnp.linalg.norm(left)}, new_residual

    def client_init(params):
        return jnp.zeros((tree_entries(params),), jnp.float32)

    def finalize(total, denominator, reports, state, rng):
        del reports, rng
        return dense(total), denominator, state, {}

    if error_feedback:
        return part(client=feedback_client, client_init=client_init, finalize=finalize,
                    uplink=uplink)
    return part(client=client, finalize=finalize, uplink=uplink)


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{name} error_feedback must be True or False, got {value!r}")
    return value


def sign(*, error_feedback: bool = True) -> AggregatorPart:
    """Scaled sign, (||x||_1 / d) sign(x) (EF-signSGD), with error feedback by default.

    Sends one bit per entry and the scale (32 bits)."""
    _check_flag("sign", error_feedback)

    def encode(vector, rng, mask):
        del rng
        return scaled_sign(vector, mask)

    def uplink(message, cohort_slots):
        del cohort_slots
        return Message(message.entries, 1, message.index_bits, message.extra_bits + FLOAT_BITS)

    return _compressor("sign", encode, error_feedback, False, uplink)


def top_k(fraction: float | None = None, k: int | None = None, *,
          error_feedback: bool = True) -> AggregatorPart:
    """The k = ceil(fraction d) (or the given k) entries of largest magnitude, with error
    feedback by default. Sends k values and k indices of ceil(log2 d) bits."""
    _check_count(fraction, k, "top_k")
    _check_flag("top_k", error_feedback)

    def encode(vector, rng, mask):
        del rng, mask
        return top_k_vector(vector, _count(fraction, k, vector.size, "top_k"))

    def uplink(message, cohort_slots):
        del cohort_slots
        d = message.entries
        return Message(_count(fraction, k, d, "top_k"), message.value_bits,
                       (d - 1).bit_length(), message.extra_bits)

    return _compressor("top_k", encode, error_feedback, True, uplink)


def random_k(fraction: float | None = None, k: int | None = None, *,
             error_feedback: bool = True) -> AggregatorPart:
    """k = ceil(fraction d) (or the given k) entries chosen uniformly from a 32-bit seed
    the client sends; without error feedback scaled by d / k (unbiased). Sends k values
    and 32 bits."""
    _check_count(fraction, k, "random_k")
    _check_flag("random_k", error_feedback)

    def encode(vector, rng, mask):
        del mask
        d = vector.size
        count = _count(fraction, k, d, "random_k")
        idx = random_k_indices(jax.random.bits(rng, (), jnp.uint32), d, count)
        scale = 1.0 if error_feedback else d / count
        return jnp.zeros_like(vector).at[idx].set(vector[idx] * scale)

    def uplink(message, cohort_slots):
        del cohort_slots
        return Message(_count(fraction, k, message.entries, "random_k"), message.value_bits,
                       message.index_bits, message.extra_bits + SEED_BITS)

    return _compressor("random_k", encode, error_feedback, True, uplink)
