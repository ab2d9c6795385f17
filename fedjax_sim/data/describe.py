"""How a federated dataset is split: client sizes, labels per client and how non-IID it is.

`describe(data)` summarises a `FederatedData` in one dict, `format_description(stats)`
renders it as a short text block, and `plot_description(data, path)` draws it: a
histogram of client sizes next to a client x label heat map. `fedjax-sim data describe`
runs the three on a config's training data.

With C clients of sizes n_i and K classes, the label statistics come from the count
matrix `h` [C, K], `h[i, k]` = number of labels k among client i's examples (or tokens:
labels of shape [N, T] are flattened per client, leaving out `ignore_label`). Client i's
label distribution is `p_i = h[i] / sum_k h[i, k]`, and the global one is that of all
clients pooled, `q = sum_i h[i] / sum_ik h[i, k]`. The non-IID summary is the mean over
clients of the total-variation distance

    TV_i = 1/2 * sum_k |p_ik - q_k|    in [0, 1],

0 when client i has exactly the global label mix, and 1 - q_k when it holds only class k.
A split that gives every client one or two classes gives values near 1. An IID split is
not at 0: a client of n labels drawn from q differs from q by sampling noise alone, of
order sqrt(K / n). So the statistics also give the IID reference `iid_mean`, the mean TV
the same client sizes get when each client's labels are drawn at random from q
(Monte-Carlo, `IID_DRAWS` multinomial draws per client with a fixed seed); a split is
label-skewed as far as its mean TV is above that.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from fedjax_sim.data.federated_data import FederatedData
from fedjax_sim.errors import UserError

__all__ = ["describe", "format_description", "plot_description", "to_jsonable"]

# At most this many bins in the client-size histogram of `describe` (integer-wide bins).
SIZE_BINS = 8
# Draws per client of the IID reference TV (its Monte-Carlo error is well below 0.01).
IID_DRAWS = 32


def _quantiles(values: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """Percentiles of `values` with numpy's default linear interpolation."""
    return [float(v) for v in np.percentile(values, qs)]


def _size_histogram(sizes: np.ndarray, max_bins: int = SIZE_BINS) -> dict[str, list[int]]:
    """Bins of equal integer width w covering min..max: bin b holds sizes in
    [edges[b], edges[b + 1]), i.e. edges[b]..edges[b + 1] - 1."""
    lo, hi = int(sizes.min()), int(sizes.max())
    width = max(1, math.ceil((hi - lo + 1) / max_bins))
    num_bins = math.ceil((hi - lo + 1) / width)
    edges = lo + width * np.arange(num_bins + 1, dtype=np.int64)
    counts = np.bincount((sizes - lo) // width, minlength=num_bins)
    return {"edges": edges.tolist(), "counts": counts.astype(np.int64).tolist()}


def _label_counts(data: FederatedData, label_key: str, num_classes: int | None,
                  ignore_label: int | None) -> tuple[np.ndarray, str]:
    """The count matrix h [C, K] and the unit counted ('examples' or 'tokens')."""
    if label_key not in data.features:
        raise UserError(
            f"no feature {label_key!r} to count labels of; pick one of {list(data.features)} "
            f"(or label_key=None to describe client sizes only)")
    labels = data.features[label_key]
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim not in (1, 2) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(
            f"feature {label_key!r} has shape {labels.shape} dtype {labels.dtype}; label "
            f"statistics need integer class labels [N] or token targets [N, T] (regression "
            f"targets have none: pass label_key=None)")
    unit = "tokens" if labels.ndim == 2 else "examples"
    per_row = 1 if labels.ndim == 1 else labels.shape[1]
    owner = np.repeat(np.arange(data.num_clients, dtype=np.int64), data.client_sizes * per_row)
    flat = labels.reshape(-1).astype(np.int64)
    if ignore_label is not None:
        keep = flat != ignore_label
        flat, owner = flat[keep], owner[keep]
    if flat.size and flat.min() < 0:
        hint = "" if ignore_label is not None else " (pass ignore_label for a padding id)"
        raise UserError(f"feature {label_key!r} has negative labels; use labels 0..K-1{hint}")
    top = int(flat.max()) + 1 if flat.size else 0
    if num_classes is None:
        num_classes = top
    elif isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or num_classes < top:
        raise UserError(
            f"labels go up to {top - 1} but num_classes={num_classes!r}; pass an int of at "
            f"least {top}")
    num_classes = int(num_classes)
    counts = np.bincount(owner * num_classes + flat, minlength=data.num_clients * num_classes)
    return counts.reshape(data.num_clients, num_classes).astype(np.int64, copy=False), unit


def _label_stats(counts: np.ndarray) -> dict[str, Any]:
    """Statistics of the count matrix h [C, K] over the clients with at least one label."""
    totals = counts.sum(axis=1)
    labelled = totals > 0
    stats: dict[str, Any] = {
        "num_classes": int(counts.shape[1]),
        "num_labels": int(totals.sum()),
        "clients_with_labels": int(labelled.sum()),
    }
    if not labelled.any():  # nothing to take a distribution of
        return stats
    h = counts[labelled]
    p = h / totals[labelled, None]                      # p_i, [C', K]
    q = h.sum(axis=0) / h.sum()                         # q, [K]
    present = (h > 0).sum(axis=1)
    dominant = p.max(axis=1)
    tv = 0.5 * np.abs(p - q).sum(axis=1)
    # The IID reference: every client's labels redrawn from q, IID_DRAWS times.
    n = totals[labelled]
    draws = np.random.default_rng(0).multinomial(n, q, size=(IID_DRAWS, n.size))  # [D, C', K]
    iid_tv = 0.5 * np.abs(draws / n[:, None] - q).sum(axis=-1)
    stats.update(
        global_distribution=q.tolist(),
        classes_per_client={"mean": float(present.mean()), "min": int(present.min()),
                            "max": int(present.max())},
        dominant_fraction={"mean": float(dominant.mean()), "p50": float(np.median(dominant))},
        label_tv={"mean": float(tv.mean()), "p50": float(np.median(tv)), "max": float(tv.max()),
                  "iid_mean": float(iid_tv.mean())},
    )
    return stats


def describe(data: FederatedData, label_key: str | None = "y", num_classes: int | None = None,
             ignore_label: int | None = None) -> dict[str, Any]:
    """Client sizes and per-client label statistics of `data` (see the module doc).

    Args:
      data: the federated dataset, with at least one client.
      label_key: the feature holding integer labels, [N] (or [N, 1]) class labels or [N, T]
        token targets; None describes client sizes only (e.g. for regression targets).
      num_classes: K; the largest label + 1 when not given.
      ignore_label: a label left out of the counts (e.g. 0 for padding tokens).

    Returns:
      A dict of plain Python values (`to_jsonable` makes it JSON-ready):
        num_clients, num_examples, empty_clients: C, N and the number of clients with n_i = 0.
        client_size: min, p10, p50, mean, p90, max, std (population std) of n_i; the
          percentiles interpolate linearly (numpy's default).
        size_histogram: {edges, counts}: counts[b] clients have edges[b] <= n_i < edges[b + 1]
          (at most `SIZE_BINS` bins of equal integer width).
        labels: None without `label_key`, else a dict with key, unit ('examples' or
          'tokens'), ignore_label, num_classes (K), num_labels (labels counted),
          clients_with_labels, and, over the clients with at least one label:
          global_distribution q [K]; classes_per_client {mean, min, max}: number of classes
          present (h[i, k] > 0); dominant_fraction {mean, p50}: max_k p_ik, the share of a
          client's labels in its most common class; label_tv {mean, p50, max}: TV_i, and
          iid_mean: the mean TV of an IID split with the same client sizes.
        per_client: client_ids, sizes (int64 [C]) and label_counts (h, int64 [C, K], or
          None), in client order.
    """
    if not isinstance(data, FederatedData):
        raise UserError(f"describe needs a FederatedData, got {type(data).__name__}")
    if data.num_clients == 0:
        raise UserError("the federated data has no clients; there is nothing to describe")
    sizes = data.client_sizes
    p10, p50, p90 = _quantiles(sizes, (10, 50, 90))
    stats: dict[str, Any] = {
        "num_clients": data.num_clients,
        "num_examples": data.num_examples,
        "empty_clients": int((sizes == 0).sum()),
        "client_size": {"min": int(sizes.min()), "p10": p10, "p50": p50,
                        "mean": float(sizes.mean()), "p90": p90, "max": int(sizes.max()),
                        "std": float(sizes.std())},
        "size_histogram": _size_histogram(sizes),
        "labels": None,
    }
    counts = None
    if label_key is not None:
        counts, unit = _label_counts(data, label_key, num_classes, ignore_label)
        stats["labels"] = {"key": label_key, "unit": unit, "ignore_label": ignore_label,
                           **_label_stats(counts)}
    stats["per_client"] = {"client_ids": data.client_ids, "sizes": sizes, "label_counts": counts}
    return stats


def to_jsonable(stats: dict[str, Any], per_client: bool = False) -> dict[str, Any]:
    """`stats` with numpy values as Python ones; the per-client arrays only if `per_client`."""
    def convert(value):
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, np.generic):
            return value.item()
        return value

    return convert({k: v for k, v in stats.items() if per_client or k != "per_client"})


def _num(value: float) -> str:
    """A statistic in at most 3 significant digits, integers without a decimal point."""
    return f"{value:,.0f}" if float(value).is_integer() or abs(value) >= 100 else f"{value:.3g}"


def format_description(stats: dict[str, Any], name: str | None = None) -> str:
    """A compact text block of `describe`'s statistics, headed by `name` when given."""
    size = stats["client_size"]
    head = (f"{stats['num_clients']:,} clients, {stats['num_examples']:,} examples")
    if stats["empty_clients"]:
        head += f" ({stats['empty_clients']} of them empty)"
    lines = [f"{name}: {head}" if name else head]
    lines.append("  client size   " + "  ".join(
        f"{k} {_num(size[k])}" for k in ("min", "p10", "p50", "mean", "p90", "max", "std")))
    edges, counts = stats["size_histogram"]["edges"], stats["size_histogram"]["counts"]
    labels = [f"{lo}" if hi - lo == 1 else f"{lo}-{hi - 1}" for lo, hi in zip(edges, edges[1:])]
    width, top = max(len(s) for s in labels), max(counts)
    for label, count in zip(labels, counts):
        bar = "#" * (round(30 * count / top) if count else 0)
        lines.append(f"    {label:>{width}}  {bar:<30} {count}")

    info = stats["labels"]
    if info is None:
        return "\n".join(lines)
    unit = info["unit"]
    ignored = f", ignoring label {info['ignore_label']}" if info["ignore_label"] is not None else ""
    lines.append(f"  labels        {info['num_classes']} classes in {info['key']!r} "
                 f"({info['num_labels']:,} {unit} counted{ignored})")
    if "label_tv" not in info:
        lines.append(f"                no client has a {unit[:-1]} with a label")
        return "\n".join(lines)
    unlabelled = stats["num_clients"] - info["clients_with_labels"]
    if unlabelled:
        lines.append(f"                left out below: {unlabelled} client(s) without labels")
    cpc, dom, tv = info["classes_per_client"], info["dominant_fraction"], info["label_tv"]
    lines.append(f"  per client    {cpc['mean']:.1f} classes present (min {cpc['min']}, "
                 f"max {cpc['max']})")
    lines.append(f"                most common class: {dom['mean']:.0%} of the client's {unit} "
                 f"(median {dom['p50']:.0%})")
    lines.append(f"  non-IID       mean TV distance to the global label mix {tv['mean']:.3f} "
                 f"(median {tv['p50']:.3f}, max {tv['max']:.3f})")
    lines.append(f"                an IID split of these client sizes: {tv['iid_mean']:.3f}  "
                 f"[TV_i = 1/2 sum_k |p_ik - q_k|]")
    return "\n".join(lines)


def _row_order(sizes: np.ndarray, counts: np.ndarray, sort: str) -> np.ndarray:
    """Client order of the heat map: largest first, or grouped by most common class."""
    if sort == "size":
        return np.argsort(-sizes, kind="stable")
    totals = np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fractions = counts / totals
    # Primary key the dominant class, then the share it has (largest first).
    return np.lexsort((-fractions.max(axis=1), fractions.argmax(axis=1)))


def plot_description(data: FederatedData, path: str, label_key: str | None = "y",
                     num_classes: int | None = None, ignore_label: int | None = None,
                     sort: str = "dominant", max_rows: int = 200, title: str | None = None,
                     stats: dict[str, Any] | None = None) -> str:
    """Writes a PNG of `data`'s split to `path` and returns the path.

    Left: a histogram of client sizes. Right (when there are labels): a heat map with a
    row per client and a column per label, coloured by the fraction of the client's
    labels in that class. Rows are sorted by `sort`: 'size' (largest client first) or
    'dominant' (grouped by most common class, strongest first), so a label-skewed split
    shows as blocks. With more than `max_rows` clients, consecutive sorted clients are
    pooled into `max_rows` rows (each row shows the label mix of its group).

    Uses matplotlib's Agg renderer directly (no pyplot, so the global backend is left
    alone). `stats` may pass `describe`'s result for the same arguments to skip
    recomputing it.
    """
    if sort not in ("size", "dominant"):
        raise UserError(f"sort must be 'size' or 'dominant', got {sort!r}")
    if isinstance(max_rows, bool) or not isinstance(max_rows, (int, np.integer)) or max_rows < 1:
        raise UserError(f"max_rows must be an int >= 1, got {max_rows!r}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UserError(f"cannot write {path!r}: directory {directory!r} does not exist; "
                        f"create it first")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError('plotting needs matplotlib; install it with pip install '
                        '"fedjax_sim[plot]"') from None
    if stats is None:
        stats = describe(data, label_key, num_classes, ignore_label)
    sizes = stats["per_client"]["sizes"]
    counts = stats["per_client"]["label_counts"]
    with_labels = counts is not None and counts.shape[1] > 0 and counts.sum() > 0

    fig = Figure(figsize=(12, 5) if with_labels else (6, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(title)
    ax = fig.add_subplot(1, 2, 1) if with_labels else fig.add_subplot(1, 1, 1)
    # At most 30 bins of equal integer width, centred on whole sizes.
    lo, hi = int(sizes.min()), int(sizes.max())
    width = max(1, math.ceil((hi - lo + 1) / 30))
    ax.hist(sizes, bins=np.arange(lo, hi + width + 1, width) - 0.5, color="tab:blue",
            edgecolor="white")
    size = stats["client_size"]
    ax.set(xlabel="examples per client", ylabel="clients",
           title=f"{stats['num_clients']:,} clients, {stats['num_examples']:,} examples "
                 f"(median {_num(size['p50'])})")

    if with_labels:
        order = _row_order(sizes, counts, sort)
        groups = np.array_split(order, min(max_rows, order.size))
        pooled = np.stack([counts[g].sum(axis=0) for g in groups])
        fractions = pooled / np.maximum(pooled.sum(axis=1, keepdims=True), 1)
        ax = fig.add_subplot(1, 2, 2)
        image = ax.imshow(fractions, aspect="auto", interpolation="nearest", cmap="viridis",
                          vmin=0.0, vmax=1.0)
        k = counts.shape[1]
        if k <= 20:
            ax.set_xticks(range(k))
        per_row = f", {order.size / len(groups):.3g} clients per row" if len(groups) < order.size else ""
        info = stats["labels"]
        ax.set(xlabel=f"label ({info['key']})",
               ylabel=f"clients, sorted by {'size' if sort == 'size' else 'most common class'}"
                      f"{per_row}",
               title=f"label mix per client (mean TV to global {info['label_tv']['mean']:.2f}, "
                     f"IID {info['label_tv']['iid_mean']:.2f})")
        ax.set_yticks([])
        fig.colorbar(image, ax=ax, label=f"fraction of the client's {info['unit']}")
    fig.savefig(path, format="png", dpi=100)
    return path
