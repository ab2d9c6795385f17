"""TensorFlow Federated HDF5 files: the per-user datasets `tff.simulation.datasets` caches.

One dataset per client and feature (e.g. fed_emnist_train.h5),

    /examples/<client_id>/<feature>     leading axis = that client's examples; all
                                        features of one client have the same length

  EMNIST         pixels float32 [n, 28, 28] in [0, 1], label int32 [n]: 62 classes
                 (fed_emnist_*.h5) or 10 (fed_emnist_digitsonly_*.h5)
  Shakespeare    snippets: strings [n], one speaking part's lines each
  CIFAR-100      image uint8 [n, 32, 32, 3], label [n] (100 classes), coarse_label [n] (20)
  StackOverflow  tokens, title, tags: strings [n]

`load_tff_h5` reads any such file into one `FederatedData`, features under their names in
the file. `tff_emnist`, `tff_shakespeare` and `tff_cifar100` return `(train, test, info)`
as described in `fedjax_sim.data.sources`.

A damaged file (a broken group or dataset header, a compressed chunk that does not
decompress) raises `UserError` naming the file and the object being read, whenever the
damage shows: while listing the clients, opening a client or reading its arrays.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from fedjax_sim.data import text
from fedjax_sim.data.federated_data import FederatedData
from fedjax_sim.data.sources.common import (EMNIST_CLASSES, IMAGE_28, Info, PathLike,
                                            check_labels, existing, finish, int_labels,
                                            offsets_of, pixels_to_uint8, text_info)
from fedjax_sim.errors import UserError

__all__ = ["load_tff_h5", "tff_cifar100", "tff_emnist", "tff_shakespeare"]

# Converts one client's array of a feature; raises UserError (without naming the file or
# client, which the reader adds) on bad values.
Converter = Callable[[np.ndarray], np.ndarray]

EMNIST_DIGITS = 10
CIFAR100_CLASSES = {"label": 100, "coarse_label": 20}
CIFAR_SHAPE = (32, 32, 3)
_LAYOUT = "TFF files store one dataset per client at examples/<client_id>/<feature>"

# What h5py raises when the HDF5 library fails to read a damaged file: KeyError for an
# object it cannot open, RuntimeError for a group it cannot list, OSError for data it
# cannot read (a chunk whose filter fails). UserError, a ValueError, is not among them,
# so the reader's own errors pass through unchanged.
_H5_ERRORS = (OSError, RuntimeError, KeyError)


def _h5_reason(error: BaseException) -> str:
    """The HDF5 library's own reason, e.g. 'filter returned failure during read' of
    "Can't synchronously read data (filter returned failure during read)"."""
    message = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    lines = message.strip().splitlines()
    first = lines[0] if lines else type(error).__name__
    inner = re.search(r"\(([^()]+)\)\s*$", first)
    return inner.group(1) if inner else first


@contextlib.contextmanager
def _reading(path: str, what: str) -> Iterator[None]:
    """Turns h5py's errors while reading `what` from `path` into a one-line UserError."""
    try:
        yield
    except _H5_ERRORS as e:
        raise UserError(
            f"{path} is damaged (reading {what}: {_h5_reason(e)}); download it again"
        ) from None


def _read_tff(path: PathLike, features: Sequence[str] | None,
              convert: Mapping[str, Converter] | None = None) -> FederatedData:
    """Reads examples/<client_id>/<feature> of every client into one FederatedData.

    Strings come back as object arrays of str (decoded as UTF-8). A feature with a
    converter is read client by client and converted (e.g. to a smaller dtype) before it
    goes into the concatenated array; other numeric features are read straight into it.
    Either way each client dataset is read once and the output arrays are allocated once.
    """
    try:
        import h5py
    except ImportError:
        raise UserError("reading TensorFlow Federated .h5 files needs h5py, which is not "
                        "installed; install it with pip install 'fedjax_sim[tff]'") from None

    path = existing(path, "HDF5 file")
    if os.path.isdir(path) or not h5py.is_hdf5(path):
        raise UserError(
            f"{path}: not an HDF5 file; pass a TensorFlow Federated .h5 file (e.g. "
            f"fed_emnist_train.h5)")
    convert = dict(convert or {})
    try:
        handle = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{path}: cannot be opened as HDF5 ({e}); check the file") from None
    with handle:
        ids, groups = _client_groups(h5py, handle, path)
        if features is not None:
            names = list(features)
        else:
            with _reading(path, f"examples/{ids[0]}"):
                names = sorted(groups[0])
        if not names:
            raise UserError(f"{path}: client {ids[0]!r} has no features; check the file")

        # Metadata pass: shapes and dtypes only, no data read yet.
        sizes = np.zeros(len(ids), np.int64)
        datasets: list[dict[str, Any]] = []
        example_shape: dict[str, tuple[tuple[int, ...], str]] = {}
        dtypes: dict[str, list[np.dtype]] = {name: [] for name in names}
        is_string: dict[str, bool] = {}
        for i, (cid, group) in enumerate(zip(ids, groups)):
            found = _client_datasets(h5py, path, cid, group, names)
            for name, dset in found.items():
                if not dset.shape:
                    raise UserError(
                        f"{path}: examples/{cid}/{name} is a scalar; every feature needs "
                        f"one entry per example")
                string = h5py.check_string_dtype(dset.dtype) is not None
                if not string and dset.dtype.kind not in "biuf":
                    raise UserError(
                        f"{path}: examples/{cid}/{name} has dtype {dset.dtype}; only "
                        f"numbers and strings can be loaded")
                if is_string.setdefault(name, string) != string:
                    raise UserError(
                        f"{path}: feature {name!r} is text for some clients and numbers for "
                        f"others (e.g. {cid!r}); store one type")
                shape = tuple(dset.shape[1:])
                first = example_shape.setdefault(name, (shape, cid))
                if first[0] != shape:
                    raise UserError(
                        f"{path}: feature {name!r} has example shape {shape} for client "
                        f"{cid!r} but {first[0]} for client {first[1]!r}; every client's "
                        f"examples need the same shape")
                dtypes[name].append(dset.dtype)
            lengths = {name: int(d.shape[0]) for name, d in found.items()}
            if len(set(lengths.values())) > 1:
                raise UserError(
                    f"{path}: client {cid!r} has features of different lengths {lengths}; "
                    f"every feature of a client needs one entry per example")
            sizes[i] = next(iter(lengths.values()))
            datasets.append(found)

        offsets = offsets_of(sizes)
        total = int(offsets[-1])
        # Numbers without a converter are read straight into their final array; the
        # others are allocated once the first client's converted value shows their type.
        direct = {name for name in names if name not in convert and not is_string[name]}
        out: dict[str, np.ndarray] = {
            name: np.empty((total,) + example_shape[name][0], np.result_type(*dtypes[name]))
            for name in names if name in direct}
        # Data pass: one read per client dataset.
        for i, cid in enumerate(ids):
            lo, hi = int(offsets[i]), int(offsets[i + 1])
            for name in names:
                dset = datasets[i][name]
                with _reading(path, f"examples/{cid}/{name}"):
                    if name in direct:
                        if hi > lo:
                            dset.read_direct(out[name], dest_sel=np.s_[lo:hi])
                        continue
                    value = _read_client(path, dset, cid, name, is_string[name])
                if name in convert:
                    try:
                        value = convert[name](value)
                    except UserError as e:
                        raise UserError(
                            f"{path}: client {cid!r} feature {name!r}: {e}") from None
                if name not in out:
                    out[name] = np.empty((total,) + value.shape[1:], value.dtype)
                out[name][lo:hi] = value
    return FederatedData(out, offsets, tuple(ids))


def _client_groups(h5py: Any, handle: Any, path: str) -> tuple[list[str], list[Any]]:
    """The client ids under examples/ in sorted order, and their groups."""
    with _reading(path, "the file's top-level group"):
        top = sorted(handle)
    examples = _child(path, handle, "", "examples", h5py.Group) if "examples" in top else None
    if examples is None:
        raise UserError(
            f"{path}: no 'examples' group (top level has {top[:5]}); {_LAYOUT}")
    with _reading(path, "the list of clients in examples/"):
        ids = sorted(examples)
    if not ids:
        raise UserError(f"{path}: the 'examples' group has no clients; check the file")
    groups = []
    for cid in ids:
        group = _child(path, examples, "examples/", cid, h5py.Group)
        if group is None:
            raise UserError(
                f"{path}: examples/{cid} is a dataset, not a client group; {_LAYOUT}")
        groups.append(group)
    return ids, groups


def _client_datasets(h5py: Any, path: str, cid: str, group: Any,
                     names: Sequence[str]) -> dict[str, Any]:
    """One client's datasets of the features `names`, opened (headers read, no data)."""
    with _reading(path, f"examples/{cid}"):
        present = sorted(group)
    found = {}
    for name in names:
        dset = (_child(path, group, f"examples/{cid}/", name, h5py.Dataset)
                if name in present else None)
        if dset is None:
            raise UserError(
                f"{path}: client {cid!r} has no feature {name!r} (examples/{cid}/{name}); "
                f"it has {present}; check that this is the right file or load only "
                f"features every client has")
        found[name] = dset
    return found


def _child(path: str, parent: Any, where: str, name: str, kind: type) -> Any:
    """`parent[name]` (at `where + name` in the file) if it is a `kind`, else None."""
    with _reading(path, where + name):
        child = parent[name]
    return child if isinstance(child, kind) else None


def _read_client(path: str, dset: Any, cid: str, name: str, string: bool) -> np.ndarray:
    """One client's dataset as an array (strings decoded to an object array of str)."""
    if not string:
        return dset[()]
    try:
        return dset.asstr(encoding="utf-8")[()]
    except UnicodeDecodeError:
        raise UserError(
            f"{path}: examples/{cid}/{name} holds bytes that are not UTF-8 text; re-encode "
            f"the strings as UTF-8") from None


def _check_features(features: Sequence[str] | None) -> list[str] | None:
    if features is None:
        return None
    if isinstance(features, str):
        features = [features]
    names = list(features)
    if not names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise UserError(
            f"features must be a non-empty list of distinct feature names, got {features!r}; "
            f"e.g. ['pixels', 'label'] or None for all")
    return names


def load_tff_h5(path: PathLike, features: Sequence[str] | None = None, *,
                drop_empty: bool = False) -> FederatedData:
    """Any TensorFlow Federated HDF5 file (examples/<client_id>/<feature>) as FederatedData.

    Args:
      path: the .h5 file.
      features: the features to load (default: all features of the first client, which
        every client must have).
      drop_empty: leave out clients without examples.

    Returns:
      The clients in sorted id order, features under their names in the file: numeric
      arrays as stored, strings as object arrays of Python str (UTF-8 decoded).
    """
    data = _read_tff(path, _check_features(features))
    return data.drop_empty() if drop_empty else data


def _renamed(data: FederatedData, names: Mapping[str, str]) -> FederatedData:
    """The same clients with features renamed {old: new} (others left out)."""
    return FederatedData({new: data.features[old] for old, new in names.items()},
                         data.offsets, data.client_ids)


def _snippet_sequences(data: FederatedData, key: str, seq_len: int) -> FederatedData:
    """Each client's snippets (object array `key`) as TFF-style sequences x, y."""
    snippets = data.features[key].tolist()
    x, y = text.snippets_to_sequences(snippets, seq_len)
    ends = offsets_of(text.chunks_per_snippet(snippets, seq_len))
    return FederatedData({"x": x, "y": y}, ends[data.offsets], data.client_ids)


def _tff_pair(train_path: PathLike, test_path: PathLike | None,
              load: Callable[[PathLike], FederatedData], drop_empty: bool,
              ) -> tuple[FederatedData, FederatedData | None, dict[str, list[str] | None]]:
    train = load(train_path)
    test = load(test_path) if test_path is not None else None
    train_file = os.fspath(train_path)
    train, test = finish(train, [train_file] * train.num_clients, test, drop_empty, "client")
    sources = {"train": [train_file],
               "test": [os.fspath(test_path)] if test_path is not None else None}
    return train, test, sources


def tff_emnist(train_path: PathLike, test_path: PathLike | None = None, *,
               only_digits: bool = False, drop_empty: bool = False,
               ) -> tuple[FederatedData, FederatedData | None, Info]:
    """Federated EMNIST from TFF's fed_emnist_{train,test}.h5 (3400 writers).

    Features: `x` uint8 [n, 28, 28, 1] = round(pixels * 255), `y` int32 [n] (the stored
    `label`). Pass `only_digits=True` for the digits-only files
    (fed_emnist_digitsonly_*.h5): 10 classes instead of 62. Labels outside the class range
    are rejected.
    """
    num_classes = EMNIST_DIGITS if only_digits else EMNIST_CLASSES
    hint = ("the digits-only files have labels 0..9; for all 62 classes pass "
            "only_digits=False" if only_digits else "EMNIST labels are 0..61")

    def load(path: PathLike) -> FederatedData:
        data = _read_tff(path, ["pixels", "label"], {
            "pixels": lambda p: pixels_to_uint8(p, IMAGE_28), "label": int_labels})
        data = _renamed(data, {"pixels": "x", "label": "y"})
        check_labels(data, "y", num_classes, [os.fspath(path)] * data.num_clients, "client",
                      hint)
        return data

    train, test, sources = _tff_pair(train_path, test_path, load, drop_empty)
    info = {"num_classes": num_classes, "input_shape": (28, 28, 1), "input_dtype": "uint8",
            "source_files": sources}
    return train, test, info


def _strings(values: np.ndarray) -> np.ndarray:
    if values.dtype != object:
        raise UserError(f"expected text, got {values.dtype} values; store strings")
    return values


def tff_shakespeare(train_path: PathLike, test_path: PathLike | None = None, *,
                    seq_len: int = 80, drop_empty: bool = False,
                    ) -> tuple[FederatedData, FederatedData | None, Info]:
    """Shakespeare from TFF's shakespeare_{train,test}.h5 (715 speaking roles).

    Every snippet becomes ceil((L + 2) / (seq_len + 1)) sequences, `x` and `y` int32
    [n, seq_len] (`fedjax_sim.data.text.snippets_to_sequences`: BOS, the characters, EOS,
    cut into chunks; y is x shifted by one, PAD = 0 where there is no target), so a
    client's examples are its snippets' sequences in snippet order.
    """
    seq_len = text._check_seq_len(seq_len)

    def load(path: PathLike) -> FederatedData:
        data = _read_tff(path, ["snippets"], {"snippets": _strings})
        return _snippet_sequences(data, "snippets", seq_len)

    train, test, sources = _tff_pair(train_path, test_path, load, drop_empty)
    return train, test, text_info(seq_len, sources)


def _cifar_images(images: np.ndarray) -> np.ndarray:
    if images.shape[1:] != CIFAR_SHAPE:
        raise UserError(
            f"images have shape {images.shape[1:]}, expected {CIFAR_SHAPE} (height, width, "
            f"RGB); check that this is the CIFAR-100 file")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.integer) or (
                images.size and (images.min() < 0 or images.max() > 255)):
            raise UserError(
                f"images are {images.dtype}, expected uint8 pixel values 0..255")
        images = images.astype(np.uint8)
    return images


def tff_cifar100(train_path: PathLike, test_path: PathLike | None = None, *,
                 label: str = "label", drop_empty: bool = False,
                 ) -> tuple[FederatedData, FederatedData | None, Info]:
    """Federated CIFAR-100 from TFF's fed_cifar100_{train,test}.h5 (500 + 100 clients).

    Features: `x` uint8 [n, 32, 32, 3] (the stored `image`) and `y` int32 [n], the fine
    `label` (100 classes) or, with `label='coarse_label'`, the 20 superclasses. The test
    file's clients are different users from the training file's.
    """
    if label not in CIFAR100_CLASSES:
        raise UserError(
            f"label must be one of {sorted(CIFAR100_CLASSES)}, got {label!r}")
    num_classes = CIFAR100_CLASSES[label]

    def load(path: PathLike) -> FederatedData:
        data = _read_tff(path, ["image", label], {"image": _cifar_images, label: int_labels})
        data = _renamed(data, {"image": "x", label: "y"})
        check_labels(data, "y", num_classes, [os.fspath(path)] * data.num_clients, "client",
                      f"CIFAR-100 {label} values are 0..{num_classes - 1}")
        return data

    train, test, sources = _tff_pair(train_path, test_path, load, drop_empty)
    info = {"num_classes": num_classes, "input_shape": CIFAR_SHAPE, "input_dtype": "uint8",
            "source_files": sources}
    return train, test, info


