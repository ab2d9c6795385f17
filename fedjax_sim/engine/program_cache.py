"""Compile once, run many: a process-wide cache of compiled round programs.

A `simulate()` call traces and compiles its round program (seconds for a small model,
minutes for a large one on XLA:CPU) and then trains (often for less time than that). A
second call that differs only in what the program takes as inputs (the seed, the data's
values, an injected learning rate, FedProx's mu, the DP clip norm and noise multiplier:
engine.hyperparams) runs the executable compiled for the first.

The key of a program is `structural_key` of everything it is built from: the model, the
task, the algorithm (with its runtime hyperparameters left out), the aggregator, the
schedule and engine choices, and the shapes, dtypes and placements of its arguments.
`structural_key` follows functions into their code and the values they close over
(default arguments, closure cells, and the globals that user code refers to), so two
models or optimizers built alike by the same code are the same key, and any difference
in a value baked into the program (a constant learning rate, a layer width, a clip norm
kept as a constant) is a different key. Objects it cannot see into are keyed by identity
and kept alive by the entry, which can only cost a recompilation, never reuse the wrong
program. As with `jax.jit`, an object changed in place after it was used is not noticed.

JAX's persistent compilation cache (engine.compilation_cache) skips XLA's compilation in
a new process; this cache also skips tracing and lowering within one.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import sys
import threading
import types
from typing import Any, Callable

import jax
import numpy as np

from fedjax_sim.engine import hyperparams as hyper_lib

# How many compiled programs are kept (least recently used first out).
MAX_PROGRAMS = 32

# Modules whose functions are keyed by their code and closures, without following the
# globals they read (those do not change within a process).
_LIBRARY_PREFIXES = ("jax", "jaxlib", "flax", "optax", "numpy", "fedjax_sim", "ml_collections",
                     "functools", "builtins", "math", "typing", "collections", "chex",
                     "orbax", "tensorflow", "scipy", "abc", "dataclasses")


class _Identity:
    """Keys an object by identity and keeps it alive (so its id is not reused)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, _Identity) and other.obj is self.obj

    def __hash__(self):
        return id(self.obj)

    def __repr__(self):
        return f"<identity {type(self.obj).__name__}>"


def structural_key(obj: Any, runtime: tuple[str, ...] = ()) -> tuple:
    """A hashable key: equal for objects that build the same program (see module doc).
    `runtime`: the names of `obj`'s own dataclass fields whose values are inputs of the
    program (only their structure is keyed)."""
    return _Walker().key(obj, runtime)


class _Walker:
    def __init__(self):
        self.seen: dict[int, int] = {}
        self.alive: list = []  # objects visited: alive while the key is built

    def key(self, x: Any, runtime: tuple[str, ...] = ()):
        if x is None or isinstance(x, (bool, int, str, bytes, complex)):
            return (type(x).__name__, x)
        if isinstance(x, float):
            return ("float", repr(x))
        if isinstance(x, (type, types.ModuleType, types.BuiltinFunctionType)):
            return ("named", getattr(x, "__module__", None), getattr(x, "__qualname__", None),
                    _Identity(x))
        if isinstance(x, types.CodeType):
            return ("code", x)
        marker = self.seen.get(id(x))
        if marker is not None:
            return ("cycle", marker)
        self.seen[id(x)] = len(self.seen)
        self.alive.append(x)
        return self._compound(x, runtime)

    # long: one branch per kind of object; each is a line or two
    def _compound(self, x: Any, runtime: tuple[str, ...]):
        if isinstance(x, (np.ndarray, np.generic, jax.Array)):
            return _array_key(x)
        if isinstance(x, jax.ShapeDtypeStruct):
            return ("abstract", x.shape, str(x.dtype), getattr(x, "sharding", None))
        if isinstance(x, np.dtype):
            return ("dtype", str(x))
        if hasattr(x, "__program_key__"):
            return ("custom", type(x), self.key(x.__program_key__()))
        if isinstance(x, functools.partial):
            return ("partial", self.key(x.func), self.key(x.args), self.key(x.keywords))
        if isinstance(x, types.MethodType):
            return ("method", self.key(x.__func__), self.key(x.__self__))
        if isinstance(x, types.FunctionType):
            return self._function(x)
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return ("dataclass", type(x), tuple(
                (f.name, self._runtime(getattr(x, f.name, None)) if f.name in runtime
                 else self.key(getattr(x, f.name, None))) for f in dataclasses.fields(x)))
        if isinstance(x, tuple):
            return (type(x), tuple(self.key(v) for v in x))
        if isinstance(x, list):
            return ("list", tuple(self.key(v) for v in x))
        if isinstance(x, dict):
            items = [(self.key(k), self.key(v)) for k, v in x.items()]
            return (type(x), tuple(sorted(items, key=repr)))
        if isinstance(x, (set, frozenset)):
            return (type(x), tuple(sorted((self.key(v) for v in x), key=repr)))
        wrapped = getattr(x, "__wrapped__", None)  # jax.jit, functools.wraps
        if wrapped is not None and callable(x):
            return ("wrapped", type(x), self.key(wrapped))
        nnx_key = _nnx_key(x, self)
        if nnx_key is not None:
            return nnx_key
        if _value_hashable(x):
            return ("value", type(x), x)
        if hasattr(x, "__dict__") and not callable(x):
            return ("object", type(x), self.key(vars(x)))
        return ("id", _Identity(x))

    def _runtime(self, value):
        """A runtime field: an injected optimizer's structure, or a number's presence."""
        skeleton = hyper_lib.skeleton(value)
        return ("runtime", self.key(skeleton) if skeleton is not None else type(value).__name__)

    def _function(self, fn: types.FunctionType):
        module = fn.__module__ or ""
        user = not module.startswith(_LIBRARY_PREFIXES)
        cells = tuple(self.key(_cell(c)) for c in (fn.__closure__ or ()))
        referenced = ()
        if user:
            names = sorted(_global_names(fn.__code__))
            found = [(n, fn.__globals__[n]) for n in names if n in fn.__globals__]
            referenced = tuple((n, self.key(v)) for n, v in found
                               if not isinstance(v, types.ModuleType))
        return ("function", module, fn.__qualname__, fn.__code__, self.key(fn.__defaults__),
                self.key(fn.__kwdefaults__), cells, referenced)


def _cell(cell):
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return "<empty cell>"


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _array_key(x) -> tuple:
    if isinstance(x, jax.core.Tracer):
        return ("id", _Identity(x))
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return ("key", str(x.dtype), _array_key(jax.random.key_data(x)))
    value = np.asarray(x)
    digest = hashlib.blake2b(np.ascontiguousarray(value).view(np.uint8).reshape(-1),
                             digest_size=16).hexdigest() if value.dtype != object else id(x)
    return ("array", value.shape, str(value.dtype), digest,
            getattr(x, "sharding", None) if isinstance(x, jax.Array) else None)


def _value_hashable(x: Any) -> bool:
    """Whether `x` compares by value (its type defines __eq__ and __hash__ of its own)."""
    cls = type(x)
    if cls.__eq__ is object.__eq__ or cls.__hash__ is None:
        return False
    try:
        hash(x)
    except TypeError:
        return False
    return True


def _nnx_key(x: Any, walker: _Walker):
    """A flax NNX module (its graph definition and state, values hashed) or variable."""
    nnx = sys.modules.get("flax.nnx")
    if nnx is None:
        return None
    if isinstance(x, nnx.Variable):
        return ("nnx.Variable", type(x), walker.key(x.get_value()), walker.key(x.get_metadata()))
    if not isinstance(x, nnx.Module):
        return None
    graphdef, state = nnx.split(x)
    leaves = jax.tree_util.tree_leaves(state)
    return ("nnx", graphdef, tuple(walker.key(v) for v in leaves))


def signature(tree: Any) -> tuple:
    """The shapes, dtypes, weak types and placements of `tree`'s arrays, and its structure."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return (treedef, tuple(_leaf_signature(x) for x in leaves))


def _leaf_signature(x) -> tuple:
    if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
        return (x.shape, str(x.dtype), bool(getattr(x, "weak_type", False)),
                getattr(x, "sharding", None))
    if isinstance(x, np.ndarray):
        return (x.shape, str(x.dtype), False, None)
    return ("python", type(x).__name__, x)


def environment() -> tuple:
    """What of JAX's configuration a trace depends on."""
    return (jax.default_backend(), bool(jax.config.jax_enable_x64),
            str(jax.config.jax_default_matmul_precision), jax.device_count())


class ProgramCache:
    """Compiled programs by key, least recently used first out."""

    def __init__(self, size: int = MAX_PROGRAMS):
        self.size = size
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get_or_compile(self, key: tuple, compile_fn: Callable[[], Any]) -> tuple[Any, bool]:
        """(the program stored under `key`, compiling it with `compile_fn()` where there is
        none; whether it was found)."""
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return found, True
        program = compile_fn()
        with self._lock:
            self.misses += 1
            self._entries[key] = program
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return program, False

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


PROGRAMS = ProgramCache()


JITS = ProgramCache(size=4 * MAX_PROGRAMS)
RESULTS = ProgramCache(size=4 * MAX_PROGRAMS)


def jit(fn: Callable, **kwargs) -> Callable:
    """`jax.jit(fn, **kwargs)`, the same jitted function for every `fn` built alike, so a
    later run calls what an earlier one compiled (e.g. a model's init or an evaluator)."""
    key = ("jit", structural_key(fn), structural_key(kwargs), environment())
    return JITS.get_or_compile(key, lambda: jax.jit(fn, **kwargs))[0]


def memoized(compute: Callable[[], Any], *depends_on: Any) -> Any:
    """`compute()`, remembered under the structural key of `depends_on` (which must hold
    everything the result depends on, e.g. the function and its arguments' signatures)."""
    key = ("memo", structural_key(depends_on), environment())
    return RESULTS.get_or_compile(key, compute)[0]


def clear() -> None:
    """Forgets every compiled program, jitted function and remembered result of this
    process (JAX's persistent cache on disk stays)."""
    for cache in (PROGRAMS, JITS, RESULTS):
        cache.clear()
