"""Per-client state: memory for the whole population, round time set by the cohort alone.

    python benchmarks/client_states.py            # MLP and CNN cases (~5 min on a 2-core CPU)
    python benchmarks/client_states.py --quick    # MLP case only, fewer repetitions

FedPer keeps a personal output layer per client: client state with one row per client of
the population. This script builds populations of N = 100, 1,000 and 10,000 clients
(10 examples each) and times a round with a fixed cohort of m clients:

  (mlp) a 64-128-62 MLP (head: 128x62 + 62 = 7,998 parameters), m = 50;
  (cnn) the EMNIST CNN on 28x28x1 inputs (head: its 128x62 output layer, the same 7,998
        parameters; the body is 1.2 M parameters), m = 10.

Rows, side by side in one process and timed round-robin (medians):
  fedavg N=10000         the stateless baseline on the largest population
  fedper N=...           client states kept on device (gathered and scattered in the round)
  fedper N=10000 host    client states kept in host memory, streamed per call
Each row reports the client-state table's size and seconds per round. If the round cost
grew with N (e.g. a copy of the whole table per round), the N=10000 row would be ~100x
the N=100 row; it should match it, and sit close to FedAvg.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine import interleaved, make_data  # noqa: E402

from fedjax_sim.aggregators import weighted_mean  # noqa: E402
from fedjax_sim.algorithms import Problem, fedavg, fedper  # noqa: E402
from fedjax_sim.engine import DeviceData, RoundProgram, make_schedule, program_cache  # noqa: E402
from fedjax_sim.engine.client_states import HostClientStates, state_bytes  # noqa: E402
from fedjax_sim.models import classification, get_model  # noqa: E402
from fedjax_sim.simulation import EngineOptions, resolve_engine  # noqa: E402
from fedjax_sim.engine.options import client_step_flops, has_convolution  # noqa: E402

LR = 0.05
PER_CLIENT = 10
ROUNDS_PER_CALL = 5


def make_runner(model, algorithm, data, m, batch, placement="device"):
    """A callable running ROUNDS_PER_CALL rounds per call, as simulate() does; returns
    (call, table bytes, compile seconds)."""
    params, mstate = model.init(jax.random.key(0))
    schedule = make_schedule(data.max_client_size, batch_size=batch, local_epochs=1, local_steps=None)
    problem = Problem(model, classification(), mstate, "x")
    example = {k: jnp.asarray(v[:batch]) for k, v in data.features.items()}
    choice = resolve_engine(EngineOptions(), backend=jax.default_backend(),
                            conv=has_convolution(model, params, mstate, example["x"]),
                            num_steps=schedule.num_steps, clients_per_round=m,
                            step_flops=client_step_flops(problem, params, example))
    program = RoundProgram(algorithm, problem, weighted_mean(), schedule,
                           num_clients=data.num_clients, max_client_size=data.max_client_size,
                           clients_per_round=m, clients_per_chunk=choice["clients_per_chunk"],
                           unroll=choice["unroll"])
    dd = DeviceData.from_federated(data)
    root = jax.random.key(1)
    state = program.init(params, placement)
    per_call = min(ROUNDS_PER_CALL, choice["rounds_per_call"])
    program_cache.clear()  # a true compile: no program reused from an earlier population
    t0 = time.perf_counter()
    if placement == "host":
        store = HostClientStates(data.num_clients, per_call * m)
        table, rows = store.template(state.clients)
        run = store.stream(program.compile(state._replace(clients=table), dd, mstate, root,
                                           per_call, rows), program)
    else:
        run = program.compile(state, dd, mstate, root, per_call)
    compile_s = time.perf_counter() - t0
    holder = {"state": state, "r": 0}

    def call():
        holder["state"], metrics = run(holder["state"], dd, mstate, root, holder["r"], per_call)
        holder["r"] += per_call
        return metrics

    call()  # warm-up
    return call, state_bytes(state.clients) if state.clients is not None else 0, compile_s, per_call


def case(name, model, shape, m, batch, populations, reps):
    full = make_data(max(populations), PER_CLIENT, shape)
    contenders, info = {}, {}
    rows = [("fedavg", max(populations), "device")] + \
        [("fedper", n, "device") for n in populations] + [("fedper", max(populations), "host")]
    for alg_name, n, placement in rows:
        data = full.subset(range(n)) if n < full.num_clients else full
        alg = (fedavg(optax.sgd(LR), batch_size=batch) if alg_name == "fedavg"
               else fedper(optax.sgd(LR), "out", batch_size=batch))
        label = f"{alg_name} N={n}" + (" host" if placement == "host" else "")
        call, nbytes, compile_s, per_call = make_runner(model, alg, data, m, batch, placement)
        contenders[label] = call
        info[label] = (nbytes, compile_s, per_call)
    times = interleaved(contenders, reps)
    base = times[f"fedper N={min(populations)}"]
    print(f"\n### ({name}) cohort m={m}, {PER_CLIENT} examples per client, batch {batch}\n")
    print("| run | client states | compile s | s/round | vs N=" + str(min(populations)) + " |")
    print("|---|---|---|---|---|")
    for label, seconds in times.items():
        nbytes, compile_s, per_call = info[label]
        print(f"| {label} | {nbytes / 2**20:.1f} MiB | {compile_s:.1f} | "
              f"{seconds / per_call:.4f} | {seconds / base:.2f}x |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    reps = 5 if args.quick else 11
    populations = (100, 1000, 10000)
    print(f"backend: {jax.default_backend()}, {jax.devices()[0].device_kind}")
    case("mlp", get_model("mlp", (64,), 62, hidden=(128,)), (64,), 50, 10, populations, reps)
    if not args.quick:
        case("cnn", get_model("cnn", (28, 28, 1), 62), (28, 28, 1), 10, 10, populations, reps)


if __name__ == "__main__":
    main()
