"""The `fedjax-sim plot` command: runs compared in one figure.

    fedjax-sim plot runs/a runs/b ... [--metric test_accuracy] [--x round|seconds|uplink_bytes]
                    [--label A --label B ...] [--title TEXT] [--out fig.png]

Each argument is a run directory (`fedjax-sim train --workdir`), or one sweep directory
(`fedjax-sim sweep --workdir`: a curve per setting, the mean over seeds with a ± std band). `--metric` is any key of
the metrics rows (`test_accuracy`, `train_loss`, `epsilon`, `client_test_accuracy_p10`, ...)
drawn by round, training seconds or cumulative uplink bytes, or a per-client metric
without a statistic (`client_test_accuracy`) drawn as its distribution over the clients
(client_metrics.json). Writes `--out` (default `<metric>_by_<x>.png`, or `<metric>.png` for
a distribution); needs matplotlib.
"""

from __future__ import annotations

import argparse

from fedjax_sim.simulation.plots import PLOT_EXTRA, X_AXES


def add_plot_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "plot", help="compare runs: a metric by round, time or uplink traffic, or a per-client "
                     "distribution",
        description="Draws one curve per run directory: --metric (any key of metrics.jsonl, "
                    "e.g. test_accuracy, train_loss, epsilon) against --x; or, for a per-client "
                    "metric without a statistic (e.g. client_test_accuracy), its distribution "
                    f"over the clients of the last evaluation. Needs matplotlib ({PLOT_EXTRA}).")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run directories (written by fedjax-sim train --workdir)")
    parser.add_argument("--metric", default="test_accuracy",
                        help="what to draw (default: test_accuracy)")
    parser.add_argument("--x", choices=X_AXES, default="round",
                        help="the horizontal axis: round (default), seconds (training time) or "
                             "uplink_bytes (client -> server traffic so far)")
    parser.add_argument("--label", action="append", default=None, metavar="NAME",
                        help="a legend label per run, in order (default: the directories' names)")
    parser.add_argument("--title", default=None)
    parser.add_argument("--out", default=None, metavar="PATH",
                        help="the figure's file, .png, .pdf or .svg (default: <metric>_by_<x>.png)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


def run_plot(args) -> int:
    from fedjax_sim.simulation.plots import client_metric_split, plot

    out = args.out
    if out is None:
        out = f"{args.metric}.png" if client_metric_split(args.metric) else f"{args.metric}_by_{args.x}.png"
    plot(args.runs, metric=args.metric, x=args.x, out=out, labels=args.label, title=args.title)
    print(f"wrote {out}")
    return 0
