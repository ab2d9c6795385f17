"""Hyperparameters that are inputs of the compiled round program, not constants in it.

A learning rate written as `optax.sgd(0.1)` is a constant of the program: another value
means another program, and compiling it again. An optimizer made with
`optax.inject_hyperparams` keeps its numeric hyperparameters in its state instead:

    optax.inject_hyperparams(optax.adam)(learning_rate=1e-3, b1=0.9)

The engine passes such an optimizer's values (and an algorithm's other declared numbers,
e.g. FedProx's mu: `Algorithm.hyperparameters`) into the round program as arguments and
rebuilds the optimizer from them inside the program (`with_values`), so a run that changes
only these values reuses the compiled program (engine.program_cache). `tunable(optax.adam,
learning_rate=1e-3)` injects every float argument; the config loader builds every
optimizer this way.

`injected(tx)` recognises such an optimizer (None for any other transformation);
`values(tx)` gives its numeric hyperparameters as float32 arrays.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
import optax


class Injected(NamedTuple):
    """What `optax.inject_hyperparams(factory, static_args)(**hps)` was made from."""

    factory: Any  # the optimizer factory, e.g. optax.adam
    numeric: dict  # name -> value: the hyperparameters kept in the state
    other: dict  # name -> value: static arguments (booleans, strings, None, ...)
    schedules: dict  # name -> schedule of a hyperparameter given as a schedule
    dtype: Any  # the hyperparameters' dtype (None: the parameters')


# The free variables of the init function `optax.inject_hyperparams` builds, by name.
_INIT_CELLS = ("hyperparam_dtype", "inner_factory", "numeric_hps", "other_hps", "sched_hps")


def injected(tx: Any) -> Injected | None:
    """The parts of an optimizer made by `optax.inject_hyperparams`, else None."""
    init = getattr(tx, "init", None)
    code = getattr(init, "__code__", None)
    if code is None or not isinstance(tx, optax.GradientTransformation):
        return None
    if not getattr(init, "__qualname__", "").startswith("inject_hyperparams.") \
            or set(_INIT_CELLS) - set(code.co_freevars):
        return None
    cells = {name: cell.cell_contents for name, cell in zip(code.co_freevars, init.__closure__)}
    numeric = cells["numeric_hps"]
    if not all(_is_float(v) for v in numeric.values()):
        return None  # an integer hyperparameter may steer Python code: keep it a constant
    return Injected(cells["inner_factory"], dict(numeric), dict(cells["other_hps"]),
                    dict(cells["sched_hps"]), cells["hyperparam_dtype"])


def _is_float(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        return True
    dtype = getattr(value, "dtype", None)
    return dtype is not None and np.ndim(value) == 0 and jnp.issubdtype(dtype, jnp.floating)


def values(tx: Any) -> dict | None:
    """An injected optimizer's numeric hyperparameters as float32 scalars, else None."""
    parts = injected(tx)
    if parts is None or not parts.numeric:
        return None
    return {k: jnp.asarray(v, jnp.float32) for k, v in sorted(parts.numeric.items())}


def with_values(tx: Any, new: dict) -> optax.GradientTransformation:
    """The injected optimizer `tx` with its numeric hyperparameters set to `new` (arrays,
    possibly traced): its `init` stores them and its inner optimizer is built from them."""
    parts = injected(tx)
    if parts is None:
        raise ValueError("with_values needs an optimizer made by optax.inject_hyperparams")
    static = tuple(parts.other)
    hps = {**parts.other, **parts.schedules, **new}
    return optax.inject_hyperparams(parts.factory, static_args=static,
                                    hyperparam_dtype=parts.dtype)(**hps)


def skeleton(tx: Any) -> tuple | None:
    """What of an injected optimizer fixes the compiled program: everything but the values
    of its numeric hyperparameters (their names stay). None for other transformations."""
    parts = injected(tx)
    if parts is None:
        return None
    return ("injected", parts.factory, tuple(sorted(parts.numeric)), parts.other,
            parts.schedules, parts.dtype)


def tunable(factory, **kwargs) -> optax.GradientTransformation:
    """`factory(**kwargs)` (an optax optimizer factory, e.g. `optax.adam`) with its float
    arguments injected: inputs of the round program, so runs that change only them reuse
    the compiled program. Integers, booleans, strings and None stay constants.

        fs.algorithms.fedavg(fs.algorithms.tunable(optax.sgd, learning_rate=0.1, momentum=0.9))
    """
    static = tuple(k for k, v in kwargs.items() if not _is_float(v))
    return optax.inject_hyperparams(factory, static_args=static)(**kwargs)
