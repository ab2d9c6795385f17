"""What the file readers of natural federated datasets share (`tff_h5`, `leaf`).

Path checks, image and label conversion, label range checks, the offsets of per-user arrays
concatenated into one `FederatedData`, the `drop_empty` rule for train / test pairs and the `info` of
character-level text datasets. Every error is a `UserError` with a one-line message.
"""

from __future__ import annotations

import os
from typing import Any, Sequence, Union

import numpy as np

from fedjax_sim.data import text
from fedjax_sim.data.federated_data import FederatedData
from fedjax_sim.errors import UserError

PathLike = Union[str, "os.PathLike[str]"]
Info = dict[str, Any]

EMNIST_CLASSES = 62
IMAGE_28 = (28, 28)


def existing(path: PathLike, what: str) -> str:
    """`path` as a str, checked to exist."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise UserError(f"{p}: no such file or directory; check the path to the {what}")
    return p


def offsets_of(sizes: Sequence[int] | np.ndarray) -> np.ndarray:
    """int64 [C + 1] `FederatedData` offsets of clients with `sizes[c]` examples each."""
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def pixels_to_uint8(pixels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """uint8 [n, *shape, 1] = round(pixels * 255) of float pixels [n, *shape] in [0, 1]."""
    if pixels.shape[1:] != shape:
        raise UserError(
            f"images have shape {pixels.shape[1:]}, expected {shape} (one value per pixel); "
            f"check that this is the right dataset")
    if not np.issubdtype(pixels.dtype, np.floating):
        raise UserError(
            f"pixels are {pixels.dtype}, expected floats in [0, 1]; store pixel / 255")
    inside = (pixels >= 0) & (pixels <= 1)  # False for NaN too
    if not inside.all():
        bad = pixels[~inside].flat[0]
        raise UserError(
            f"pixel value {bad} is outside [0, 1]; store intensities scaled to [0, 1] "
            f"(pixel / 255)")
    return np.rint(pixels * np.float32(255)).astype(np.uint8)[..., None]


def int_labels(labels: np.ndarray) -> np.ndarray:
    """int32 labels of an integer array (floats holding whole numbers are accepted)."""
    if labels.ndim != 1:
        raise UserError(f"labels have shape {labels.shape}, expected one label per example")
    if np.issubdtype(labels.dtype, np.floating) and np.all(np.mod(labels, 1) == 0):
        labels = labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"labels are {labels.dtype}, expected integer class ids")
    if labels.size and (labels.min() < np.iinfo(np.int32).min
                        or labels.max() > np.iinfo(np.int32).max):
        raise UserError("labels do not fit in int32; use class ids 0..K-1")
    return labels.astype(np.int32)


def check_labels(data: FederatedData, key: str, num_classes: int, files: Sequence[str],
                 who: str, hint: str) -> None:
    """Raises naming the file and client of the first label outside [0, num_classes)."""
    labels = data.features[key]
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        row = int(bad[0])
        c = int(np.searchsorted(data.offsets, row, side="right")) - 1
        raise UserError(
            f"{files[c]}: {who} {data.client_ids[c]!r} has label {int(labels[row])} outside "
            f"[0, {num_classes}) ({bad.size} such label(s) in total); {hint}")


def finish(train: FederatedData, train_files: Sequence[str], test: FederatedData | None,
           drop_empty: bool, who: str) -> tuple[FederatedData, FederatedData | None]:
    """Rejects (or, with drop_empty, drops) training clients without examples."""
    empty = np.flatnonzero(train.client_sizes == 0)
    if empty.size and not drop_empty:
        c = int(empty[0])
        raise UserError(
            f"{train_files[c]}: training {who} {train.client_ids[c]!r} has no examples "
            f"({empty.size} such {who}(s)); remove them from the file or pass "
            f"drop_empty=True to drop them")
    if drop_empty:
        dropped = {train.client_ids[int(c)] for c in empty}
        train = train.drop_empty()
        if test is not None:
            test = test.subset([i for i, (cid, n) in enumerate(zip(test.client_ids,
                                                                     test.client_sizes))
                                if n > 0 and cid not in dropped])
    return train, test


def text_info(seq_len: int, sources: dict[str, list[str] | None]) -> Info:
    """The `info` of a character-level dataset (`fedjax_sim.data.text` vocabulary)."""
    return {
        "num_classes": text.VOCAB_SIZE,
        "vocab_size": text.VOCAB_SIZE,
        "pad_id": text.PAD,
        "seq_len": seq_len,
        "input_shape": (seq_len,),
        "input_dtype": "int32",
        "source_files": sources,
    }
