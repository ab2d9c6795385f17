"""Malicious clients (fedjax_sim.attacks): who is chosen, what each data attack changes,
and every update attack through `simulate` against a numpy re-implementation of the rounds."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import fedjax_sim as fs
from fedjax_sim.attacks import Attack
from fedjax_sim.data import FederatedData
from fedjax_sim.models import logistic_regression

from helpers import logreg_grad, toy_clients

FEATURES, CLASSES, SIZES, LR, STEPS = 5, 3, [3, 6, 4, 8, 5, 7, 4, 6], 0.3, 2


def _toy():
    x, y, offsets = toy_clients(SIZES, FEATURES, CLASSES, seed=3)
    return FederatedData({"x": x, "y": y}, offsets, tuple(f"c{i}" for i in range(len(SIZES))))


def _run(attack, rounds=3, aggregator=None, **kw):
    data, model = _toy(), logistic_regression((FEATURES,), CLASSES)
    alg = fs.algorithms.fedavg(optax.sgd(LR), local_epochs=None, local_steps=STEPS,
                               batch_size=None, weighting="uniform")
    result = fs.simulate(model, alg, data, rounds=rounds, clients_per_round=len(SIZES),
                         attack=attack, aggregator=aggregator, eval_every=100, progress=False, **kw)
    return data, model, result


def _numpy_rounds(data, model, rounds, forge):
    """FedAvg (uniform weights, every client every round, full-batch SGD) where the server
    receives forge(deltas [C, P]) instead of the clients' deltas."""
    params, _ = model.init(jax.random.fold_in(jax.random.key(0), fs.simulation.INIT_STREAM))
    w = [np.asarray(params["dense"][k], np.float64) for k in ("kernel", "bias")]
    x, y, off = data.features["x"], data.features["y"], data.offsets
    for r in range(rounds):
        deltas = []
        for lo, hi in zip(off[:-1], off[1:]):
            v = [a.copy() for a in w]
            for _ in range(STEPS):
                v = [vi - LR * g for vi, g in zip(v, logreg_grad(v[0], v[1], x[lo:hi], y[lo:hi]))]
            deltas.append(np.concatenate([(a - b).ravel() for a, b in zip(w, v)]))
        mean = np.mean(forge(np.array(deltas), r), axis=0)
        w = [w[0] - mean[:w[0].size].reshape(w[0].shape), w[1] - mean[w[0].size:]]
    return w


def _final(result):
    return [np.asarray(result.params["dense"][k]) for k in ("kernel", "bias")]


# -- who is malicious ----------------------------------------------------------------------
def test_fraction_picks_the_rounded_count_with_the_attacks_own_seed():
    ids = tuple(f"u{i}" for i in range(50))
    a = Attack(fraction=0.2, update=fs.attacks.sign_flip())
    mask = a.malicious(ids)
    assert mask.dtype == bool and mask.sum() == 10
    assert np.array_equal(mask, a.malicious(ids))  # deterministic
    other = Attack(fraction=0.2, update=fs.attacks.sign_flip(), seed=1).malicious(ids)
    assert other.sum() == 10 and not np.array_equal(mask, other)
    assert Attack(fraction=0.13, update=fs.attacks.sign_flip()).malicious(ids).sum() == 6  # 6.5 -> 6


def test_fixed_clients_by_position_or_id():
    ids = ("a", "b", "c", "d")
    mask = Attack(clients=[0, "c"], update=fs.attacks.sign_flip()).malicious(ids)
    assert mask.tolist() == [True, False, True, False]


@pytest.mark.parametrize("kwargs, message", [
    (dict(update=fs.attacks.sign_flip()), "either fraction"),
    (dict(fraction=0.1, clients=[1], update=fs.attacks.sign_flip()), "either fraction"),
    (dict(fraction=1.5, update=fs.attacks.sign_flip()), "fraction must be a number in"),
    (dict(fraction=0.1), "what the malicious clients do"),
    (dict(fraction=0.1, update="sign_flip"), "update attack such as"),
])
def test_bad_attacks_are_one_line_errors(kwargs, message):
    with pytest.raises(fs.UserError, match=message):
        Attack(**kwargs)


def test_unknown_client_is_named():
    with pytest.raises(fs.UserError, match="'zz' is not a client"):
        Attack(clients=["zz"], update=fs.attacks.sign_flip()).malicious(("a", "b"))


@pytest.mark.parametrize("builder, message", [
    (lambda: fs.attacks.sign_flip(-1.0), "positive"), (lambda: fs.attacks.gaussian_noise(0), "positive"),
    (lambda: fs.attacks.inner_product(float("nan")), "finite"),
    (lambda: fs.attacks.label_flip(source=1), "both source and target"),
    (lambda: fs.attacks.backdoor(target=0, poison_fraction=0), "poison_fraction"),
    (lambda: fs.attacks.backdoor(target=0, pattern="star"), "pattern must be one of"),
])
def test_bad_attack_arguments(builder, message):
    with pytest.raises(fs.UserError, match=message):
        builder()


# -- data attacks --------------------------------------------------------------------------
def test_label_flip_changes_exactly_the_malicious_clients_labels():
    data = _toy()
    attack = Attack(clients=[1, 4], data=fs.attacks.label_flip())
    mask = attack.malicious(data.client_ids)
    poisoned = attack.poison(data, mask)
    y, y2 = data.features["y"], poisoned.features["y"]
    for i, (lo, hi) in enumerate(zip(data.offsets[:-1], data.offsets[1:])):
        expected = CLASSES - 1 - y[lo:hi] if i in (1, 4) else y[lo:hi]
        assert np.array_equal(y2[lo:hi], expected), i
    assert np.array_equal(poisoned.features["x"], data.features["x"])
    assert not np.array_equal(y, y2)  # the original is untouched, the copy changed


def test_targeted_label_flip_changes_only_the_source_class():
    data = _toy()
    attack = Attack(clients=[3], data=fs.attacks.label_flip(source=2, target=0))
    poisoned = attack.poison(data, attack.malicious(data.client_ids))
    y, y2 = data.features["y"], poisoned.features["y"]
    lo, hi = data.offsets[3], data.offsets[4]
    rows = np.zeros(len(y), bool)
    rows[lo:hi] = True
    assert np.array_equal(y2, np.where(rows & (y == 2), 0, y))


def test_backdoor_stamps_the_trigger_on_a_share_of_each_malicious_client():
    rng = np.random.default_rng(0)
    sizes = [10, 7, 4, 9]
    x = rng.uniform(0, 0.5, size=(sum(sizes), 6, 6, 1)).astype(np.float32)
    x[0, 0, 0, 0] = 0.9  # the images' largest value: the trigger's
    y = rng.integers(0, 4, sum(sizes)).astype(np.int32)
    data = FederatedData({"x": x, "y": y}, np.concatenate([[0], np.cumsum(sizes)]),
                         ("a", "b", "c", "d"))
    attack = Attack(clients=[1, 2], data=fs.attacks.backdoor(target=3, poison_fraction=0.5, size=2,
                                                             pattern="square"))
    poisoned = attack.poison(data, attack.malicious(data.client_ids))
    x2, y2 = poisoned.features["x"], poisoned.features["y"]
    changed = np.any(x2 != x, axis=(1, 2, 3))
    off = data.offsets
    for i, size in enumerate(sizes):
        rows = slice(off[i], off[i + 1])
        expected = int(round(0.5 * size)) if i in (1, 2) else 0  # 4 (3.5 -> 4) and 2
        assert changed[rows].sum() == expected, i
    assert np.all(x2[changed][:, 4:, 4:, 0] == np.float32(0.9))  # bottom-right 2x2, value max
    assert np.array_equal(x2[changed][:, :4], x[changed][:, :4])  # nothing else moved
    assert np.all(y2[changed] == 3) and np.array_equal(y2[~changed], y[~changed])

    test = {"x": x[:12], "y": y[:12]}
    triggered = attack.data.triggered(test)
    assert len(triggered["y"]) == int(np.sum(y[:12] != 3)) and np.all(triggered["y"] == 3)
    assert np.all(triggered["x"][:, 4:, 4:, 0] == np.float32(0.9))


def test_checkerboard_trigger_pattern():
    mask = fs.attacks.data.trigger_mask((8, 8), 3, "checkerboard", "bottom_right")
    assert mask.sum() == 5 and mask[5, 5] and not mask[5, 6] and mask[7, 7]
    with pytest.raises(fs.UserError, match="outside"):
        fs.attacks.data.trigger_mask((8, 8), 3, "square", (7, 0))


def test_label_flip_through_simulate_matches_numpy_on_flipped_labels():
    data, model, result = _run(Attack(clients=[0, 5], data=fs.attacks.label_flip()))
    flipped = data.features["y"].copy()
    for i in (0, 5):
        lo, hi = data.offsets[i], data.offsets[i + 1]
        flipped[lo:hi] = CLASSES - 1 - flipped[lo:hi]
    poisoned = FederatedData({"x": data.features["x"], "y": flipped}, data.offsets, data.client_ids)
    expected = _numpy_rounds(poisoned, model, 3, lambda d, r: d)
    for got, want in zip(_final(result), expected):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    assert [row["malicious_clients"] for row in result.history] == [2, 2, 2]


# -- update attacks through simulate ---------------------------------------------------------
BAD = [1, 6]


def _malicious_rows():
    mask = np.zeros(len(SIZES), bool)
    mask[BAD] = True
    return mask


def _alie(d, r):
    bad = _malicious_rows()
    mu, sigma = d[~bad].mean(0), d[~bad].std(0)
    n, m = len(d), bad.sum()
    z = stats.norm.ppf((n - (np.floor(n / 2 + 1) - m)) / n)
    out = d.copy()
    out[bad] = mu - z * sigma
    return out


def _replace_rows(d, forged):
    out = d.copy()
    out[_malicious_rows()] = forged(d)
    return out


@pytest.mark.parametrize("update, forge", [
    (fs.attacks.sign_flip(2.0), lambda d, r: _replace_rows(d, lambda d: -2.0 * d[BAD])),
    (fs.attacks.scale(5.0), lambda d, r: _replace_rows(d, lambda d: 5.0 * d[BAD])),
    # uniform weights, 8 clients, 2 attackers, server lr 1: gamma = 8 / 2
    (fs.attacks.model_replacement(), lambda d, r: _replace_rows(d, lambda d: 4.0 * d[BAD])),
    (fs.attacks.model_replacement(server_learning_rate=0.5),
     lambda d, r: _replace_rows(d, lambda d: 8.0 * d[BAD])),
    (fs.attacks.little_is_enough(), _alie),
    (fs.attacks.little_is_enough(z=1.5), lambda d, r: _replace_rows(
        d, lambda d: d[~_malicious_rows()].mean(0) - 1.5 * d[~_malicious_rows()].std(0))),
    (fs.attacks.inner_product(0.5), lambda d, r: _replace_rows(
        d, lambda d: -0.5 * d[~_malicious_rows()].mean(0))),
], ids=["sign_flip", "scale", "model_replacement", "model_replacement_lr", "alie", "alie_z",
        "inner_product"])
def test_update_attack_matches_numpy(update, forge):
    data, model, result = _run(Attack(clients=BAD, update=update))
    expected = _numpy_rounds(data, model, 3, forge)
    for got, want in zip(_final(result), expected):
        np.testing.assert_allclose(got, want, rtol=5e-5, atol=5e-6)
    assert all(row["malicious_clients"] == 2 for row in result.history)


def test_cohort_attacks_are_chunk_invariant():
    attack = Attack(clients=BAD, update=fs.attacks.little_is_enough())
    whole = _final(_run(attack)[2])
    chunked = _final(_run(attack, engine=fs.EngineOptions(clients_per_chunk=3))[2])
    for a, b in zip(whole, chunked):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_clipping_applies_to_the_forged_update():
    """The server's per-client transforms see what the attacker sends: a scaled update is
    clipped like any other (so a cohort attack's forgery is too)."""
    clip = 0.05
    for update in (fs.attacks.scale(50.0), fs.attacks.model_replacement()):
        data, model, result = _run(Attack(clients=BAD, update=update), rounds=2,
                                   aggregator=fs.aggregators.clip(clip))
        gamma = 50.0 if update.client is not None else 4.0

        def forge(d, r):
            out = d.copy()
            out[BAD] *= gamma
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            return out * np.minimum(1.0, clip / norms)

        expected = _numpy_rounds(data, model, 2, forge)
        for got, want in zip(_final(result), expected):
            np.testing.assert_allclose(got, want, rtol=5e-5, atol=5e-6)
        assert result.history[-1]["dp_clipped_fraction"] >= 2 / 8


def test_gaussian_noise_replaces_the_update_with_noise_of_the_claimed_std():
    """One round: the server's update is the honest deltas' mean plus the attackers' noise
    / C; its spread over many coordinates has the std it claims (a chi-square bound)."""
    x = np.random.default_rng(0).normal(size=(2000, 1)).astype(np.float32)
    y = np.zeros(2000, np.int32)
    data = FederatedData({"x": x, "y": y}, np.array([0, 1000, 2000]), ("a", "b"))
    model = fs.models.mlp((1,), 2, hidden=[400], dense_impl="xla")
    alg = fs.algorithms.fedavg(optax.sgd(0.0), local_steps=1, batch_size=None,
                               local_epochs=None, weighting="uniform")
    std = 3.0
    result = fs.simulate(model, alg, data, rounds=1, clients_per_round=2,
                         attack=Attack(clients=[1], update=fs.attacks.gaussian_noise(std)),
                         eval_every=100, progress=False)
    params0, _ = model.init(jax.random.fold_in(jax.random.key(0), fs.simulation.INIT_STREAM))
    change = np.concatenate([np.ravel(a - b) for a, b in zip(
        jax.tree_util.tree_leaves(params0), jax.tree_util.tree_leaves(result.params))])
    # lr 0: honest delta is 0, so the aggregate is noise / 2
    sample = 2 * change
    n = sample.size
    lo, hi = stats.chi2.ppf([1e-4, 1 - 1e-4], n) / n
    assert lo * std ** 2 < np.mean(sample ** 2) < hi * std ** 2
    assert abs(np.mean(sample)) < 5 * std / np.sqrt(n)


def test_cohort_attack_skips_padding_slots():
    """Poisson cohorts: padding slots neither count as honest nor receive a forgery."""
    update = fs.attacks.inner_product(1.0)
    u = jnp.array([[1.0, 2.0], [3.0, 4.0], [100.0, 100.0], [0.0, 0.0]])
    live = jnp.array([True, True, True, False])
    bad = jnp.array([False, False, True, False])
    out = update.cohort({"w": u}, jnp.array([1.0, 1.0, 1.0, 0.0]), bad, live, jax.random.key(0))
    np.testing.assert_allclose(out["w"], [[1, 2], [3, 4], [-2, -3], [0, 0]])


def test_model_replacement_replaces_the_global_model():
    """Honest updates zero: the weighted mean is exactly the attackers' update / lr."""
    update = fs.attacks.model_replacement(server_learning_rate=0.5)
    u = jnp.array([[0.0, 0.0], [0.0, 0.0], [1.0, -2.0], [0.0, 0.0]])
    w = jnp.array([2.0, 3.0, 5.0, 0.0])
    live = jnp.array([True, True, True, False])
    bad = jnp.array([False, False, True, False])
    out = update.cohort({"w": u}, w, bad, live, jax.random.key(0))["w"]
    mean = np.asarray(jnp.tensordot(w, out, axes=1) / w.sum())
    np.testing.assert_allclose(0.5 * mean, [1.0, -2.0], rtol=1e-6)


def test_backdoor_success_is_reported_and_is_accuracy_on_triggered_examples():
    data = _toy()
    # the toy has no images: as [N, 1, 5] "images" it takes a 1x1 trigger
    x = data.features["x"].reshape(-1, 1, FEATURES)
    images = FederatedData({"x": x, "y": data.features["y"]}, data.offsets, data.client_ids)
    model = fs.models.mlp((1, FEATURES), CLASSES, hidden=[], dense_impl="xla")
    alg = fs.algorithms.fedavg(optax.sgd(LR), local_steps=STEPS, local_epochs=None,
                               batch_size=None, weighting="uniform")
    attack = Attack(clients=[0, 1, 2, 3, 4, 5], data=fs.attacks.backdoor(
        target=1, size=1, location=(0, 0), value=10.0, poison_fraction=1.0))
    test = {"x": x[:20], "y": data.features["y"][:20]}
    result = fs.simulate(model, alg, images, rounds=4, clients_per_round=8, eval_data=test,
                         attack=attack, eval_every=2, progress=False)
    rows = [r for r in result.history if "test_accuracy" in r]
    assert all("backdoor_success" in r for r in rows)
    triggered = attack.data.triggered(test)
    _, state = model.init(jax.random.key(0))
    logits = model.apply(result.params, state, jnp.asarray(triggered["x"]), train=False)[0]
    success = float(np.mean(np.argmax(np.asarray(logits), -1) == 1))
    assert rows[-1]["backdoor_success"] == pytest.approx(success, abs=1e-6)


# -- configs, memory, composition -----------------------------------------------------------
def test_config_sections_build_the_attack_and_the_rule():
    from fedjax_sim.cli.config import load_config
    from fedjax_sim.cli.options import aggregator_options, attack_options

    config = load_config("configs/digits_robust.py", {
        "attack.update": "dict(name='little_is_enough', z=1.5)",
        "attack.data": "dict(name='backdoor', target=3)",
        "aggregator.robust": "dict(name='krum', num_byzantine=4, num_selected=10)"})
    attack = attack_options(config)
    assert attack.fraction == 0.2 and attack.seed == 0
    assert attack.update.key == fs.attacks.little_is_enough(z=1.5).key
    assert attack.data.name == "backdoor"
    assert aggregator_options(config).reduce is not None
    config = load_config("configs/digits_robust.py", {"attack": "None", "aggregator": "None"})
    assert attack_options(config) is None and aggregator_options(config) is None


def test_a_stacked_cohort_too_large_for_memory_is_refused_before_compiling():
    from fedjax_sim.simulation.setup import check_stacked_cohort

    check_stacked_cohort(0, 10, "cpu", limit=1)  # nothing stacked: nothing to check
    check_stacked_cohort(400, 10, "cpu", limit=1000)
    with pytest.raises(fs.UserError, match=r"10 cohort slots x .* more than half of the .* this "
                                           r"device has; lower clients_per_round"):
        check_stacked_cohort(600 * 2**30, 10, "gpu", limit=1000 * 2**30)


def test_robust_rules_under_client_level_dp_are_refused_with_the_reason():
    from fedjax_sim.privacy import ClientLevelDP

    with pytest.raises(fs.UserError, match="can move by more than the clip norm"):
        _run(None, aggregator=fs.aggregators.coordinate_median(),
             privacy=ClientLevelDP(noise_multiplier=1.0, clip_norm=1.0, delta=1e-3))


def test_attack_under_client_level_dp_is_clipped_like_any_update():
    from fedjax_sim.privacy import ClientLevelDP

    def dp(clip):
        return ClientLevelDP(noise_multiplier=0.0, clip_norm=clip, delta=1e-3, sampling="fixed")

    honest = _run(None, rounds=2, privacy=dp(1e6))[2].history
    clip = 3 * max(r["dp_update_norm"] for r in honest)
    attack = Attack(clients=BAD, update=fs.attacks.scale(100.0))
    _, _, result = _run(attack, rounds=2, privacy=dp(clip))
    # the two boosted updates, and only they, are clipped
    assert [r["dp_clipped_fraction"] for r in result.history] == [0.25, 0.25]


def test_a_sweep_of_attacked_runs_equals_each_run_alone():
    attack = Attack(clients=BAD, update=fs.attacks.little_is_enough())

    def run(seed):
        alg = fs.algorithms.fedavg(optax.sgd(LR), local_epochs=1, batch_size=2,
                                   weighting="uniform")
        return dict(model=logistic_regression((FEATURES,), CLASSES), algorithm=alg,
                    train_data=_toy(), rounds=3, clients_per_round=6, seed=seed, attack=attack,
                    aggregator=fs.aggregators.trimmed_mean(0.2), eval_every=100)

    sweep = fs.sweep(run, {"seed": [0, 1]}, progress=False)
    for trial in sweep.trials:
        alone = fs.simulate(**run(trial.settings["seed"]), progress=False)
        for got, want in zip(_final(trial.result), _final(alone)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert [r["malicious_clients"] for r in trial.result.history] == \
            [r["malicious_clients"] for r in alone.history]


def test_clipping_then_a_robust_rule_then_noise_composes_in_a_chain():
    """chain(clip(C), coordinate_median(), gaussian(z, m)): the server's aggregate is
    (median of the clipped updates x n + noise) / m; with z = 0, exactly the median x n / m."""
    clip, m = 0.05, 10.0
    A = fs.aggregators
    aggregator = A.chain(A.clip(clip), A.coordinate_median(), A.gaussian(0.0, expected_clients=m))
    data, model, result = _run(Attack(clients=BAD, update=fs.attacks.scale(50.0)), rounds=2,
                               aggregator=aggregator)

    def forge(d, r):
        out = d.copy()
        out[BAD] *= 50.0
        out *= np.minimum(1.0, clip / np.linalg.norm(out, axis=1, keepdims=True))
        # _numpy_rounds takes the mean over the C rows: give it C rows of median x n / m
        return np.repeat(np.median(out, axis=0)[None] * len(out) / m, len(out), axis=0)

    expected = _numpy_rounds(data, model, 2, forge)
    for got, want in zip(_final(result), expected):
        np.testing.assert_allclose(got, want, rtol=5e-5, atol=5e-6)
