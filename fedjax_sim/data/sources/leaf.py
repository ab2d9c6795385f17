"""LEAF JSON files: the per-user splits of the LEAF benchmark (FEMNIST, Shakespeare, ...).

One split (e.g. data/train) is one .json file or a directory of them, with the users of
all files of a directory put together,

    {"users": [uid, ...], "num_samples": [n, ...],
     "user_data": {uid: {"x": [... n items ...], "y": [... n items ...]}, ...}}

  FEMNIST      x: 784 floats in [0, 1] per example (a 28 x 28 image, row-major),
               y: int in [0, 62)
  Shakespeare  x: a string of 80 characters, y: the character that follows it

`load_leaf` reads any such split into one `FederatedData` with features 'x' and 'y'.
`leaf_femnist` and `leaf_shakespeare` return `(train, test, info)` as described in
`fedjax_sim.data.sources`.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import numpy as np

from fedjax_sim.data import text
from fedjax_sim.data.federated_data import FederatedData
from fedjax_sim.data.sources.common import (EMNIST_CLASSES, IMAGE_28, Info, PathLike,
                                            check_labels, existing, finish, int_labels,
                                            offsets_of, pixels_to_uint8, text_info)
from fedjax_sim.errors import UserError

__all__ = ["leaf_femnist", "leaf_shakespeare", "load_leaf"]


def _leaf_files(path: PathLike) -> list[str]:
    """The .json files of one split: the file itself, or a directory's *.json (sorted)."""
    p = existing(path, "LEAF .json file or directory")
    if not os.path.isdir(p):
        return [p]
    files = sorted(os.path.join(p, f) for f in os.listdir(p)
                   if f.endswith(".json") and os.path.isfile(os.path.join(p, f)))
    if not files:
        raise UserError(
            f"{p}: directory has no .json files; pass a LEAF split directory such as "
            f"data/train or one of its .json files")
    return files


def _read_json(file: str) -> tuple[list, list, dict]:
    """(users, num_samples, user_data) of one LEAF file, with the top level checked."""
    try:
        with open(file, encoding="utf-8") as handle:
            doc = json.load(handle)
    except json.JSONDecodeError as e:
        raise UserError(
            f"{file}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); pass a "
            f"LEAF .json file") from None
    except UnicodeDecodeError:
        raise UserError(f"{file}: not UTF-8 text, so not JSON; pass a LEAF .json file") from None
    if not isinstance(doc, dict):
        raise UserError(
            f"{file}: the top level is a JSON {type(doc).__name__}, not an object; LEAF files "
            f"hold {{'users', 'num_samples', 'user_data'}}")
    for key, kind in (("users", list), ("num_samples", list), ("user_data", dict)):
        if key not in doc:
            raise UserError(
                f"{file}: no {key!r} field; LEAF files hold 'users', 'num_samples' and "
                f"'user_data' (has {sorted(doc)[:5]})")
        if not isinstance(doc[key], kind):
            raise UserError(
                f"{file}: {key!r} is a JSON {type(doc[key]).__name__}, expected "
                f"{'a list' if kind is list else 'an object'}")
    users, num_samples = doc["users"], doc["num_samples"]
    if len(users) != len(num_samples):
        raise UserError(
            f"{file}: {len(users)} users but {len(num_samples)} num_samples entries; give "
            f"one count per user")
    return users, num_samples, doc["user_data"]


def _numeric(raw: list) -> np.ndarray:
    """A list of numbers (or equal-shape nested lists) as float32 / int32 / bool."""
    try:
        array = np.asarray(raw)
    except ValueError:
        raise UserError(
            "examples have different shapes; give every example the same shape or pass a "
            "conversion function (x_fn / y_fn)") from None
    if array.dtype.kind == "f":
        return array.astype(np.float32)
    if array.dtype.kind in "iu":
        info = np.iinfo(np.int32)
        fits = array.min() >= info.min and array.max() <= info.max
        return array.astype(np.int32) if fits else array.astype(np.int64)
    if array.dtype.kind == "b":
        return array
    raise UserError(
        f"values are not numbers (e.g. {raw[0]!r:.40}); pass a conversion function "
        f"(x_fn / y_fn) for raw data")


def _convert(raw: list, fn: Callable[[list], np.ndarray] | None, file: str, uid: str,
             field: str) -> np.ndarray:
    """One user's field through `fn` (or `_numeric`), with errors naming the file and user."""
    try:
        value = _numeric(raw) if fn is None else fn(raw)
    except UserError as e:
        raise UserError(f"{file}: user {uid!r} field {field!r}: {e}") from None
    if not isinstance(value, np.ndarray) or value.ndim == 0 or value.shape[0] != len(raw):
        got = value.shape if isinstance(value, np.ndarray) else type(value).__name__
        raise UserError(
            f"{file}: user {uid!r}: {field}_fn returned {got} for {len(raw)} examples; it "
            f"must return an array with one row per example")
    return value


def _concat(parts: list[np.ndarray | None], sizes: Sequence[int], field: str,
            owners: list[tuple[str, str]], empty: np.ndarray) -> np.ndarray:
    """Concatenates users' arrays; users without examples (None) take the others' shape."""
    template = next((p for p in parts if p is not None), empty)
    out = np.empty((int(sum(sizes)),) + template.shape[1:],
                   np.result_type(*[p.dtype for p in parts if p is not None] or [template]))
    lo = 0
    for part, n, (file, uid) in zip(parts, sizes, owners):
        if part is None:
            continue
        if part.shape[1:] != template.shape[1:]:
            raise UserError(
                f"{file}: user {uid!r} has {field} of example shape {part.shape[1:]}, other "
                f"users {template.shape[1:]}; every example needs the same shape")
        out[lo:lo + n] = part
        lo += n
    return out


def _read_leaf(path: PathLike, x_fn: Callable[[list], np.ndarray] | None,
               y_fn: Callable[[list], np.ndarray] | None,
               empty_x: np.ndarray, empty_y: np.ndarray,
               ) -> tuple[FederatedData, list[str], list[str]]:
    """(data with users sorted by id, file of each user, all files read)."""
    files = _leaf_files(path)
    records: dict[str, tuple[str, int, np.ndarray | None, np.ndarray | None]] = {}
    for file in files:
        users, num_samples, user_data = _read_json(file)
        for i, (uid, n) in enumerate(zip(users, num_samples)):
            if not isinstance(uid, str):
                raise UserError(f"{file}: users[{i}] is {uid!r}, not a string user id")
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise UserError(
                    f"{file}: num_samples[{i}] (user {uid!r}) is {n!r}; it must be a "
                    f"non-negative integer")
            if uid in records:
                where = records[uid][0]
                raise UserError(
                    f"{file}: user {uid!r} appears twice (also in {where}); list each user "
                    f"once per split")
            entry = user_data.get(uid)
            if entry is None:
                raise UserError(
                    f"{file}: user {uid!r} is in 'users' but missing from 'user_data'; add "
                    f"its data or remove it from 'users' and 'num_samples'")
            raw = {}
            for field in ("x", "y"):
                values = entry.get(field) if isinstance(entry, dict) else None
                if not isinstance(values, list):
                    raise UserError(
                        f"{file}: user_data[{uid!r}] has no {field!r} list; LEAF stores "
                        f"{{'x': [...], 'y': [...]}} per user")
                if len(values) != n:
                    raise UserError(
                        f"{file}: user {uid!r} has {len(values)} {field!r} values but "
                        f"num_samples says {n}; make them agree")
                raw[field] = values
            x = _convert(raw["x"], x_fn, file, uid, "x") if n else None
            y = _convert(raw["y"], y_fn, file, uid, "y") if n else None
            records[uid] = (file, n, x, y)
    ids = sorted(records)
    owners = [(records[u][0], u) for u in ids]
    sizes = [records[u][1] for u in ids]
    features = {
        "x": _concat([records[u][2] for u in ids], sizes, "x", owners, empty_x),
        "y": _concat([records[u][3] for u in ids], sizes, "y", owners, empty_y),
    }
    return FederatedData(features, offsets_of(sizes), tuple(ids)), [f for f, _ in owners], files


def load_leaf(path: PathLike, x_fn: Callable[[list], np.ndarray] | None = None,
              y_fn: Callable[[list], np.ndarray] | None = None, *,
              num_classes: int | None = None, drop_empty: bool = False) -> FederatedData:
    """One LEAF split (a .json file or a directory of them) as FederatedData.

    Args:
      path: a LEAF .json file, or a directory whose *.json files hold one split together.
      x_fn: converts one user's raw `x` list to an array with one row per example, e.g. for
        Sent140 / CelebA style raw inputs (strings, image file names). Without it `x` must
        be numbers or equal-shape lists of numbers (stored as float32, or int32 for ints).
      y_fn: the same for `y`.
      num_classes: when given, labels `y` must be integers in [0, num_classes).
      drop_empty: leave out users without examples.

    Returns:
      Features `x` and `y`, the users in sorted id order.
    """
    data, owners, _ = _read_leaf(path, x_fn, y_fn, np.zeros(0, np.float32),
                                 np.zeros(0, np.int32))
    if num_classes is not None:
        if not np.issubdtype(data.features["y"].dtype, np.integer):
            raise UserError(
                f"{os.fspath(path)}: y is {data.features['y'].dtype}, but num_classes needs "
                f"integer labels; pass y_fn or leave num_classes out")
        check_labels(data, "y", num_classes, owners, "user",
                      f"labels must be 0..{num_classes - 1}")
    return data.drop_empty() if drop_empty else data


def _leaf_pair(train_path: PathLike, test_path: PathLike | None,
               load: Callable[[PathLike], tuple[FederatedData, list[str], list[str]]],
               drop_empty: bool,
               ) -> tuple[FederatedData, FederatedData | None, dict[str, list[str] | None]]:
    train, owners, train_files = load(train_path)
    test, test_files = None, None
    if test_path is not None:
        test, _, test_files = load(test_path)
    train, test = finish(train, owners, test, drop_empty, "user")
    return train, test, {"train": train_files, "test": test_files}


def _femnist_x(raw: list) -> np.ndarray:
    try:
        pixels = np.asarray(raw, dtype=np.float32)
    except (ValueError, TypeError):
        raise UserError(
            "examples are not lists of 784 numbers; FEMNIST x holds one 28 x 28 image "
            "per example") from None
    if pixels.ndim != 2 or pixels.shape[1] != 784:
        raise UserError(
            f"examples have shape {pixels.shape[1:]}, expected 784 pixel values (a 28 x 28 "
            f"image) each")
    return pixels_to_uint8(pixels.reshape(-1, *IMAGE_28), IMAGE_28)


def _femnist_y(raw: list) -> np.ndarray:
    return int_labels(_numeric(raw))


def leaf_femnist(train_path: PathLike, test_path: PathLike | None = None, *,
                 drop_empty: bool = False,
                 ) -> tuple[FederatedData, FederatedData | None, Info]:
    """LEAF FEMNIST (data/train and data/test of LEAF's femnist, 62 classes).

    Features: `x` uint8 [n, 28, 28, 1] = round(x * 255) of the 784 stored values,
    `y` int32 [n] in [0, 62).
    """
    def load(path: PathLike) -> tuple[FederatedData, list[str], list[str]]:
        data, owners, files = _read_leaf(path, _femnist_x, _femnist_y,
                                         np.zeros((0, 28, 28, 1), np.uint8),
                                         np.zeros(0, np.int32))
        check_labels(data, "y", EMNIST_CLASSES, owners, "user", "FEMNIST labels are 0..61")
        return data, owners, files

    train, test, sources = _leaf_pair(train_path, test_path, load, drop_empty)
    info = {"num_classes": EMNIST_CLASSES, "input_shape": (28, 28, 1), "input_dtype": "uint8",
            "source_files": sources}
    return train, test, info


def _leaf_strings(raw: list) -> np.ndarray:
    for i, value in enumerate(raw):
        if not isinstance(value, str):
            raise UserError(f"example {i} is {value!r:.40}, not a string")
    out = np.empty(len(raw), dtype=object)
    out[:] = raw
    return out


def _leaf_next_chars(raw: list) -> np.ndarray:
    out = _leaf_strings(raw)
    for i, value in enumerate(raw):
        if len(value) != 1:
            raise UserError(
                f"example {i} is {value!r:.40}, not a single character; LEAF Shakespeare's "
                f"y is the character that follows x")
    return out


def leaf_shakespeare(train_path: PathLike, test_path: PathLike | None = None, *,
                     seq_len: int = 80, drop_empty: bool = False,
                     ) -> tuple[FederatedData, FederatedData | None, Info]:
    """LEAF Shakespeare (80-character windows and the character after each).

    Features: `x` and `y` int32 [n, seq_len] (`fedjax_sim.data.text.leaf_to_sequences`):
    every position predicts the next character and the last real one LEAF's label.
    """
    seq_len = text._check_seq_len(seq_len)

    def load(path: PathLike) -> tuple[FederatedData, list[str], list[str]]:
        empty = np.zeros(0, dtype=object)
        data, owners, files = _read_leaf(path, _leaf_strings, _leaf_next_chars, empty, empty)
        x, y = text.leaf_to_sequences(data.features["x"].tolist(),
                                      data.features["y"].tolist(), seq_len)
        return FederatedData({"x": x, "y": y}, data.offsets, data.client_ids), owners, files

    train, test, sources = _leaf_pair(train_path, test_path, load, drop_empty)
    return train, test, text_info(seq_len, sources)
