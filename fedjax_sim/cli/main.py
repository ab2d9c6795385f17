"""The `fedjax-sim` command.

    fedjax-sim train --config configs/digits_fedavg.py [--config.KEY=VALUE ...] --workdir DIR
    fedjax-sim privacy --noise-multiplier Z | --epsilon EPS  --sampling-rate Q | --clients-per-round M
                       --rounds T --delta D [--population N] [--accountant rdp|pld] [--json]
    fedjax-sim data describe --config configs/digits_fedavg.py [--config.KEY=VALUE ...]
                             [--png PATH | --no-png] [--sort dominant|size] [--json]
    fedjax-sim plot runs/a runs/b ... [--metric test_accuracy] [--x round|seconds|uplink_bytes]
                    [--out fig.png]

Re-running the same command on the same --workdir resumes from the last checkpoint there.
`privacy` is `cli/privacy.py`, `data describe` is `cli/describe.py`, `plot` is `cli/plot.py`.

User mistakes print one line (`error: ...`) and exit with status 2; `--debug` shows the
full traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from fedjax_sim.cli.describe import add_describe_parser, run_describe
from fedjax_sim.cli.plot import add_plot_parser, run_plot
from fedjax_sim.cli.audit import add_audit_parser, run_audit
from fedjax_sim.cli.privacy import add_privacy_parser, run_privacy
from fedjax_sim.cli.sweep import add_sweep_parser, run_sweep
from fedjax_sim.errors import UserError


def _split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    rest, overrides = [], {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config."):].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise UserError(f"{arg} needs a value: {arg}=VALUE")
                value = argv[i + 1]
                i += 1
            overrides[key] = value
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedjax-sim", description="Federated learning simulator.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run a federated training from a config file",
                           epilog="Override any config value with --config.KEY=VALUE, e.g. "
                                  "--config.rounds=50 --config.algorithm.batch_size=20")
    train.add_argument("--config", required=True, help="path to a config .py with get_config()")
    train.add_argument("--workdir", default=None,
                       help="directory for config.json, metrics.jsonl and summary.json")
    train.add_argument("--allow-config-change", action="store_true",
                       help="resume the run in --workdir even though the config differs from "
                            "the one it was started with")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.add_argument("--tensorboard", nargs="?", const=True, default=False, metavar="DIR",
                       help="also write TensorBoard event files: every metric of every round, "
                            "the summary and hyperparameters (into WORKDIR/tensorboard, or DIR; "
                            "needs pip install 'fedjax_sim[tracking]')")
    many = train.add_argument_group(
        "multi-process runs", "one process per host (or per accelerator); every process runs "
        "the same command. --distributed lets JAX detect SLURM, Open MPI or a TPU pod; "
        "elsewhere give --coordinator, --num-processes and --process-id (or config.distributed)")
    many.add_argument("--distributed", action="store_true",
                      help="join a multi-process run whose layout JAX detects")
    many.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                      help="process 0's address, the same for every process")
    many.add_argument("--num-processes", type=int, default=None)
    many.add_argument("--process-id", type=int, default=None)
    train.add_argument("--debug", action="store_true", help="show full tracebacks")
    add_sweep_parser(sub)
    add_privacy_parser(sub)
    add_audit_parser(sub)
    data = sub.add_parser("data", help="inspect the federated data a config builds")
    data_sub = data.add_subparsers(dest="data_command", metavar="{describe}", required=True)
    add_describe_parser(data_sub)
    add_plot_parser(sub)
    return parser


def _train(args, overrides) -> int:
    from fedjax_sim.cli.config import load_config
    from fedjax_sim.cli.experiment import run

    config = load_config(args.config, overrides)
    _join_processes(args, config)
    result = run(config, args.workdir, progress=not args.no_progress,
                 allow_config_change=args.allow_config_change, tensorboard=args.tensorboard)
    summary = result.summary
    shown = ("test_accuracy", "test_loss", "test_mse", "client_test_accuracy_mean",
             "client_test_accuracy_p10", "client_personal_accuracy_mean",
             "client_finetuned_accuracy_mean")
    final = ", ".join(f"{k}={summary['final'][k]:.4f}" for k in shown if k in summary["final"])
    timing = (f"{summary['seconds_per_round'] * 1e3:.1f} ms/round (+{summary['compile_seconds']:.1f} s "
              f"compile)" if "seconds_per_round" in summary else "already complete")
    privacy = summary.get("privacy")
    if privacy:
        eps = privacy.get("epsilon")  # None where ε is unbounded (no noise)
        shown = f"ε={'inf' if eps is None else f'{eps:.3g}'} (δ={privacy['delta']:g})"
        final = f"{final}, {shown}" if final else shown
    rounds = f"{summary['rounds']} rounds"
    if summary.get("stopped"):  # the privacy budget ran out first
        rounds = f"{result.history[-1]['round']} of {rounds}"
    if summary.get("resumed_from_round") and "seconds_per_round" in summary:
        rounds = f"{rounds} (resumed from round {summary['resumed_from_round']})"
    print(f"done: {rounds}, {timing}; {final}")  # why it stopped early: a warning (stderr)
    if args.workdir:
        extra = ", client_metrics.json" if result.client_metrics is not None else ""
        extra += ", tensorboard/" if args.tensorboard is True else ""
        print(f"wrote {args.workdir}/config.json, metrics.jsonl, summary.json, params.npz{extra}, "
              f"checkpoints/")
    else:
        print(json.dumps(summary["final"]))
    if isinstance(args.tensorboard, str):
        print(f"wrote TensorBoard events to {args.tensorboard}")
    return 0


def _join_processes(args, config) -> None:
    """Joins a multi-process run where the flags or config.distributed ask for one (before
    anything else touches JAX's devices)."""
    from fedjax_sim.cli.options import distributed_options
    from fedjax_sim.simulation import DistributedOptions, initialize_distributed

    flags = (args.coordinator, args.num_processes, args.process_id)
    options = distributed_options(config)
    if any(v is not None for v in flags):
        options = DistributedOptions(*flags)
    elif args.distributed and options is None:
        options = DistributedOptions()
    if options is not None:
        initialize_distributed(options)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    with warnings.catch_warnings():
        if not debug:  # a warning is one line on stderr, whoever else listens for warnings
            warnings.showwarning = _show_warning
        try:
            rest, overrides = _split_overrides(argv)
            args = _parser().parse_args(rest)
            if args.command == "train":
                return _train(args, overrides)
            if args.command == "sweep":
                return run_sweep(args, overrides)
            if args.command == "privacy":
                return run_privacy(args)
            if args.command == "audit":
                return run_audit(args, overrides)
            if args.command == "data" and args.data_command == "describe":
                return run_describe(args, overrides)
            if args.command == "plot":
                return run_plot(args)
        except UserError as e:
            if debug:
                raise
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:  # Ctrl-C: where the run stopped, how to resume
            if debug:
                raise
            print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
            return 130
    return 1

if __name__ == "__main__":
    sys.exit(main())
