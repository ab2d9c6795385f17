"""Seconds per round on whatever backend JAX finds (CPU, GPU, TPU): the fedjax_sim engine
vs a sequential per-client loop vs the centralized step on the same examples.

    python benchmarks/accelerator.py                 # all cases, full sizes (for a GPU/TPU)
    python benchmarks/accelerator.py --quick         # tiny sizes: a few seconds on a CPU
    python benchmarks/accelerator.py --cases a --rounds 1500
    python benchmarks/accelerator.py --cases b --cohorts 10,100 --reps 3
    python benchmarks/accelerator.py --cases c --resnet-width 16 --resnet-cohort 10

Cases (FedAvg, client SGD, one local epoch, synthetic random data: nothing is downloaded):
  (a) pfl-research's CIFAR-10 speed benchmark: 1,000 clients of 50 32x32x3 images, 50 per
      round, batch 10, their CNN conv32(3x3)-conv64(3x3)-maxpool-dropout-dense128-dropout-
      dense10 (the zoo's `cnn` on 32x32x3); besides the per-round medians, the engine runs
      all `--rounds` rounds (default 1,500) end to end, as their benchmark does;
  (b) the EMNIST CNN (the zoo's `cnn` on 28x28x1), clients of 100 examples, batch 20, at
      `--cohorts` clients per round (default 10, 100, 1,000);
  (c) a GroupNorm ResNet-18 (the zoo's `resnet18`, CIFAR stem, 2 groups) on 32x32x3,
      clients of 50 images, batch 10, `--resnet-cohort` (default 100) clients per round.
Contenders, timed round-robin in this one process (one call of each in turn, medians):
  engine      fedjax_sim's RoundProgram with the automatic choices simulate() makes for
              this backend (kernels, chunking, unrolling, rounds fused per call);
  loop/step   a Python loop over the cohort, one jitted SGD step per call on batches cut
              on the host, then a jitted weighted average (how FedJAX and Flower run
              clients; benchmarks/engine.py's `make_loops`, with XLA's own kernels);
  central     one model, one jit, the round's m*B examples per step (the compute limit;
              on CPU the faster of XLA's kernels and the engine's CPU kernels).
Reported besides: the engine's compile seconds, the loop's and central's first call
(compile + one round), and the process's peak device memory after each case
(`memory_stats()['peak_bytes_in_use']`; n/a where the backend reports none, e.g. CPU).

Before each case's timing, a check that the engine and the loop train alike: 3 rounds on
4 of the case's clients with dropout off, the whole population every round and one
full-batch step (so sampling and shuffling cannot differ); the largest parameter
difference is printed next to how far the parameters moved.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim.aggregators import weighted_mean
from fedjax_sim.algorithms import Problem, fedavg
from fedjax_sim.engine import DeviceData, RoundProgram, make_schedule, program_cache
from fedjax_sim.engine.options import client_step_flops, has_convolution
from fedjax_sim.models import classification, get_model
from fedjax_sim.simulation import EngineOptions, resolve_engine

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine import LR, interleaved, make_central, make_data, make_loops  # noqa: E402

CASES = ("a", "b", "c")
CHECK_CLIENTS = 4
CHECK_ROUNDS = 3


class EngineRunner:
    """fedjax_sim's round program built as simulate() builds it, run by hand for timing."""

    def __init__(self, model, data, m: int, batch: int, options: EngineOptions = EngineOptions()):
        params, mstate = model.init(jax.random.key(0))
        schedule = make_schedule(data.max_client_size, batch_size=batch, local_epochs=1,
                                 local_steps=None)
        problem = Problem(model, classification(), mstate, "x")
        first = {k: jnp.asarray(v[:batch]) for k, v in data.features.items()}
        self.choice = resolve_engine(options, backend=jax.default_backend(),
                                     conv=has_convolution(model, params, mstate, first["x"]),
                                     num_steps=schedule.num_steps, clients_per_round=m,
                                     step_flops=client_step_flops(problem, params, first))
        self.algorithm = fedavg(optax.sgd(LR), batch_size=batch)
        program = RoundProgram(self.algorithm, problem, weighted_mean(), schedule,
                               num_clients=data.num_clients, max_client_size=data.max_client_size,
                               clients_per_round=m, clients_per_chunk=self.choice["clients_per_chunk"],
                               unroll=self.choice["unroll"])
        self.data, self.mstate, self.root = DeviceData.from_federated(data), mstate, jax.random.key(1)
        self.state = program.init(params)
        self.max_k = self.choice["rounds_per_call"]
        program_cache.clear()  # a true compile: no program reused from an earlier case or run
        t0 = time.perf_counter()
        self._run = program.compile(self.state, self.data, self.mstate, self.root, self.max_k)
        self.compile_s = time.perf_counter() - t0
        self.next_round, self.k = 0, 1

    def call(self, k: int | None = None):
        """Runs k rounds (default: the rounds per call chosen by `choose_rounds_per_call`)."""
        k = k or self.k
        self.state, metrics = self._run(self.state, self.data, self.mstate, self.root,
                                        self.next_round, k)
        self.next_round += k
        return metrics

    def choose_rounds_per_call(self) -> None:
        """As simulate() does: about a second of rounds per call, at most the resolved cap."""
        jax.block_until_ready(self.call(1))  # warm-up
        one = min(_seconds(lambda: self.call(1)) for _ in range(2))
        self.k = max(1, min(self.max_k, int(1.0 / one)))

    def run_rounds(self, count: int) -> None:
        """`count` rounds in calls of `k`, each call's metrics fetched to the host (as the
        host loop does for its log)."""
        while count > 0:
            k = min(count, self.k)
            jax.device_get(self.call(k))
            count -= k

    def params(self):
        return self.algorithm.params(self.state.server)


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def peak_memory() -> str:
    """The process's peak device memory so far, where the backend reports it."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # not every backend implements memory_stats
        stats = {}
    peak = stats.get("peak_bytes_in_use")
    return "n/a" if peak is None else f"{peak / 2**30:.2f} GiB"


def without_dropout(model):
    """The same model, always in inference mode: training is deterministic."""
    def apply(params, state, x, *, train=False, rng=None, **kwargs):
        return model.apply(params, state, x, train=False, rng=rng, **kwargs)
    return dataclasses.replace(model, apply=apply)


def same_training(models: dict, shape, per_client: int) -> tuple[float, float]:
    """(largest |engine - loop| parameter difference, largest parameter change) after
    CHECK_ROUNDS rounds of both on CHECK_CLIENTS clients: dropout off, every client every
    round, one full-batch step, so nothing random can differ (module doc). `models`:
    kernels name -> Model, the engine's ('auto') and the loop's ('xla')."""
    data = make_data(CHECK_CLIENTS, per_client, shape, seed=1)
    engine_model = without_dropout(models["auto"])
    engine = EngineRunner(engine_model, data, CHECK_CLIENTS, per_client)
    for _ in range(CHECK_ROUNDS):
        engine.call(1)
    loop, _ = make_loops(without_dropout(models["xla"]), data, CHECK_CLIENTS, per_client)
    for _ in range(CHECK_ROUNDS):
        looped = loop()
    start, _ = engine_model.init(jax.random.key(0))
    leaves = lambda tree: [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(tree)]
    diff = max(np.max(np.abs(a - b)) for a, b in zip(leaves(engine.params()), leaves(looped)))
    moved = max(np.max(np.abs(a - b)) for a, b in zip(leaves(looped), leaves(start)))
    return float(diff), float(moved)


@dataclasses.dataclass
class Workload:
    label: str
    model_fn: object  # impl -> Model ('auto': the engine's kernels, 'xla': XLA's own)
    data: object
    cohort: int
    batch: int
    reps: int


def run_workload(w: Workload, *, check: bool, end_to_end: int = 0,
                 central_impls: tuple = ("auto",)) -> dict:
    """Times the three contenders on one workload; returns the table row."""
    steps = math.ceil(w.data.max_client_size / w.batch)
    print(f"\n== {w.label}: {w.cohort} clients/round of {w.data.num_clients}, batch {w.batch}, "
          f"{steps} local steps", flush=True)
    shape = w.data.features["x"].shape[1:]
    # One Model per kernel choice: its init compiles once, however often it is called.
    models = {impl: w.model_fn(impl) for impl in {"auto", "xla", *central_impls}}
    if check:
        diff, moved = same_training(models, shape, w.data.max_client_size)
        print(f"check: engine vs loop/step after {CHECK_ROUNDS} rounds: max |difference| "
              f"{diff:.2e}, parameters moved up to {moved:.2e}", flush=True)
    engine = EngineRunner(models["auto"], w.data, w.cohort, w.batch)
    engine.choose_rounds_per_call()
    print(f"engine compiled in {engine.compile_s:.1f} s; {engine.choice}; "
          f"{engine.k} rounds per call", flush=True)
    row = {"case": w.label, "cohort": w.cohort, "compile": engine.compile_s}
    if end_to_end:
        seconds = _seconds(lambda: engine.run_rounds(end_to_end) or engine.state)
        row["end_to_end"] = (end_to_end, seconds)
        print(f"engine, {end_to_end} rounds end to end: {seconds:.1f} s "
              f"({seconds / end_to_end:.4f} s/round; compile {engine.compile_s:.1f} s besides)",
              flush=True)
    loop, _ = make_loops(models["xla"], w.data, w.cohort, w.batch)
    contenders = {"engine": engine.call, "loop/step": loop}
    impls = central_impls
    for impl in impls:
        contenders[f"central/{impl}"] = make_central(models[impl], w.data, w.cohort * w.batch,
                                                     steps)
    firsts = {name: _seconds(fn) for name, fn in contenders.items() if name != "engine"}
    print("first call (compile + one round): "
          + ", ".join(f"{name} {s:.1f} s" for name, s in firsts.items()), flush=True)
    t = interleaved(contenders, w.reps)
    row["engine"] = t["engine"] / engine.k
    row["loop"] = t["loop/step"]
    row["central"] = min(t[f"central/{impl}"] for impl in impls)
    row["memory"] = peak_memory()
    print(f"engine     {row['engine']:10.4f} s/round", flush=True)
    print(f"loop/step  {row['loop']:10.4f} s/round   engine speed-up x{row['loop'] / row['engine']:.1f}",
          flush=True)
    print(f"central    {row['central']:10.4f} s/round   engine / central = "
          f"{row['engine'] / row['central']:.2f}", flush=True)
    print(f"peak device memory so far: {row['memory']}", flush=True)
    return row


def workloads(args) -> list[tuple[Workload, int]]:
    """The requested cases at full or --quick sizes, each with its end-to-end round count."""
    quick = args.quick
    reps = args.reps or (2 if quick else 5)
    image = (8, 8, 3) if quick else (32, 32, 3)
    out = []
    if "a" in args.cases:
        cnn = lambda impl: get_model("cnn", image, 10, conv_impl=impl, dense_impl=impl)
        clients, per_client, cohort, batch = (12, 10, 4, 5) if quick else (1000, 50, 50, 10)
        out.append((Workload("(a) pfl-research CIFAR-10 CNN", cnn,
                             make_data(clients, per_client, image), cohort, batch, reps),
                    args.rounds))
    if "b" in args.cases:
        digit = (8, 8, 1) if quick else (28, 28, 1)
        cnn = lambda impl: get_model("cnn", digit, 10, conv_impl=impl, dense_impl=impl)
        per_client, batch = (10, 5) if quick else (100, 20)
        data = make_data(max(2 * max(args.cohorts), 200 if not quick else 8), per_client, digit)
        for m in args.cohorts:
            out.append((Workload("(b) EMNIST CNN", cnn, data, m, batch,
                                 reps if m < 1000 else max(2, reps // 2)), 0))
    if "c" in args.cases:
        resnet = lambda impl: get_model("resnet18", image, 10, norm="group", stem="cifar",
                                        width=args.resnet_width, conv_impl=impl, dense_impl=impl)
        per_client, batch = (10, 5) if quick else (50, 10)
        m = args.resnet_cohort
        out.append((Workload(f"(c) ResNet-18 GroupNorm, width {args.resnet_width}", resnet,
                             make_data(max(2 * m, 8), per_client, image), m, batch, reps), 0))
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: seconds on a CPU")
    parser.add_argument("--cases", default="a,b,c", help="comma-separated: a, b, c")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds of case (a)'s end-to-end engine run (default 1500; 4 with "
                             "--quick; 0 skips it)")
    parser.add_argument("--cohorts", default=None,
                        help="case (b)'s clients per round (default 10,100,1000; 2 with --quick)")
    parser.add_argument("--resnet-cohort", type=int, default=None,
                        help="case (c)'s clients per round (default 100; 2 with --quick)")
    parser.add_argument("--resnet-width", type=int, default=None,
                        help="case (c)'s first-stage width (default 64; 2 with --quick)")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds per contender")
    parser.add_argument("--no-check", action="store_true", help="skip the engine-vs-loop check")
    args = parser.parse_args(argv)
    args.cases = {c.strip() for c in args.cases.split(",") if c.strip()}
    if not args.cases or not args.cases <= set(CASES):
        parser.error(f"--cases takes a comma-separated subset of {', '.join(CASES)}")
    quick = args.quick
    args.rounds = (4 if quick else 1500) if args.rounds is None else args.rounds
    cohorts = args.cohorts or ("2" if quick else "10,100,1000")
    args.cohorts = [int(c) for c in cohorts.split(",")]
    args.resnet_cohort = args.resnet_cohort or (2 if quick else 100)
    args.resnet_width = args.resnet_width or (2 if quick else 64)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = jax.devices()[0]
    print(f"backend: {jax.default_backend()}, device: {device.device_kind} "
          f"({jax.device_count()} device(s); timing uses one), jax {jax.__version__}", flush=True)
    # On XLA:CPU the faster of the two kernels is the compute limit (benchmarks/engine.py);
    # elsewhere 'auto' is XLA's own. --quick compiles one.
    impls = ("auto", "xla") if jax.default_backend() == "cpu" and not args.quick else ("auto",)
    rows = [run_workload(w, check=not args.no_check, end_to_end=e2e, central_impls=impls)
            for w, e2e in workloads(args)]
    print("\n| case | clients/round | engine s/round | loop/step s/round | central s/round "
          "| engine speed-up vs loop/step | engine / central | engine compile s | peak device memory |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['cohort']} | {r['engine']:.4g} | {r['loop']:.4g} | "
              f"{r['central']:.4g} | {r['loop'] / r['engine']:.1f}x | "
              f"{r['engine'] / r['central']:.2f} | {r['compile']:.1f} | {r['memory']} |")
    for r in rows:
        if "end_to_end" in r:
            n, s = r["end_to_end"]
            print(f"\n{r['case']}: {n} rounds end to end in {s:.1f} s on {device.device_kind} "
                  f"(engine compile {r['compile']:.1f} s besides)")
    return rows


if __name__ == "__main__":
    main()
