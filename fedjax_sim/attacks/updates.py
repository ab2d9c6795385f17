"""What malicious clients do to the update they send (`UpdateAttack`, engine.contracts).

A client's update Δ is the change it asks the server to subtract (FedAvg: w_global − w_i,
a pseudo-gradient). With A the malicious clients of a round's cohort, H its honest ones
and w_i the aggregation weights:

    sign_flip(s):            Δ_a ← −s·Δ_a                                   (per client)
    scale(λ):                Δ_a ← λ·Δ_a                                    (per client)
    gaussian_noise(σ):       Δ_a ← N(0, σ² I)         (Blanchard et al. 2017's Gaussian attack)
    model_replacement(η):    Δ_a ← γ·Δ_a,  γ = Σ_{i live} w_i / (η · Σ_{a∈A} w_a)
                             (Bagdasaryan et al. 2020: with the honest updates near zero, the
                             weighted mean becomes Δ_a/η and a server step of learning rate η
                             replaces the global model by the attackers')
    little_is_enough(z):     Δ_a ← μ_H − z·σ_H        coordinate-wise mean and standard
                             deviation of the honest updates (Baruch et al. 2019); by default
                             z = Φ⁻¹((n − s)/n), s = ⌊n/2 + 1⌋ − |A|, n the cohort's clients,
                             the largest shift that the paper's argument keeps within the
                             spread of the honest updates
    inner_product(ε):        Δ_a ← −ε·μ_H             (Xie et al. 2020, inner-product
                             manipulation: the aggregate's inner product with the true
                             update turns negative)

The last three know every honest update of the round (omniscient attackers, as in the
papers' strongest setting): they run on the stacked cohort, so memory grows with cohort
slots × parameters. μ_H and σ_H are unweighted over the honest clients that took part.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.stats import norm

from fedjax_sim.engine.contracts import UpdateAttack
from fedjax_sim.errors import UserError


def _number(name: str, value, *, positive: bool = False, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value > 0 if positive else True))
    if not ok:
        raise UserError(f"{name} must be a {'positive ' if positive else ''}finite number, "
                        f"got {value!r}")
    return float(value)


def _scaled(tree, factor):
    return jax.tree_util.tree_map(lambda x: (x * factor).astype(x.dtype), tree)


def sign_flip(scale: float = 1.0) -> UpdateAttack:
    """Each malicious client sends −scale × its honest update."""
    s = _number("sign_flip scale", scale, positive=True)
    return UpdateAttack(client=lambda delta, rng, cid: _scaled(delta, -s), key=("attack.sign_flip", s))


def scale(factor: float) -> UpdateAttack:
    """Each malicious client sends factor × its honest update (a boosted update)."""
    f = _number("scale factor", factor)
    return UpdateAttack(client=lambda delta, rng, cid: _scaled(delta, f), key=("attack.scale", f))


def gaussian_noise(std: float = 1.0) -> UpdateAttack:
    """Each malicious client sends pure Gaussian noise N(0, std²) in every coordinate."""
    sigma = _number("gaussian_noise std", std, positive=True)

    def client(delta, rng, cid):
        del cid
        leaves, treedef = jax.tree_util.tree_flatten(delta)
        keys = jax.random.split(rng, len(leaves))
        return jax.tree_util.tree_unflatten(treedef, [
            (sigma * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
            for k, x in zip(keys, leaves)])

    return UpdateAttack(client=client, key=("attack.gaussian_noise", sigma))


def _per_slot(mask, x):
    return mask.reshape(-1, *[1] * (x.ndim - 1))


def _replace(updates, malicious, forged):
    """The cohort's updates with the malicious slots set to `forged` (a tree of [m, ...]
    leaves, or of unbatched leaves broadcast to every malicious slot)."""
    return jax.tree_util.tree_map(
        lambda u, f: jnp.where(_per_slot(malicious, u), jnp.broadcast_to(f, u.shape).astype(u.dtype), u),
        updates, forged)


def model_replacement(server_learning_rate: float = 1.0) -> UpdateAttack:
    """The malicious clients boost their updates by γ = (Σ_live w) / (η · Σ_malicious w), so
    that together they replace the global model by theirs (module doc). Pair it with a
    data attack (a backdoor) to plant it in one round."""
    eta = _number("model_replacement server_learning_rate", server_learning_rate, positive=True)

    def cohort(updates, weights, malicious, live, rng):
        del rng
        total = jnp.sum(jnp.where(live, weights, 0.0))
        bad = jnp.sum(jnp.where(malicious, weights, 0.0))
        gamma = jnp.where(bad > 0, total / (eta * jnp.maximum(bad, 1e-30)), 1.0)
        return jax.tree_util.tree_map(
            lambda u: jnp.where(_per_slot(malicious, u), u * gamma.astype(u.dtype), u), updates)

    return UpdateAttack(cohort=cohort, key=("attack.model_replacement", eta))


def _honest_moments(updates, malicious, live):
    """Unweighted coordinate-wise mean and standard deviation over the honest live slots."""
    honest = live & ~malicious
    count = jnp.maximum(jnp.sum(honest.astype(jnp.float32)), 1.0)

    def moments(u):
        h = _per_slot(honest, u)
        x = jnp.where(h, u.astype(jnp.float32), 0.0)
        mean = jnp.sum(x, axis=0) / count
        var = jnp.sum(jnp.where(h, jnp.square(u.astype(jnp.float32) - mean), 0.0), axis=0) / count
        return mean, jnp.sqrt(var)

    pairs = jax.tree_util.tree_map(moments, updates)
    mean = jax.tree_util.tree_map(lambda u, p: p[0], updates, pairs)
    std = jax.tree_util.tree_map(lambda u, p: p[1], updates, pairs)
    return mean, std


def little_is_enough_z(clients, attackers):
    """Baruch et al. (2019)'s z_max for n clients of which `attackers` are malicious:
    Φ⁻¹((n − s)/n) with s = ⌊n/2 + 1⌋ − attackers (works on traced counts)."""
    n = jnp.maximum(jnp.asarray(clients, jnp.float32), 1.0)
    s = jnp.floor(n / 2 + 1) - attackers
    p = jnp.clip((n - s) / n, 1e-6, 1 - 1e-6)
    return norm.ppf(p)


def little_is_enough(z: float | None = None) -> UpdateAttack:
    """"A little is enough" (Baruch et al. 2019): every malicious client sends μ − z·σ of
    the honest updates; z=None takes the paper's z_max for the round's cohort."""
    z_fixed = _number("little_is_enough z", z, allow_none=True)

    def cohort(updates, weights, malicious, live, rng):
        del weights, rng
        mean, std = _honest_moments(updates, malicious, live)
        if z_fixed is None:
            z_ = little_is_enough_z(jnp.sum(live.astype(jnp.float32)),
                                    jnp.sum(malicious.astype(jnp.float32)))
        else:
            z_ = jnp.float32(z_fixed)
        forged = jax.tree_util.tree_map(lambda m, s: m - z_ * s, mean, std)
        return _replace(updates, malicious, forged)

    return UpdateAttack(cohort=cohort, key=("attack.little_is_enough", z_fixed))


def inner_product(epsilon: float = 0.1) -> UpdateAttack:
    """Inner-product manipulation (Xie et al. 2020): every malicious client sends −ε times
    the mean of the honest updates."""
    eps = _number("inner_product epsilon", epsilon, positive=True)

    def cohort(updates, weights, malicious, live, rng):
        del weights, rng
        mean, _ = _honest_moments(updates, malicious, live)
        return _replace(updates, malicious, jax.tree_util.tree_map(lambda m: -eps * m, mean))

    return UpdateAttack(cohort=cohort, key=("attack.inner_product", eps))


UPDATE_ATTACKS = {"sign_flip": sign_flip, "scale": scale, "gaussian_noise": gaussian_noise,
                  "model_replacement": model_replacement, "little_is_enough": little_is_enough,
                  "inner_product": inner_product}
