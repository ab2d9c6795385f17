"""What a `simulate()` call compiles when a program like it was compiled before: in the same
process (the program cache, engine/program_cache.py, with runtime hyperparameters,
engine/hyperparams.py) and in a fresh process (JAX's persistent compilation cache,
engine/compilation_cache.py).

    python benchmarks/compile_cache.py            # configs/digits_fedavg.py, 5 rounds a call
    python benchmarks/compile_cache.py --quick    # 1 round a call (a smoke run)

Each contender runs in a fresh Python process with its own empty cache directory:

- `cache on`: call 1 (nothing cached), call 2 the identical run, call 3 with only the client
  learning rate changed, call 4 with the server learning rate changed, call 5 with the
  seed changed (the seed also draws the Dirichlet partition, so the client sizes and with
  them the program's shapes change: it compiles); then a second fresh process runs call 1 again.
- `cache off` (FEDJAX_SIM_COMPILATION_CACHE=0): the same calls; the in-process cache is
  still on (it cannot be turned off: it only ever reuses a program built alike).

Per call it prints the seconds JAX spent tracing, lowering and compiling (the sum over
every program of the call, from jax.monitoring's events), how many programs it compiled,
and the call's wall seconds, each as a fraction of call 1's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "digits_fedavg.py")

CHILD = r"""
import collections, json, sys, time
from jax import monitoring
spent = collections.Counter()
TRACE, LOWER, COMPILE = ("/jax/core/compile/jaxpr_trace_duration",
                         "/jax/core/compile/jaxpr_to_mlir_module_duration",
                         "/jax/core/compile/backend_compile_duration")
def listen(event, seconds, **kwargs):
    if event in (TRACE, LOWER, COMPILE):
        spent[event] += seconds
        spent[event + "#"] += 1
monitoring.register_event_duration_secs_listener(listen)
from fedjax_sim.cli.config import load_config
from fedjax_sim.cli.experiment import run
out = []
rounds = sys.argv[3]
for change in json.loads(sys.argv[2]):
    config = load_config(sys.argv[1], {"rounds": rounds, "eval_every": rounds, **change})
    spent.clear()
    start = time.perf_counter()
    result = run(config, None, progress=False)
    out.append({"wall": time.perf_counter() - start,
                "compile": spent[TRACE] + spent[LOWER] + spent[COMPILE],
                "trace": spent[TRACE], "lower": spent[LOWER], "xla": spent[COMPILE],
                "programs": spent[COMPILE + "#"],
                "cache": result.summary["engine"]["program_cache"],
                "accuracy": result.summary["final"].get("test_accuracy")})
print(json.dumps(out))
"""

CALLS = [
    ("1: first call", {}),
    ("2: identical call", {}),
    ("3: client learning rate changed", {"algorithm.client_optimizer.learning_rate": "0.05"}),
    ("4: server learning rate changed", {"algorithm.server_optimizer.learning_rate": "0.9"}),
    ("5: seed changed (a new partition: other client sizes)", {"seed": "7"}),
]


def _process(cache: str, calls: list[dict], rounds: int) -> list[dict]:
    env = dict(os.environ, FEDJAX_SIM_COMPILATION_CACHE=cache, JAX_PLATFORMS="cpu")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-c", CHILD, CONFIG, json.dumps(calls), str(rounds)],
                          env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round a call")
    args = parser.parse_args(argv)
    rounds = 1 if args.quick else 5
    rows = []
    for name, cache in (("cache on", tempfile.mkdtemp(prefix="fedjax_sim_bench_xla_")),
                        ("cache off", "0")):
        first = _process(cache, [c for _, c in CALLS], rounds)
        again = _process(cache, [{}], rounds)
        labels = [label for label, _ in CALLS] + ["fresh process, call 1 again"]
        for label, call in zip(labels, first + again):
            rows.append((name, label, call, first[0]))
    print("| persistent cache | call | program cache | compile s (trace + lower + XLA) "
          "| vs call 1 | XLA compile s | vs call 1 | programs compiled | wall s | vs call 1 "
          "| test acc |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, label, call, base in rows:
        print(f"| {name} | {label} | {call['cache']} | {call['compile']:.2f} "
              f"({call['trace']:.2f} + {call['lower']:.2f} + {call['xla']:.2f}) "
              f"| {call['compile'] / base['compile']:.1%} | {call['xla']:.2f} "
              f"| {call['xla'] / base['xla']:.1%} | {call['programs']} "
              f"| {call['wall']:.2f} | {call['wall'] / base['wall']:.0%} | {call['accuracy']:.4f} |")


if __name__ == "__main__":
    main()
