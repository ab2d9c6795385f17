"""Homomorphically encrypted aggregation (TenSEAL): the server sums ciphertexts it cannot read.

    encrypted_sum("ckks")                   total ≈ Σ_i w_i Δ_i,  denominator ≈ Σ_i w_i
    encrypted_sum("bfv", fraction_bits=f)   total = 2^-f Σ_i round(2^f w_i Δ_i)   (exact sum)

A reducing part (it receives the stacked cohort) that simulates, each round, the protocol
of additively homomorphic aggregation with a key shared by the clients:

  1. key holder (standing for the clients, who share the secret key): makes a TenSEAL
     context once and gives the server that context serialized WITHOUT its secret key
     (as `make_context_public` does): the server can add ciphertexts, not decrypt them;
  2. each client that takes part encrypts its weighted update w_i Δ_i, flattened, with its
     weight w_i appended (so Σ_i w_i is aggregated privately too), in chunks of the slot
     count (N/2 for CKKS, N for BFV; N = poly_modulus_degree), and sends the serialized
     ciphertexts; padding slots of a Poisson cohort send nothing;
  3. the server deserializes them with its public context and adds them chunk by chunk;
  4. the key holder decrypts only the sum.

CKKS encodes real numbers with scale Δ = 2^scale_bits: the decrypted sum of m clients
is off by a noise of standard deviation about 0.17 sqrt(m) N / Δ per coordinate (measured
for N = 8192 and 16384: 1.2e-9 sqrt(m) at the defaults; the tests bound it by 4 m N / Δ),
and the result is rounded to float32. SEAL draws the encryption noise from its own generator,
so CKKS runs are not bit-reproducible (they agree within that error). BFV sums integers
exactly: each client sends round(2^f w_i Δ_i) (fixed point with f = fraction_bits binary
digits), the plaintext modulus t is a prime of `plain_modulus_bits` bits, and the sum is
decoded as an integer divided by 2^f: it equals the same quantization summed in plain
integers, bit for bit. Sums must stay in range (CKKS: |Σ| < 2^(data bits - scale_bits -
2); BFV: |Σ round(2^f w Δ)| < t/2, data bits = the coefficient primes but the last); each
client checks |x| < range / m for the cohort's m slots, and where one would overflow the
round fails (the metric ROUND_FAILED: the round has no effect, the host warns). BFV's
noise must also stay below its modulus: data bits - plain_modulus_bits - 2 > log2 N + 6 +
log2 m (a worst-case bound on the noise of m fresh ciphertexts' sum), checked when the
round is traced.

Costs, measured on the host each round and logged: `he_encrypt_ms_per_client` (encoding,
encryption and serialization, mean over the clients), `he_server_sum_ms` (deserializing
and adding every client's ciphertexts), `he_decrypt_ms` (decrypting and decoding the
sum), `he_ciphertext_bytes_per_client` (serialized, measured) and
`he_ciphertexts_per_client`. `uplink` gives the engine the exact bytes a client sends
(as the message's `extra_bits`; it sends no plaintext values): each of its ciphertexts
serialized once per chunk length and measured. With 60-bit coefficient primes (the
defaults) a ciphertext's serialized size depends only on the parameters and its chunk's
length, so this is exact; with smaller primes SEAL's compression varies it by a few
hundred bytes.

In a chain it goes after the per-client transforms (clipping, quantization; after a
sparsifying one it encrypts the update dense, zeros included, and counts those bytes) and
before the finalizers, which act on the decrypted sum: chain(clip(C), encrypted_sum(), gaussian(z, expected_clients=m)) adds
the noise after decryption, so the key holder sees the sum without it.

What it protects: an honest-but-curious aggregator (the server) sees neither any client's
update nor the sum, only ciphertexts (RLWE at 128-bit security: the defaults stay within
the HomomorphicEncryption.org bounds, and bad parameters are refused); the key holder sees
the sum (the aggregate a plaintext server would see, and Σ_i w_i) but no individual
update. What it does not: a malicious server or client (no integrity: a client can send
any ciphertext, a server can drop or replay some); anyone holding the secret key who sees
a client's ciphertext (the key holder or another client colluding with the server, or
listening on a channel that is not private, reads that client's update); what the
aggregate itself reveals (add differential privacy for that); and who took part and how
much each sends. Keys live for the part's lifetime (one set per `encrypted_sum(...)`),
not per round.

Cost: this runs on the host through `jax.pure_callback`, one client after another, in
TenSEAL's C++ (SEAL), so it suits small models (logistic regression, the diabetes MLP:
one ciphertext per client) and is far slower than the plaintext round. Inside the round's
jit it works on one device and on a single-process mesh (XLA gathers the cohort to the
first device); a multi-process run is refused.
"""

from __future__ import annotations

import math
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.engine.contracts import ROUND_FAILED
from fedjax_sim.errors import UserError

PyTree = Any

SCHEMES = ("ckks", "bfv")
# The largest coefficient modulus, in bits, SEAL accepts per ring degree N at 128-bit
# security (the HomomorphicEncryption.org standard; SEAL's CoeffModulus::MaxBitCount).
MAX_COEFF_BITS = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
# Additions only, so one data prime (CKKS) or two (BFV, whose plaintext modulus must fit
# below them with the noise) and the special prime are enough; 60-bit primes serialize to
# one size per ciphertext.
DEFAULT_COEFF_BITS = {"ckks": (60, 60), "bfv": (60, 60, 60)}
COSTS = ("he_encrypt_ms_per_client", "he_server_sum_ms", "he_decrypt_ms",
         "he_ciphertext_bytes_per_client", "he_ciphertexts_per_client")
INSTALL = "pip install 'fedjax_sim[he]'"


class HEConfig(NamedTuple):
    """The encryption parameters of `encrypted_sum` (checked)."""

    scheme: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int | None  # CKKS: the encoding scale is 2^scale_bits
    fraction_bits: int | None  # BFV: updates are quantized to multiples of 2^-fraction_bits
    plain_modulus_bits: int | None  # BFV: the plaintext modulus t has this many bits

    @property
    def slots(self) -> int:
        """Values one ciphertext holds."""
        return self.poly_modulus_degree // (2 if self.scheme == "ckks" else 1)

    @property
    def data_bits(self) -> int:
        """Bits of the modulus a fresh ciphertext lives under (all primes but the special one)."""
        sizes = self.coeff_mod_bit_sizes
        return sum(sizes[:-1]) if len(sizes) > 1 else sizes[0]

    def chunks(self, entries: int) -> int:
        """Ciphertexts per client for an update of `entries` values (plus the weight)."""
        return -(-(entries + 1) // self.slots)


def _is_prime(n: int) -> bool:
    """Miller-Rabin with the first 12 primes as bases: deterministic below 3.3e24."""
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    if n < 2:
        return False
    if n in bases:
        return True
    if any(n % p == 0 for p in bases):
        return False
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def batching_prime(bits: int, poly_modulus_degree: int) -> int:
    """The largest prime t < 2^bits with t ≡ 1 (mod 2N): a BFV plaintext modulus that
    allows batching N integers per ciphertext."""
    step = 2 * poly_modulus_degree
    t = (2 ** bits - 2) // step * step + 1
    while t > step and not _is_prime(t):
        t -= step
    if t <= step:
        raise UserError(f"no batching prime below 2^{bits} for poly_modulus_degree "
                        f"{poly_modulus_degree}; raise plain_modulus_bits")
    return t


def _int_option(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UserError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _check(scheme, poly_modulus_degree, coeff_mod_bit_sizes, scale_bits, fraction_bits,
           plain_modulus_bits) -> HEConfig:
    if scheme not in SCHEMES:
        raise UserError(f"encrypted_sum scheme must be 'ckks' or 'bfv', got {scheme!r}")
    if poly_modulus_degree not in MAX_COEFF_BITS:
        raise UserError(f"poly_modulus_degree must be one of {sorted(MAX_COEFF_BITS)}, got "
                        f"{poly_modulus_degree!r}")
    sizes = DEFAULT_COEFF_BITS[scheme] if coeff_mod_bit_sizes is None else coeff_mod_bit_sizes
    if not isinstance(sizes, (list, tuple)) or not sizes or not all(
            isinstance(b, int) and not isinstance(b, bool) and 20 <= b <= 60 for b in sizes):
        raise UserError(f"coeff_mod_bit_sizes must be a non-empty list of integers in "
                        f"[20, 60], got {coeff_mod_bit_sizes!r}")
    limit = MAX_COEFF_BITS[poly_modulus_degree]
    if sum(sizes) > limit:
        raise UserError(f"coeff_mod_bit_sizes sum to {sum(sizes)} bits, above the {limit} that "
                        f"poly_modulus_degree={poly_modulus_degree} allows at 128-bit security; "
                        f"use fewer or smaller primes, or a larger poly_modulus_degree")
    ckks = scheme == "ckks"
    for name, value, own in (("scale_bits", scale_bits, ckks),
                             ("fraction_bits", fraction_bits, not ckks),
                             ("plain_modulus_bits", plain_modulus_bits, not ckks)):
        if value is not None and not own:
            other = "ckks" if scheme == "bfv" else "bfv"
            raise UserError(f"{name} is a parameter of scheme={other!r}, not {scheme!r}; drop it")
    config = HEConfig(scheme, poly_modulus_degree, tuple(sizes),
                      _int_option("scale_bits", 40 if scale_bits is None else scale_bits,
                                  20, 60) if ckks else None,
                      None if ckks else _int_option(
                          "fraction_bits", 24 if fraction_bits is None else fraction_bits, 0, 52),
                      None if ckks else _int_option(
                          "plain_modulus_bits", 50 if plain_modulus_bits is None
                          else plain_modulus_bits, 20, 59))
    if ckks and config.data_bits < config.scale_bits + 10:
        raise UserError(f"CKKS data primes of {config.data_bits} bits leave less than 10 bits "
                        f"above scale_bits={config.scale_bits} for the sum; lower scale_bits or "
                        f"use larger coefficient primes")
    return config


def _import_tenseal():
    try:
        import tenseal
    except ImportError:
        raise UserError(f"encrypted_sum needs TenSEAL, which is not installed: {INSTALL}") \
            from None
    return tenseal


class _Parties:
    """The simulated parties of one `encrypted_sum`: the clients' shared secret context
    (key holder) and the server's context, which has no secret key."""

    def __init__(self, tenseal, config: HEConfig):
        self.ts, self.config = tenseal, config
        self.plain_modulus = None if config.scheme == "ckks" else batching_prime(
            config.plain_modulus_bits, config.poly_modulus_degree)
        self._secret = self._public = None
        self.public_context_bytes = None
        self._ciphertext_bytes = {}  # chunk length -> serialized bytes
        self.dense_entries = None  # values in a client's update, set when the reduce is traced

    def contexts(self):
        """(secret, public) contexts, made on first use (key generation takes a moment)."""
        if self._secret is None:
            ts, c = self.ts, self.config
            if c.scheme == "ckks":
                secret = ts.context(ts.SCHEME_TYPE.CKKS, c.poly_modulus_degree,
                                    coeff_mod_bit_sizes=list(c.coeff_mod_bit_sizes))
                secret.global_scale = 2.0 ** c.scale_bits
            else:
                secret = ts.context(ts.SCHEME_TYPE.BFV, c.poly_modulus_degree,
                                    plain_modulus=self.plain_modulus,
                                    coeff_mod_bit_sizes=list(c.coeff_mod_bit_sizes))
            # What the server receives: the public key and parameters, no secret key (nor
            # relinearization or Galois keys: it only adds).
            wire = secret.serialize(save_public_key=True, save_secret_key=False,
                                    save_galois_keys=False, save_relin_keys=False)
            public = ts.context_from(wire)
            assert not public.is_private()
            self._secret, self._public, self.public_context_bytes = secret, public, len(wire)
        return self._secret, self._public

    def _vector(self, context, values):
        make = self.ts.ckks_vector if self.config.scheme == "ckks" else self.ts.bfv_vector
        return make(context, values.tolist())

    def _load(self, context, data: bytes):
        load = (self.ts.ckks_vector_from if self.config.scheme == "ckks"
                else self.ts.bfv_vector_from)
        return load(context, data)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """A client's values as the scheme encodes them: float64 (CKKS) or the fixed-point
        integers round(2^f x) (BFV)."""
        if self.config.scheme == "ckks":
            return x
        return np.rint(x * 2.0 ** self.config.fraction_bits).astype(np.int64)

    def bound(self, cohort_slots: int) -> float:
        """The largest |encoded value| a client may send so that the sum of `cohort_slots`
        clients stays in range."""
        c = self.config
        if c.scheme == "ckks":
            return 2.0 ** (c.data_bits - c.scale_bits - 2) / cohort_slots
        return (self.plain_modulus - 1) // 2 // cohort_slots

    def encrypt(self, encoded: np.ndarray) -> list[bytes]:
        """A client's message: its encoded values in chunks of the slot count, each
        encrypted and serialized."""
        secret, _ = self.contexts()
        n = self.config.slots
        return [self._vector(secret, encoded[i:i + n]).serialize()
                for i in range(0, len(encoded), n)]

    def add(self, messages: list[list[bytes]]) -> list[bytes]:
        """The server: every client's ciphertexts added chunk by chunk, with the public context."""
        _, public = self.contexts()
        sums = None
        for message in messages:
            vectors = [self._load(public, data) for data in message]
            if sums is None:
                sums = vectors
            else:
                for total, v in zip(sums, vectors):
                    total += v
        return [v.serialize() for v in sums]

    def decrypt(self, summed: list[bytes], size: int) -> np.ndarray:
        """The key holder: the sum decrypted and decoded, float64 [size]."""
        secret, _ = self.contexts()
        values = np.concatenate([np.asarray(self._load(secret, data).decrypt(), np.float64)
                                 for data in summed])[:size]
        if self.config.scheme == "bfv":
            values = values / 2.0 ** self.config.fraction_bits
        return values

    def message_bytes(self, entries: int) -> int:
        """The serialized bytes of a client's message for an update of `entries` values
        (plus its weight): each chunk's ciphertext size measured once per chunk length
        (TenSEAL records the length, so a short last chunk is a few bytes smaller)."""
        n = self.config.slots
        lengths = [min(n, entries + 1 - i) for i in range(0, entries + 1, n)]
        for length in set(lengths) - set(self._ciphertext_bytes):
            self._ciphertext_bytes[length] = len(self.encrypt(self.encode(np.zeros(length)))[0])
        return sum(self._ciphertext_bytes[length] for length in lengths)

    def round(self, flat, weights, live):
        """One round on the host: flat [m, D] updates, weights [m], live [m] ->
        (total [D] f32, denominator f32, costs [len(COSTS)] f32, failed bool)."""
        flat, weights, live = np.asarray(flat), np.asarray(weights), np.asarray(live)
        m, size = flat.shape
        # w_i Δ_i in float64: the product of two float32 numbers is exact there.
        values = [np.append(weights[i].astype(np.float64) * flat[i].astype(np.float64),
                            weights[i]) for i in np.flatnonzero(live)]
        empty = (np.zeros(size, np.float32), np.float32(0.0),
                 np.zeros(len(COSTS), np.float32), np.bool_(False))
        if not values:
            return empty
        if not all(np.all(np.isfinite(x)) for x in values):
            # As the plaintext sum would be: the engine's divergence check stops the run.
            return (np.full(size, np.nan, np.float32), np.float32(np.nan)) + empty[2:]
        encoded = [self.encode(x) for x in values]
        if max(float(np.max(np.abs(e))) for e in encoded) >= self.bound(m):
            return empty[:3] + (np.bool_(True),)
        start = time.perf_counter()
        messages = [self.encrypt(e) for e in encoded]
        encrypted = time.perf_counter()
        summed = self.add(messages)
        added = time.perf_counter()
        result = self.decrypt(summed, size + 1)
        decrypted = time.perf_counter()
        costs = np.array([(encrypted - start) * 1e3 / len(messages), (added - encrypted) * 1e3,
                          (decrypted - added) * 1e3,
                          sum(len(b) for mb in messages for b in mb) / len(messages),
                          len(messages[0])], np.float32)
        return result[:size].astype(np.float32), np.float32(result[size]), costs, np.bool_(False)


def encrypted_sum(scheme: str = "ckks", *, poly_modulus_degree: int = 8192,
                  coeff_mod_bit_sizes: tuple[int, ...] | None = None,
                  scale_bits: int | None = None, fraction_bits: int | None = None,
                  plain_modulus_bits: int | None = None):
    """Aggregates the clients' weighted updates under homomorphic encryption (module doc).

    scheme: 'ckks' (approximate real arithmetic) or 'bfv' (exact integers, on updates
      quantized to fixed point).
    poly_modulus_degree: the ring degree N; a ciphertext holds N/2 (CKKS) or N (BFV) values.
    coeff_mod_bit_sizes: the coefficient primes' bits, the last being the special prime;
      default (60, 60) for CKKS, (60, 60, 60) for BFV.
    scale_bits (CKKS): the encoding scale 2^scale_bits, default 40.
    fraction_bits (BFV): the fixed-point scale 2^fraction_bits, default 24.
    plain_modulus_bits (BFV): bits of the plaintext modulus t (a batching prime), default 50.

    Returns a reducing part: reduce -> (total, denominator, metrics: the costs and
    ROUND_FAILED); uplink -> the exact serialized bytes a client sends.
    """
    from fedjax_sim.aggregators import part

    config = _check(scheme, poly_modulus_degree, coeff_mod_bit_sizes, scale_bits,
                    fraction_bits, plain_modulus_bits)
    parties = _Parties(_import_tenseal(), config)

    def reduce(cohort, state, rng):
        del state, rng
        return _encrypted_reduce(parties, cohort)

    def uplink(message, cohort_slots):
        del cohort_slots
        # What is encrypted is the dense update, whatever a part before this one (top_k,
        # random_k) counted: its size as the reduce last traced it (the engine traces the
        # reduce before it asks), else the message's entries. No plaintext values are sent:
        # the message is the ciphertexts, counted as their serialized bits.
        entries = parties.dense_entries or message.entries
        return message._replace(entries=0, index_bits=0,
                                extra_bits=8 * parties.message_bytes(entries))

    return part(reduce=reduce, uplink=uplink)


def _encrypted_reduce(parties: _Parties, cohort):
    """The traced side of the reduce: flatten the cohort, run the round on the host, and
    unflatten the decrypted sum."""
    if jax.process_count() > 1:
        raise UserError("encrypted_sum runs on one host and cannot run in a multi-process "
                        "run; run it in one process (a mesh of that process's devices works)")
    c = parties.config
    m = cohort.weights.shape[0]
    noise_bits = math.log2(c.poly_modulus_degree) + 6 + math.log2(max(m, 1))
    if c.scheme == "bfv" and c.data_bits - c.plain_modulus_bits - 2 <= noise_bits:
        raise UserError(f"BFV with plain_modulus_bits={c.plain_modulus_bits} and data primes "
                        f"of {c.data_bits} bits cannot hold the noise of {m} clients' sum; "
                        f"lower plain_modulus_bits or add a coefficient prime")
    leaves, treedef = jax.tree_util.tree_flatten(cohort.updates)
    flat = jnp.concatenate([x.reshape(m, -1).astype(jnp.float32) for x in leaves], axis=1)
    size = parties.dense_entries = flat.shape[1]
    shapes = (jax.ShapeDtypeStruct((size,), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32),
              jax.ShapeDtypeStruct((len(COSTS),), jnp.float32),
              jax.ShapeDtypeStruct((), jnp.bool_))
    total, denominator, costs, failed = jax.pure_callback(
        parties.round, shapes, flat, cohort.weights.astype(jnp.float32), cohort.live,
        vmap_method="sequential")
    out, start = [], 0
    for x in leaves:
        n = math.prod(x.shape[1:])
        out.append(total[start:start + n].reshape(x.shape[1:]))
        start += n
    metrics = {name: costs[i] for i, name in enumerate(COSTS)}
    metrics[ROUND_FAILED] = failed
    return jax.tree_util.tree_unflatten(treedef, out), denominator, metrics
