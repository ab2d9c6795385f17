"""JAX's persistent compilation cache, on by default: a program compiled once (the same
model, algorithm, shapes and hyperparameters) is read back instead of compiled again, by a
later `simulate()` call in the same process and by a fresh process.

`import fedjax_sim` points JAX's cache at `$XDG_CACHE_HOME/fedjax_sim/xla` (by default
`~/.cache/fedjax_sim/xla`) and caches every program that took at least
MIN_COMPILE_SECONDS to compile, unless

- the environment sets `FEDJAX_SIM_COMPILATION_CACHE=0` (or `off`, `false`, `no`): off;
- it sets `FEDJAX_SIM_COMPILATION_CACHE=<a directory>`: that directory;
- JAX's own cache is already configured (`JAX_COMPILATION_CACHE_DIR`, or
  `jax.config.jax_compilation_cache_dir` set before the import): left as it is.

`compilation_cache(None)` turns it off for the rest of the process and
`compilation_cache(path)` points it elsewhere. Entries are keyed by the compiled program
and the JAX/XLA versions and devices, so a stale entry is never used; the directory can
be deleted at any time.
"""

from __future__ import annotations

import os

import jax

ENV = "FEDJAX_SIM_COMPILATION_CACHE"
# Programs quicker to compile than this are not worth a file each.
MIN_COMPILE_SECONDS = 0.5
_OFF = ("0", "off", "false", "no")


def default_directory() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fedjax_sim", "xla")


def compilation_cache(path: str | None) -> str | None:
    """Points JAX's persistent compilation cache at `path` (created if missing), or turns
    it off with None; returns the directory in use."""
    if path is None:
        jax.config.update("jax_compilation_cache_dir", None)
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # JAX's own setting wins
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return path


def configure_default() -> str | None:
    """What `import fedjax_sim` does (module doc); returns the directory in use, if any."""
    setting = os.environ.get(ENV, "").strip()
    if setting.lower() in _OFF:
        return None
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    try:
        return compilation_cache(setting or default_directory())
    except OSError:  # e.g. a read-only home directory: run without the cache
        return None
