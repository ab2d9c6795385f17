"""Memory of a 100-client vmapped round with a frozen backbone: per-client state vs activations.

    python benchmarks/transfer_memory.py             # widths 8/16/32, heads 10/1000 (2-3 min)
    python benchmarks/transfer_memory.py --quick     # widths 8/16, 16x16, 1 step (~1.5 min)
    python benchmarks/transfer_memory.py --chunk 10  # also the cohort in chunks of 10 (~5 min)
    python benchmarks/transfer_memory.py --widths 8 32 --classes 10 4000 --size 16

(Times on a 2-core CPU.)

`fs.models.with_trainable(model, 'head')` moves every parameter but the output layer into
the model's state, which the engine broadcasts to the cohort instead of stacking it. This
script checks what that buys, with nothing executed: it compiles the round program exactly
as `simulate()` builds it and reads XLA's memory analysis of the executable.

Setup: ResNet-18 (`fs.models.resnet18`, norm='group', CIFAR stem) of first-stage width w
(8, 16, 32: the backbone grows ~16x from 8 to 32) with a head `fc` of C outputs (10 or
1000); the head's fan-in is the backbone's output width 8w, so it grows with w too (4x from
8 to 32). For each (w, C): trainable='head' and trainable='all'. FedAvg, client SGD with
momentum 0.9 (so each client holds an optimizer state), 2 local steps of batch 10, a cohort
of all 100 clients in ONE vmap (`EngineOptions(clients_per_chunk=None)`; the other choices
as `resolve_engine` makes them), synthetic uint8 images (100 clients x 20 examples),
converted to float on device as simulate's default preprocessing does. One round per call
(max_rounds=1); parameters are abstract (shapes only), so nothing is allocated or run.

Columns:
  trainable / frozen    `count_parameters(model)`; upload = what one client sends (float32)
  stacked state         analytic, per cohort: 100 x (trainable params + client optimizer
                        state + delta) in bytes: what the vmap stacks per client
  XLA args / temp       `compiled.memory_analysis()` of the round program: argument bytes
                        (server state, data, the frozen backbone once) and temporaries
                        (everything the round allocates: stacked client copies, gradients,
                        activations)
  fwd                   temp bytes of a reference program: the vmapped inference forward
                        pass of one local step (100 clients x batch 10) through the model,
                        nothing else -- the transient activations a frozen backbone still
                        costs, since every client runs it on its own images
  cached features       the same round program for the head alone on precomputed [8w]
                        backbone features (the model simulate's feature cache builds: the
                        same parameters as `fc`), i.e. what trains when the backbone is not
                        run in the round at all (a feature cache)
  temp - fwd            what the round needs beyond those activations (with one local
                        step: one stacked copy of the head; with more, also the next
                        step's activations, which XLA overlaps with the first's)

A frozen backbone's forward activations grow with the backbone (they are per client
example, whatever is trained); the stacked per-client state does not. The ratios printed at
the end separate the two.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import time

# Nothing here is executed, only compiled for its memory analysis, which XLA takes from the
# HLO buffer assignment, before LLVM generates machine code. LLVM's optimization passes are
# most of the compile time on XLA:CPU (up to ~3x here) and cannot change that analysis (the
# same numbers with and without, checked with --quick), so they are off unless
# --full-codegen is given. Set before jax initializes its backend.
if "--full-codegen" not in sys.argv:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_backend_optimization_level=0").strip()

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_sim as fs
from fedjax_sim.aggregators import weighted_mean
from fedjax_sim.algorithms import Problem, fedavg
from fedjax_sim.data import FederatedData
from fedjax_sim.data.augment import default_preprocess
from fedjax_sim.engine import DeviceData, RoundProgram, make_schedule
from fedjax_sim.models import classification
from fedjax_sim.models.trainable import count_parameters
from fedjax_sim.simulation import EngineOptions, resolve_engine
from fedjax_sim.engine.options import has_convolution

LR = 0.05
MOMENTUM = 0.9
MIB = 2 ** 20


def make_data(num_clients: int, per_client: int, size: int, num_classes: int,
              seed: int = 0) -> FederatedData:
    """Synthetic uint8 images [N, size, size, 3] and labels, `per_client` per client."""
    rng = np.random.default_rng(seed)
    n = num_clients * per_client
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    y = rng.integers(0, num_classes, n).astype(np.int32)
    return FederatedData({"x": x, "y": y}, np.arange(num_clients + 1) * per_client,
                         tuple(str(i) for i in range(num_clients)))


def make_features(num_clients: int, per_client: int, dim: int, num_classes: int,
                  seed: int = 0) -> FederatedData:
    """Synthetic float32 backbone features [N, dim] (what a feature cache would hold)."""
    rng = np.random.default_rng(seed)
    n = num_clients * per_client
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = rng.integers(0, num_classes, n).astype(np.int32)
    return FederatedData({"x": x, "y": y}, np.arange(num_clients + 1) * per_client,
                         tuple(str(i) for i in range(num_clients)))


def tree_bytes(tree) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(tree)))


def build_model(width: int, num_classes: int, trainable: str, size: int):
    base = fs.models.resnet18((size, size, 3), num_classes, norm="group", stem="cifar",
                              width=width)
    return fs.models.with_trainable(base, trainable)


def cached_head(width: int, num_classes: int, size: int):
    """What `simulate(feature_cache=...)` trains: the frozen model's head alone on its
    precomputed [8w] backbone features (same parameters as `fc`; the frozen backbone is
    still in the model's state, but unused, so jit drops it from the program's arguments)."""
    from fedjax_sim.simulation.feature_cache import head_model as _head_model
    return _head_model(build_model(width, num_classes, "head", size), (8 * width,))


def lower_round(model, data: FederatedData, args, clients_per_chunk: int | None = None):
    """The round program as simulate() builds it, with the whole cohort in one vmap (or
    chunks of `clients_per_chunk` clients); returns (lowered program, facts about it)."""
    # Abstract parameters: the model's shapes only (an eager ResNet init takes ~20 s here,
    # and the memory analysis needs no values).
    params, mstate = jax.eval_shape(model.init, jax.random.key(0))
    count = count_parameters(model, params, mstate)
    algorithm = fedavg(optax.sgd(LR, momentum=MOMENTUM), local_steps=args.local_steps,
                       batch_size=args.batch)
    schedule = make_schedule(data.max_client_size, batch_size=args.batch, local_epochs=None,
                             local_steps=args.local_steps)
    preprocess = default_preprocess(data.features["x"])
    problem = Problem(model, classification(), mstate, "x")
    # has_convolution traces the model on values: zeros of the right shapes will do.
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), (params, mstate))
    example = jnp.asarray(data.features["x"][:2])
    if preprocess is not None:
        example = preprocess({"x": example}, None, train=False)["x"]
    choice = resolve_engine(EngineOptions(clients_per_chunk=clients_per_chunk),
                            backend=jax.default_backend(),
                            conv=has_convolution(model, *zeros, example),
                            num_steps=schedule.num_steps, clients_per_round=args.clients)
    program = RoundProgram(algorithm, problem, weighted_mean(), schedule,
                           num_clients=data.num_clients, max_client_size=data.max_client_size,
                           clients_per_round=args.clients,
                           clients_per_chunk=choice["clients_per_chunk"], unroll=choice["unroll"],
                           preprocess=preprocess)
    state = jax.eval_shape(program.init, params)
    dd = DeviceData.from_federated(data)
    root = jax.random.key(1)
    # As RoundProgram.compile lowers it (one round per call).
    lowered = program._jit.lower(state, dd, mstate, root, jnp.int32(0), jnp.int32(1), None,
                                 max_rounds=1)
    opt_state = jax.eval_shape(algorithm.client_optimizer.init, params)
    per_client = 2 * tree_bytes(params) + tree_bytes(opt_state)  # params, delta, opt state
    return lowered, {"count": count, "stacked": args.clients * per_client,
                     "choice": choice}


def lower_forward(model, args):
    """Inference forward pass of one local step of the cohort ([clients, batch, H, W, 3]
    uint8 images, parameters broadcast to every client): the activations alone."""
    params, mstate = jax.eval_shape(model.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct((args.clients, args.batch, args.size, args.size, 3), jnp.uint8)

    def forward(p, s, xb):
        return model.apply(p, s, xb.astype(jnp.float32) / 255.0, train=False)[0]

    return jax.jit(jax.vmap(forward, in_axes=(None, None, 0))).lower(params, mstate, x)


def compile_all(lowered: dict, jobs: int) -> dict:
    """Compiles every lowered program (`jobs` at a time, in threads); returns
    {name: (memory analysis, compile seconds)}."""
    def one(item):
        name, low = item
        t0 = time.perf_counter()
        mem = low.compile().memory_analysis()
        return name, (mem, time.perf_counter() - t0)

    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        return dict(pool.map(one, lowered.items()))


def mib(nbytes: float) -> str:
    return f"{nbytes / MIB:,.1f}" if nbytes < 100 * MIB else f"{nbytes / MIB:,.0f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="widths 8 16, 16x16 inputs, 1 local step (a tiny run)")
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32],
                        help="ResNet-18 first-stage widths (backbone size)")
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 1000],
                        help="head sizes (num_outputs)")
    parser.add_argument("--size", type=int, default=32, help="input height = width")
    parser.add_argument("--clients", type=int, default=100, help="cohort, all in one vmap")
    parser.add_argument("--per-client", type=int, default=20, help="examples per client")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=1,
                        help="programs compiled at once (2 was slower on a 2-core CPU)")
    parser.add_argument("--chunk", type=int, default=0,
                        help="also compile the first head size with the cohort in chunks of "
                             "this many clients (EngineOptions(clients_per_chunk=K): a scan "
                             "over chunks, vmap inside); 0: off")
    parser.add_argument("--full-codegen", action="store_true",
                        help="compile with XLA's default LLVM optimization (slower; the "
                             "memory analysis is the same)")
    args = parser.parse_args()
    if args.quick:
        args.widths, args.size, args.local_steps = [8, 16], 16, 1
    widths, classes, modes = sorted(args.widths), sorted(args.classes), ("head", "all")

    print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), jax "
          f"{jax.__version__}; resnet18 (group norm, cifar stem) on {args.size}x{args.size}x3 "
          f"uint8; FedAvg, SGD momentum {MOMENTUM}, {args.local_steps} local steps of batch "
          f"{args.batch}; cohort of {args.clients} clients in one vmap; one round per program")
    t_start = time.perf_counter()
    lowered, facts = {}, {}
    for c in classes:
        data = make_data(args.clients, args.per_client, args.size, c)
        for w in widths:
            for mode in modes:
                model = build_model(w, c, mode, args.size)
                lowered[(w, c, mode)], facts[(w, c, mode)] = lower_round(model, data, args)
            key = (w, c, "cached")
            lowered[key], facts[key] = lower_round(
                cached_head(w, c, args.size), make_features(args.clients, args.per_client, 8 * w, c), args)
            if c == classes[0]:
                lowered[(w, "fwd")] = lower_forward(build_model(w, c, "head", args.size), args)
                for mode in modes if args.chunk else ():
                    key = (w, c, mode, "chunk")
                    lowered[key], facts[key] = lower_round(build_model(w, c, mode, args.size),
                                                           data, args, args.chunk)
    choice = next(iter(facts.values()))["choice"]
    print(f"engine: clients_per_chunk={choice['clients_per_chunk']} (whole cohort vmapped), "
          f"unroll={choice['unroll']}; lowered {len(lowered)} programs in "
          f"{time.perf_counter() - t_start:.0f} s")
    results = compile_all(lowered, args.jobs)

    def temp(key):
        return results[key][0].temp_size_in_bytes

    print(f"\n| backbone width | head classes | trainable | trainable params | frozen params "
          f"| upload / client | stacked state, {args.clients} clients (MiB) | XLA args (MiB) "
          f"| XLA temp (MiB) | fwd activations (MiB) | temp - fwd (MiB) "
          f"| head alone on cached features: XLA args / temp (MiB) | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    head = lambda w, c: facts[(w, c, "head")]["count"].trainable
    for w in widths:
        fwd = temp((w, "fwd"))
        for c in classes:
            for mode in modes:
                key = (w, c, mode)
                mem, seconds = results[key]
                count = facts[key]["count"]
                assert facts[(w, c, "cached")]["count"].trainable == head(w, c)
                cached_mem = results[(w, c, "cached")][0]
                cached = (f"{mib(cached_mem.argument_size_in_bytes)} / "
                          f"{mib(cached_mem.temp_size_in_bytes)}" if mode == "head" else "-")
                print(f"| {w} | {c} | {mode} | {count.trainable:,} | {count.frozen:,} | "
                      f"{count.upload_bytes / 1024:,.1f} KiB | {mib(facts[key]['stacked'])} | "
                      f"{mib(mem.argument_size_in_bytes)} | {mib(mem.temp_size_in_bytes)} | "
                      f"{mib(fwd)} | {mib(mem.temp_size_in_bytes - fwd)} | {cached} | "
                      f"{seconds:.1f} |")

    lo, hi = widths[0], widths[-1]
    backbone = lambda w: facts[(w, classes[0], "head")]["count"].frozen
    beyond = lambda w, c: temp((w, c, "head")) - temp((w, "fwd"))
    print(f"\nRatios measured in this run (width {lo} -> {hi}: backbone "
          f"{backbone(lo):,} -> {backbone(hi):,} parameters, "
          f"{ratio(backbone(hi), backbone(lo))}):")
    for c in classes:
        st = lambda w, m: facts[(w, c, m)]["stacked"]
        print(f"  head of {c} classes: head params {ratio(head(hi, c), head(lo, c))} "
              f"(fan-in {8 * lo} -> {8 * hi})")
        print(f"    trainable='head': stacked state {ratio(st(hi, 'head'), st(lo, 'head'))}, "
              f"XLA temp {ratio(temp((hi, c, 'head')), temp((lo, c, 'head')))}, "
              f"fwd activations {ratio(temp((hi, 'fwd')), temp((lo, 'fwd')))}, "
              f"temp - fwd {ratio(beyond(hi, c), beyond(lo, c))}")
        print(f"    trainable='all':  stacked state {ratio(st(hi, 'all'), st(lo, 'all'))}, "
              f"XLA temp {ratio(temp((hi, c, 'all')), temp((lo, c, 'all')))}")
        print(f"    head alone on cached features: XLA temp "
              f"{ratio(temp((hi, c, 'cached')), temp((lo, c, 'cached')))}")
    if len(classes) > 1:
        c0, c1 = classes[0], classes[-1]
        print(f"  head {c0} -> {c1} classes (backbone fixed):")
        for w in widths:
            st = lambda c, m: facts[(w, c, m)]["stacked"]
            print(f"    width {w}: head params {head(w, c0):,} -> {head(w, c1):,}; "
                  f"trainable='head': stacked state +{mib(st(c1, 'head') - st(c0, 'head'))} MiB, "
                  f"XLA temp +{mib(temp((w, c1, 'head')) - temp((w, c0, 'head')))} MiB "
                  f"({ratio(temp((w, c1, 'head')), temp((w, c0, 'head')))}); "
                  f"trainable='all': XLA temp "
                  f"+{mib(temp((w, c1, 'all')) - temp((w, c0, 'all')))} MiB; "
                  f"head on cached features: XLA temp "
                  f"+{mib(temp((w, c1, 'cached')) - temp((w, c0, 'cached')))} MiB")
    print("  trainable='all' / trainable='head', XLA temp: " + ", ".join(
        f"w{w}/C{c} {ratio(temp((w, c, 'all')), temp((w, c, 'head')))}"
        for w in widths for c in classes))
    if args.chunk:
        c = classes[0]
        print(f"\nThe cohort in chunks of {args.chunk} clients (clients_per_chunk={args.chunk}; "
              f"head of {c} classes):\n")
        print("| backbone width | trainable | XLA temp, chunks (MiB) | XLA temp, one vmap (MiB) "
              "| chunks / vmap |")
        print("|---|---|---|---|---|")
        for w in widths:
            for mode in modes:
                chunked, whole = temp((w, c, mode, "chunk")), temp((w, c, mode))
                print(f"| {w} | {mode} | {mib(chunked)} | {mib(whole)} | {ratio(chunked, whole)} |")
        print("  width %d -> %d, XLA temp with chunks: " % (lo, hi) + ", ".join(
            f"trainable='{m}' {ratio(temp((hi, c, m, 'chunk')), temp((lo, c, m, 'chunk')))}"
            for m in modes))
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
