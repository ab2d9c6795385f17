"""A dense-layer matmul whose gradient stays on XLA:CPU's fast matmul path.

Differentiating `y = x @ W` gives `dW = x^T @ g` and `dx = g @ W^T`. XLA folds the
transposes into the dot's dimension numbers, and under `vmap` over clients XLA:CPU runs
such a transposed batched dot through a slow generic contraction: for logistic regression
with 50 vmapped clients (batch 10, 64 -> 10) the weight-gradient dot alone took 165 us per
step, against 35 us for the forward dot (benchmarks/README.md). Making the transpose an
explicit copy (behind an optimization barrier, so it is not folded back) turns the
gradient into a plain matmul that XLA:CPU hands to its fast library kernels: that round
went from 2.1 to 1.3 ms.

The copy only pays off for small operands; for large ones (the EMNIST CNN's 9216 -> 128
layer) the folded form is as fast or faster, so operands above TRANSPOSE_MAX_ELEMENTS are
left to XLA.

Client batches are short, and for a batch of at most OUTER_PRODUCT_MAX_ROWS rows the
weight gradient skips the dot altogether: `dW = sum_r outer(x_r, g_r)`, written out row by
row, is one elementwise fusion (with the optimizer update that follows it). Measured on
XLA:CPU (2 cores, vmapped over clients): 23 us against 105 us with the copy and 180 us
folded for 50 clients of 10 x (64 -> 10); 86 / 455 / 457 us for 10 clients of
10 x (200 -> 200); 0.94 / 1.35 / 1.14 ms for one client of 20 x (9216 -> 128). At 64 rows
the dot wins again. The values are those of the plain matmul up to float round-off.

`explicit_transpose_dot_general` has the signature of `lax.dot_general`, so it plugs into
`flax.nnx.Linear(..., dot_general=explicit_transpose_dot_general)`. Only the dense-layer
case (`[..., in] @ [in, out]`) is changed; anything else goes to `lax.dot_general`. It
defines a custom VJP, so it supports reverse-mode differentiation (gradients, also under
vmap for per-example gradients) but not forward-mode `jax.jvp`; use impl 'xla' for that.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_sim.models.kernels import select_kernel

# Per-client operand size up to which the gradient's transpose is made an explicit copy.
TRANSPOSE_MAX_ELEMENTS = 1 << 16
# Batches of up to this many rows get the weight gradient as a sum of outer products.
OUTER_PRODUCT_MAX_ROWS = 32


def _transposed(a: jax.Array) -> jax.Array:
    if a.size > TRANSPOSE_MAX_ELEMENTS:
        return a.T  # folded into the dot by XLA
    return lax.optimization_barrier(a.T)  # materialised, so the dot reads it row-major


@jax.custom_vjp
def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    return x @ w


def _matmul_fwd(x, w):
    return x @ w, (x, w)


def _weight_gradient(x: jax.Array, g: jax.Array) -> jax.Array:
    """x^T g for x [rows, in], g [rows, out]."""
    rows = x.shape[0]
    if rows > OUTER_PRODUCT_MAX_ROWS:
        return _transposed(x) @ g
    # A few rows: sum the rows' outer products, one elementwise fusion with no dot at all.
    dw = x[0, :, None] * g[0, None, :]
    for r in range(1, rows):
        dw = dw + x[r, :, None] * g[r, None, :]
    return dw


def _matmul_bwd(residuals, g):
    x, w = residuals
    dtype = jnp.promote_types(x.dtype, w.dtype)
    g = g.astype(dtype)
    dx = (g @ _transposed(w)).astype(x.dtype)
    dw = _weight_gradient(x.astype(dtype), g).astype(w.dtype)
    return dx, dw


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def explicit_transpose_dot_general(lhs, rhs, dimension_numbers, precision=None,
                                   preferred_element_type=None, **kwargs):
    """Drop-in for `lax.dot_general`; dense-layer matmuls get the fast gradient (module doc)."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    dense = (rhs.ndim == 2 and not lhs_batch and not rhs_batch
             and tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
             and precision is None and set(kwargs) <= {"out_sharding"}
             and kwargs.get("out_sharding") is None
             and (preferred_element_type is None or preferred_element_type == lhs.dtype))
    if not dense:
        return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)
    x = lhs.reshape(-1, lhs.shape[-1])
    return _matmul(x, rhs).reshape(*lhs.shape[:-1], rhs.shape[-1])


def dense_function(impl: str = "auto", backend: str | None = None):
    """The `dot_general` to give `nnx.Linear` for impl 'auto' | 'explicit_transpose' | 'xla'
    ('auto': 'explicit_transpose' on CPU, see module doc; XLA's dot on accelerators).
    `backend` ('cpu', 'gpu', 'tpu') is the platform 'auto' chooses for; default: the
    current one, `jax.default_backend()`."""
    return select_kernel("dense_impl", impl, {"explicit_transpose": explicit_transpose_dot_general,
                                              "xla": lax.dot_general}, cpu_default="explicit_transpose",
                         backend=backend)
