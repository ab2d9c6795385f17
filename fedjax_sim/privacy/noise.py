"""Gaussian noise shaped like a pytree: what DP-SGD adds to a summed gradient and
DP-FedAvg to a summed update."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def gaussian_like(rng: jax.Array, tree: PyTree, std) -> PyTree:
    """N(0, std²) noise shaped like `tree`, in each leaf's dtype, from ONE draw of all the
    coordinates (a draw per leaf compiles a threefry kernel per leaf: on XLA:CPU seconds
    of compile time for a few leaves, with the same run time)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    sizes = [math.prod(x.shape) for x in leaves]
    flat = std * jax.random.normal(rng, (sum(sizes),), jnp.float32)
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    return jax.tree_util.tree_unflatten(treedef, [
        flat[a:b].reshape(x.shape).astype(x.dtype)
        for x, a, b in zip(leaves, offsets[:-1], offsets[1:])])
