"""Privacy accounting against dp_accounting called directly, scipy, and published numbers."""

import json
import math
import re
import warnings

import dp_accounting
import pytest
from scipy import stats

from fedjax_sim.cli.main import main
from fedjax_sim.errors import UserError
from fedjax_sim.privacy import accounting
from fedjax_sim.privacy.accounting import Accountant, SampledGaussian

# TensorFlow Federated's DP tutorial: 120 of 3,383 EMNIST clients per round, z = 1.2,
# 100 rounds, δ = 1e-5 gives ε ≈ 2 (RDP).
TFF_N = 3383
TFF_Q = 120 / 3383
DISC = 1e-3

# Every Accountant here uses δ < 1/N except where the warning is the point.
pytestmark = pytest.mark.filterwarnings("error::UserWarning")

CASES = [(0.01, 1.1, 1000, 1e-5), (0.1, 0.8, 50, 1e-6), (1.0, 5.0, 10, 1e-5)]


def _poisson(z, q, population=10_000, cap=None):
    return SampledGaussian(noise_multiplier=z, sampling="poisson", population=population,
                           sampling_rate=q, max_sample_size=cap)


def _reference_rdp(event, count, delta, relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE):
    acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
    acc.compose(dp_accounting.SelfComposedDpEvent(event, count))
    return acc.get_epsilon(delta)


def _reference_pld(q, z, count, delta):
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=DISC)
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), count))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("q,z,count,delta", CASES)
def test_rdp_epsilon_matches_dp_accounting(q, z, count, delta):
    acc = Accountant(_poisson(z, q), delta=delta)
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    for t in (1, count // 2, count):
        assert acc.epsilon(t) == pytest.approx(_reference_rdp(event, t, delta), rel=1e-9)


def test_rdp_fallback_without_accountant_state_gives_the_same(monkeypatch):
    q, z, count, delta = CASES[0]
    fast = Accountant(_poisson(z, q), delta=delta).epsilon(count)
    monkeypatch.setattr(Accountant, "_one_step_rdp", lambda self: None)
    slow = Accountant(_poisson(z, q), delta=delta)
    assert slow._rdp_curve is None
    assert slow.epsilon(count) == pytest.approx(fast, rel=1e-9)


@pytest.mark.parametrize("q,z,count,delta", CASES)
def test_pld_epsilon_matches_dp_accounting(q, z, count, delta):
    acc = Accountant(_poisson(z, q), delta=delta, accountant="pld", pld_discretization=DISC)
    assert acc.epsilon(count) == pytest.approx(_reference_pld(q, z, count, delta), rel=1e-6)
    # PLD is tighter than the RDP upper bound.
    assert acc.epsilon(count) <= Accountant(_poisson(z, q), delta=delta).epsilon(count)


def test_tff_tutorial_epsilon_is_about_two():
    rdp = accounting.epsilon(1.2, rounds=100, delta=1e-5, sampling_rate=TFF_Q, population=TFF_N)
    pld = accounting.epsilon(1.2, rounds=100, delta=1e-5, sampling_rate=TFF_Q, population=TFF_N,
                             accountant="pld")
    assert 1.9 < rdp < 2.1  # published ε ≈ 2 (1.986)
    assert 1.5 < pld < rdp


def test_fixed_size_sampling_is_without_replacement_at_half_the_multiplier():
    z, n, m, rounds, delta = 2.0, 1000, 50, 20, 1e-5
    mech = SampledGaussian(noise_multiplier=z, sampling="fixed", population=n, sample_size=m)
    assert mech.neighboring_relation == dp_accounting.NeighboringRelation.REPLACE_ONE
    assert mech.event() == dp_accounting.SampledWithoutReplacementDpEvent(
        n, m, dp_accounting.GaussianDpEvent(z / 2))
    assert mech.expected_sample_size == m and mech.overflow_probability() == 0.0
    reference = _reference_rdp(mech.event(), rounds, delta,
                               dp_accounting.NeighboringRelation.REPLACE_ONE)
    assert Accountant(mech, delta=delta).epsilon(rounds) == pytest.approx(reference, rel=1e-9)
    with pytest.raises(UserError, match="accountant='rdp' or poisson"):
        Accountant(mech, delta=delta, accountant="pld")


def test_poisson_event_and_relation():
    mech = _poisson(1.3, 0.02, population=5000)
    assert mech.event() == dp_accounting.PoissonSampledDpEvent(
        0.02, dp_accounting.GaussianDpEvent(1.3))
    assert mech.neighboring_relation == dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    assert mech.expected_sample_size == pytest.approx(100.0)


def test_default_cap_is_the_smallest_with_overflow_below_the_bound():
    cap = accounting.default_cap(TFF_N, TFF_Q)
    assert stats.binom.sf(cap, TFF_N + 1, TFF_Q) <= 1e-12 < stats.binom.sf(cap - 1, TFF_N + 1, TFF_Q)
    assert _poisson(1.2, TFF_Q, TFF_N, cap).overflow_probability() == pytest.approx(
        stats.binom.sf(cap, TFF_N + 1, TFF_Q), rel=1e-12)
    # Full participation: only a cap of N + 1 never overflows for the larger neighbour ...
    assert accounting.default_cap(10, 1.0) == 11
    # ... but a cap of N never binds on the N records simulated: the release is exactly
    # the uncapped mechanism's, so nothing is charged to δ.
    assert _poisson(1.0, 1.0, 10, 10).overflow_probability() == 0.0
    assert _poisson(1.0, 0.3, 10, 9).overflow_probability() == pytest.approx(
        stats.binom.sf(9, 11, 0.3), rel=1e-12)
    # So a huge ε with the cap at N is reported as it is, not as unbounded.
    z, q, n = 0.3, 0.2, 100
    reference = dp_accounting.rdp.RdpAccountant()
    reference.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), 50)
    assert accounting.Accountant(_poisson(z, q, n, n), delta=1e-3, accountant="rdp").epsilon(50) == \
        pytest.approx(reference.get_epsilon(1e-3), rel=1e-9)


def _capped_reference(z, q, n, cap, count, delta):
    """ε(δ − s) with s = (1 + e^{ε(δ/2)})·t·p, everything from dp_accounting and scipy."""
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    p = stats.binom.sf(cap, n + 1, q)
    slack = (1 + math.exp(_reference_rdp(event, count, delta / 2))) * count * p
    return _reference_rdp(event, count, delta - slack)


def test_truncation_slack():
    z, rounds, delta = 1.2, 100, 1e-5
    uncapped = Accountant(_poisson(z, TFF_Q, TFF_N), delta=delta).epsilon(rounds)
    # A generous cap costs nothing visible.
    cap = accounting.default_cap(TFF_N, TFF_Q, overflow=1e-20)
    capped = Accountant(_poisson(z, TFF_Q, TFF_N, cap), delta=delta).epsilon(rounds)
    assert capped == pytest.approx(uncapped, rel=1e-9)
    # The default cap (overflow 1e-12) shifts δ by ~1e-9 of 1e-5: ε moves by < 1e-4.
    cap = accounting.default_cap(TFF_N, TFF_Q)
    capped = Accountant(_poisson(z, TFF_Q, TFF_N, cap), delta=delta).epsilon(rounds)
    assert uncapped <= capped < uncapped + 1e-4
    assert capped == pytest.approx(_capped_reference(z, TFF_Q, TFF_N, cap, rounds, delta), rel=1e-9)
    # A tight cap: a visible slack, still matching the formula.
    capped = Accountant(_poisson(z, TFF_Q, TFF_N, 188), delta=delta).epsilon(rounds)
    assert capped > uncapped + 1e-2
    assert capped == pytest.approx(_capped_reference(z, TFF_Q, TFF_N, 188, rounds, delta), rel=1e-9)
    # Too small a cap: no guarantee at this δ.
    with pytest.raises(UserError, match="max_sample_size = 150 is too small"):
        Accountant(_poisson(z, TFF_Q, TFF_N, 150), delta=delta).epsilon(rounds)


def test_max_count_is_the_largest_count_under_the_target():
    acc = Accountant(_poisson(1.2, TFF_Q, TFF_N), delta=1e-5)
    t = acc.max_count(1.5, 1000)
    assert 0 < t < 1000
    assert acc.epsilon(t) <= 1.5 < acc.epsilon(t + 1)
    assert acc.max_count(100.0, 50) == 50
    assert acc.max_count(0.0, 10) == 0
    # With a tight cap, counts whose slack no longer fits in δ are over the target.
    capped = Accountant(_poisson(1.2, TFF_Q, TFF_N, 188), delta=1e-5)
    t = capped.max_count(math.inf, 10_000)
    capped.epsilon(t)
    with pytest.raises(UserError):
        capped.epsilon(t + 1)


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_calibrate_noise_round_trips(kind):
    common = dict(rounds=100, delta=1e-5, sampling_rate=TFF_Q, population=TFF_N, accountant=kind)
    z = accounting.calibrate_noise(2.0, tolerance=1e-3, **common)
    eps = accounting.epsilon(z, **common)
    assert 2.0 - 1e-2 < eps <= 2.0
    assert accounting.epsilon(z - 2e-3, **common) > 2.0


def test_zero_noise_and_zero_count():
    acc = Accountant(_poisson(0.0, TFF_Q, TFF_N), delta=1e-5)
    assert acc.epsilon(0) == 0.0 and acc.epsilon(1) == math.inf
    assert Accountant(_poisson(0.0, TFF_Q, TFF_N), delta=1e-5, accountant="pld").epsilon(3) == math.inf
    assert Accountant(_poisson(1.0, TFF_Q, TFF_N), delta=1e-5).epsilon(0) == 0.0


@pytest.mark.parametrize("make,name", [
    (lambda: _poisson(-1.0, 0.1), "noise_multiplier"),
    (lambda: _poisson(math.nan, 0.1), "noise_multiplier"),
    (lambda: _poisson(1.0, 0.0), "sampling_rate"),
    (lambda: _poisson(1.0, 1.5), "sampling_rate"),
    (lambda: _poisson(1.0, 0.1, population=0), "population"),
    (lambda: _poisson(1.0, 0.1, cap=0), "max_sample_size"),
    (lambda: SampledGaussian(1.0, "uniform", 100, sampling_rate=0.1), "sampling"),
    (lambda: SampledGaussian(1.0, "fixed", 100, sample_size=101), "sample_size"),
    (lambda: Accountant(_poisson(1.0, 0.1), delta=0.0), "delta"),
    (lambda: Accountant(_poisson(1.0, 0.1), delta=1.0), "delta"),
    (lambda: Accountant(_poisson(1.0, 0.1), delta=1e-6, accountant="moments"), "accountant"),
    (lambda: Accountant(_poisson(1.0, 0.1), delta=1e-6).epsilon(-1), "count"),
    (lambda: accounting.calibrate_noise(0.0, rounds=10, delta=1e-5, sampling_rate=0.1),
     "target_epsilon"),
    (lambda: accounting.calibrate_noise(-1.0, rounds=10, delta=1e-5, sampling_rate=0.1),
     "target_epsilon"),
    (lambda: accounting.epsilon(1.0, rounds=10, delta=1e-5, sampling="fixed", sample_size=5),
     "population"),
])
def test_bad_input_names_the_argument(make, name):
    with pytest.raises(UserError, match=re.escape(name)) as info:
        make()
    assert "\n" not in str(info.value)


def test_delta_at_least_one_over_population_warns():
    with pytest.warns(UserWarning, match=r"delta = 0.001 >= 1/N = 1/1000"):
        Accountant(_poisson(1.0, 0.1, population=1000), delta=1e-3)
    with pytest.warns(UserWarning, match="delta"):
        accounting.epsilon(1.0, rounds=1, delta=1e-3, sampling_rate=0.1, population=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Accountant(_poisson(1.0, 0.1, population=1000), delta=1e-4 / 2)
        accounting.epsilon(1.0, rounds=1, delta=1e-3, sampling_rate=0.1)  # N unknown: no check


def _cli(capsys, *args):
    code = main(["privacy", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


TFF_ARGS = ("--sampling-rate", str(TFF_Q), "--rounds", "100", "--delta", "1e-5")


def test_cli_prints_epsilon(capsys):
    code, out, err = _cli(capsys, "--noise-multiplier", "1.2", *TFF_ARGS)
    assert code == 0, err
    assert out.startswith("ε = 1.99 at δ = 1e-05 after 100 rounds (Poisson sampling q = 0.0354")
    assert "z = 1.2, RDP accountant" in out
    code, out, err = _cli(capsys, "--noise-multiplier", "1.2", "--json", *TFF_ARGS)
    row = json.loads(out)
    assert code == 0 and row["epsilon"] == pytest.approx(
        accounting.epsilon(1.2, rounds=100, delta=1e-5, sampling_rate=TFF_Q), rel=1e-12)
    assert row["delta"] == 1e-5 and row["noise_multiplier"] == 1.2 and row["rounds"] == 100
    assert row["sampling"] == "poisson" and row["sampling_rate"] == TFF_Q
    assert row["accountant"] == "rdp"


def test_cli_calibrates_noise(capsys):
    code, out, err = _cli(capsys, "--epsilon", "2.0", *TFF_ARGS)
    assert code == 0, err
    match = re.match(r"noise multiplier z = ([0-9.]+) gives ε = ([0-9.]+) at δ = 1e-05 after 100 "
                     r"rounds \(Poisson sampling q = 0.0354\d*, RDP accountant\)", out)
    assert match, out
    z = float(match.group(1))
    assert 1.19 < z < 1.21
    assert accounting.epsilon(z, rounds=100, delta=1e-5, sampling_rate=TFF_Q) <= 2.0
    code, out, err = _cli(capsys, "--epsilon", "2.0", "--json", *TFF_ARGS)
    row = json.loads(out)
    assert code == 0 and row["target_epsilon"] == 2.0
    assert 2.0 - 1e-2 < row["epsilon"] <= 2.0


def test_cli_bad_input_is_one_line_error(capsys):
    code, out, err = _cli(capsys, "--noise-multiplier", "1.2", "--sampling-rate", "0.1",
                          "--rounds", "10", "--delta", "0")
    assert code == 2 and out == ""
    assert err.startswith("error: delta must be in (0, 1)") and err.count("\n") == 1
    code, out, err = _cli(capsys, "--noise-multiplier", "1.2", "--clients-per-round", "10",
                          "--rounds", "10", "--delta", "1e-5")
    assert code == 2 and err.startswith("error: --clients-per-round needs --population")
