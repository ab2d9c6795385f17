"""The zoo's CPU kernels for any model: a rewrite of the model's traced program.

The zoo's models compute their convolutions as im2col + matmul (`models/conv.py`) and
their dense-layer gradients without XLA's folded-transpose dot (`models/dense.py`) on
XLA:CPU, which runs a real convolution ~10x slower inside a loop and ~3x slower vmapped
over clients. A model a researcher writes with `flax.linen.Conv` / `nnx.Conv` /
`lax.conv_general_dilated` gets XLA's kernels instead. `substitute_kernels(fn)` gives
it the zoo's: each call traces `fn` on its actual arguments (`jax.make_jaxpr`) and
evaluates the resulting program with every `conv_general_dilated` equation computed by
`matmul_conv` and every dense-layer `dot_general` (`[..., in] @ [in, out]`) by
`explicit_transpose_dot_general`. Both have the primitive's signature and values (up to
float round-off), and fall back to XLA's own kernel for what they do not handle
(channels-first layouts, feature groups, input dilation; dots that are not dense layers),
so the rewritten function computes what `fn` computes, and differentiates (reverse mode)
and vmaps like it.

Sub-programs are followed where they hold a replaced kernel: `jit` and `closed_call` are
evaluated inline, `checkpoint` (remat) is rebuilt with `jax.checkpoint` and its policy,
and other higher-order primitives (`scan`, `while`, `cond`) are bound again with their
programs rewritten. `custom_jvp` / `custom_vjp` functions keep their own definitions and
are bound unchanged, as is every equation without a replaced kernel inside.

The dense kernel defines a custom VJP, so a substituted function supports reverse-mode
differentiation but not forward-mode `jax.jvp` (pass `dense=False`, or build the model
with `kernels='xla'`).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable

import jax
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

from fedjax_sim.models.conv import matmul_conv
from fedjax_sim.models.dense import explicit_transpose_dot_general

# Bound as they are: their differentiation rules are the author's and must see the
# primitives they were written for.
_KEEP = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr",
                   "custom_lin", "custom_transpose_call"})
_INLINE = frozenset({"jit", "pjit", "closed_call", "core_call"})
_REMAT = frozenset({"checkpoint", "remat2", "remat"})


def _dense_dot(eqn) -> bool:
    """Whether a dot_general equation is a dense layer, `[..., in] @ [in, out]`."""
    lhs, rhs = (v.aval for v in eqn.invars)
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
    return (rhs.ndim == 2 and not lhs_batch and not rhs_batch
            and tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,))


def _rules(conv: bool, dense: bool) -> dict[str, tuple[Callable, Callable]]:
    """primitive name -> (whether an equation is replaced, the replacement)."""
    rules = {}
    if conv:
        rules["conv_general_dilated"] = (lambda eqn: True, matmul_conv)
    if dense:
        rules["dot_general"] = (_dense_dot, explicit_transpose_dot_general)
    return rules


def _programs(params: dict):
    """(param name, index or None, program) of every jaxpr among an equation's params."""
    for name, value in params.items():
        if isinstance(value, (ClosedJaxpr, Jaxpr)):
            yield name, None, value
        elif isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                if isinstance(v, (ClosedJaxpr, Jaxpr)):
                    yield name, i, v


def _open(program) -> Jaxpr:
    return program.jaxpr if isinstance(program, ClosedJaxpr) else program


def _replaces(jaxpr: Jaxpr, rules: dict) -> bool:
    """Whether `jaxpr` (sub-programs included, custom-rule functions excluded) holds an
    equation that `rules` replace."""
    for eqn in jaxpr.eqns:
        rule = rules.get(eqn.primitive.name)
        if rule is not None and rule[0](eqn):
            return True
        if eqn.primitive.name not in _KEEP and any(
                _replaces(_open(p), rules) for _, _, p in _programs(eqn.params)):
            return True
    return False


def _bind(eqn, invals):
    """The equation as it was written, on new inputs."""
    params = eqn.primitive.get_bind_params(eqn.params)
    manager = getattr(getattr(eqn, "ctx", None), "manager", None) or contextlib.nullcontext()
    with manager:
        out = eqn.primitive.bind(*invals, **params)
    return out if eqn.primitive.multiple_results else [out]


class _CannotRewrite(Exception):
    """A rewritten sub-program needs constants where its primitive takes none."""


def _rewritten(program, rules: dict):
    """`program` (a ClosedJaxpr or an open Jaxpr without constants) with `rules` applied."""
    jaxpr = _open(program)
    consts = program.consts if isinstance(program, ClosedJaxpr) else ()
    avals = [v.aval for v in jaxpr.invars]
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=getattr(a, "weak_type", False))
             for a in avals]
    closed = jax.make_jaxpr(lambda *args: evaluate(jaxpr, consts, args, rules))(*specs)
    if isinstance(program, ClosedJaxpr):
        return closed
    if closed.consts:
        raise _CannotRewrite
    return closed.jaxpr


def _equation(eqn, invals, rules: dict) -> list:
    name = eqn.primitive.name
    rule = rules.get(name)
    if rule is not None and rule[0](eqn):
        return [rule[1](*invals, **eqn.params)]
    programs = list(_programs(eqn.params))
    if not programs or name in _KEEP or not any(_replaces(_open(p), rules) for _, _, p in programs):
        return _bind(eqn, invals)
    if name in _INLINE and len(programs) == 1:
        program = programs[0][2]
        consts = program.consts if isinstance(program, ClosedJaxpr) else ()
        return evaluate(_open(program), consts, invals, rules)
    if name in _REMAT and len(programs) == 1 and isinstance(programs[0][2], Jaxpr):
        jaxpr = programs[0][2]
        run = jax.checkpoint(lambda *args: evaluate(jaxpr, (), args, rules),
                             prevent_cse=eqn.params.get("prevent_cse", True),
                             policy=eqn.params.get("policy"))
        return list(run(*invals))
    params = dict(eqn.params)
    try:
        for key, index, program in programs:
            new = _rewritten(program, rules)
            if index is None:
                params[key] = new
            else:
                params[key] = (*params[key][:index], new, *params[key][index + 1:])
    except _CannotRewrite:
        return _bind(eqn, invals)
    return _bind(eqn.replace(params=params), invals)


def evaluate(jaxpr: Jaxpr, consts, args, rules: dict) -> list:
    """Evaluates `jaxpr` on `args` (traced into whatever is tracing the caller) with the
    equations that `rules` name replaced."""
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        outs = _equation(eqn, [read(v) for v in eqn.invars], rules)
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def substitute_kernels(fn: Callable, *, conv: bool = True, dense: bool = True) -> Callable:
    """`fn` with its XLA convolutions computed by `matmul_conv` (`conv`) and its dense-layer
    matmuls by `explicit_transpose_dot_general` (`dense`): see the module doc.

    `fn` may take any pytrees of arrays and other values (flags, None); the non-array
    leaves are fixed at each call's trace, as under `jax.jit` with static arguments.
    """
    rules = _rules(conv, dense)

    @functools.wraps(fn)
    def substituted(*args, **kwargs):
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        dynamic = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]

        def flat_fn(*arrays):
            full = list(leaves)
            for i, a in zip(dynamic, arrays):
                full[i] = a
            call_args, call_kwargs = jax.tree_util.tree_unflatten(treedef, full)
            return fn(*call_args, **call_kwargs)

        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(
            *[leaves[i] for i in dynamic])
        outs = evaluate(closed.jaxpr, closed.consts, [leaves[i] for i in dynamic], rules)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return substituted

