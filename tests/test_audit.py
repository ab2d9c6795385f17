"""Empirical privacy auditing: canaries send exactly their crafted updates, the scores
separate them when nothing hides them, a correct mechanism's lower bound stays below its
ε and a mechanism with 10x less noise than it claims is caught."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.privacy import ClientLevelDP
from fedjax_sim.simulation.audit import canary_direction


def _digits(num_clients):
    train, _ = fs.data.load_digits()
    return fs.data.partition(train, train["y"], "iid", num_clients, seed=0)


def test_canary_directions_are_unit_and_fixed_by_seed_and_index():
    like = {"w": jnp.zeros((7, 3)), "b": jnp.zeros(5)}
    u = canary_direction(like, 0, 3)
    flat = np.concatenate([np.ravel(u["w"]), np.ravel(u["b"])])
    assert np.linalg.norm(flat) == pytest.approx(1.0, rel=1e-5)
    again = canary_direction(like, 0, 3)
    assert np.array_equal(u["w"], again["w"])
    other = canary_direction(like, 0, 4)
    assert abs(np.dot(flat, np.concatenate([np.ravel(other["w"]), np.ravel(other["b"])]))) < 0.9


def test_without_noise_or_honest_learning_the_scores_separate_in_from_out():
    """Honest clients at learning rate 0 send nothing and z = 0: the model moves only along
    the inserted canaries' directions, so every in canary outscores every out canary."""
    model = fs.models.get_model("logistic_regression", (8, 8, 1), 10)
    alg = fs.algorithms.fedavg(optax.sgd(0.0), local_steps=1, local_epochs=None, batch_size=10,
                               weighting="uniform")
    # every client in every round: the 10 honest ones and the canaries the audit inserts
    chosen = np.flatnonzero(np.random.default_rng([0, 0xA0D17]).random(40) < 0.5)
    inserted = len(chosen)
    m = 10 + inserted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # z = 0: ε is infinite
        report = fs.audit(model, alg, _digits(10), rounds=3, clients_per_round=m, canaries=40,
                          privacy=ClientLevelDP(noise_multiplier=0.0, clip_norm=1.0, delta=1e-5,
                                                sampling="fixed"), progress=False)
    assert len(report.in_scores) + len(report.out_scores) == 40
    assert report.auroc == 1.0 and report.in_scores.min() > report.out_scores.max()
    assert len(report.in_scores) == inserted
    # the model moved by 3 rounds x (C / m) x the sum of the inserted canaries' directions
    params, _ = model.init(jax.random.key(0))
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])  # noqa: E731
    U = np.stack([flat(canary_direction(params, 0, i)) for i in range(40)])
    expected = U @ (3 * 1.0 / m * U[chosen].sum(0))
    np.testing.assert_allclose(report.in_scores, expected[chosen], rtol=1e-3, atol=1e-5)
    out = np.setdiff1d(np.arange(40), chosen)
    np.testing.assert_allclose(report.out_scores, expected[out], rtol=1e-3, atol=1e-5)
    assert report.epsilon is None and not report.violated  # nothing claimed


def test_audit_refuses_runs_without_a_clip_norm():
    model = fs.models.get_model("logistic_regression", (8, 8, 1), 10)
    alg = fs.algorithms.fedavg(optax.sgd(0.1), weighting="uniform")
    with pytest.raises(fs.UserError, match="audit needs client-level DP with a fixed clip norm"):
        fs.audit(model, alg, _digits(10), rounds=1, clients_per_round=5, privacy=None)


def _audit(z, claimed=None, clip=1.0, canary_norm=None):
    model = fs.models.get_model("mlp", (8, 8, 1), 10, hidden=[200])
    alg = fs.algorithms.fedavg(optax.sgd(0.05), local_steps=1, local_epochs=None, batch_size=10,
                               weighting="uniform")
    return fs.audit(model, alg, _digits(50), rounds=20, clients_per_round=275, canaries=1000,
                    privacy=ClientLevelDP(noise_multiplier=z, clip_norm=clip, delta=1e-5),
                    claimed_epsilon=claimed, canary_norm=canary_norm, progress=False)


@pytest.mark.slow  # three audited runs of 20 rounds with ~500 canary clients: ~1.5 minutes
def test_correct_mechanism_stays_below_its_epsilon_and_a_broken_one_is_caught():
    correct = _audit(4.0)
    assert correct.epsilon_lower_bound < correct.epsilon  # 0.32 < 2.65
    assert not correct.violated
    # the same run with a tenth of the noise, claiming the correct run's ε
    broken = _audit(0.4, claimed=correct.epsilon)
    assert broken.epsilon_lower_bound > correct.epsilon  # 3.93 > 2.65
    assert broken.violated and broken.auroc > 0.95
    # clipping off: the noise the claim says (std 4 = z·C for z = 4, C = 1), but updates of
    # norm 10 go through unclipped (a clip at 10 never binds: the canaries send exactly 10)
    unclipped = _audit(0.4, claimed=correct.epsilon, clip=10.0, canary_norm=10.0)
    assert unclipped.epsilon_lower_bound > correct.epsilon
    assert unclipped.violated and unclipped.auroc > 0.95
    # while with clipping in force, canaries of norm 10 are clipped to 1: consistent
    clipped = _audit(4.0, canary_norm=10.0)
    assert clipped.epsilon_lower_bound < clipped.epsilon and not clipped.violated


def test_audit_command_prints_the_bound_and_the_claim(capsys):
    from fedjax_sim.cli.main import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["audit", "--config", "configs/digits_dp_fedavg.py", "--canaries", "20",
                     "--config.rounds=2", "--config.eval_every=2"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and out[0].startswith("audit: ε ≥ ") and "consistent" in out[0]
    summary = json.loads(out[1])
    assert summary["canaries_in"] + summary["canaries_out"] == 20
    assert summary["epsilon_lower_bound"] <= summary["epsilon_claimed"]


def test_audit_is_also_in_the_privacy_namespace():
    assert fs.privacy.audit is fs.audit
