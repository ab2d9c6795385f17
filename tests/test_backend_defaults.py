"""What each backend runs by default: the CPU-specific kernels and execution strategy on
'cpu' only, XLA's own kernels and a plain vmap with scanned steps on accelerators.

The choice is made by name (`backend=`), so the accelerator defaults are checked here on
the CPU. The expected values are the rules of engine/options.py's and models/kernels.py's
docstrings (and benchmarks/README.md): on CPU, im2col convolutions and dense layers with
explicit gradient transposes; clients one by one when a step is heavy, unless the model
has XLA convolutions; short local loops and every loop of a model with XLA convolutions
unrolled, and such a model one round per call. On 'gpu' and 'tpu': none of that.
"""

import pytest
from jax import lax

from fedjax_sim.engine.options import (MAX_AUTO_UNROLL, MAX_ROUNDS_PER_CALL, EngineOptions,
                                       resolve_engine)
from fedjax_sim.models.conv import conv_function, matmul_conv
from fedjax_sim.models.dense import dense_function, explicit_transpose_dot_general

HEAVY = 1e12  # FLOPs of one local step: far above any CPU threshold
SETTINGS = [  # (conv, local steps, clients per round, FLOPs of one step)
    (conv, steps, clients, flops)
    for conv in (True, False) for steps in (1, 5, 50) for clients in (10, 1000)
    for flops in (0.0, HEAVY)]


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_accelerators_get_full_vmap_a_rolled_scan_and_many_rounds_per_call(backend):
    for conv, steps, clients, flops in SETTINGS:
        choice = resolve_engine(EngineOptions(), backend=backend, conv=conv, num_steps=steps,
                                clients_per_round=clients, step_flops=flops)
        assert choice == {"clients_per_chunk": None, "unroll": 1,
                          "rounds_per_call": MAX_ROUNDS_PER_CALL,
                          "adaptive_rounds_per_call": True}, (conv, steps, clients, flops)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_accelerators_get_xla_kernels(backend):
    assert conv_function("auto", backend=backend) is lax.conv_general_dilated
    assert dense_function("auto", backend=backend) is lax.dot_general
    # a kernel named explicitly is used on any backend
    assert conv_function("matmul", backend=backend) is matmul_conv
    assert dense_function("explicit_transpose", backend=backend) is explicit_transpose_dot_general


def test_cpu_gets_the_cpu_kernels():
    assert conv_function("auto", backend="cpu") is matmul_conv
    assert dense_function("auto", backend="cpu") is explicit_transpose_dot_general
    assert conv_function("xla", backend="cpu") is lax.conv_general_dilated
    assert dense_function("xla", backend="cpu") is lax.dot_general


def test_cpu_gets_the_cpu_strategy():
    def choose(conv, steps, clients, flops):
        return resolve_engine(EngineOptions(), backend="cpu", conv=conv, num_steps=steps,
                              clients_per_round=clients, step_flops=flops)

    for conv, steps, clients, flops in SETTINGS:
        choice = choose(conv, steps, clients, flops)
        assert choice["clients_per_chunk"] == (1 if flops == HEAVY and not conv else None)
        assert choice["unroll"] == (True if conv or steps <= MAX_AUTO_UNROLL else 1)
        assert choice["rounds_per_call"] == (1 if conv else MAX_ROUNDS_PER_CALL)
        assert choice["adaptive_rounds_per_call"] == (not conv)
    # the rules' edges: exactly MAX_AUTO_UNROLL steps are unrolled, one more is not
    assert choose(False, MAX_AUTO_UNROLL, 10, 0.0)["unroll"] is True
    assert choose(False, MAX_AUTO_UNROLL + 1, 10, 0.0)["unroll"] == 1


def test_forced_options_hold_on_every_backend():
    forced = EngineOptions(clients_per_chunk=4, unroll=2, rounds_per_call=3)
    for backend in ("cpu", "gpu", "tpu"):
        choice = resolve_engine(forced, backend=backend, conv=True, num_steps=5,
                                clients_per_round=10, step_flops=HEAVY)
        assert choice == {"clients_per_chunk": 4, "unroll": 2, "rounds_per_call": 3,
                          "adaptive_rounds_per_call": False}
