"""A functional view of a Flax model: `init(rng)` and `apply(params, state, x, ...)`.

The engine vmaps over clients and differentiates with respect to the trainable
parameters only, so it needs a model as two pure functions over plain pytrees:

    init(rng)                                    -> (params, state)
    apply(params, state, x, *, train, rng)       -> (outputs, new_state)

`params` are the trainable leaves (they get a client axis, gradients and optimizer
state); `state` is everything else (BatchNorm statistics, RNG counters, frozen
variables). The engine broadcasts `state` to every client instead of stacking it.

Some of `state` may be running statistics (BatchNorm's mean and variance), which a
training-mode `apply` updates. A `Model` names them (`stats`) so the engine can treat them
as the federated setting asks (`simulate(batch_norm=...)`): frozen (training normalises
with the stored statistics, through `freeze_stats()`), averaged over the clients like the
weights, or kept per client (FedBN).

Both Flax NNX modules (`from_nnx`) and Linen modules (`from_linen`) are adapted to this
shape; the pytrees are nested dicts of arrays, so they checkpoint and print plainly.
"""

from __future__ import annotations

import contextvars
import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_sim.errors import UserError
from fedjax_sim.models.substitute import substitute_kernels
from fedjax_sim.trees import path_names, split, under

PyTree = Any
# What `from_nnx` / `from_linen` do with the model's convolutions and dense layers.
KERNELS = ("auto", "substitute", "as_written")


@dataclasses.dataclass(frozen=True)
class HeadSplit:
    """A model seen as a backbone computing features, then an output head.

    names: the top-level parameter names of the head (e.g. ('fc',)).
    features: `(params, state, x) -> features`, the backbone in inference mode.
    apply_head: `(params, state, features, *, train, rng) -> (outputs, new_state)`.
    fixed: the backbone computes the same in training mode as in inference mode (no
      active dropout, running statistics frozen or absent), so training the head on
      `features` computed once is training the whole model with the backbone frozen.
    """

    names: tuple[str, ...]
    features: Callable
    apply_head: Callable
    fixed: bool


@dataclasses.dataclass(frozen=True)
class Model:
    """A model as pure functions.

    Attributes:
      init: `rng -> (params, state)`.
      apply: `(params, state, x, *, train: bool, rng) -> (outputs, new_state)`; `x` is a
        batch of inputs with a leading batch axis.
      input_shape: shape of ONE input example (no batch axis).
      name: for logs.
      stats: '/'-joined names of the `state` leaves that are running statistics, updated
        by a training-mode `apply` (BatchNorm's `mean` and `var`); empty if none.
      freeze_stats: `() -> Model`, the same model whose training-mode `apply` normalises
        with the stored statistics and leaves them unchanged (BatchNorm in inference mode,
        dropout still on); None if the model cannot do that.
      head_split: the model as backbone features and an output head (`HeadSplit`), or None.
      takes_batch_mask: `apply` accepts `batch_mask=` ([B] bool, the batch's real examples)
        in training mode, so batch statistics leave out padding slots (MaskedBatchNorm).
    """

    init: Callable[[jax.Array], tuple[PyTree, PyTree]]
    apply: Callable[..., tuple[jax.Array, PyTree]]
    input_shape: tuple[int, ...]
    name: str = "model"
    stats: tuple[str, ...] = ()
    freeze_stats: Callable[[], "Model"] | None = None
    head_split: HeadSplit | None = None
    takes_batch_mask: bool = False

    def num_params(self, params: PyTree) -> int:
        return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))

    def stats_of(self, state: PyTree) -> dict:
        """The running statistics (`stats`) of `state`, in its nesting."""
        names = set(self.stats)
        return split(state, lambda n: n in names)[0]


# The real examples of the batch a training-mode `apply` is running ([B] bool), for the
# MaskedBatchNorm layers inside it; None outside such a call.
_BATCH_MASK: contextvars.ContextVar = contextvars.ContextVar("fedjax_sim_batch_mask",
                                                             default=None)


class MaskedBatchNorm(nnx.BatchNorm):
    """`nnx.BatchNorm` whose batch statistics count only a batch's real examples.

    The engine pads a client's last batch to the fixed batch size (padding slots copy the
    client's first example and are masked out of the loss); a plain BatchNorm's training
    statistics would count them. Inside a `from_nnx` model's training-mode `apply` with
    `batch_mask`, this layer takes the mask over the batch axis; anywhere else it is
    `nnx.BatchNorm`. The zoo's ResNets use it.
    """

    def __call__(self, x, use_running_average=None, *, mask=None):
        batch_mask = _BATCH_MASK.get()
        if mask is None and batch_mask is not None:
            mask = batch_mask.reshape(batch_mask.shape + (1,) * (x.ndim - 1))
        return super().__call__(x, use_running_average, mask=mask)


def from_nnx(
    make_module: Callable[[nnx.Rngs], nnx.Module],
    input_shape: tuple[int, ...],
    *,
    trainable: Any = nnx.Param,
    name: str | None = None,
    head: Sequence[str] | None = None,
    kernels: str = "auto",
) -> Model:
    """Adapts an NNX module factory `make_module(rngs) -> module` to a `Model`.

    `trainable` is an NNX filter (default: every `nnx.Param`); the rest of the module's
    state (batch statistics, RNG streams, frozen variables) becomes `state`. The module's
    `train()`/`eval()` switch selects dropout/BatchNorm behaviour, and in training mode
    every RNG stream is reseeded from the `rng` passed to `apply`, so randomness is
    explicit and per client, per step. `nnx.BatchStat` variables are the model's `stats`.

    Its `apply` takes `batch_mask` ([B] bool) in training mode and hands it to the module's
    `MaskedBatchNorm` layers, so their batch statistics leave out padding slots.

    `head`: the names of the module's output-head attributes (e.g. ('fc',)), for a module
    that computes `self.head(self.features(x))` with methods `features` and `head`; it
    gives the model a `head_split` (what trains on cached features when the rest is frozen).

    `kernels`: 'auto' (default) computes the module's XLA convolutions and dense-layer
    matmuls with the zoo's CPU kernels when running on the CPU backend (models/substitute.py:
    the same values, up to float round-off, several times faster in the engine's loops
    there) and as written elsewhere; 'substitute' always; 'as_written' never.
    """
    _check_kernels(kernels, "from_nnx")
    abstract = nnx.eval_shape(lambda: make_module(nnx.Rngs(0)))
    graphdef, params_template, state_template = nnx.split(abstract, trainable, ...)
    stat_names = tuple(path_names(nnx.to_pure_dict(
        nnx.split(abstract, trainable, nnx.BatchStat, ...)[2])))
    model_name = name or type(abstract).__name__
    head = tuple(head) if head else None
    if head is not None and not all(callable(getattr(abstract, m, None)) for m in ("features", "head")):
        raise UserError(f"from_nnx(head={head}) needs {type(abstract).__name__} to define the "
                        f"methods features(x) and head(features)")
    return _nnx_model(make_module, input_shape, trainable, graphdef, params_template,
                      state_template, stat_names, model_name, head, abstract, kernels,
                      frozen_stats=False)


def _check_kernels(kernels: str, adapter: str) -> None:
    if kernels not in KERNELS:
        raise UserError(f"{adapter}(kernels=...) must be 'auto', 'substitute' or 'as_written', "
                        f"got {kernels!r}")


def with_kernels(fn: Callable, kernels: str) -> Callable:
    """`fn` (a model's apply) with its convolutions and dense layers computed as `kernels`
    says (see `from_nnx`); 'auto' decides by the backend when `fn` is traced."""
    if kernels == "as_written":
        return fn
    substituted = substitute_kernels(fn)
    if kernels == "substitute":
        return substituted

    def auto(*args, **kwargs):
        return (substituted if jax.default_backend() == "cpu" else fn)(*args, **kwargs)
    return auto


def _nnx_model(make_module, input_shape, trainable, graphdef, params_template, state_template,
               stat_names, name, head, abstract, kernels, *, frozen_stats: bool) -> Model:

    def make(rng: jax.Array) -> tuple[PyTree, PyTree]:
        module = make_module(nnx.Rngs(rng))
        _, params, state = nnx.split(module, trainable, ...)
        return nnx.to_pure_dict(params), nnx.to_pure_dict(state)

    # Compiled: run eagerly, every initializer of every layer would be compiled on its own
    # (half a minute for a ResNet on XLA:CPU).
    init = jax.jit(make)

    def build(params, state, train: bool, rng):
        p = nnx.State(params_template)
        nnx.replace_by_pure_dict(p, params)
        s = nnx.State(state_template)
        nnx.replace_by_pure_dict(s, state)
        module = nnx.merge(graphdef, p, s)
        if train:
            module.train()
            if frozen_stats:
                module.set_attributes(nnx.BatchNorm, use_running_average=True,
                                      raise_if_not_found=False)
            if rng is not None:
                nnx.reseed(module, default=rng, dropout=rng)
        else:
            module.eval()
        return module

    def new_state(module):
        return nnx.to_pure_dict(nnx.split(module, trainable, ...)[2])

    def apply(params, state, x, *, train: bool = False, rng: jax.Array | None = None,
              batch_mask: jax.Array | None = None):
        module = build(params, state, train, rng)
        token = _BATCH_MASK.set(batch_mask if train else None)
        try:
            out = module(x)
        finally:
            _BATCH_MASK.reset(token)
        return out, new_state(module)

    head_split = None
    if head is not None:
        def features(params, state, x):
            return build(params, state, False, None).features(x)

        def apply_head(params, state, f, *, train: bool = False, rng: jax.Array | None = None):
            module = build(params, state, train, rng)
            out = module.head(f)
            return out, new_state(module)

        head_split = HeadSplit(head, with_kernels(features, kernels),
                               with_kernels(apply_head, kernels),
                               _fixed_backbone(abstract, head, frozen_stats))

    def freeze_stats() -> Model:
        return _nnx_model(make_module, input_shape, trainable, graphdef, params_template,
                          state_template, stat_names, name, head, abstract, kernels,
                          frozen_stats=True)

    return Model(init=init, apply=with_kernels(apply, kernels), input_shape=tuple(input_shape),
                 name=name if not frozen_stats else f"{name}[frozen stats]",
                 stats=stat_names, freeze_stats=freeze_stats, head_split=head_split,
                 takes_batch_mask=True)


def _fixed_backbone(abstract: nnx.Module, head: tuple[str, ...], frozen_stats: bool) -> bool:
    """Whether the part of the module outside `head` computes in training mode exactly what
    it computes in inference mode: no active dropout, BatchNorm only with frozen statistics."""
    for path, module in nnx.iter_modules(abstract):
        if path and path[0] in head:
            continue
        if isinstance(module, nnx.Dropout) and module.rate > 0:
            return False
        if isinstance(module, nnx.BatchNorm) and not frozen_stats:
            return False
    return True


def from_linen(
    module: Any,
    input_shape: tuple[int, ...],
    *,
    train_kwarg: str | None = None,
    rng_collections: tuple[str, ...] = ("dropout",),
    name: str | None = None,
    frozen_norm_kwarg: str | None = None,
    kernels: str = "auto",
) -> Model:
    """Adapts a Flax Linen module to a `Model`.

    The `params` collection is trainable; every other collection (e.g. `batch_stats`) is
    `state` and is returned updated from training-mode calls. If the module's
    `__call__` takes a training flag, name it with `train_kwarg` (e.g. "train"); its RNG
    collections (`rng_collections`) are fed from the `rng` passed to `apply`.

    The `batch_stats` collection holds the model's `stats`. A Linen module's training flag
    switches its BatchNorm and its dropout together, so the model cannot train with frozen
    statistics (`freeze_stats` is None) unless it has no dropout: give `frozen_norm_kwarg`,
    the name of a `__call__` flag that makes its BatchNorms use their running averages.

    `kernels`: 'auto' (default) computes the module's XLA convolutions (`nn.Conv`) and
    dense-layer matmuls (`nn.Dense`) with the zoo's CPU kernels when running on the CPU
    backend, as written elsewhere; 'substitute' always; 'as_written' never (see `from_nnx`).
    """
    _check_kernels(kernels, "from_linen")

    def call_kwargs(train: bool, frozen: bool = False) -> dict:
        kwargs = {train_kwarg: train} if train_kwarg else {}
        if frozen:
            kwargs[frozen_norm_kwarg] = True
        return kwargs

    def init(rng: jax.Array) -> tuple[PyTree, PyTree]:
        dummy = jnp.zeros((1, *input_shape), jnp.float32)
        variables = module.init({"params": rng, **{c: rng for c in rng_collections}},
                                dummy, **call_kwargs(False))
        variables = dict(variables)
        params = variables.pop("params", {})
        return params, variables

    def make_apply(frozen: bool):
        def apply(params, state, x, *, train: bool = False, rng: jax.Array | None = None):
            variables = {"params": params, **state}
            rngs = {c: rng for c in rng_collections} if (train and rng is not None) else None
            mutable = list(state) if (train and state and not frozen) else False
            result = module.apply(variables, x, rngs=rngs, mutable=mutable,
                                  **call_kwargs(train, frozen and train))
            if mutable:
                out, updated = result
                return out, {**state, **dict(updated)}
            return result, state
        return with_kernels(apply, kernels)

    abstract_state = jax.eval_shape(init, jax.random.key(0))[1]
    stat_names = tuple(n for n in path_names(abstract_state) if under(n, "batch_stats"))
    model_name = name or type(module).__name__
    freeze_stats = None
    if frozen_norm_kwarg is not None:
        def freeze_stats() -> Model:
            return Model(init=init, apply=make_apply(True), input_shape=tuple(input_shape),
                         name=f"{model_name}[frozen stats]", stats=stat_names,
                         freeze_stats=freeze_stats)
    return Model(init=init, apply=make_apply(False), input_shape=tuple(input_shape),
                 name=model_name, stats=stat_names, freeze_stats=freeze_stats)
