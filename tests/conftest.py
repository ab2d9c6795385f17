import os
import shutil
import sys
import tempfile

# Tests run on the CPU with deterministic, single-threaded-friendly settings.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _fast_compiles(config) -> None:
    """The default suite's time goes into XLA compiling hundreds of small programs, not
    into running them. LLVM at -O0 without its expensive passes compiles them in about 40%
    less CPU time (and mostly on one thread, so pytest-xdist's workers share the cores;
    pyproject's addopts). Every comparison in the suite holds at this level as at XLA's
    default (the bitwise checks compare programs compiled alike). The slow tier (`-m slow`)
    keeps XLA's default level: it checks the documented results, which are measured at it.
    Set XLA_FLAGS with an --xla_backend_optimization_level of your own to test at another
    level (e.g. 3). Tests that start the command line in a subprocess inherit the setting."""
    flags = os.environ.get("XLA_FLAGS", "")
    markexpr = config.getoption("markexpr", "") or ""
    if "--xla_backend_optimization_level" in flags or markexpr.strip() != "not slow":
        return
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [
        flags, "--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]))


def pytest_configure(config):
    """Fast compiles for the default suite (above), and one compilation cache for the whole
    run, its workers and subprocesses: many tests compile the same round program (the same
    model, algorithm and shapes), and a rerun from a checkpoint compiles again what the
    first run compiled. It starts empty in every run (a temporary directory, removed at the
    end) unless JAX_COMPILATION_CACHE_DIR is set."""
    _fast_compiles(config)
    if hasattr(config, "workerinput"):  # an xdist worker: the controller set it up
        return
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    path = tempfile.mkdtemp(prefix="fedjax_sim_test_xla_cache_")
    config._fedjax_sim_xla_cache = path
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    # cache every program, however small or quick to compile
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    if "jax" in sys.modules:  # imported before this hook (a plugin): set it directly too
        import jax

        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    path = getattr(config, "_fedjax_sim_xla_cache", None)
    if path:
        shutil.rmtree(path, ignore_errors=True)
