"""Secure aggregation (Bonawitz et al. 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning"), simulated inside the round's jit.

The server learns the sum of the surviving clients' updates and nothing about any single
one; this module runs the protocol's arithmetic for real (integers mod 2^b, pairwise and
self masks from a PRG, Shamir secret sharing, a key agreement), so that its effects on
training are the deployed protocol's: quantization, the modulus, dropouts, failed rounds.

    secure_aggregation(c, cohort_size=m) = chain(integer_encode(c, s), secure_sum(b))

Per round, for the n live clients of the cohort (m slots), all in uint32 arithmetic:

1. Encode (`integer_encode`, per client, inside the vmap): clip the update to L2 norm c,
   scale by s, round stochastically to integers (floor(v) + Bernoulli(v - floor(v)):
   unbiased, variance <= 1/4 per coordinate). The default s is the largest for which the
   sum of m clients cannot leave the signed b-bit range: m·W·(⌈s·c⌉) <= 2^(b-1) - 1.
2. Keys (`round_secrets`): client u draws a self-mask seed b_u and a key-agreement secret
   sk_u (each 4 elements of the field Z_p, p = 65521, about 64 bits) and publishes
   pk_u = g^sk_u mod p per element (Diffie-Hellman in Z_p^*, g = 17). Clients u and v
   agree on s_uv = pk_v^sk_u = pk_u^sk_v, the seed of their pairwise mask.
3. Sharing: u splits b_u and sk_u into t-of-n Shamir shares (polynomials of degree t-1
   over Z_p with the secret as constant term, evaluated at x = slot + 1), one for every
   other client. p < 2^16, so every product of two field elements fits in uint32.
4. Masking (`masked_input`): u sends, with its integer weight w_u appended to its vector,
       y_u = w_u·x_u + PRG(b_u) + Σ_{v>u} PRG(s_uv) - Σ_{v<u} PRG(s_uv)   (mod 2^b)
   PRG(seed) = jax.random.bits from a threefry key made of the seed's field elements
   (with the mask's domain mixed in: self or pair, and the pair's slots).
5. Dropouts: each live client independently drops after masking with probability
   `dropout_rate`; its y_u never arrives. With fewer than t survivors the round fails
   (metric ROUND_FAILED: the round has no effect and the host warns).
6. Unmasking (`reconstruct`, `server_rows`): the first t survivors send their shares of
   each survivor's b_u and of each dropped client's sk_u (never both of one client); the
   server interpolates them at 0 (Lagrange, inverses by Fermat: a^(p-2)), expands
   PRG(b_u) of the survivors, recomputes the dropped clients' s_uv = pk_v^sk_u with each
   survivor v, and subtracts all of them from Σ y_u: what is left is Σ_{survivors} w_u·x_u
   mod 2^b exactly. The masks cancel only if every reconstruction is right. (The
   simulation expands the survivors' masks and those the server removes in one loop,
   `expand_masks`, so that one PRG call site is compiled.)
7. Decode: back to signed integers, divided by s; the denominator is the survivors'
   summed weights (securely summed as the vector's last entry).

Weights: by default (`max_weight=1`) every surviving client counts once, the uniform
mean, which is what DP-FedAvg and distributed DP use: the sum of m clipped updates is then
bounded by m·c whatever the clients' data. `max_weight=W` gives the example-weighted mean
with integer weights capped at W (min(n_u, W), as McMahan et al. 2018 cap them): clients
send w_u·x_u and w_u, at the cost of log2(W) bits of the modulus. Uncapped weights would
make the sum's bound depend on the clients' data sizes, unknown when the modulus is chosen.

Overflow: `on_overflow='error'` (the default) requires the worst case to fit and raises a
UserError naming the fix when the round is compiled; 'fail' and 'wrap' accept a larger
scale: a round whose sum actually left the b-bit range then fails ('fail') or is applied
wrapped as the deployed protocol would apply it ('wrap'). Either way the simulation
computes the true sum exactly (in two 16-bit halves) and logs
`secagg_overflow_coordinates`; a sum never wraps silently.

Threat model. Protects each client's update from an honest-but-curious server, even one
colluding with fewer than t clients: it sees only masked vectors, uniform mod 2^b, and
learns only the sum (of the clients outside the coalition). It does NOT protect the sum
itself (add distributed DP noise for that), does not stop malicious clients from
poisoning the sum (it cannot even see their updates), and the simulation's server is
honest about dropouts (the paper's consistency checks and signatures against a lying
server are not simulated). The arithmetic is the protocol's, the cryptographic strength
is not: secrets are 4 elements of a 16-bit field and the key agreement runs in a 16-bit
group.

Costs (module constants SECRET_BITS = 64 bits per public key or share): a surviving client
sends its public key, 2(n-1) shares (b and sk for every other client), its masked vector
of d + 1 entries of b bits, and n - 1 shares when unmasking: (d+1)·b + 64·(3n - 2) bits
(`uplink`; real deployments use 256-bit keys and encrypted shares, a few times more).
Client work: n PRG expansions of d + 1 words, n - 1 key agreements. Server work:
|S|·(1 + |D|) PRG expansions and |S|·|D| key agreements (S survivors, D dropped), n
reconstructions of 4 field elements from t shares; all are logged per round. The
simulation itself expands (|S| + |D| + 1)·m PRG vectors of d + 1 words a round (O(m²·d))
and makes O(m·t²) field operations: cohorts of tens to a few hundred clients.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.aggregators.compression import _layout, flatten, unflatten
from fedjax_sim.aggregators.dp import _check_positive, _scale_to_norm, global_norm
from fedjax_sim.engine.contracts import ROUND_FAILED, Cohort, Message
from fedjax_sim.errors import UserError

PyTree = Any

FIELD_PRIME = 65521  # the largest prime below 2^16: a product of two residues fits in uint32
GENERATOR = 17       # generates Z_p^* (17^((p-1)/q) != 1 for every prime q dividing p - 1)
LIMBS = 4            # field elements per secret (a seed or a key): about 64 bits
SECRET_BITS = 16 * LIMBS  # a public key or one share on the wire
_SELF, _PAIR = 1, 2  # domain tags of self-mask and pairwise-mask seeds
_CHUNK_WORDS = 1 << 22  # PRG words expanded at once (16 MiB) when summing masks
_MAX_SLOTS = 1 << 15    # cohort slots the exact overflow check can sum in int32


# -- the field Z_p and the key agreement ------------------------------------------------
def _mulmod(a: jax.Array, b: jax.Array) -> jax.Array:
    return (a * b) % jnp.uint32(FIELD_PRIME)  # a, b < p < 2^16: exact in uint32


def powmod(base: jax.Array, exponent: jax.Array) -> jax.Array:
    """base^exponent mod p, elementwise, for exponents below 2^16 (square and multiply)."""
    base = jnp.asarray(base, jnp.uint32)
    exponent = jnp.asarray(exponent, jnp.uint32)
    result = jnp.ones(jnp.broadcast_shapes(base.shape, exponent.shape), jnp.uint32)
    for bit in range(15, -1, -1):
        result = _mulmod(result, result)
        result = jnp.where((exponent >> bit) & 1, _mulmod(result, base), result)
    return result


def inverse(a: jax.Array) -> jax.Array:
    """a^(-1) mod p by Fermat's little theorem (a^(p-2)); 0 maps to 0."""
    return powmod(a, FIELD_PRIME - 2)


def public_key(secret_key: jax.Array) -> jax.Array:
    """g^sk mod p per element: what a client publishes."""
    return powmod(GENERATOR, secret_key)


def agree(secret_key: jax.Array, other_public: jax.Array) -> jax.Array:
    """The shared secret pk_v^sk_u = g^(sk_u·sk_v) mod p, the same from either side."""
    return powmod(other_public, secret_key)


# -- Shamir secret sharing over Z_p -----------------------------------------------------
def field_elements(words: jax.Array) -> jax.Array:
    """Uniform elements of Z_p from pairs of uniform uint32 words [..., 2] (hi·2^32 + lo
    mod p: a bias below 2^-48)."""
    p = jnp.uint32(FIELD_PRIME)
    hi, lo = words[..., 0] % p, words[..., 1] % p
    return (_mulmod(hi, jnp.uint32((1 << 32) % FIELD_PRIME)) + lo) % p


def shamir_polynomial(randomness: jax.Array, secret: jax.Array, threshold) -> jax.Array:
    """Coefficients [..., T] of a random polynomial of degree threshold - 1 with `secret`
    (elements of Z_p) as constant term; `randomness` [..., T - 1] holds uniform elements of
    Z_p, of which those from `threshold` on are zeroed, so `threshold` may be traced (<= T)."""
    degree = jnp.arange(1, randomness.shape[-1] + 1)
    rand = jnp.where(degree < threshold, randomness.astype(jnp.uint32), jnp.uint32(0))
    return jnp.concatenate([jnp.asarray(secret, jnp.uint32)[..., None], rand], axis=-1)


def shamir_evaluate(coefficients: jax.Array, xs: jax.Array) -> jax.Array:
    """Shares [..., h]: every polynomial of `coefficients` [..., T] at the points xs [h]
    (Horner's rule mod p)."""
    xs = jnp.asarray(xs, jnp.uint32)
    acc = jnp.zeros(coefficients.shape[:-1] + xs.shape, jnp.uint32)

    def step(acc, a):
        return (_mulmod(acc, xs) + a[..., None]) % jnp.uint32(FIELD_PRIME), None

    acc, _ = jax.lax.scan(step, acc, jnp.moveaxis(coefficients, -1, 0)[::-1])
    return acc


def _product_mod(a: jax.Array) -> jax.Array:
    """Π over the last axis mod p."""
    return jax.lax.reduce(a, jnp.uint32(1), _mulmod, (a.ndim - 1,))


def lagrange_at_zero(xs: jax.Array, use: jax.Array) -> jax.Array:
    """λ_j = Π_{k≠j} x_k / (x_k - x_j) mod p over the points with use [T] set (0 elsewhere):
    f(0) = Σ_j λ_j f(x_j) for every polynomial f of degree below the number used."""
    xs = jnp.asarray(xs, jnp.uint32)
    p = jnp.uint32(FIELD_PRIME)
    others = use[None, :] & ~jnp.eye(xs.shape[0], dtype=bool)
    numerator = _product_mod(jnp.where(others, xs[None, :], jnp.uint32(1)))
    denominator = _product_mod(jnp.where(others, (xs[None, :] + p - xs[:, None]) % p,
                                         jnp.uint32(1)))
    return jnp.where(use, _mulmod(numerator, inverse(denominator)), jnp.uint32(0))


def shamir_reconstruct(xs: jax.Array, shares: jax.Array, use: jax.Array) -> jax.Array:
    """The constant terms [...] from shares [..., T] at xs [T], using the points with `use`."""
    lam = lagrange_at_zero(xs, use)
    terms = _mulmod(shares, lam)  # each < p, so T of them sum below 2^32
    return jnp.sum(terms, axis=-1, dtype=jnp.uint32) % jnp.uint32(FIELD_PRIME)


# -- masks --------------------------------------------------------------------------------
def _modulus_mask(modulus_bits: int) -> jax.Array:
    return jnp.uint32((1 << modulus_bits) - 1)


def _seed_key(elements: jax.Array, tag, u, v) -> jax.Array:
    """The PRG key of a seed: its LIMBS 16-bit field elements packed into a threefry key's two
    words, offset by the mask's domain (tag and, for pairs, their public slots: this keeps
    different pairs' masks apart even where two toy 16-bit agreements collide). Mixing the
    domain in with integer arithmetic instead of `fold_in` saves a threefry per mask."""
    words = (elements[0::2] | (elements[1::2] << 16)).astype(jnp.uint32)
    domain = (jnp.asarray(tag, jnp.uint32) << 30) | (jnp.asarray(u, jnp.uint32) << 15) \
        | jnp.asarray(v, jnp.uint32)
    words = words ^ jnp.stack([domain * jnp.uint32(0x9E3779B9), domain])
    return jax.random.wrap_key_data(words, impl="threefry2x32")


def prg(key: jax.Array, size: int, modulus_bits: int) -> jax.Array:
    """`size` uniform words mod 2^modulus_bits expanded from a seed's key."""
    return jax.random.bits(key, (size,), jnp.uint32) & _modulus_mask(modulus_bits)


class RoundSecrets(NamedTuple):
    """What the round's clients generate and share (rows are cohort slots, [m, LIMBS]):
    self-mask seeds b_u, key-agreement secrets sk_u, public keys pk_u = g^sk_u, and the
    Shamir polynomials [m, 2, LIMBS, T] of (b_u, sk_u) whose values are the shares."""

    self_seed: jax.Array
    secret_key: jax.Array
    public_key: jax.Array
    polynomials: jax.Array


def round_secrets(key: jax.Array, slots: int, threshold, max_threshold: int) -> RoundSecrets:
    """Every slot's secrets, public key and sharing polynomials (degree threshold - 1): the
    protocol's AdvertiseKeys and ShareKeys rounds. One PRNG draw for all of them (on
    XLA:CPU every PRNG call site costs compile time); row u is client u's randomness."""
    shape = (slots, 2, LIMBS, max_threshold, 2)
    # drawn flat: a many-axis draw compiles several times slower on XLA:CPU
    words = jax.random.bits(key, (math.prod(shape),), jnp.uint32).reshape(shape)
    elements = field_elements(words)  # [m, 2, LIMBS, T]: (b_u, sk_u) and their coefficients
    seed = elements[:, 0, :, 0]
    secret = jnp.uint32(1) + elements[:, 1, :, 0] % jnp.uint32(FIELD_PRIME - 2)  # in [1, p-2]
    polynomials = shamir_polynomial(elements[..., 1:], jnp.stack([seed, secret], 1), threshold)
    return RoundSecrets(seed, secret, public_key(secret), polynomials)


_PLUS, _MINUS, _ZERO = np.uint32(1), np.uint32(0xFFFFFFFF), np.uint32(0)  # signs mod 2^32


class MaskRows(NamedTuple):
    """Mask sums to expand, one row r each: Σ_v signs[r, v]·PRG(seed(r, v)) mod 2^32, where
    seed(r, v) is slot v's self-mask seed where v is the row's own slot or `selves[r]` is
    set (the clients' own seeds, or the server's reconstructed ones where `server[r]`),
    and else the pair seed agree(secret[r], pk_v) of slots (slot[r], v)."""

    slot: jax.Array        # [R] int32
    secret: jax.Array      # [R, LIMBS] the key-agreement secret the row's owner uses
    server: jax.Array      # [R] bool: self seeds from the reconstructed table
    selves: jax.Array      # [R] bool: every v's self mask (the server's self-mask row)
    signs: jax.Array       # [R, m] uint32: 1, -1 (2^32 - 1) or 0
    active: jax.Array      # [R] bool: rows that are not skipped


def expand_masks(rows: MaskRows, self_seeds: jax.Array, recovered: jax.Array,
                 public_keys: jax.Array, size: int, modulus_bits: int) -> jax.Array:
    """Σ over the active rows of their mask sums (`MaskRows`), [size] uint32 mod 2^b: a scan
    over rows, a vmap over chunks of slots v (at most _CHUNK_WORDS PRG words at once). One
    PRG call site serves clients' and server's masks alike."""
    m = public_keys.shape[0]
    chunk = max(1, min(m, _CHUNK_WORDS // max(size, 1)))
    pad = -m % chunk
    ids = jnp.arange(m + pad).reshape(-1, chunk)

    def mask(row, v):
        u = row.slot
        own = row.selves | (v == u)
        seed = jnp.where(row.server, recovered[v], self_seeds[v])
        elements = jnp.where(own, seed, agree(row.secret, public_keys[v]))
        key = _seed_key(elements, jnp.where(own, _SELF, _PAIR),
                        jnp.where(own, v, jnp.minimum(u, v)), jnp.where(own, v, jnp.maximum(u, v)))
        return prg(key, size, modulus_bits)

    def block(row, v, s):
        return jnp.sum(jax.vmap(lambda i: mask(row, i))(v) * s[:, None], axis=0,
                       dtype=jnp.uint32)

    def one_row(row):
        if chunk == m:  # one block: no loop to compile
            return block(row, jnp.arange(m), row.signs)
        signs = jnp.pad(row.signs, (0, pad)).reshape(-1, chunk)
        return jax.lax.scan(lambda acc, vs: (acc + block(row, *vs), None),
                            jnp.zeros((size,), jnp.uint32), (ids, signs))[0]

    def step(acc, row):
        return acc + jax.lax.cond(row.active, one_row,
                                  lambda r: jnp.zeros((size,), jnp.uint32), row), None

    total, _ = jax.lax.scan(step, jnp.zeros((size,), jnp.uint32), rows)
    return total & _modulus_mask(modulus_bits)


def client_rows(secrets: RoundSecrets, live: jax.Array, sending: jax.Array) -> MaskRows:
    """Client u's masks: +PRG(b_u) + Σ_{v>u} PRG(s_uv) - Σ_{v<u} PRG(s_uv) over live v,
    for the clients that send (`sending`)."""
    m = live.shape[0]
    u, v = jnp.arange(m)[:, None], jnp.arange(m)[None, :]
    signs = jnp.where(u == v, _PLUS, jnp.where(live[None, :], jnp.where(v > u, _PLUS, _MINUS),
                                                _ZERO))
    none = jnp.zeros((m,), bool)
    return MaskRows(jnp.arange(m), secrets.secret_key, none, none, signs, sending)


def server_rows(recovered: jax.Array, survived: jax.Array, dropped: jax.Array) -> MaskRows:
    """What the server removes, from the reconstructed secrets: one row for every
    survivor's self mask, and a row per dropped client u for the masks each survivor v
    shares with it (y_v holds +PRG(s_uv) where u > v, -PRG(s_uv) where u < v)."""
    m = survived.shape[0]
    u, v = jnp.arange(m)[:, None], jnp.arange(m)[None, :]
    pairs = jnp.where(survived[None, :], jnp.where(v < u, _MINUS, _PLUS), _ZERO)
    selves = jnp.where(survived, _MINUS, _ZERO)[None, :]
    yes = jnp.ones((m + 1,), bool)
    return MaskRows(jnp.arange(m + 1) % m, jnp.concatenate([recovered, recovered[:1]]), yes,
                    jnp.arange(m + 1) == m, jnp.concatenate([pairs, selves]),
                    jnp.concatenate([dropped, jnp.any(survived)[None]]))


def masked_input(x: jax.Array, u, secrets: RoundSecrets, live: jax.Array,
                 modulus_bits: int) -> jax.Array:
    """Client u's masked vector y_u = x + PRG(b_u) + Σ_{v>u} PRG(s_uv) - Σ_{v<u} PRG(s_uv)
    mod 2^b over the other live slots v; x: [size] uint32, already mod 2^b."""
    rows = client_rows(secrets, live, jnp.arange(live.shape[0]) == u)
    masks = expand_masks(rows, secrets.self_seed, secrets.self_seed, secrets.public_key,
                         x.shape[0], modulus_bits)
    return (x + masks) & _modulus_mask(modulus_bits)


def reconstruct(secrets: RoundSecrets, survived: jax.Array, count) -> jax.Array:
    """[m, LIMBS]: each survivor's b_u and each dropped client's sk_u, interpolated from the
    shares the first `count` survivors hold (a survivor reveals a share of b_u or of sk_u,
    never both, for any client)."""
    max_threshold = secrets.polynomials.shape[-1]
    holders = jnp.nonzero(survived, size=max_threshold, fill_value=0)[0]
    slot = jnp.arange(max_threshold)
    use = (slot < count) & (slot < jnp.sum(survived.astype(jnp.int32)))
    xs = (holders + 1).astype(jnp.uint32)
    asked = jnp.where(survived[:, None, None], secrets.polynomials[:, 0],
                      secrets.polynomials[:, 1])
    return shamir_reconstruct(xs, shamir_evaluate(asked, xs), use)


def secure_sum_protocol(values: jax.Array, live: jax.Array, survived: jax.Array,
                        key: jax.Array, threshold, max_threshold: int, modulus_bits: int,
                        shares_used=None):
    """One round of the protocol on integer vectors values [m, size] (int32, encoded mod 2^b):
    (Σ_{survivors} values mod 2^b as uint32 [size], whether at least `threshold` survived).

    The survivors' masked vectors and the masks the server removes are expanded in one
    loop (`expand_masks` over client and server rows: one PRG call site to compile);
    the sum is exact only if the server's reconstructions are (`shares_used`, default
    `threshold`: how many shares it interpolates from)."""
    size = values.shape[1]
    encoded = jax.lax.bitcast_convert_type(values, jnp.uint32) & _modulus_mask(modulus_bits)
    secrets = round_secrets(key, values.shape[0], threshold, max_threshold)
    recovered = reconstruct(secrets, survived,
                            threshold if shares_used is None else shares_used)
    clients, server = client_rows(secrets, live, survived), server_rows(
        recovered, survived, live & ~survived)
    rows = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), clients, server)
    sent = jnp.sum(jnp.where(survived[:, None], encoded, jnp.uint32(0)), axis=0, dtype=jnp.uint32)
    masks = expand_masks(rows, secrets.self_seed, recovered, secrets.public_key, size,
                         modulus_bits)
    total = (sent + masks) & _modulus_mask(modulus_bits)
    return total, jnp.sum(survived.astype(jnp.int32)) >= threshold


# -- integers, overflow -------------------------------------------------------------------
def to_signed(u: jax.Array, modulus_bits: int) -> jax.Array:
    """uint32 residues mod 2^b as int32 in [-2^(b-1), 2^(b-1))."""
    if modulus_bits < 32:
        high = jnp.uint32(0xFFFFFFFF ^ ((1 << modulus_bits) - 1))
        u = jnp.where(u >= jnp.uint32(1 << (modulus_bits - 1)), u | high, u)
    return jax.lax.bitcast_convert_type(u, jnp.int32)


def wrapped_coordinates(values: jax.Array, rows: jax.Array, modulus_bits: int) -> jax.Array:
    """[size] bool: where the exact sum of values [m, size] (int32) over `rows` [m] leaves
    [-2^(b-1), 2^(b-1)). Exact without 64-bit integers: the sum is H·2^16 + L with H the sum
    of the high halves (arithmetic shift) and 0 <= L < 2^16 after carrying."""
    v = jnp.where(rows[:, None], values, 0)
    high = jnp.sum(v >> 16, axis=0)
    low = jnp.sum(v & 0xFFFF, axis=0)
    high, low = high + (low >> 16), low & 0xFFFF
    if modulus_bits > 16:
        limit = 1 << (modulus_bits - 17)
        return (high >= limit) | (high < -limit)
    half = 1 << (modulus_bits - 1)
    small = jnp.abs(high) < (1 << 14)
    exact = jnp.where(small, high, 0) * 65536 + low
    return ~small | (exact >= half) | (exact < -half)


# -- the aggregator parts -----------------------------------------------------------------
def value_bound(clip_norm: float, scale: float) -> int:
    """The largest |integer| `integer_encode(clip_norm, scale)` makes: ⌈s·c⌉ in float32."""
    return math.ceil(float(np.float32(scale) * np.float32(clip_norm)))


def stochastic_round(v: jax.Array, rng: jax.Array) -> jax.Array:
    """floor(v) + Bernoulli(v - floor(v)) per entry, as int32: unbiased, variance <= 1/4."""
    floor = jnp.floor(v)
    up = jax.random.uniform(rng, v.shape, jnp.float32) < v - floor
    return floor.astype(jnp.int32) + up.astype(jnp.int32)


def integer_encode(clip_norm: float, scale: float):
    """Clips each client's update to L2 norm `clip_norm` (c), scales it by `scale` (s) and
    rounds it stochastically to int32 leaves (floor(v) + Bernoulli(v - floor(v)): unbiased,
    variance <= 1/4 per coordinate, every |value| <= ⌈s·c⌉); the finalizer divides the
    sum by s. Reports `encode_clipped_fraction` and `encode_update_norm` per client, and the
    round's `encode_scale`. Parts between it and the sum (noise) see integer leaves."""
    from fedjax_sim.aggregators import part

    c = _check_positive("clip_norm", clip_norm)
    s = _check_positive("scale", scale)
    limit = np.float32(s) * np.float32(c)
    if limit > 2 ** 30:
        raise UserError(f"scale x clip_norm = {float(limit):g} leaves no room in int32: use "
                        f"scale <= {2 ** 30 / c:g}")

    def client(delta, state, rng):
        del state
        norm = global_norm(delta)
        v = jnp.clip(_scale_to_norm(flatten(delta), norm, jnp.float32(c)) * jnp.float32(s),
                     -limit, limit)
        return unflatten(stochastic_round(v, rng), _layout(delta)), {
            "encode_clipped_fraction": (norm > c).astype(jnp.float32),
            "encode_update_norm": norm}

    def finalize(total, denominator, reports, state, rng):
        del reports, rng
        scaled = jax.tree_util.tree_map(lambda t: t.astype(jnp.float32) / jnp.float32(s), total)
        return scaled, denominator, state, {"encode_scale": jnp.float32(s)}

    return part(client=client, finalize=finalize)


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low \
            or (high is not None and value > high):
        span = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise UserError(f"{name} must be an integer {span}, got {value!r}")
    return int(value)


def _threshold_rule(threshold):
    """rule(m) -> (t(n), T): the threshold for n live clients (traced) and its static
    maximum over cohorts of m slots. None: t = ⌊2n/3⌋ + 1 (more than two thirds); a
    fraction f in (0, 1]: t = ⌈f·n⌉; an integer k: t = k."""
    if threshold is None:
        return lambda m: (lambda n: (2 * n) // 3 + 1, (2 * m) // 3 + 1)
    if isinstance(threshold, float) and 0 < threshold <= 1:
        f = Fraction(threshold).limit_denominator(1000)
        return lambda m: (lambda n: jnp.maximum(1, -((-f.numerator * n) // f.denominator)),
                          max(1, -((-f.numerator * m) // f.denominator)))
    k = _check_int("threshold (a fraction in (0, 1] or a count of clients)", threshold, 1)

    def rule(m):
        if k > m:
            raise UserError(f"threshold={k} exceeds the round's {m} cohort slots: pass a "
                            f"threshold <= {m} or a fraction such as 0.67")
        return (lambda n: jnp.int32(k)), k

    return rule


def _check_worst_case(slots: int, max_weight: int, bound: int, modulus_bits: int, fix: str,
                      accept: str):
    worst = slots * max_weight * max(bound, 1)
    if worst > 2 ** (modulus_bits - 1) - 1:
        needed = worst.bit_length() + 1
        more = f"raise modulus_bits to {needed}, " if needed <= 32 else ""
        raise UserError(f"modulus_bits={modulus_bits} cannot hold the sum of {slots} clients "
                        f"sending integers up to {bound} (weight <= {max_weight}): worst case "
                        f"{worst} > 2^{modulus_bits - 1} - 1; {more}{fix}, or {accept}")


def _protocol_metrics(live, survived, enough, threshold, wrapped, capped, size, modulus_bits):
    """The round's counts and costs (module doc): scalars, float32."""
    f = lambda v: jnp.asarray(v, jnp.float32)
    n, s = f(jnp.sum(live)), f(jnp.sum(survived))
    d, done = n - s, f(enough)
    shares = SECRET_BITS * jnp.maximum(n - 1, 0.0)
    sent = n * (SECRET_BITS + 2 * shares) + s * (size * modulus_bits + done * shares)
    return {"secagg_survivors": s, "secagg_dropped": d, "secagg_threshold": f(threshold),
            "secagg_too_few_survivors": f((n > 0) & ~enough),
            "secagg_overflow_coordinates": f(jnp.sum(wrapped)),
            "secagg_capped_weights": f(jnp.sum(capped)),
            "secagg_uplink_bytes": sent / 8,
            "secagg_client_prg_expansions": n,
            "secagg_server_prg_expansions": done * (s + s * d),
            "secagg_server_key_agreements": done * s * d,
            "secagg_server_reconstructions": done * n}


def _check_rate(dropout_rate) -> float:
    if not (isinstance(dropout_rate, (int, float)) and not isinstance(dropout_rate, bool)
            and 0 <= dropout_rate < 1):
        raise UserError(f"dropout_rate must be a probability in [0, 1), got {dropout_rate!r}")
    return float(dropout_rate)


def secure_sum(modulus_bits: int = 32, *, dropout_rate: float = 0.0, threshold=None,
               max_weight: int = 1, value_bound: int | None = None, on_overflow: str = "fail"):
    """The reducing part that runs the protocol (module doc) on the stacked cohort's integer
    updates: masks, drops clients, sums mod 2^modulus_bits, reconstructs and unmasks.

    dropout_rate: each live client's chance to drop after masking.
    threshold: Shamir's t (None: ⌊2n/3⌋ + 1 of the n live clients; a fraction f: ⌈f·n⌉; an
      integer: t).
    max_weight: client u sums min(w_u, W)·x_u and min(w_u, W) (W = 1: the uniform mean).
    value_bound: the largest |integer| a client sends; given, the worst case must fit the
      modulus (a UserError when the round compiles).
    on_overflow: a round whose sum left the b-bit range 'fail's (no effect) or is applied
      'wrap'ped.
    Returns the sum as int32 leaves and the survivors' summed weights; logs the counts and
    costs (`secagg_*`) and ROUND_FAILED.
    """
    bits = _check_int("modulus_bits", modulus_bits, 2, 32)
    bound = None if value_bound is None else _check_int("value_bound", value_bound, 1)
    if on_overflow not in ("fail", "wrap"):
        raise UserError(f"on_overflow must be 'fail' or 'wrap', got {on_overflow!r}")
    return _secure_sum(bits, _check_rate(dropout_rate), _threshold_rule(threshold),
                       _check_int("max_weight", max_weight, 1), bound, on_overflow,
                       lambda m: "send smaller integers",
                       "pass value_bound=None to accept the risk (on_overflow decides)")


def _secure_sum(bits: int, dropout_rate: float, rule, weight_cap: int, bound: int | None,
                on_overflow: str, fix, accept: str):
    """secure_sum with validated arguments; fix(m) and accept complete the worst-case
    error's message."""
    from fedjax_sim.aggregators import part

    def reduce(cohort: Cohort, state, rng):
        del state
        leaves, treedef = jax.tree_util.tree_flatten(cohort.updates)
        if not all(jnp.issubdtype(x.dtype, jnp.integer) for x in leaves):
            raise UserError("secure_sum needs integer updates: put integer_encode(clip_norm, "
                            "scale) before it in the chain")
        m = cohort.weights.shape[0]
        if m >= _MAX_SLOTS:
            raise UserError(f"secure aggregation simulates at most {_MAX_SLOTS - 1} clients per "
                            f"round, got {m}: lower clients_per_round")
        threshold_of, max_threshold = rule(m)
        if bound is not None:
            _check_worst_case(m, weight_cap, bound, bits, fix(m), accept)
        x = jnp.concatenate([v.reshape(m, -1).astype(jnp.int32) for v in leaves], axis=1)
        given = jnp.round(cohort.weights).astype(jnp.int32)
        weights = jnp.where(cohort.live, jnp.minimum(given, weight_cap), 0)
        values = jnp.concatenate([x * weights[:, None], weights[:, None]], axis=1)
        k_secrets, k_dropout = jax.random.split(rng)
        survived = cohort.live & (jax.random.uniform(k_dropout, (m,)) >= dropout_rate)
        n = jnp.sum(cohort.live.astype(jnp.int32))
        t = threshold_of(n)
        unmasked, enough = secure_sum_protocol(values, cohort.live, survived, k_secrets, t,
                                               max_threshold, bits)
        # x·w leaves int32 where |x| > (2^31 - 1) // w: its true sum is not checkable
        room = (2 ** 31 - 1) // jnp.maximum(weights, 1)[:, None]
        unchecked = jnp.any(survived[:, None] & ((x > room) | (x < -room)), axis=0)
        wrapped = wrapped_coordinates(values, survived, bits) | jnp.append(unchecked, False)
        decoded = to_signed(unmasked, bits)
        ends = np.cumsum([math.prod(v.shape[1:]) for v in leaves])[:-1]
        total = jax.tree_util.tree_unflatten(treedef, [
            piece.reshape(v.shape[1:]) for piece, v in zip(jnp.split(decoded[:-1], ends), leaves)])
        metrics = _protocol_metrics(cohort.live, survived, enough, t, wrapped,
                                    cohort.live & (given > weight_cap), values.shape[1], bits)
        failed = (n > 0) & ~enough
        if on_overflow == "fail":
            failed = failed | jnp.any(wrapped)
        metrics[ROUND_FAILED] = failed
        return total, decoded[-1].astype(jnp.float32), metrics

    def uplink(message: Message, cohort_slots: int) -> Message:
        # dense values of b bits plus the weight; a public key, 2(n-1) shares when sharing
        # and n-1 when unmasking
        return Message(message.entries + 1, bits, 0,
                       message.extra_bits + SECRET_BITS * (3 * cohort_slots - 2))

    return part(reduce=reduce, uplink=uplink)


def default_scale(clip_norm: float, modulus_bits: int, cohort_size: int,
                  max_weight: int = 1) -> float:
    """The largest scale s (a float32) for which cohort_size·max_weight·⌈s·c⌉ <= 2^(b-1) - 1:
    the sum of a cohort's encoded updates cannot leave the signed b-bit range."""
    c = _check_positive("clip_norm", clip_norm)
    budget = (2 ** (modulus_bits - 1) - 1) // (cohort_size * max_weight)
    if budget < 2:
        raise UserError(f"modulus_bits={modulus_bits} leaves no room for the sum of "
                        f"{cohort_size} clients (weight <= {max_weight}): raise modulus_bits "
                        f"to at least {(cohort_size * max_weight * 2).bit_length() + 1}")
    s = np.float32(min(budget - 1, 2 ** 30) / c)
    while value_bound(c, s) > budget:  # float32 rounding of s·c: step down an ulp at a time
        s = np.nextafter(s, np.float32(0))
    return float(s)


def secure_aggregation(clip_norm: float, *, cohort_size: int | None = None,
                       modulus_bits: int = 32, scale: float | None = None,
                       dropout_rate: float = 0.0, threshold=None, max_weight: int = 1,
                       on_overflow: str = "error"):
    """Secure aggregation (module doc): `chain(integer_encode(c, s), secure_sum(b, ...))`.

    scale=None picks `default_scale(clip_norm, modulus_bits, cohort_size, max_weight)`, so
    `cohort_size` (the round's cohort slots: clients_per_round, or a Poisson cohort's cap)
    is then required. on_overflow='error' requires the worst case to fit (checked now
    with cohort_size, and when the round compiles); 'fail' or 'wrap' accept a larger scale
    and act on the rounds whose sum does leave the range.
    """
    from fedjax_sim.aggregators import chain

    c = _check_positive("clip_norm", clip_norm)
    bits = _check_int("modulus_bits", modulus_bits, 2, 32)
    cap = _check_int("max_weight", max_weight, 1)
    if cohort_size is not None:
        cohort_size = _check_int("cohort_size", cohort_size, 1, _MAX_SLOTS - 1)
    if on_overflow not in ("error", "fail", "wrap"):
        raise UserError(f"on_overflow must be 'error', 'fail' or 'wrap', got {on_overflow!r}")
    chosen = scale is None
    if chosen:
        if cohort_size is None:
            raise UserError("secure_aggregation needs cohort_size= (the clients per round) to "
                            "choose its scale, or an explicit scale=")
        scale = default_scale(c, bits, cohort_size, cap)
    encode = integer_encode(c, scale)
    bound = value_bound(c, scale)

    def fix(m):
        if chosen and m > cohort_size:
            return f"pass cohort_size={m} (the round's cohort slots)"
        if (2 ** (bits - 1) - 1) // (m * cap) < 2:
            return "use fewer clients per round"
        return f"lower scale to at most {default_scale(c, bits, m, cap):g}"

    accept = "pass on_overflow='fail' to accept the risk"
    if on_overflow == "error" and cohort_size is not None:
        _check_worst_case(cohort_size, cap, bound, bits, fix(cohort_size), accept)
    return chain(encode, _secure_sum(
        bits, _check_rate(dropout_rate), _threshold_rule(threshold), cap,
        bound if on_overflow == "error" else None,
        "fail" if on_overflow == "error" else on_overflow, fix, accept))
