"""Convolution as shifted slices and one matrix multiply (im2col), for XLA:CPU.

On XLA:CPU a `conv_general_dilated` inside a loop body (`lax.scan`, `lax.map`, a
`while_loop`) runs about 10x slower than the same convolution outside a loop, and
vmapping per-client kernels turns a convolution into a grouped convolution that runs
about 3x slower than clients one after another (benchmarks/README.md). Both problems
disappear when the convolution is written as a gather of the kh*kw shifted input windows
followed by a `dot`: matrix multiplies are fast inside loops, and vmapped over clients
they become batched matrix multiplies.

`matmul_conv` has the signature of `lax.conv_general_dilated`, so it plugs into
`flax.nnx.Conv(..., conv_general_dilated=matmul_conv)`. It handles channels-last inputs
(NHWC, HWIO kernels) with any kernel size, stride, padding and kernel dilation; other
cases (input dilation, feature groups, other layouts) fall back to the XLA convolution.
The result equals `lax.conv_general_dilated` up to float round-off (tests/test_models.py).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_sim.models.kernels import select_kernel


def _channels_last(dimension_numbers, ndim: int) -> bool:
    if dimension_numbers is None:
        return False
    dn = lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, dimension_numbers)
    spatial = tuple(range(1, ndim - 1))
    return (dn.lhs_spec == (0, ndim - 1, *spatial)
            and dn.rhs_spec == (ndim - 1, ndim - 2, *range(ndim - 2))
            and dn.out_spec == (0, ndim - 1, *spatial))


def matmul_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                precision=None, preferred_element_type=None, **kwargs):
    """Drop-in for `lax.conv_general_dilated` computed as im2col + dot (see module doc).

    Extra keyword arguments (e.g. `out_sharding`) are forwarded to the XLA fallback and
    ignored by the matmul path, which produces the same layout.
    """
    nd = lhs.ndim - 2
    lhs_dilation = tuple(lhs_dilation or (1,) * nd)
    rhs_dilation = tuple(rhs_dilation or (1,) * nd)
    if (not _channels_last(dimension_numbers, lhs.ndim) or feature_group_count != 1
            or batch_group_count != 1 or any(d != 1 for d in lhs_dilation)):
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision=precision,
            preferred_element_type=preferred_element_type, **kwargs)

    kernel = rhs.shape[:nd]
    cout = rhs.shape[nd + 1]
    strides = tuple(window_strides)
    effective = tuple((k - 1) * d + 1 for k, d in zip(kernel, rhs_dilation))
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(lhs.shape[1:-1], effective, strides, padding)
    else:
        pads = tuple(tuple(p) for p in padding)
    if any(lo or hi for lo, hi in pads):
        lhs = jnp.pad(lhs, ((0, 0), *pads, (0, 0)))
    out_shape = tuple((size - e) // s + 1
                      for size, e, s in zip(lhs.shape[1:-1], effective, strides))
    windows = []
    for offset in itertools.product(*(range(k) for k in kernel)):
        start = (0, *(o * d for o, d in zip(offset, rhs_dilation)), 0)
        limit = (lhs.shape[0], *(st + (n - 1) * s + 1 for st, n, s in
                                 zip(start[1:-1], out_shape, strides)), lhs.shape[-1])
        windows.append(lax.slice(lhs, start, limit, (1, *strides, 1)))
    patches = jnp.concatenate(windows, axis=-1) if len(windows) > 1 else windows[0]
    return jnp.dot(patches, rhs.reshape(-1, cout), precision=precision,
                   preferred_element_type=preferred_element_type)


def conv_function(impl: str = "auto", backend: str | None = None):
    """The `conv_general_dilated` to give `nnx.Conv` for impl 'auto' | 'matmul' | 'xla'
    ('auto': 'matmul' on CPU, see module doc; the XLA convolution on accelerators).
    `backend` ('cpu', 'gpu', 'tpu') is the platform 'auto' chooses for; default: the
    current one, `jax.default_backend()`."""
    return select_kernel("conv_impl", impl, {"matmul": matmul_conv, "xla": lax.conv_general_dilated},
                         cpu_default="matmul", backend=backend)
