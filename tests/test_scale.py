"""Large populations: per-call and start-up work that does not grow with the number of
clients C, and the same results as before.

- Host-kept client states: each call writes only its own clients' entries of the row map
  (no [C] array per call), and a run equals the on-device run exactly.
- Host-streamed data: a pack writes only its clients' offsets (no [C] array per pack).
- Cohorts of large populations: uniform m-subsets drawn at a cost set by m.
- Start-up: the data digest does not copy the data; the finiteness check and the empty-
  client scan are vectorised; a run without a workdir does not hash its data.
"""

import functools
import hashlib
import itertools
import tracemalloc
from collections import Counter
from math import comb

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.engine import round as round_module
from fedjax_sim.engine.client_states import HostClientStates
from fedjax_sim.engine.streaming import HostData
from fedjax_sim.errors import UserError
from fedjax_sim.models.tasks import classification
from fedjax_sim.simulation import inputs
from fedjax_sim.simulation.checkpoint import checksum


def _population(num_clients, per_client=2, features=3, seed=0):
    rng = np.random.default_rng(seed)
    n = num_clients * per_client
    x = rng.standard_normal((n, features)).astype(np.float32)
    y = (x[:, 0] + 0.3 * rng.standard_normal(n) > 0).astype(np.int32)
    return fs.data.FederatedData({"x": x, "y": y}, np.arange(num_clients + 1) * per_client,
                                 tuple(map(str, range(num_clients))))


def _peak_bytes(fn):
    """Peak bytes numpy and Python allocate while `fn()` runs (tracemalloc sees numpy)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ------------------------------------------------------------------ host-kept client states

def test_host_states_row_map_is_written_per_call_not_built():
    """take() gives a table holding exactly the call's clients' rows and a row map that
    sends each of them to its row, across calls that share clients; and it allocates
    nothing of size C on the host (the old [C] int32 map was 8 MB here)."""
    c, rows_per_call = 2_000_000, 64
    host = {"a": np.arange(c * 2, dtype=np.float32).reshape(c, 2), "b": np.arange(c)}
    store = HostClientStates(c, rows_per_call)
    rng = np.random.default_rng(0)
    earlier = rng.choice(c, 40, replace=False)
    for call in range(3):
        # each call repeats some clients of the call before (their entries get rewritten)
        cohorts = np.concatenate([earlier[:10], rng.choice(c, 30, replace=False)]).reshape(2, 20)
        live = np.ones_like(cohorts, bool)
        live[1, -3:] = False  # padding slots (Poisson) are not taken
        table, row_map, ids = store.take(host, cohorts, live)
        expected_ids = np.unique(cohorts[live])
        np.testing.assert_array_equal(ids, expected_ids)
        rows = np.asarray(row_map)[ids]
        np.testing.assert_array_equal(rows, np.arange(len(ids)))
        for name in host:
            np.testing.assert_array_equal(np.asarray(table[name])[rows], host[name][ids])
        earlier = ids
    peak = _peak_bytes(lambda: jax.block_until_ready(store.take(host, cohorts, live)[:2]))
    assert peak < c * 4 // 8, peak


@pytest.mark.slow
def test_host_states_equal_device_states_on_a_large_population(monkeypatch):
    """SCAFFOLD on 4,200 clients (above the permutation threshold: cohorts come from
    draws with replacement), cohorts of 2,000 so clients recur within and across calls:
    host-kept control variates give bit-identical results to device-kept ones. Neither
    run, having no workdir, hashes its data to describe itself."""
    from fedjax_sim.simulation import setup

    described = []
    monkeypatch.setattr(setup, "describe_run", lambda **kw: described.append(1) or {})
    data = _population(4200)
    model = fs.models.get_model("logistic_regression", (3,), 2)
    runs = {}
    for states in ("device", "host"):
        runs[states] = fs.simulate(
            model, fs.algorithms.scaffold(0.1, batch_size=2), data, rounds=4,
            clients_per_round=2000, eval_every=4, progress=False, seed=3,
            engine=fs.EngineOptions(rounds_per_call=2, client_states=states))
    assert described == []
    a, b = runs["device"], runs["host"]
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]
    for u, v in zip(jax.tree_util.tree_leaves((a.params, a.client_states)),
                    jax.tree_util.tree_leaves((b.params, b.client_states))):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    # the clients that trained hold non-zero control variates, the others zero
    trained = np.any(np.asarray(jax.tree_util.tree_leaves(b.client_states)[0]) != 0,
                     axis=tuple(range(1, np.ndim(jax.tree_util.tree_leaves(b.client_states)[0]))))
    assert 0 < trained.sum() < 4200


# ------------------------------------------------------------------ host-streamed data

def test_pack_writes_only_its_clients_offsets():
    """Consecutive packs into the same offsets buffer each point their own clients at
    their rows, and a pack allocates nothing of size C (the old one built [C] offsets)."""
    c = 1_000_000
    data = _population(c, per_client=1, features=1)
    host = HostData(data, window_clients=8)
    try:
        rng = np.random.default_rng(1)
        for _ in range(3):
            ids = rng.choice(c, 8, replace=False)
            packed = host.pack(ids, host.capacity)
            x, offsets = np.asarray(packed.features["x"]), np.asarray(packed.offsets)
            for cid in ids:
                np.testing.assert_array_equal(x[offsets[cid]], data.features["x"][cid])
        peak = _peak_bytes(lambda: jax.block_until_ready(host.pack(ids, host.capacity)))
        assert peak < c * 4 // 8, peak
    finally:
        host.close()


# ------------------------------------------------------------------ cohort sampling

def _subset_chi2(out, n, m):
    """Chi-square statistic of the counts of each m-subset of n over the draws `out`."""
    counts = Counter(tuple(sorted(row)) for row in out.tolist())
    assert len(counts) == comb(n, m)
    expected = len(out) / comb(n, m)
    return float(sum((k - expected) ** 2 / expected for k in counts.values()))


def test_large_population_sampler_stays_uniform_when_it_draws_again(monkeypatch):
    """The sampler for large populations, forced onto 4 of 8 (its largest cohort, half the
    population; 70 subsets) with only m draws a try, so that most tries hold a repeat and
    are drawn again: every subset stays equally likely (chi-square), every client equally
    likely in the first slot, no repeats. (tests/test_engine.py checks its usual path.)"""
    monkeypatch.setattr(round_module, "PERMUTATION_MAX_CLIENTS", 0)
    monkeypatch.setattr(round_module, "_draws_for_distinct", lambda n, m: m)
    draws = 10_000
    out = np.asarray(jax.jit(jax.vmap(lambda k: round_module.sample_cohort(k, 8, 4)))(
        jax.random.split(jax.random.key(7), draws)))
    assert all(len(set(row)) == 4 for row in out.tolist())
    assert _subset_chi2(out, 8, 4) < 111.1  # chi-square, 69 dof, 0.999 quantile
    first = np.bincount(out[:, 0], minlength=8)
    assert float(((first - draws / 8) ** 2 / (draws / 8)).sum()) < 24.3  # 7 dof, 0.999


def test_draws_for_distinct_is_enough_and_bounded():
    """The number of draws leaves at least 8 standard deviations of margin between the
    expected number of distinct ids and m, and stays within 2m + 64."""
    for n, m in [(10**6, 100), (10**6, 10_000), (10**4, 5000), (5000, 2500), (20_000, 64)]:
        d = round_module._draws_for_distinct(n, m)
        distinct = n * -np.expm1(-d / n)
        assert m < d <= 2 * m + 64
        assert distinct - m >= 8 * np.sqrt(min(distinct, d - distinct)) or d == 2 * m + 64


def test_cohort_of_a_million_is_distinct_and_in_range():
    ids = np.asarray(jax.jit(lambda k: round_module.sample_cohort(k, 10**6, 3000))(
        jax.random.key(0)))
    assert len(set(ids.tolist())) == 3000 and ids.min() >= 0 and ids.max() < 10**6
    # a million ids spread over the whole range: each tenth holds about a tenth
    assert np.histogram(ids, bins=10, range=(0, 10**6))[0].min() > 200


# ------------------------------------------------------------------ start-up

def test_checksum_hashes_the_bytes_without_copying():
    """The digest equals BLAKE2b over each leaf's path, dtype, shape and tobytes() (the
    definition), for contiguous, strided, 0-d, empty, bool and bfloat16 leaves."""
    tree = {"a": np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2],
            "b": np.float64(2.5), "c": np.zeros((0, 3), np.int8), "d": np.array([True, False]),
            "e": np.asarray(jnp.arange(3, dtype=jnp.bfloat16))}
    reference = hashlib.blake2b(digest_size=16)
    for name in sorted(tree):
        x = np.ascontiguousarray(tree[name])
        reference.update(f"{name}|{x.dtype}|{x.shape}|".encode())  # path 'a' is 'a'
        reference.update(x.tobytes())
    assert checksum(tree) == reference.hexdigest()
    big = {"x": np.ones((1 << 20, 4), np.float32)}
    assert _peak_bytes(lambda: checksum(big)) < big["x"].nbytes // 8


def test_finite_check_and_empty_clients_are_vectorised():
    """A NaN in a later block of rows is found and named by example and client; empty
    clients are listed in order (checked against a per-client loop)."""
    x = np.zeros((1_200_000, 4), np.float32)  # 4.8 M values: two blocks of rows
    x[1_100_003, 2] = np.nan
    offsets = np.array([0, 600_000, 600_000, 1_100_000, 1_200_000, 1_200_000])
    data = fs.data.FederatedData({"x": x, "y": np.zeros(len(x), np.int32)}, offsets,
                                 ("a", "b", "c", "d", "e"))
    with pytest.raises(UserError, match=r"1 example\(s\), first at example 1100003 \(client 'd'\)"):
        inputs._check_finite(data.features, "training data", classification(), "x", data)
    loop = [cid for cid, n in zip(data.client_ids, np.diff(offsets)) if n == 0]
    assert data.empty_clients() == loop == ["b", "e"]
    x[1_100_003, 2] = 0.0
    inputs._check_finite(data.features, "training data", classification(), "x", data)


# ------------------------------------------------------------------ participation counts

def test_example_level_participation_peaks_follow_the_cohorts():
    """DP-SGD's ledger keeps the busiest client's count per round without scanning all C
    counts: its peaks equal the maximum of counts recomputed from the cohorts (padding
    slots not counted), also after a recount from round 0 (resume)."""
    from fedjax_sim.privacy import ExampleLevelDP
    from fedjax_sim.simulation.private import PrivatePlan

    c, m, rounds = 50, 8, 40
    rng = np.random.default_rng(0)
    ids = np.stack([rng.permutation(c)[:m] for _ in range(rounds)])
    live = rng.random((rounds, m)) < 0.8

    class Program:  # the cohorts of rounds start .. start+count-1, as RoundProgram.cohorts
        def cohorts(self, root, start, count):
            return ids[start:start + count], live[start:start + count]

    plan = PrivatePlan(ExampleLevelDP(clip_norm=1.0, noise_multiplier=1.0, sampling_rate=0.5,
                                      delta=1e-5), algorithm=fs.algorithms.fedavg(
                           optax.sgd(0.1), local_steps=2),
                       aggregator=None, num_clients=c, clients_per_round=m, max_client_size=4,
                       rounds=rounds)
    counts, expected = np.zeros(c, int), []
    for r in range(rounds):
        for cid in ids[r][live[r]]:
            counts[cid] += 1
        expected.append(int(counts.max()))
    peaks = plan.record(Program(), None, 0, 25) + plan.record(Program(), None, 25, 15)
    assert peaks == expected
    plan.recount(Program(), None, rounds)
    assert plan._peak == expected[-1]
    np.testing.assert_array_equal(plan.participation, counts)


# ------------------------------------------------------------------ contiguous client rows

@pytest.mark.parametrize("schedule_args", [dict(batch_size=2, local_epochs=1, local_steps=None),
                                           dict(batch_size=4, local_epochs=None, local_steps=1)])
def test_client_rows_fetched_as_a_block_feed_the_same_batches(schedule_args):
    """A client fetching its rows as one block first (epoch schedules: the loop reads at
    least as many rows as the largest client holds) sees exactly the batches it gathers
    row by row, for every client, the last one (its block moved back from the data's end)
    and an empty one included; checked against batches gathered with numpy. A schedule
    that reads fewer rows (one step of 4 < 5) is left as it was."""
    from fedjax_sim.engine.batching import bits_needed, client_batches, make_schedule
    from fedjax_sim.engine.local import LocalData, _fetch_block

    sizes = [3, 0, 5, 2, 4]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    x = np.arange(offsets[-1] * 2, dtype=np.float32).reshape(-1, 2) ** 1.5
    data = {"x": jnp.asarray(x), "y": jnp.arange(offsets[-1], dtype=jnp.int32)}
    schedule = make_schedule(max(sizes), **schedule_args)
    fetches = schedule.num_steps * schedule.batch_size >= max(sizes)
    assert _fetch_block(data, schedule.num_steps * schedule.batch_size, max(sizes)) == fetches

    s_, b_ = schedule.num_steps, schedule.batch_size
    bits = jax.random.bits(jax.random.key(4), (len(sizes), bits_needed(schedule, max(sizes))),
                           jnp.uint32)

    def step(carry, batch, mask, key):  # writes each step's masked batch into the carry
        i, xs, ys = carry
        return (i + 1, xs.at[i].set(batch["x"] * mask[:, None]),
                ys.at[i].set(batch["y"] * mask)), {}

    @functools.partial(jax.jit, static_argnums=0)
    def batches(max_rows):
        def one(offset, n, words):
            idx, mask = client_batches(schedule, words, n, max(sizes))
            local = LocalData(data, offset, idx, mask, n, 0, unroll=True,
                              live=jnp.ones(s_, bool), max_rows=max_rows)
            empty = (0, jnp.zeros((s_, b_, 2), jnp.float32), jnp.zeros((s_, b_), jnp.int32))
            return local.run(step, empty, jax.random.key(0))[0][1:], idx, mask
        return jax.vmap(one)(jnp.asarray(offsets[:-1], jnp.int32),
                             jnp.asarray(sizes, jnp.int32), bits)

    block, idx, mask = batches(max(sizes))
    rows, _, _ = batches(None)
    for cid in range(len(sizes)):
        m = np.asarray(mask[cid])
        reference = np.minimum(offsets[cid] + np.where(m, np.asarray(idx[cid]), 0),
                               offsets[-1] - 1)
        want = (x[reference] * m[..., None], np.asarray(data["y"])[reference] * m)
        for got in (block, rows):
            np.testing.assert_array_equal(np.asarray(got[0][cid]), want[0])
            np.testing.assert_array_equal(np.asarray(got[1][cid]), want[1])


def test_poisson_sampling_of_a_large_population_keeps_its_distribution(monkeypatch):
    """Poisson sampling drawn as Binomial(N, q) joiners in a uniformly ordered subset,
    forced onto N = 6, q = 0.4, 3 slots: the kept set (the live slots, first) has exactly
    the distribution of every client joining independently, a uniform 3 of them kept
    where more join: chi-square over all 42 sets against that distribution."""
    monkeypatch.setattr(round_module, "PERMUTATION_MAX_CLIENTS", 0)
    n, q, slots, draws = 6, 0.4, 3, 20_000
    cohort, live = jax.jit(jax.vmap(lambda k: round_module.poisson_cohort(k, n, q, slots)))(
        jax.random.split(jax.random.key(5), draws))
    cohort, live = np.asarray(cohort), np.asarray(live)
    assert all(np.all(np.diff(row.astype(int)) <= 0) for row in live)  # live slots first
    assert all(len(set(row)) == slots for row in cohort.tolist())
    kept = Counter(tuple(sorted(c[l].tolist())) for c, l in zip(cohort, live))

    def probability(size):  # of one given kept set of `size` clients
        if size < slots:
            return q ** size * (1 - q) ** (n - size)
        return sum(comb(n - slots, k - slots) * q ** k * (1 - q) ** (n - k) / comb(k, slots)
                   for k in range(slots, n + 1))

    sets = [s for size in range(slots + 1) for s in itertools.combinations(range(n), size)]
    assert abs(sum(probability(len(s)) for s in sets) - 1) < 1e-12 and set(kept) <= set(sets)
    chi2 = sum((kept.get(s, 0) - draws * probability(len(s))) ** 2 / (draws * probability(len(s)))
               for s in sets)
    assert chi2 < 74.7  # chi-square, 41 dof, 0.999 quantile
