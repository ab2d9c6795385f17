"""JAX's persistent compilation cache is on by default (engine/compilation_cache.py): a
fresh process reads back what an earlier one compiled; the environment turns it off or
moves it, and a cache JAX was already given is left alone. Each check runs in a fresh
Python process (the setting is made at import)."""

import json
import os
import subprocess
import sys

import pytest

CHILD = r"""
import json
import jax, jax.numpy as jnp
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
import fedjax_sim
f = jax.jit(lambda x: jnp.sin(x) * 3.0 + jnp.cos(x) ** 2)
f(jnp.arange(7.0)).block_until_ready()
print(json.dumps({"dir": jax.config.jax_compilation_cache_dir, "hits": len(hits)}))
"""


def _child(**env):
    base = {k: v for k, v in os.environ.items()
            if k not in ("JAX_COMPILATION_CACHE_DIR", "FEDJAX_SIM_COMPILATION_CACHE")}
    base.update(JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **env)
    done = subprocess.run([sys.executable, "-c", CHILD], env=base, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_fresh_process_reads_back_what_an_earlier_one_compiled(tmp_path):
    first = _child(XDG_CACHE_HOME=str(tmp_path))
    assert first["dir"] == str(tmp_path / "fedjax_sim" / "xla") and first["hits"] == 0
    assert os.listdir(first["dir"])  # the program was written
    assert _child(XDG_CACHE_HOME=str(tmp_path))["hits"] >= 1  # read back, not compiled


def test_the_environment_turns_it_off_or_moves_it_and_jaxs_own_setting_wins(tmp_path,
                                                                             monkeypatch):
    import jax

    from fedjax_sim.engine.compilation_cache import configure_default

    before = jax.config.jax_compilation_cache_dir
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv("FEDJAX_SIM_COMPILATION_CACHE", "off")
        assert configure_default() is None and jax.config.jax_compilation_cache_dir is None
        monkeypatch.setenv("FEDJAX_SIM_COMPILATION_CACHE", str(tmp_path / "elsewhere"))
        assert configure_default() == str(tmp_path / "elsewhere")
        monkeypatch.delenv("FEDJAX_SIM_COMPILATION_CACHE")
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax_own"))
        assert configure_default() == str(tmp_path / "jax_own")  # left as it was
        jax.config.update("jax_compilation_cache_dir", None)
        assert configure_default() == str(tmp_path / "fedjax_sim" / "xla")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
