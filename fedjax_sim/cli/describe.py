"""The `fedjax-sim data describe` command: the training clients a config builds, without
training.

    fedjax-sim data describe --config configs/digits_fedavg.py [--config.KEY=VALUE ...]
                             [--png PATH | --no-png] [--sort dominant|size] [--json]

Prints client sizes, the labels per client and how far each client's label mix is from the
global one (`fedjax_sim.data.describe`), the sizes of the test splits and, with
`data.heldout_clients`, how many clients were held out (they are not among the described
training clients). Draws the split to `<config stem>_clients.png`, to `--png PATH`, or into
`--png DIR` as `DIR/<config stem>_clients.png`. Without matplotlib the statistics are still
printed, followed by what to install: a warning for the default plot, an error (exit status
2) when `--png` asked for one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from fedjax_sim.errors import UserError

PLOT_EXTRA = "pip install 'fedjax_sim[plot]'"


def add_describe_parser(data_sub) -> argparse.ArgumentParser:
    """Registers `describe` on the `data` command's subparsers."""
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
                      help="where to write the plot: a file, or an existing directory to write "
                           "<config stem>_clients.png into (default: that name in the current "
                           f"directory); needs matplotlib ({PLOT_EXTRA})")
    plot.add_argument("--no-png", action="store_true", help="do not draw the plot")
    describe.add_argument("--sort", choices=("dominant", "size"), default="dominant",
                          help="heat-map row order: by most common class (default) or by size")
    describe.add_argument("--json", action="store_true",
                          help="print the statistics as one JSON object instead of text")
    describe.add_argument("--debug", action="store_true", help="show full tracebacks")
    return describe


def _size_summary(sizes) -> dict:
    """Client count, example count and min/median/max client size of a test split."""
    return dict(num_clients=int(sizes.size), num_examples=int(sizes.sum()),
                min=int(sizes.min()), p50=float(np.median(sizes)), max=int(sizes.max()))


def _labels(task: str, train, test: dict, info: dict) -> dict:
    """describe()'s label arguments for the task: label_key, num_classes, ignore_label."""
    labels = train.features.get("y")
    if task == "sequence":  # next-token targets; padding is not a label
        return dict(label_key="y", num_classes=info.get("vocab_size"),
                    ignore_label=info.get("pad_id", 0))
    if task == "classification" and labels is not None and np.issubdtype(labels.dtype, np.integer):
        # Count every class of the pooled test set too, so a class no client holds still
        # gets a (zero) column.
        top = int(labels.max()) if labels.size else 0
        if "y" in test and np.issubdtype(test["y"].dtype, np.integer) and test["y"].size:
            top = max(top, int(test["y"].max()))
        return dict(label_key="y", num_classes=max(top + 1, int(info.get("num_classes") or 0)),
                    ignore_label=None)
    return dict(label_key=None, num_classes=None, ignore_label=None)


def _heldout(info: dict, setting) -> dict | None:
    """Clients and examples of the held-out clients (data.heldout_clients), or None."""
    held = info.get("heldout")
    if held is None:
        return None
    train = held[0] if isinstance(held, tuple) else held
    out = dict(num_clients=int(train.num_clients), num_examples=int(train.client_sizes.sum()),
               setting=setting)
    if isinstance(held, tuple):
        out["test_examples"] = int(held[1].client_sizes.sum())
    return out


def _png_path(args) -> str | None:
    if args.no_png:
        return None
    name = f"{os.path.splitext(os.path.basename(args.config))[0]}_clients.png"
    if args.png and os.path.isdir(args.png):
        return os.path.join(args.png, name)
    return args.png or name


def _has_matplotlib() -> bool:
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except ImportError:
        return False
    return True


def _print_text(name: str, stats, splits: dict, heldout: dict | None, png: str | None) -> None:
    from fedjax_sim.data import format_description

    print(format_description(stats, name=f"{name} training data"))
    if "client_test" in splits:
        s = splits["client_test"]
        print(f"  client test   {s['num_clients']:,} clients, {s['num_examples']:,} examples "
              f"(per client min {s['min']}, median {s['p50']:g}, max {s['max']})")
    if "pooled_test" in splits:
        print(f"  pooled test   {splits['pooled_test']['num_examples']:,} examples")
    if heldout:
        tests = (f" and {heldout['test_examples']:,} test examples"
                 if "test_examples" in heldout else "")
        print(f"  held out      {heldout['num_clients']:,} clients with {heldout['num_examples']:,} "
              f"examples{tests} (data.heldout_clients={heldout['setting']!r}), not among the "
              f"training clients described above")
    if png:
        print(f"wrote {png}")


def run_describe(args, overrides) -> int:
    from fedjax_sim.data import describe, plot_description
    from fedjax_sim.data.describe import to_jsonable
    from fedjax_sim.cli.config import load_config
    from fedjax_sim.cli.experiment import build_data
    from fedjax_sim.cli.validate import validate_config

    config = load_config(args.config, overrides)
    validate_config(config)
    train, test, client_test, info = build_data(config.data, config.get("seed", 0))
    test = test or {}
    labels = _labels(config.get("task", "classification"), train, test, info)
    stats = describe(train, **labels)
    splits = {}
    if client_test is not None:
        splits["client_test"] = _size_summary(client_test.client_sizes)
    if test:
        splits["pooled_test"] = {"num_examples": int(next(iter(test.values())).shape[0])}
    heldout = _heldout(info, config.data.get("heldout_clients"))

    png = _png_path(args)
    missing = png is not None and not _has_matplotlib()
    if png and not missing:
        name = os.path.basename(args.config)
        plot_description(train, png, sort=args.sort, title=f"{name}: training clients",
                         stats=stats, **labels)
    written = None if missing else png
    if args.json:
        extra = {"heldout": heldout} if heldout else {}
        print(json.dumps({"config": args.config, "train": to_jsonable(stats), **splits, **extra,
                          "png": written}))
    else:
        _print_text(os.path.basename(args.config), stats, splits, heldout, written)
    if missing:
        what = f"no plot written to {png}: drawing it needs matplotlib; install the plot extra " \
               f"with {PLOT_EXTRA}"
        if args.png:  # asked for: an error, after the statistics
            raise UserError(what)
        sys.stdout.flush()
        print(f"warning: {what}, or pass --no-png", file=sys.stderr)
    return 0
