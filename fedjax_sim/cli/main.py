"""The `fedjax-sim` command.

    fedjax-sim train --config configs/digits_fedavg.py [--config.KEY=VALUE ...] --workdir DIR
    fedjax-sim privacy --noise-multiplier Z | --epsilon EPS  --sampling-rate Q | --clients-per-round M
                       --rounds T --delta D [--population N] [--accountant rdp|pld] [--json]
    fedjax-sim data describe --config configs/digits_fedavg.py [--config.KEY=VALUE ...]
                             [--png PATH | --no-png] [--sort dominant|size] [--json]

Re-running the same command on the same --workdir resumes from the last checkpoint there.

`data describe` builds the config's training clients without training: client sizes, the
labels per client and how far each client's label mix is from the global one
(`fedjax_sim.data.describe`), plus the sizes of the test splits; it draws the split to
`<config stem>_clients.png` (or --png PATH) and prints JSON instead of text with --json.

User mistakes print one line (`error: ...`) and exit with status 2; `--debug` shows the
full traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from fedjax_sim.cli.privacy import add_privacy_parser, run_privacy
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
    train.add_argument("--debug", action="store_true", help="show full tracebacks")
    add_privacy_parser(sub)
    data = sub.add_parser("data", help="inspect the federated data a config builds")
    data_sub = data.add_subparsers(dest="data_command", metavar="{describe}", required=True)
    describe = data_sub.add_parser(
        "describe", help="client sizes, labels per client and how non-IID the split is",
        description="Builds the training clients of a config (no training) and describes "
                    "them: client sizes, the classes each client holds, and the mean total-"
                    "variation distance between each client's label mix and the global one "
                    "(0 = the same mix, 1 = disjoint classes), next to the value an IID "
                    "split of the same client sizes gets. Also draws a client-size "
                    "histogram and a client x label heat map.",
        epilog="Override any config value with --config.KEY=VALUE, e.g. "
               "--config.data.partition_args.alpha=0.1")
    describe.add_argument("--config", required=True, help="path to a config .py with get_config()")
    plot = describe.add_mutually_exclusive_group()
    plot.add_argument("--png", default=None, metavar="PATH",
                      help="where to write the plot (default: <config stem>_clients.png in the "
                           "current directory)")
    plot.add_argument("--no-png", action="store_true", help="do not draw the plot")
    describe.add_argument("--sort", choices=("dominant", "size"), default="dominant",
                          help="heat-map row order: by most common class (default) or by size")
    describe.add_argument("--json", action="store_true",
                          help="print the statistics as one JSON object instead of text")
    describe.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


def _train(args, overrides) -> int:
    from fedjax_sim.cli.config import load_config
    from fedjax_sim.cli.experiment import run

    config = load_config(args.config, overrides)
    result = run(config, args.workdir, progress=not args.no_progress,
                 allow_config_change=args.allow_config_change)
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
        rounds = f"{len(result.history)} of {rounds}"
    print(f"done: {rounds}, {timing}; {final}")  # why it stopped early: a warning (stderr)
    if args.workdir:
        extra = ", client_metrics.json" if result.client_metrics is not None else ""
        print(f"wrote {args.workdir}/config.json, metrics.jsonl, summary.json, params.npz{extra}, "
              f"checkpoints/")
    else:
        print(json.dumps(summary["final"]))
    return 0


def _size_summary(sizes) -> dict:
    """Client count, example count and min/median/max client size of a test split."""
    import numpy as np

    return dict(num_clients=int(sizes.size), num_examples=int(sizes.sum()),
                min=int(sizes.min()), p50=float(np.median(sizes)), max=int(sizes.max()))


def _data_describe(args, overrides) -> int:
    import os

    import numpy as np

    from fedjax_sim.cli.config import load_config
    from fedjax_sim.cli.experiment import build_data
    from fedjax_sim.cli.validate import validate_config
    from fedjax_sim.data.describe import (describe, format_description, plot_description,
                                          to_jsonable)

    config = load_config(args.config, overrides)
    validate_config(config)
    seed = config["seed"] if "seed" in config else 0
    train, test, client_test, info = build_data(config.data, seed)
    test = test or {}

    label_key, num_classes, ignore_label = None, None, None
    task = config["task"] if "task" in config else "classification"
    labels = train.features.get("y")
    if task == "sequence":  # next-token targets; padding is not a label
        label_key, ignore_label = "y", info.get("pad_id", 0)
        num_classes = info.get("vocab_size")
    elif task == "classification" and labels is not None and np.issubdtype(labels.dtype, np.integer):
        # Count every class of the pooled test set too, so a class no client holds still
        # gets a (zero) column.
        label_key = "y"
        top = max([int(labels.max())] if labels.size else [0])
        if "y" in test and np.issubdtype(test["y"].dtype, np.integer) and test["y"].size:
            top = max(top, int(test["y"].max()))
        num_classes = max(top + 1, int(info.get("num_classes") or 0))
    stats = describe(train, label_key=label_key, num_classes=num_classes, ignore_label=ignore_label)
    splits = {}
    if client_test is not None:
        splits["client_test"] = _size_summary(client_test.client_sizes)
    if test:
        splits["pooled_test"] = {"num_examples": int(next(iter(test.values())).shape[0])}

    png = None
    if not args.no_png:
        stem = os.path.splitext(os.path.basename(args.config))[0]
        png = args.png or f"{stem}_clients.png"
        name = os.path.basename(args.config)
        plot_description(train, png, label_key=label_key, num_classes=num_classes,
                         ignore_label=ignore_label, sort=args.sort, title=f"{name}: training clients", stats=stats)

    if args.json:
        print(json.dumps({"config": args.config, "train": to_jsonable(stats), **splits,
                          "png": png}))
        return 0
    print(format_description(stats, name=f"{os.path.basename(args.config)} training data"))
    if "client_test" in splits:
        s = splits["client_test"]
        print(f"  client test   {s['num_clients']:,} clients, {s['num_examples']:,} examples "
              f"(per client min {s['min']}, median {s['p50']:g}, max {s['max']})")
    if "pooled_test" in splits:
        print(f"  pooled test   {splits['pooled_test']['num_examples']:,} examples")
    if png:
        print(f"wrote {png}")
    return 0


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
            if args.command == "privacy":
                return run_privacy(args)
            if args.command == "data" and args.data_command == "describe":
                return _data_describe(args, overrides)
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
