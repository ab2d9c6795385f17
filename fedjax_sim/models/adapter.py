"""A functional view of a Flax model: `init(rng)` and `apply(params, state, x, ...)`.

The engine vmaps over clients and differentiates with respect to the trainable
parameters only, so it needs a model as two pure functions over plain pytrees:

    init(rng)                                    -> (params, state)
    apply(params, state, x, *, train, rng)       -> (outputs, new_state)

`params` are the trainable leaves (they get a client axis, gradients and optimizer
state); `state` is everything else (BatchNorm statistics, RNG counters, frozen
variables). The engine broadcasts `state` to every client instead of stacking it.

Both Flax NNX modules (`from_nnx`) and Linen modules (`from_linen`) are adapted to this
shape; the pytrees are nested dicts of arrays, so they checkpoint and print plainly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Model:
    """A model as pure functions.

    Attributes:
      init: `rng -> (params, state)`.
      apply: `(params, state, x, *, train: bool, rng) -> (outputs, new_state)`; `x` is a
        batch of inputs with a leading batch axis.
      input_shape: shape of ONE input example (no batch axis).
      name: for logs.
    """

    init: Callable[[jax.Array], tuple[PyTree, PyTree]]
    apply: Callable[..., tuple[jax.Array, PyTree]]
    input_shape: tuple[int, ...]
    name: str = "model"

    def num_params(self, params: PyTree) -> int:
        return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


def from_nnx(
    make_module: Callable[[nnx.Rngs], nnx.Module],
    input_shape: tuple[int, ...],
    *,
    trainable: Any = nnx.Param,
    name: str | None = None,
) -> Model:
    """Adapts an NNX module factory `make_module(rngs) -> module` to a `Model`.

    `trainable` is an NNX filter (default: every `nnx.Param`); the rest of the module's
    state (batch statistics, RNG streams, frozen variables) becomes `state`. The module's
    `train()`/`eval()` switch selects dropout/BatchNorm behaviour, and in training mode
    every RNG stream is reseeded from the `rng` passed to `apply`, so randomness is
    explicit and per client, per step.
    """
    abstract = nnx.eval_shape(lambda: make_module(nnx.Rngs(0)))
    graphdef, params_template, state_template = nnx.split(abstract, trainable, ...)

    def init(rng: jax.Array) -> tuple[PyTree, PyTree]:
        module = make_module(nnx.Rngs(rng))
        _, params, state = nnx.split(module, trainable, ...)
        return nnx.to_pure_dict(params), nnx.to_pure_dict(state)

    def apply(params, state, x, *, train: bool = False, rng: jax.Array | None = None):
        p = nnx.State(params_template)
        nnx.replace_by_pure_dict(p, params)
        s = nnx.State(state_template)
        nnx.replace_by_pure_dict(s, state)
        module = nnx.merge(graphdef, p, s)
        if train:
            module.train()
            if rng is not None:
                nnx.reseed(module, default=rng, dropout=rng)
        else:
            module.eval()
        out = module(x)
        _, _, new_state = nnx.split(module, trainable, ...)
        return out, nnx.to_pure_dict(new_state)

    return Model(init=init, apply=apply, input_shape=tuple(input_shape),
                 name=name or type(abstract).__name__)


def from_linen(
    module: Any,
    input_shape: tuple[int, ...],
    *,
    train_kwarg: str | None = None,
    rng_collections: tuple[str, ...] = ("dropout",),
    name: str | None = None,
) -> Model:
    """Adapts a Flax Linen module to a `Model`.

    The `params` collection is trainable; every other collection (e.g. `batch_stats`) is
    `state` and is returned updated from training-mode calls. If the module's
    `__call__` takes a training flag, name it with `train_kwarg` (e.g. "train"); its RNG
    collections (`rng_collections`) are fed from the `rng` passed to `apply`.
    """

    def call_kwargs(train: bool) -> dict:
        return {train_kwarg: train} if train_kwarg else {}

    def init(rng: jax.Array) -> tuple[PyTree, PyTree]:
        dummy = jnp.zeros((1, *input_shape), jnp.float32)
        variables = module.init({"params": rng, **{c: rng for c in rng_collections}},
                                dummy, **call_kwargs(False))
        variables = dict(variables)
        params = variables.pop("params", {})
        return params, variables

    def apply(params, state, x, *, train: bool = False, rng: jax.Array | None = None):
        variables = {"params": params, **state}
        rngs = {c: rng for c in rng_collections} if (train and rng is not None) else None
        mutable = list(state) if (train and state) else False
        result = module.apply(variables, x, rngs=rngs, mutable=mutable, **call_kwargs(train))
        if mutable:
            out, updated = result
            return out, {**state, **dict(updated)}
        return result, state

    return Model(init=init, apply=apply, input_shape=tuple(input_shape),
                 name=name or type(module).__name__)
