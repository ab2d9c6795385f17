"""DP-FTRL with banded matrix factorization: the correlated noise has the covariance its
factorization says, the sensitivity and ε are those of independent computations, and the
cyclic sampler enforces the participation the accounting assumes."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import optimize, stats

import fedjax_sim as fs
from helpers import noise_of_rounds
from fedjax_sim.aggregators.matrix_factorization import correlated_gaussian
from fedjax_sim.engine.round import cyclic_groups
from fedjax_sim.privacy import MatrixFactorizationDP
from fedjax_sim.privacy.matrix_factorization import (BandMFMechanism, MatrixFactorizationAccountant,
                                                     bandmf_coefficients,
                                                     calibrate_noise_multiplier,
                                                     gaussian_epsilon, sensitivity)


def _toeplitz(coef, n):
    """The n x n lower-triangular banded Toeplitz matrix of coef (numpy, independent)."""
    C = np.zeros((n, n))
    for j, c in enumerate(coef):
        C += c * np.eye(n, k=-j)
    return C


def test_correlated_noise_has_the_factorizations_covariance():
    """The noise of n rounds, W [n, d], is σ C⁻¹ Z: C W / σ has i.i.d. N(0, 1) entries, so
    its rows' sample covariance over d coordinates is I within a few sqrt(2/d)."""
    n, bands, z, clip = 10, 4, 2.0, 0.5
    coef = bandmf_coefficients(n, bands)
    W, _ = noise_of_rounds(correlated_gaussian(z, coefficients=coef, expected_clients=1.0), n, clip)
    d = W.shape[1]
    Z = _toeplitz(coef, n) @ W / (z * clip)
    cov = Z @ Z.T / d
    assert np.abs(cov - np.eye(n)).max() < 6 * math.sqrt(2 / d)
    # and the noise itself is correlated across rounds as C⁻¹ C⁻ᵀ says
    inv = np.linalg.inv(_toeplitz(coef, n))
    expected = inv @ inv.T
    scale = np.sqrt(np.outer(np.diag(expected), np.diag(expected)))
    assert np.abs(W @ W.T / d / (z * clip) ** 2 - expected).max() < 6 * math.sqrt(2 / d) * scale.max()
    assert not np.allclose(expected, np.diag(np.diag(expected)))  # really correlated


@pytest.mark.parametrize("n, bands, separation", [(24, 4, 4), (24, 4, 6), (24, 6, 3), (30, 1, 5)])
def test_sensitivity_matches_the_librarys_dense_computation(n, bands, separation):
    from jax_privacy.matrix_factorization import sensitivity as dense_sensitivity

    coef = bandmf_coefficients(n, bands)
    k = math.ceil(n / separation)
    C = jnp.asarray(_toeplitz(coef, n), jnp.float32)
    reference = float(dense_sensitivity.get_min_sep_sensitivity_upper_bound(
        C, min_sep=separation, max_participations=k))
    ours = sensitivity(coef, rounds=n, min_separation=separation)
    assert ours == pytest.approx(reference, rel=1e-5)
    if bands <= separation:  # unit columns at least b apart never overlap: sqrt(k)
        assert ours == pytest.approx(math.sqrt(k), rel=1e-5)
    else:
        assert ours > math.sqrt(k)


def _analytic_gaussian_epsilon(mu: float, delta: float) -> float:
    """Balle & Wang (2018): the exact ε(δ) of a Gaussian mechanism with sensitivity/σ = mu."""
    f = lambda eps: (stats.norm.cdf(-eps / mu + mu / 2)
                     - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta)
    return optimize.brentq(f, 0.0, 500.0)


@pytest.mark.parametrize("z, rounds, separation", [(1.0, 50, 5), (3.0, 100, 10), (0.7, 8, 8)])
def test_epsilon_is_the_gaussian_mechanisms_at_the_strategys_sensitivity(z, rounds, separation):
    coef = bandmf_coefficients(rounds, separation)
    mech = BandMFMechanism(z, coef, separation, rounds)
    sens = math.sqrt(math.ceil(rounds / separation))
    exact = _analytic_gaussian_epsilon(sens / z, 1e-5)
    pld = MatrixFactorizationAccountant(mech, delta=1e-5, accountant="pld").epsilon(rounds)
    rdp = MatrixFactorizationAccountant(mech, delta=1e-5, accountant="rdp").epsilon(rounds)
    assert exact <= pld <= exact * 1.01 + 1e-3  # PLD's pessimistic discretization
    assert pld < rdp  # RDP's conversion is looser
    assert gaussian_epsilon(z / sens, 1e-5) == pytest.approx(pld)


def test_epsilon_grows_with_participations_and_target_epsilon_stops():
    coef = bandmf_coefficients(40, 4)
    acct = MatrixFactorizationAccountant(BandMFMechanism(2.0, coef, 4, 40), delta=1e-5)
    eps = [acct.epsilon(t) for t in range(1, 41)]
    assert all(a <= b + 1e-12 for a, b in zip(eps, eps[1:]))
    # after one round only the first row of C is released: sensitivity c0
    exact = _analytic_gaussian_epsilon(coef[0] / 2.0, 1e-5)
    assert exact <= eps[0] <= exact * 1.01 + 1e-3
    target = eps[19]
    assert acct.max_count(target, 40) == max(t for t in range(1, 41) if eps[t - 1] <= target)


def test_cyclic_sampler_enforces_the_participation_pattern():
    """Every client takes part at most once every b rounds and at most ceil(T/b) times;
    each cohort is drawn from its round's group, without repeats."""
    num_clients, m, b, T = 103, 7, 12, 60
    train, _ = fs.data.load_digits()
    clients = fs.data.partition(train, train["y"], "iid", num_clients, seed=0)
    model = fs.models.get_model("logistic_regression", (8, 8, 1), 10)
    alg = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=10, weighting="uniform")
    privacy = MatrixFactorizationDP(noise_multiplier=1.0, clip_norm=1.0, delta=1e-3, min_separation=b)
    plan = fs.simulation.setup.plan_run(fs.simulation.setup.RunRequest(
        model=model, algorithm=alg, train_data=clients, rounds=T, clients_per_round=m,
        privacy=privacy, progress=False))
    ids, live = jax.device_get(plan.program.cohorts(plan.root, 0, T))
    assert live.all()
    groups = cyclic_groups(num_clients, b)
    assert sorted(groups[groups >= 0].tolist()) == list(range(num_clients))
    last = {}
    counts = np.zeros(num_clients, int)
    for r in range(T):
        cohort = ids[r].tolist()
        assert len(set(cohort)) == m and set(cohort) <= set(groups[r % b].tolist())
        for c in cohort:
            assert r - last.get(c, -b) >= b
            last[c] = r
            counts[c] += 1
    assert counts.max() <= math.ceil(T / b)


def test_dp_ftrl_run_reports_epsilon_every_round_and_stops_at_the_target():
    train, test = fs.data.load_digits()
    clients = fs.data.partition(train, train["y"], "dirichlet", 40, seed=0, alpha=0.5)
    model = fs.models.get_model("logistic_regression", (8, 8, 1), 10)
    alg = fs.algorithms.fedavg(optax.sgd(0.3), batch_size=10, weighting="uniform")
    privacy = MatrixFactorizationDP(noise_multiplier=1.5, clip_norm=0.5, delta=1e-3)
    result = fs.simulate(model, alg, clients, rounds=12, clients_per_round=8, eval_data=test,
                         eval_every=6, privacy=privacy, progress=False)
    eps = [r["epsilon"] for r in result.history]
    sep = 40 // 8
    coef = bandmf_coefficients(12, sep)
    acct = MatrixFactorizationAccountant(BandMFMechanism(1.5, coef, sep, 12), delta=1e-3)
    assert eps == pytest.approx([acct.epsilon(t) for t in range(1, 13)])
    summary = result.summary["privacy"]
    assert summary["sampling"] == "cyclic"
    assert summary["matrix_factorization"]["max_participations"] == math.ceil(12 / sep)
    target = eps[6]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stopped = fs.simulate(model, alg, clients, rounds=12, clients_per_round=8, eval_data=test,
                              eval_every=6, progress=False,
                              privacy=MatrixFactorizationDP(noise_multiplier=1.5, clip_norm=0.5,
                                                            delta=1e-3, target_epsilon=target))
    assert stopped.history[-1]["epsilon"] <= target
    assert len(stopped.history) == max(t for t in range(1, 13) if eps[t - 1] <= target)


def test_bad_dp_ftrl_settings_are_one_line_errors():
    with pytest.raises(fs.UserError, match="privacy.bands must be an integer >= 1"):
        MatrixFactorizationDP(noise_multiplier=1.0, clip_norm=1.0, delta=1e-3, bands=0)
    train, _ = fs.data.load_digits()
    clients = fs.data.partition(train, train["y"], "iid", 20, seed=0)
    model = fs.models.get_model("logistic_regression", (8, 8, 1), 10)
    alg = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=10, weighting="uniform")
    with pytest.raises(fs.UserError, match="min_separation=5 splits the 20 clients into groups of 4"):
        fs.simulate(model, alg, clients, rounds=3, clients_per_round=5, progress=False,
                    privacy=MatrixFactorizationDP(noise_multiplier=1.0, clip_norm=1.0, delta=1e-3,
                                                  min_separation=5))


def test_calibrated_noise_multiplier_meets_the_target_epsilon():
    z = calibrate_noise_multiplier(4.0, rounds=30, min_separation=6, delta=1e-5)
    coef = bandmf_coefficients(30, 6)
    acct = lambda z_: MatrixFactorizationAccountant(BandMFMechanism(z_, coef, 6, 30), delta=1e-5)  # noqa: E731
    assert acct(z).epsilon(30) <= 4.0 < acct(z * 0.999).epsilon(30)


@pytest.mark.slow  # three checkpointed runs: about a minute on 2 cores
def test_an_interrupted_dp_ftrl_run_resumes_exactly_and_refuses_other_rounds(tmp_path):
    """The correlated noise's buffers live in the checkpointed aggregator state: a resumed
    run equals the uninterrupted one. Its strategy is built for the run's rounds, so
    resuming with other rounds would switch mechanisms mid-run and is refused."""
    train, test = fs.data.load_digits()
    clients = fs.data.partition(train, train["y"], "dirichlet", 40, seed=0, alpha=0.5)
    model = fs.models.get_model("logistic_regression", (8, 8, 1), 10)
    alg = fs.algorithms.fedavg(optax.sgd(0.3), batch_size=10, weighting="uniform")
    kw = dict(rounds=10, clients_per_round=8, eval_every=5, progress=False,
              privacy=MatrixFactorizationDP(noise_multiplier=1.5, clip_norm=0.5, delta=1e-3),
              checkpoint=fs.CheckpointOptions(every_rounds=3))
    full = fs.simulate(model, alg, clients, **kw)

    def stop(row):
        if row["round"] == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fs.simulate(model, alg, clients, **kw, workdir=str(tmp_path), callback=stop)
    resumed = fs.simulate(model, alg, clients, **kw, workdir=str(tmp_path))
    assert resumed.summary["resumed_from_round"] == 6
    for a, b in zip(jax.tree_util.tree_leaves(full.params), jax.tree_util.tree_leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [r["epsilon"] for r in resumed.history] == [r["epsilon"] for r in full.history]
    with pytest.raises(fs.UserError, match="privacy_strategy.rounds"):
        fs.simulate(model, alg, clients, **{**kw, "rounds": 12}, workdir=str(tmp_path))


def _cyclic_poisson_plan(num_clients, m, b, T, **privacy):
    train, _ = fs.data.load_digits()
    clients = fs.data.partition(train, train["y"], "iid", num_clients, seed=0)
    model = fs.models.get_model("logistic_regression", (8, 8, 1), 10)
    alg = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=10, weighting="uniform")
    return fs.simulation.setup.plan_run(fs.simulation.setup.RunRequest(
        model=model, algorithm=alg, train_data=clients, rounds=T, clients_per_round=m,
        privacy=MatrixFactorizationDP(noise_multiplier=1.0, clip_norm=1.0, delta=1e-3,
                                      min_separation=b, participation="cyclic_poisson", **privacy),
        progress=False))


def test_cyclic_poisson_sampler_draws_each_group_member_with_probability_q():
    """Round r's cohort holds only members of group r mod b, each present independently
    with probability q = m / (N // b): over the rounds every client's count of
    participations is Binomial(⌈T/b⌉, q), and the cohort sizes are Binomial(group, q)."""
    num_clients, m, b, T = 60, 3, 4, 400
    plan = _cyclic_poisson_plan(num_clients, m, b, T)
    q = m / (num_clients // b)
    assert plan.program.sampling.kind == "cyclic_poisson" and plan.program.sampling.rate == q
    ids, live = jax.device_get(plan.program.cohorts(plan.root, 0, T))
    groups = cyclic_groups(num_clients, b)
    counts = np.zeros(num_clients, int)
    sizes = live.sum(axis=1)
    for r in range(T):
        cohort = ids[r][live[r]].tolist()
        assert len(set(cohort)) == len(cohort) and set(cohort) <= set(groups[r % b].tolist())
        assert live[r][:sizes[r]].all()  # the joined clients fill the first slots
        counts[cohort] += 1
    # each client: ⌈T/b⌉ = 100 chances at q = 0.2; the total over 60 clients is Binomial(6000, q)
    total, n = counts.sum(), num_clients * (T // b)
    assert abs(total - n * q) < 4 * math.sqrt(n * q * (1 - q))
    # a group holds 15 clients: sizes are Binomial(15, q) (cap: all 15 slots)
    assert plan.program.sampling.slots <= 15
    assert abs(sizes.mean() - 15 * q) < 4 * math.sqrt(15 * q * (1 - q) / T)
    assert abs(sizes.var() - 15 * q * (1 - q)) < 0.5


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_amplified_bandmf_epsilon_is_the_librarys(accountant):
    """ε every round equals jax_privacy's DpsgdTrainingAccountant for BandMF under cyclic
    Poisson sampling (cycle_length = b, batch size m, N clients)."""
    from jax_privacy.accounting import accountants, analysis

    num_clients, m, b, T = 40, 4, 5, 12
    train, test = fs.data.load_digits()
    clients = fs.data.partition(train, train["y"], "dirichlet", num_clients, seed=0, alpha=0.5)
    model = fs.models.get_model("logistic_regression", (8, 8, 1), 10)
    alg = fs.algorithms.fedavg(optax.sgd(0.3), batch_size=10, weighting="uniform")
    result = fs.simulate(model, alg, clients, rounds=T, clients_per_round=m, eval_data=test,
                         eval_every=T, progress=False,
                         privacy=MatrixFactorizationDP(noise_multiplier=1.5, clip_norm=0.5,
                                                       delta=1e-3, min_separation=b,
                                                       participation="cyclic_poisson",
                                                       accountant=accountant))
    config = (accountants.PldAccountantConfig(value_discretization_interval=1e-3)
              if accountant == "pld" else accountants.RdpAccountantConfig())
    library = analysis.DpsgdTrainingAccountant(dp_accountant_config=config)
    params = analysis.DpParams(noise_multipliers=1.5, num_samples=num_clients, delta=1e-3,
                               batch_size=m, cycle_length=b)
    assert [r["epsilon"] for r in result.history] == pytest.approx(
        [library.compute_epsilon(t, params) for t in range(1, T + 1)], rel=1e-3)
    summary = result.summary["privacy"]
    assert summary["sampling"] == "cyclic_poisson" and summary["sampling_rate"] == 0.5
    assert all(1 <= r["cohort_size"] <= 8 for r in result.history)
    # amplification: below the same run without sampling
    cyclic = MatrixFactorizationAccountant(
        BandMFMechanism(1.5, bandmf_coefficients(T, b), b, T), delta=1e-3, accountant=accountant)
    assert result.history[-1]["epsilon"] < cyclic.epsilon(T)
    z = calibrate_noise_multiplier(result.history[-1]["epsilon"], rounds=T, min_separation=b,
                                   delta=1e-3, accountant=accountant, sampling_rate=0.5)
    assert z == pytest.approx(1.5, rel=2e-3)


def test_cyclic_poisson_settings_are_one_line_errors():
    kw = dict(noise_multiplier=1.0, clip_norm=1.0, delta=1e-3)
    with pytest.raises(fs.UserError, match="proven for BandMF only"):
        MatrixFactorizationDP(**kw, strategy="tree", participation="cyclic_poisson")
    with pytest.raises(fs.UserError, match="needs bands <= min_separation"):
        MatrixFactorizationDP(**kw, participation="cyclic_poisson", min_separation=3, bands=4)
    with pytest.raises(fs.UserError, match="max_cohort_size applies to participation='cyclic_poisson'"):
        MatrixFactorizationDP(**kw, max_cohort_size=10)
    with pytest.raises(fs.UserError, match="privacy.participation must be 'cyclic' or 'cyclic_poisson'"):
        MatrixFactorizationDP(**kw, participation="poisson")
    # the default separation (60 clients // 3 a round = 20) is known only to the run
    with pytest.raises(fs.UserError, match="needs bands <= min_separation, got bands=25 > 20"):
        _cyclic_poisson_plan(60, 3, None, 30, bands=25)
