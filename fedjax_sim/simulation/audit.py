"""Empirical privacy auditing: canary clients in one run, and a lower bound on ε.

    report = fs.audit(model, algorithm, clients, rounds=50, clients_per_round=20,
                      privacy=ClientLevelDP(noise_multiplier=1.0, clip_norm=0.5, delta=1e-3))
    report.epsilon_lower_bound, report.epsilon   # the audit's bound, the accountant's ε

A one-run audit (Steinke, Nasr, Jagielski 2023) of client-level DP in the white-box
setting where the auditor knows the initial and the final global model. `canaries`
canary clients are drawn; each is inserted into the population with probability ½ (the
"in" canaries; the others never exist in the run). Canary i has a crafted update: a
fixed random direction u_i (unit L2 norm, from its id) times the clip norm (or
`canary_norm`), sent whenever it is sampled, whatever its data. After training, its score is ⟨θ₀ − θ_T, u_i⟩: the
released updates' total along u_i (with server SGD, momentum or any optimizer whose step
is a positive combination of the aggregates). Honest updates and the noise are nearly
orthogonal to u_i in high dimension, so an inserted canary scores about its number of
participations × C / m higher. `jax_privacy.auditing.CanaryScoreAuditor` turns the in
and out scores into ε lower bounds: the one-run bound (Steinke et al. 2023) and the
Clopper-Pearson bound on the best threshold's true and false positive rates (Jagielski
et al. 2020), each holding with probability 1 − `significance`.

A correct mechanism's lower bound stays below the accountant's ε; a broken one (noise
scaled down, clipping off) is caught when its bound exceeds the ε it claims.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.engine.contracts import UpdateAttack
from fedjax_sim.errors import UserError

# Canary directions: fold_in(key(CANARY_SEED + seed), canary index).
CANARY_SEED = 0xCA7A


@dataclasses.dataclass
class AuditReport:
    """What an audit found.

    epsilon_lower_bound: the one-run lower bound on ε (Steinke et al. 2023) at
      `significance`; epsilon_clopper_pearson: the threshold audit's bound (Jagielski et
      al. 2020); epsilon: the ε the run's accountant reports (the claim), or the
      `claimed_epsilon` given; auroc: how well the scores separate in from out canaries.
    in_scores / out_scores: the canaries' scores; result: the audited run's `Result`.
    """

    epsilon_lower_bound: float
    epsilon_clopper_pearson: float
    epsilon: float | None
    delta: float
    significance: float
    auroc: float
    in_scores: np.ndarray
    out_scores: np.ndarray
    result: Any

    @property
    def violated(self) -> bool:
        """Whether the audit refutes the claim: a lower bound above the claimed ε."""
        return self.epsilon is not None and self.epsilon_lower_bound > self.epsilon

    def summary(self) -> dict:
        return {"epsilon_lower_bound": self.epsilon_lower_bound,
                "epsilon_clopper_pearson": self.epsilon_clopper_pearson,
                "epsilon_claimed": self.epsilon, "delta": self.delta,
                "significance": self.significance, "auroc": self.auroc,
                "canaries_in": int(len(self.in_scores)), "canaries_out": int(len(self.out_scores)),
                "violated": self.violated}


def canary_direction(params_like, seed: int, index) -> Any:
    """Canary `index`'s unit direction, shaped like the update (works on traced indices)."""
    leaves, treedef = jax.tree_util.tree_flatten(params_like)
    sizes = [math.prod(x.shape) for x in leaves]
    flat = jax.random.normal(jax.random.fold_in(jax.random.key(CANARY_SEED + seed), index),
                             (sum(sizes),), jnp.float32)
    flat = flat / jnp.linalg.norm(flat)
    out, start = [], 0
    for x, n in zip(leaves, sizes):
        out.append(flat[start:start + n].reshape(x.shape).astype(x.dtype))
        start += n
    return jax.tree_util.tree_unflatten(treedef, out)


def _canary_update(clip_norm: float, first: int, candidates: np.ndarray, seed: int) -> UpdateAttack:
    """The canaries' crafted updates: canary client first + j sends clip_norm × the
    direction of candidate candidates[j], whatever it computed."""
    table = tuple(int(i) for i in candidates)

    def client(delta, rng, cid):
        del rng
        index = jnp.asarray(table, jnp.int32)[jnp.clip(cid - first, 0, len(table) - 1)]
        return jax.tree_util.tree_map(lambda v: v * clip_norm,
                                      canary_direction(delta, seed, index))

    return UpdateAttack(client=client, key=("audit.canary", float(clip_norm), first, table, seed))


def _scores(params0, moved, seed: int, canaries: int) -> np.ndarray:
    """⟨θ₀ − θ_T, u_i⟩ for every candidate canary i, 64 directions at a time."""
    flat = jnp.concatenate([jnp.ravel(jnp.asarray(x, jnp.float32))
                            for x in jax.tree_util.tree_leaves(moved)])

    def score(i):
        u = canary_direction(params0, seed, i)
        return jnp.dot(jnp.concatenate([jnp.ravel(x.astype(jnp.float32))
                                        for x in jax.tree_util.tree_leaves(u)]), flat)

    run = jax.jit(lambda ids: jax.lax.map(score, ids, batch_size=64))
    return np.asarray(run(jnp.arange(canaries)), np.float64)


def _with_canaries(train_data, inserted: np.ndarray):
    """The training data with one client per inserted canary (one copy of the first
    example: a canary's update does not depend on its data)."""
    from fedjax_sim.data import FederatedData

    count = len(inserted)
    features = {k: np.concatenate([np.asarray(v), np.repeat(np.asarray(v)[:1], count, 0)])
                for k, v in train_data.features.items()}
    offsets = np.concatenate([np.asarray(train_data.offsets),
                              train_data.offsets[-1] + np.arange(1, count + 1)])
    ids = tuple(train_data.client_ids) + tuple(f"canary_{i}" for i in inserted)
    return FederatedData(features, offsets, ids)


def audit(model, algorithm, train_data, *, rounds: int, clients_per_round: int, privacy,
          canaries: int = 1000, seed: int = 0, significance: float = 0.05,
          claimed_epsilon: float | None = None, canary_norm: float | None = None,
          **simulate_kwargs) -> AuditReport:
    """Audits one run of `simulate(model, algorithm, train_data, ..., privacy=privacy)`
    with `canaries` canary clients (module doc). The canaries join the population (so the
    sampling rate is clients_per_round over the larger population); `claimed_epsilon`
    replaces the run's own ε as the claim to test (e.g. what a mechanism is said to give
    when the run uses a deliberately broken one); `canary_norm` (default: the clip norm)
    is the norm of the canaries' updates: above the clip norm, a mechanism that clips
    gives them no more weight, one that does not is caught."""
    from fedjax_sim.attacks import Attack
    from fedjax_sim.simulation import INIT_STREAM
    from fedjax_sim.simulation.loop import simulate

    if privacy is None or not hasattr(privacy, "clip_norm") or privacy.clip_norm is None:
        raise UserError("audit needs client-level DP with a fixed clip norm (privacy="
                        "ClientLevelDP(...) or MatrixFactorizationDP(...)): the canaries send "
                        "updates of exactly that norm")
    if isinstance(canaries, bool) or not isinstance(canaries, int) or canaries < 2:
        raise UserError(f"canaries must be an integer >= 2, got {canaries!r}")
    if not 0 < significance < 1:
        raise UserError(f"significance must be in (0, 1), got {significance!r}")
    norm = float(privacy.clip_norm if canary_norm is None else canary_norm)
    if not (math.isfinite(norm) and norm > 0):
        raise UserError(f"canary_norm must be a finite number > 0, got {canary_norm!r}")
    rng = np.random.default_rng([seed, 0xA0D17])
    inserted = np.flatnonzero(rng.random(canaries) < 0.5)
    first = train_data.num_clients
    data = _with_canaries(train_data, inserted)
    params0, _ = model.init(jax.random.fold_in(jax.random.key(seed), INIT_STREAM))
    canary_clients = (first + np.arange(len(inserted))).tolist()
    update = _canary_update(norm, first, inserted, seed)
    result = simulate(model, algorithm, data, rounds=rounds, clients_per_round=clients_per_round,
                      privacy=privacy, seed=seed, initial_params=params0,
                      attack=Attack(clients=canary_clients, update=update),
                      **simulate_kwargs)
    moved = jax.tree_util.tree_map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                                   params0, result.params)
    scores = _scores(params0, moved, seed, canaries)
    is_in = np.zeros(canaries, bool)
    is_in[inserted] = True
    from jax_privacy import auditing

    auditor = auditing.CanaryScoreAuditor(scores[is_in], scores[~is_in])
    delta = float(privacy.delta)
    claimed = claimed_epsilon if claimed_epsilon is not None else (
        (result.summary.get("privacy") or {}).get("epsilon"))
    return AuditReport(
        epsilon_lower_bound=float(auditor.epsilon_one_run(significance, delta)),
        epsilon_clopper_pearson=float(auditor.epsilon_clopper_pearson(significance, delta)),
        epsilon=claimed, delta=delta, significance=significance,
        auroc=float(auditor.attack_auroc()), in_scores=scores[is_in], out_scores=scores[~is_in],
        result=result)
