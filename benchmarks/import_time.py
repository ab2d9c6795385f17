"""How long `import fedjax_sim` takes, in fresh interpreters.

    python benchmarks/import_time.py                       # this checkout, median of 5
    python benchmarks/import_time.py --reps 9
    python benchmarks/import_time.py --checkout /path/to/another/fedjax_sim/checkout

Each measurement is one new Python process that times its own import (wall clock and
the process's CPU time; the interpreter's start-up is not included). Contenders run
round-robin, so drift in the machine's load affects all alike:
  floor     import jax, flax (linen and nnx), optax and numpy: what the package needs at
            import, and so the least its import can take
  package   import fedjax_sim (per checkout)
  cli       import fedjax_sim.cli.main, the `fedjax-sim` command's start (per checkout)
The medians are printed; on a loaded machine, CPU time varies less than wall time.
Libraries that one feature needs (TFDS, orbax, dp-accounting and scipy, scikit-learn, h5py,
...) are loaded by that feature, not at import: tests/test_import.py checks it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TIMER = """
import json, sys, time
wall, cpu = time.perf_counter(), time.process_time()
{statement}
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
package = sys.modules.get("fedjax_sim")
print(json.dumps([wall, cpu, package and package.__file__]))
"""

FLOOR = "import jax, flax, flax.linen, flax.nnx, optax, numpy"


def measure(statement: str, checkout: str | None) -> tuple[float, float]:
    """(wall, cpu) seconds of `statement` in a fresh interpreter importing from `checkout`."""
    env = dict(os.environ)
    if checkout is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            [checkout] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    # -P: the working directory is not put on sys.path, so the checkout's copy is imported.
    out = subprocess.run([sys.executable, "-P", "-c", TIMER.format(statement=statement)],
                         env=env, capture_output=True, text=True, check=True)
    wall, cpu, imported = json.loads(out.stdout.strip().splitlines()[-1])
    if checkout is not None and not os.path.abspath(imported).startswith(checkout + os.sep):
        raise SystemExit(f"imported {imported}, not the checkout {checkout}")
    return wall, cpu


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="fresh processes per contender")
    parser.add_argument("--checkout", action="append", default=None,
                        help="a fedjax_sim checkout to import from (repeatable; default: "
                             "this one)")
    args = parser.parse_args(argv)
    checkouts = [os.path.abspath(c) for c in (args.checkout or [ROOT])]
    contenders = [("floor (jax, flax, optax, numpy)", FLOOR, None)]
    for checkout in checkouts:
        where = "" if len(checkouts) == 1 else f" [{checkout}]"
        contenders += [(f"import fedjax_sim{where}", "import fedjax_sim", checkout),
                       (f"import fedjax_sim.cli.main{where}", "import fedjax_sim.cli.main",
                        checkout)]
    times = {name: [] for name, _, _ in contenders}
    for _ in range(args.reps):
        for name, statement, checkout in contenders:
            times[name].append(measure(statement, checkout))
    import jax

    print(f"python {sys.version.split()[0]}, jax {jax.__version__}, {os.cpu_count()} CPU cores, "
          f"load average {os.getloadavg()[0]:.1f}; median of {args.reps} fresh processes")
    width = max(len(name) for name in times)
    print(f"{'':{width}}  wall s   cpu s")
    for name, samples in times.items():
        wall = statistics.median(w for w, _ in samples)
        cpu = statistics.median(c for _, c in samples)
        print(f"{name:{width}}  {wall:6.2f}  {cpu:6.2f}")


if __name__ == "__main__":
    main()
