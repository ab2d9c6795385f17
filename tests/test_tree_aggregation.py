"""DP-FTRL with tree aggregation: the exact sensitivity equals brute force over every
participation pattern and stays within jax_privacy's upper bound, the published Gboard
setting's ε is reproduced, and the tree noise has the covariance its node structure says."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from helpers import noise_of_rounds
from fedjax_sim.aggregators.matrix_factorization import tree_gaussian
from fedjax_sim.privacy import MatrixFactorizationDP
from fedjax_sim.privacy.matrix_factorization import (MatrixFactorizationAccountant,
                                                     TreeMechanism, calibrate_noise_multiplier,
                                                     gaussian_epsilon)
from fedjax_sim.privacy.tree_aggregation import TreeSensitivity


def _nodes(n):
    """The complete dyadic blocks [lo, hi) inside n rounds (independent of the module)."""
    out, size = [], 1
    while size <= n:
        out += [(lo, lo + size) for lo in range(0, n - size + 1, size)]
        size *= 2
    return out


def _strategy(n):
    """The tree's 0/1 strategy matrix C: a row per node, a column per round."""
    C = np.zeros((len(_nodes(n)), n))
    for r, (lo, hi) in enumerate(_nodes(n)):
        C[r, lo:hi] = 1.0
    return C


def _brute_force(n, b, k):
    """max over patterns (<= k rounds, any two >= b apart) of ||C 1_p||², by enumeration."""
    C = _strategy(n)
    best = 0.0
    for m in range(1, k + 1):
        for p in itertools.combinations(range(n), m):
            if all(q - r >= b for r, q in zip(p, p[1:])):
                best = max(best, float(np.sum(C[:, list(p)].sum(axis=1) ** 2)))
    return best


@pytest.mark.parametrize("b, k", [(1, None), (2, None), (3, None), (3, 2), (5, None), (4, 3)])
def test_tree_sensitivity_is_the_worst_participation_pattern(b, k):
    ours = TreeSensitivity(b, k)
    for n in range(1, 17):
        limit = math.ceil(n / b) if k is None else min(k, math.ceil(n / b))
        assert ours.squared(n) == _brute_force(n, b, limit), n


@pytest.mark.parametrize("n, b", [(64, 8), (100, 7), (50, 50), (37, 4)])
def test_tree_sensitivity_is_within_the_librarys_upper_bound(n, b):
    """jax_privacy's min-sep bound (any strategy) is valid for the tree, so ours is below
    it; with one participation both are the largest column norm, the tree's depth."""
    from jax_privacy.matrix_factorization import sensitivity as library

    bound = library.get_min_sep_sensitivity_upper_bound(jnp.asarray(_strategy(n), jnp.float32),
                                                        min_sep=b)
    ours = math.sqrt(TreeSensitivity(b).squared(n))
    assert ours <= bound * (1 + 1e-6)
    if b >= n:
        assert ours == pytest.approx(bound, rel=1e-6)
        assert ours ** 2 == pytest.approx(max(sum(lo <= t < hi for lo, hi in _nodes(n))
                                              for t in range(n)))


def test_published_gboard_setting_is_reproduced():
    """The Spanish Gboard next-word model trained with tree-aggregation DP-FTRL (McMahan &
    Thakurta, "Federated Learning with Formal Differential Privacy Guarantees", Google AI
    blog 2022, and its supplemental accounting colab in google-research/federated
    dp_ftrl/; the accounting of Kairouz et al. 2021, Appendix D): noise multiplier 7,
    2000 rounds, at least 313 rounds between two participations of a device (b = 314),
    at most 6 participations, δ = 1e-10. Published: ρ = 0.81 zCDP and ε = 8.90 (RDP)."""
    zeta = TreeSensitivity(314, 6).squared(2000)
    assert zeta == 79.0
    assert round(zeta / (2 * 7.0 ** 2), 2) == 0.81
    assert round(gaussian_epsilon(7.0 / math.sqrt(zeta), 1e-10, "rdp"), 2) == 8.90


def test_tree_noise_has_the_trees_covariance():
    """Over n rounds the prefix sums of the noise are σ times the sum of the nodes that
    decompose each prefix: Cov(S_i, S_j) = σ² · (nodes shared by prefixes i and j)."""
    n, z, clip = 13, 2.0, 0.5
    W, metrics = noise_of_rounds(tree_gaussian(z, expected_clients=1.0), n, clip)
    assert float(metrics["dp_noise_std"]) == pytest.approx(z * clip)
    S = np.cumsum(W, axis=0) / (z * clip)
    d = S.shape[1]

    def decomposition(t):  # the dyadic blocks of the first t rounds, largest first
        out, lo = set(), 0
        for j in reversed(range(t.bit_length())):
            if t >> j & 1:
                out.add((lo, lo + 2 ** j))
                lo += 2 ** j
        return out

    shared = np.array([[len(decomposition(i + 1) & decomposition(j + 1)) for j in range(n)]
                       for i in range(n)], float)
    assert np.abs(S @ S.T / d - shared).max() < 6 * math.sqrt(2 / d) * shared.max()
    assert not np.allclose(shared, np.diag(np.diag(shared)))


def _setup():
    train, test = fs.data.load_digits()
    clients = fs.data.partition(train, train["y"], "dirichlet", 40, seed=0, alpha=0.5)
    model = fs.models.get_model("logistic_regression", (8, 8, 1), 10)
    alg = fs.algorithms.fedavg(optax.sgd(0.3), batch_size=10, weighting="uniform")
    return clients, test, model, alg


def test_tree_run_reports_the_trees_epsilon_every_round():
    clients, test, model, alg = _setup()
    privacy = MatrixFactorizationDP(noise_multiplier=1.5, clip_norm=0.5, delta=1e-3,
                                    strategy="tree")
    result = fs.simulate(model, alg, clients, rounds=12, clients_per_round=8, eval_data=test,
                         eval_every=6, privacy=privacy, progress=False)
    acct = MatrixFactorizationAccountant(TreeMechanism(1.5, 5, 12), delta=1e-3)
    assert [r["epsilon"] for r in result.history] == pytest.approx(
        [acct.epsilon(t) for t in range(1, 13)])
    # after 12 rounds each client took part <= 3 times, 5 apart: brute force says 13
    assert _brute_force(12, 5, 3) == 13.0
    summary = result.summary["privacy"]["matrix_factorization"]
    assert summary["strategy"] == "tree" and summary["sensitivity"] == pytest.approx(math.sqrt(13))
    assert result.history[-1]["test_accuracy"] > 0.5


def test_tree_settings_errors_and_calibration():
    with pytest.raises(fs.UserError, match="privacy.strategy must be 'bandmf' or 'tree'"):
        MatrixFactorizationDP(noise_multiplier=1.0, clip_norm=1.0, delta=1e-3, strategy="dense")
    with pytest.raises(fs.UserError, match="privacy.bands applies to strategy='bandmf' only"):
        MatrixFactorizationDP(noise_multiplier=1.0, clip_norm=1.0, delta=1e-3, strategy="tree",
                              bands=3)
    z = calibrate_noise_multiplier(4.0, rounds=30, min_separation=6, delta=1e-5, strategy="tree")
    acct = lambda z_: MatrixFactorizationAccountant(TreeMechanism(z_, 6, 30), delta=1e-5)  # noqa: E731
    assert acct(z).epsilon(30) <= 4.0 < acct(z * 0.999).epsilon(30)
    # the tree needs more noise than BandMF for the same ε
    assert z > calibrate_noise_multiplier(4.0, rounds=30, min_separation=6, delta=1e-5)


@pytest.mark.slow  # three checkpointed runs: about a minute on 2 cores
def test_an_interrupted_tree_run_resumes_exactly_and_may_run_longer(tmp_path):
    """The tree's root key and round count live in the checkpointed aggregator state, so a
    resumed run equals the uninterrupted one; the tree does not depend on the number of
    rounds, so a finished run may be extended."""
    clients, test, model, alg = _setup()
    kw = dict(clients_per_round=8, eval_every=5, progress=False,
              privacy=MatrixFactorizationDP(noise_multiplier=1.5, clip_norm=0.5, delta=1e-3,
                                            strategy="tree"),
              checkpoint=fs.CheckpointOptions(every_rounds=3))
    full = fs.simulate(model, alg, clients, rounds=10, **kw)

    def stop(row):
        if row["round"] == 7:
            raise KeyboardInterrupt

    workdir = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        fs.simulate(model, alg, clients, rounds=10, workdir=workdir, callback=stop, **kw)
    resumed = fs.simulate(model, alg, clients, rounds=10, workdir=workdir, **kw)
    assert resumed.summary["resumed_from_round"] == 6
    for a, b in zip(jax.tree_util.tree_leaves(full.params), jax.tree_util.tree_leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    longer = fs.simulate(model, alg, clients, rounds=14, workdir=workdir, **kw)
    acct = MatrixFactorizationAccountant(TreeMechanism(1.5, 5, 14), delta=1e-3)
    assert longer.history[-1]["round"] == 14
    assert longer.history[-1]["epsilon"] == pytest.approx(acct.epsilon(14))
