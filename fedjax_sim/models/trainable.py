"""Which parameters train: freeze the rest of a model (transfer learning).

`with_trainable(model, trainable, params=..., state=...)` returns a `Model` whose
trainable parameters are only the selected leaves; every other parameter moves into the
model's *state*. The engine stacks, differentiates, optimizes and aggregates the params
only, and broadcasts the state to every client, so a frozen backbone:

  - is never stacked per client (memory for a cohort grows with the trainable part),
  - gets no gradient and no optimizer state,
  - is not part of the client update (the upload is the trainable part alone),

and frozen values stay bit-for-bit what they were. `trainable` selects by leaf path
(`'/'`-joined, e.g. 'layer4/0/conv1/kernel'):

  'all'                      everything (the model unchanged)
  'head'                     the output layer: 'fc' (ResNets) or 'out' (the other zoo models)
  'layer4+head'              '+'-joined path prefixes, 'head' as above
  ['layer4', 'fc']           a list of path prefixes
  callable(path) -> bool     any filter

`params` / `state` (optional) replace what `model.init` would give, e.g. pretrained
weights from `load_pretrained`; they are the starting point of every run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.errors import UserError
from fedjax_sim.models.adapter import HeadSplit, Model
from fedjax_sim.trees import merge, path_names, split, under

PyTree = Any
Selector = str | Sequence[str] | Callable[[str], bool]
# The output layer of the zoo's models, in the order tried for 'head'.
HEAD_NAMES = ("fc", "out")


def selector(trainable: Selector, names: Sequence[str],
             head: Sequence[str] | None = None) -> Callable[[str], bool]:
    """The path predicate `trainable` means for a model whose params are named `names`;
    'head' means the prefixes `head` (the model's `head_split.names`) where given."""
    if callable(trainable):
        return trainable
    if isinstance(trainable, str):
        if trainable == "all":
            return lambda path: True
        parts = [p.strip() for p in trainable.split("+") if p.strip()]
    else:
        parts = list(trainable)
    if not parts or not all(isinstance(p, str) and p for p in parts):
        raise UserError(f"trainable must be 'all', 'head', '+'-joined path prefixes such as "
                        f"'layer4+head', a list of prefixes or a predicate, got {trainable!r}")
    prefixes = []
    for part in parts:
        if part == "head":
            if head is not None:
                prefixes.extend(head)
                continue
            found = next((h for h in HEAD_NAMES if any(under(n, h) for n in names)), None)
            if found is None:
                raise UserError(f"trainable='head' found no output layer named {HEAD_NAMES} among "
                                f"the model's parameters (e.g. {list(names[:4])}); name it "
                                f"with a path prefix instead")
            part = found
        if not any(under(n, part) for n in names):
            raise UserError(f"trainable prefix {part!r} selects no parameter; the model's top-level "
                            f"names are {sorted({n.split('/')[0] for n in names})}")
        prefixes.append(part)
    return lambda path: any(under(path, p) for p in prefixes)


@dataclasses.dataclass(frozen=True)
class ParameterCount:
    """Trainable vs frozen parameters, and what one client uploads per round (float32
    deltas of the trainable parameters, before any compression)."""

    trainable: int
    frozen: int
    upload_bytes: int

    def __str__(self) -> str:
        total = self.trainable + self.frozen
        return (f"{self.trainable:,} trainable / {self.frozen:,} frozen parameters "
                f"({100 * self.trainable / max(total, 1):.2f}% train); one client uploads "
                f"{self.upload_bytes / 2**20:.2f} MiB a round")


def with_trainable(model: Model, trainable: Selector = "all", *, params: PyTree = None,
                   state: PyTree = None) -> Model:
    """`model` with only the `trainable` parameters trained; the rest frozen (see module)."""
    if params is None or state is None:
        p0, s0 = jax.eval_shape(model.init, jax.random.key(0))
        params = p0 if params is None else params
        state = s0 if state is None else state
    keep = selector(trainable, path_names(params),
                    model.head_split.names if model.head_split is not None else None)
    given_params, given_state = params, state
    pretrained = not any(isinstance(x, jax.ShapeDtypeStruct) for x in
                         jax.tree_util.tree_leaves((given_params, given_state)))

    return _frozen_model(model, trainable, keep, given_params, given_state, pretrained)


def _frozen_model(model: Model, trainable: Selector, keep, given_params, given_state,
                  pretrained: bool) -> Model:
    def init(rng):
        if pretrained:
            # Copies: the engine donates its state, which must not delete the caller's arrays.
            full, model_state = jax.tree_util.tree_map(jnp.array, (given_params, given_state))
        else:
            full, model_state = model.init(rng)
        train_part, frozen = split(full, keep)
        return train_part, {"frozen": frozen, "model": model_state}

    def apply(params, state, x, *, train=False, rng=None, batch_mask=None):
        full = merge(params, state["frozen"])
        extra = {"batch_mask": batch_mask} if batch_mask is not None else {}
        out, new_model_state = model.apply(full, state["model"], x, train=train, rng=rng, **extra)
        return out, {"frozen": state["frozen"], "model": new_model_state}

    freeze_stats = None
    if model.freeze_stats is not None:
        freeze_stats = lambda: _frozen_model(model.freeze_stats(), trainable, keep, given_params,
                                             given_state, pretrained)
    head_split = None
    if model.head_split is not None:
        inner = model.head_split

        def features(params, state, x):
            return inner.features(merge(params, state["frozen"]), state["model"], x)

        def apply_head(params, state, f, *, train=False, rng=None):
            out, new_model_state = inner.apply_head(merge(params, state["frozen"]), state["model"],
                                                    f, train=train, rng=rng)
            return out, {"frozen": state["frozen"], "model": new_model_state}

        head_split = HeadSplit(inner.names, features, apply_head, inner.fixed)
    name = model.name if trainable == "all" else f"{model.name}[trainable={trainable}]"
    return Model(init=init, apply=apply, input_shape=model.input_shape, name=name,
                 stats=tuple(f"model/{n}" for n in model.stats), freeze_stats=freeze_stats,
                 head_split=head_split, takes_batch_mask=model.takes_batch_mask)


def count_parameters(model: Model, params: PyTree = None, state: PyTree = None) -> ParameterCount:
    """Trainable and frozen parameter counts of a (possibly `with_trainable`) model."""
    if params is None or state is None:
        params, state = jax.eval_shape(model.init, jax.random.key(0))
    size = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
    frozen = state.get("frozen", {}) if isinstance(state, dict) else {}
    trainable = size(params)
    return ParameterCount(trainable, size(frozen), 4 * trainable)
