"""What a `simulate()` call compiles when the same program was compiled before: in the
same process and in a fresh one, with JAX's persistent compilation cache on (the default,
fedjax_sim/engine/compilation_cache.py) and off.

    python benchmarks/compile_cache.py            # configs/digits_fedavg.py, 5 rounds a call

Each contender runs in a fresh Python process with its own empty cache directory:

- `cache on`: call 1 (nothing cached), call 2 the identical run, call 3 with only the client
  learning rate changed; then a second fresh process repeats call 1.
- `cache off` (FEDJAX_SIM_COMPILATION_CACHE=0): the same calls.

It prints each call's compile seconds (summary.json's `compile_seconds`: lowering and
compiling the round program) and wall seconds (the whole `run`, evaluation programs
included), and each as a fraction of call 1. A learning rate is a constant inside the
compiled program, so changing one compiles again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "digits_fedavg.py")

CHILD = r"""
import json, sys, time
from fedjax_sim.cli.config import load_config
from fedjax_sim.cli.experiment import run
out = []
for lr in sys.argv[2].split(","):
    config = load_config(sys.argv[1], {"rounds": "5", "eval_every": "5",
                                       "algorithm.client_optimizer.learning_rate": lr})
    start = time.perf_counter()
    result = run(config, None, progress=False)
    out.append({"lr": lr, "compile": result.summary["compile_seconds"],
                "wall": time.perf_counter() - start})
print(json.dumps(out))
"""


def _process(cache: str, lrs: str) -> list[dict]:
    env = dict(os.environ, FEDJAX_SIM_COMPILATION_CACHE=cache, JAX_PLATFORMS="cpu")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-c", CHILD, CONFIG, lrs], env=env, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    rows = []
    for name, cache in (("cache on", tempfile.mkdtemp(prefix="fedjax_sim_bench_xla_")),
                        ("cache off", "0")):
        first = _process(cache, "0.1,0.1,0.05")
        again = _process(cache, "0.1")
        labels = ["1: first call", "2: identical call", "3: learning rate changed",
                  "fresh process, call 1 again"]
        for label, call in zip(labels, first + again):
            rows.append((name, label, call, first[0]))
    print("| cache | call | compile s | vs call 1 | wall s | vs call 1 |")
    print("|---|---|---|---|---|---|")
    for name, label, call, base in rows:
        print(f"| {name} | {label} | {call['compile']:.2f} | {call['compile'] / base['compile']:.0%} "
              f"| {call['wall']:.2f} | {call['wall'] / base['wall']:.0%} |")


if __name__ == "__main__":
    main()
