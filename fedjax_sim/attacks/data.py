"""What malicious clients do to their own training data (applied once, before training).

    label_flip():                every label y of a malicious client becomes L − 1 − y
                                 (L classes; Fang et al. 2020, Tolpegin et al. 2020)
    label_flip(source, target):  only labels `source` become `target` (a targeted flip)
    backdoor(target, ...):       a fraction of each malicious client's examples get a pixel
                                 trigger stamped on and the label `target` (BadNets, Gu et
                                 al. 2017; the semantic-free backdoor of Bagdasaryan et al.
                                 2020); the run then also reports `backdoor_success`, the
                                 share of the test examples of other classes that the model
                                 classifies as `target` once the trigger is stamped on them

Honest clients' data, and the test data the run reports `test_*` metrics on, are left as
they are.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from fedjax_sim.errors import UserError


@dataclasses.dataclass(frozen=True)
class DataPoisoning:
    """A data attack: `poison(features, clients, rng)` returns the training features (a dict
    of [N, ...] arrays, copies where changed) with the examples of `clients` (the malicious
    clients' row ranges, a list of (start, stop)) poisoned; `triggered(test)` returns the test examples on which
    the attack's success is measured, labelled with what the attacker wants (None: the
    attack has no such measure)."""

    name: str
    poison: Callable[[dict, list, np.random.Generator], dict]
    triggered: Callable[[dict], dict] | None = None
    label_key: str = "y"


def _int_or_none(name: str, value, low: int = 0):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise UserError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def label_flip(source: int | None = None, target: int | None = None, *,
               num_classes: int | None = None, label_key: str = "y") -> DataPoisoning:
    """Malicious clients' labels flipped: y → L − 1 − y for every example (L classes: from
    `num_classes`, else the largest training label + 1), or with `source` and `target` only
    `source` → `target`."""
    source, target = _int_or_none("label_flip source", source), _int_or_none("label_flip target", target)
    num_classes = _int_or_none("label_flip num_classes", num_classes, low=2)
    if (source is None) != (target is None):
        raise UserError("label_flip needs both source and target (a targeted flip) or neither "
                        "(every label y becomes L - 1 - y)")

    def poison(features, clients, rng):
        del rng
        y = np.asarray(features[label_key])
        rows = _rows(len(y), clients)
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise UserError(f"label_flip needs integer class labels of shape [N] under "
                            f"{label_key!r}, got {y.dtype} {y.shape}")
        flipped = y.copy()
        if source is None:
            classes = num_classes or int(y.max()) + 1
            flipped[rows] = classes - 1 - y[rows]
        else:
            flipped[rows & (y == source)] = target
        return {**features, label_key: flipped}

    return DataPoisoning("label_flip", poison, label_key=label_key)


def _rows(n: int, clients) -> np.ndarray:
    rows = np.zeros(n, bool)
    for lo, hi in clients:
        rows[lo:hi] = True
    return rows


TRIGGER_PATTERNS = ("square", "checkerboard")


def trigger_mask(image_shape: tuple, size: int, pattern: str, location) -> np.ndarray:
    """[H, W] bool: the pixels a `size` x `size` trigger sets, at `location` ('bottom_right',
    'top_left', 'top_right', 'bottom_left' or (row, col) of its top-left pixel)."""
    h, w = image_shape[:2]
    if size > min(h, w):
        raise UserError(f"backdoor trigger size {size} does not fit images of {h}x{w}")
    corners = {"top_left": (0, 0), "top_right": (0, w - size), "bottom_left": (h - size, 0),
               "bottom_right": (h - size, w - size)}
    if isinstance(location, str):
        if location not in corners:
            raise UserError(f"backdoor location must be one of {sorted(corners)} or (row, col), "
                            f"got {location!r}")
        row, col = corners[location]
    else:
        row, col = (int(v) for v in location)
        if not (0 <= row <= h - size and 0 <= col <= w - size):
            raise UserError(f"backdoor location {location!r} puts a {size}x{size} trigger outside "
                            f"the {h}x{w} image")
    square = np.ones((size, size), bool)
    if pattern == "checkerboard":
        square = (np.add.outer(np.arange(size), np.arange(size)) % 2) == 0
    mask = np.zeros((h, w), bool)
    mask[row:row + size, col:col + size] = square
    return mask


def stamp(x: np.ndarray, mask: np.ndarray, value) -> np.ndarray:
    """Images x [n, H, W, ...] with the pixels of `mask` [H, W] set to `value`."""
    x = np.array(x, copy=True)
    x[:, mask] = value
    return x


def backdoor(target: int, *, poison_fraction: float = 0.5, size: int = 3,
             pattern: str = "checkerboard", location="bottom_right", value: float | None = None,
             input_key: str = "x", label_key: str = "y") -> DataPoisoning:
    """A pixel-pattern backdoor: `poison_fraction` of every malicious client's examples
    (rounded, at least one) get the trigger (a `size` x `size` `pattern` at `location`, its
    pixels set to `value`: by default the largest value of the images it is stamped on, e.g.
    1.0 or 255) and the label `target`. Images are [N, H, W] or [N, H, W, C]."""
    target = _int_or_none("backdoor target", target)
    if target is None:
        raise UserError("backdoor needs target=<the class triggered examples should get>")
    if isinstance(poison_fraction, bool) or not isinstance(poison_fraction, (int, float)) \
            or not 0 < poison_fraction <= 1:
        raise UserError(f"backdoor poison_fraction must be in (0, 1], got {poison_fraction!r}")
    size = _int_or_none("backdoor size", size, low=1)
    if pattern not in TRIGGER_PATTERNS:
        raise UserError(f"backdoor pattern must be one of {TRIGGER_PATTERNS}, got {pattern!r}")

    def check(x):
        if x.ndim < 3:
            raise UserError(f"a pixel backdoor needs images [N, H, W(, C)] under {input_key!r}, "
                            f"got shape {x.shape}")

    def poison(features, clients, rng):
        x, y = np.asarray(features[input_key]), np.asarray(features[label_key])
        check(x)
        mask = trigger_mask(x.shape[1:], size, pattern, location)
        chosen = np.zeros(len(y), bool)
        for lo, hi in clients:  # a share of each malicious client's examples
            if hi > lo:
                k = max(1, int(round(poison_fraction * (hi - lo))))
                chosen[lo + rng.choice(hi - lo, k, replace=False)] = True
        x = x.copy()
        x[chosen] = stamp(x[chosen], mask, float(x.max()) if value is None else float(value))
        y = y.copy()
        y[chosen] = target
        return {**features, input_key: x, label_key: y}

    def triggered(test):
        x, y = np.asarray(test[input_key]), np.asarray(test[label_key])
        check(x)
        keep = y != target
        mask = trigger_mask(x.shape[1:], size, pattern, location)
        v = float(x.max()) if value is None else float(value)
        return {**{k: np.asarray(a)[keep] for k, a in test.items()},
                input_key: stamp(x[keep], mask, v), label_key: np.full(int(keep.sum()), target, y.dtype)}

    return DataPoisoning("backdoor", poison, triggered, label_key=label_key)


DATA_ATTACKS = {"label_flip": label_flip, "backdoor": backdoor}
