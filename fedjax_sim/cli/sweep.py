"""The `fedjax-sim sweep` command: a grid of config values, trials of a kind in one program.

    fedjax-sim sweep --config configs/digits_fedavg.py --workdir runs/sweep \\
        --sweep 'algorithm.client_optimizer.learning_rate=[0.01,0.03,0.1]' \\
        --sweep 'seed=range(8)' [--zip] [--metric test_accuracy] [--config.KEY=VALUE ...]

Every `--sweep KEY=VALUES` names a config key and its values: a Python list
(`[0.01, 0.1]`), `range(N)` / `range(A, B[, STEP])`, or comma-separated values
(`0.01,0.1`). Every combination is a trial (`--zip`: the lists side by side); each trial is
the config with its values set, run as `fedjax-sim train` would run it, and trials that
differ only in runtime inputs (the seed, learning rates and optimizer hyperparameters,
FedProx's μ, the DP noise multiplier and clip norm, ...) run in one compiled program
(`fs.sweep`). Writes WORKDIR/trials/<k>/ (config.json, metrics.jsonl, summary.json,
params.npz), WORKDIR/sweep.csv and sweep.json; rerun the same command to resume.
"""

from __future__ import annotations

import argparse
import ast
import json
import re

from fedjax_sim.errors import UserError

_RANGE = re.compile(r"^range\(\s*(-?\d+)\s*(?:,\s*(-?\d+)\s*)?(?:,\s*(-?\d+)\s*)?\)$")


def add_sweep_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "sweep", help="run a grid of config values, trials of a kind in one compiled program",
        epilog="Override any config value for every trial with --config.KEY=VALUE.")
    parser.add_argument("--config", required=True, help="path to a config .py with get_config()")
    parser.add_argument("--sweep", action="append", required=True, metavar="KEY=VALUES",
                        help="a config key and its values: KEY=[v1,v2,...], KEY=range(N) or "
                             "KEY=v1,v2 (repeat for a grid)")
    parser.add_argument("--zip", action="store_true",
                        help="take the --sweep lists side by side instead of every combination")
    parser.add_argument("--workdir", default=None,
                        help="directory for trials/<k>/, sweep.csv, sweep.json and checkpoints")
    parser.add_argument("--metric", default="test_accuracy",
                        help="what picks the best trial (default: test_accuracy)")
    parser.add_argument("--mode", choices=("max", "min"), default=None,
                        help="whether the best trial has the largest or smallest --metric "
                             "(default: min for losses and errors, else max)")
    parser.add_argument("--max-trials-per-program", type=_trials_per_program, default="auto",
                        metavar="N",
                        help="run at most N trials in one program (default auto: as many as "
                             "fit 80%% of an accelerator's memory; all on CPU)")
    parser.add_argument("--trial-axis", choices=("auto", "vmap", "map"), default="auto",
                        help="run a program's trials side by side (vmap) or one after another "
                             "inside it (map); auto picks by the model's step cost on CPU")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


def _trials_per_program(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive integer, got {text!r}")


def parse_sweep(text: str) -> tuple[str, list]:
    """'KEY=VALUES' -> (key, list of values)."""
    key, eq, values = text.partition("=")
    key, values = key.strip(), values.strip()
    if not eq or not key or not values:
        raise UserError(f"--sweep {text!r} must be KEY=VALUES, e.g. "
                        f"--sweep 'algorithm.client_optimizer.learning_rate=[0.01,0.1]'")
    m = _RANGE.match(values)
    if m:
        numbers = [int(g) for g in m.groups() if g is not None]
        out = list(range(*numbers))
    else:
        try:
            parsed = ast.literal_eval(values if values.startswith(("[", "(")) else f"[{values}]")
        except (ValueError, SyntaxError):
            raise UserError(f"--sweep {key}: cannot read {values!r}; give a list "
                            f"([0.01, 0.1]), range(N) or comma-separated values") from None
        out = list(parsed) if isinstance(parsed, (list, tuple)) else [parsed]
    if not out:
        raise UserError(f"--sweep {key}: no values in {values!r}")
    return key, out


def run_sweep(args, overrides: dict[str, str]) -> int:
    from fedjax_sim.cli.config import load_config
    from fedjax_sim.cli.experiment import build
    from fedjax_sim.simulation.sweeps import sweep

    grid: dict[str, list] = {}
    for text in args.sweep:
        key, values = parse_sweep(text)
        if key in grid:
            raise UserError(f"--sweep {key} is given twice; give its values in one list")
        if key in overrides:
            raise UserError(f"{key} is both swept and set with --config.{key}; keep one")
        grid[key] = values
    load_config(args.config, overrides)  # the base config reads (errors before any trial)

    loaded: dict = {}  # trials with the same data section share the loaded data

    def trial(**settings):
        config = load_config(args.config, {**overrides, **{
            k: json.dumps(v) if not isinstance(v, str) else v for k, v in settings.items()}})
        parts = build(config, data_cache=loaded)
        info = parts.pop("info")
        parts.pop("checkpoint")
        metadata = ({"target_stats": {k: float(v) for k, v in info["target_stats"].items()}}
                    if info.get("target_stats") else None)
        return dict(parts, metadata=metadata,
                    config=json.loads(json.dumps(config.to_dict(), default=str)))

    result = sweep(trial, grid, zip=args.zip, workdir=args.workdir, metric=args.metric,
                   mode=args.mode, max_trials_per_program=args.max_trials_per_program,
                   trial_axis=args.trial_axis,
                   progress=not args.no_progress)
    if args.no_progress:  # otherwise the sweep printed it
        print(result.summary_line())
    if args.workdir:
        print(f"wrote {args.workdir}/sweep.csv, sweep.json and trials/0..{len(result.trials) - 1}/")
    else:
        print(result.to_csv(), end="")
    return 0
