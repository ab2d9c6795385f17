"""Choosing a layer's kernel implementation by name ('auto' picks by backend)."""

from __future__ import annotations

from typing import Callable

import jax

from fedjax_sim.errors import UserError


def select_kernel(option: str, impl: str, kernels: dict[str, Callable], cpu_default: str,
                  backend: str | None = None) -> Callable:
    """The kernel named `impl` among `kernels`; 'auto' means `cpu_default` on CPU and 'xla'
    on accelerators ('gpu', 'tpu'). `backend` names the platform to choose for (default:
    `jax.default_backend()`, the one the program will run on). `option` names the model
    argument in the error message."""
    if impl == "auto":
        backend = jax.default_backend() if backend is None else backend
        impl = cpu_default if backend == "cpu" else "xla"
    if impl not in kernels:
        names = ["auto", *kernels]
        allowed = ", ".join(repr(n) for n in names[:-1]) + f" or {names[-1]!r}"
        raise UserError(f"{option} must be {allowed}, got {impl!r} (config: model.args.{option})")
    return kernels[impl]
