"""Natural federated datasets from files on disk: TensorFlow Federated HDF5 and LEAF JSON.

These datasets come split by their real users (writers, speaking roles, ...), so no
partitioner is involved: every user becomes one client, with the clients in sorted id
order (Python string order) whatever the order in the file.

TensorFlow Federated HDF5 (the files `tff.simulation.datasets` caches, e.g.
fed_emnist_train.h5): one dataset per client and feature,

    /examples/<client_id>/<feature>     leading axis = that client's examples; all
                                        features of one client have the same length

  EMNIST         pixels float32 [n, 28, 28] in [0, 1], label int32 [n]: 62 classes
                 (fed_emnist_*.h5) or 10 (fed_emnist_digitsonly_*.h5)
  Shakespeare    snippets: strings [n], one speaking part's lines each
  CIFAR-100      image uint8 [n, 32, 32, 3], label [n] (100 classes), coarse_label [n] (20)
  StackOverflow  tokens, title, tags: strings [n]

LEAF JSON: one split (e.g. data/train) is one .json file or a directory of them, with the
users of all files of a directory put together,

    {"users": [uid, ...], "num_samples": [n, ...],
     "user_data": {uid: {"x": [... n items ...], "y": [... n items ...]}, ...}}

  FEMNIST      x: 784 floats in [0, 1] per example (a 28 x 28 image, row-major),
               y: int in [0, 62)
  Shakespeare  x: a string of 80 characters, y: the character that follows it

`load_tff_h5` and `load_leaf` read any such file into one `FederatedData` (features under
their names in the file, resp. 'x' and 'y'). The dataset loaders (`tff_emnist`,
`tff_shakespeare`, `tff_cifar100`, `leaf_femnist`, `leaf_shakespeare`) return
`(train, test, info)`: the training clients, the test clients (None without a test path;
each keeps its own ids, so a client of both files is the same user) and an `info` dict
with what a model needs (`num_classes`, `input_shape`, `input_dtype`, for text also
`vocab_size`, `seq_len`, `pad_id`) and `source_files`. Their features are `x` (uint8
images or int32 character ids) and `y` (int32 labels or per-position next-character ids,
see `fedjax_sim.data.text`).

Bad input raises `UserError` with a one-line message naming the file, the client and the
field. A training client without examples is an error unless `drop_empty=True`, which
drops such clients (and, to keep the splits aligned, the same ids and any empty clients
from test).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np

from fedjax_sim.data import text
from fedjax_sim.data.federated_data import FederatedData
from fedjax_sim.errors import UserError

__all__ = [
    "leaf_femnist",
    "leaf_shakespeare",
    "load_leaf",
    "load_tff_h5",
    "tff_cifar100",
    "tff_emnist",
    "tff_shakespeare",
]

PathLike = Union[str, "os.PathLike[str]"]
# Converts one client's array of a feature; raises UserError (without naming the file or
# client, which the reader adds) on bad values.
Converter = Callable[[np.ndarray], np.ndarray]
Info = dict[str, Any]

EMNIST_CLASSES = 62
EMNIST_DIGITS = 10
CIFAR100_CLASSES = {"label": 100, "coarse_label": 20}
IMAGE_28 = (28, 28)
CIFAR_SHAPE = (32, 32, 3)


# ---------------------------------------------------------------------------- shared


def _existing(path: PathLike, what: str) -> str:
    """`path` as a str, checked to exist."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise UserError(f"{p}: no such file or directory; check the path to the {what}")
    return p


def _pixels_to_uint8(pixels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
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


def _int_labels(labels: np.ndarray) -> np.ndarray:
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


def _check_labels(data: FederatedData, key: str, num_classes: int, files: Sequence[str],
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


def _finish(train: FederatedData, train_files: Sequence[str], test: FederatedData | None,
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


def _renamed(data: FederatedData, names: Mapping[str, str]) -> FederatedData:
    """The same clients with features renamed {old: new} (others left out)."""
    return FederatedData({new: data.features[old] for old, new in names.items()},
                         data.offsets, data.client_ids)


def _snippet_sequences(data: FederatedData, key: str, seq_len: int) -> FederatedData:
    """Each client's snippets (object array `key`) as TFF-style sequences x, y."""
    snippets = data.features[key].tolist()
    x, y = text.snippets_to_sequences(snippets, seq_len)
    ends = np.concatenate([[0], np.cumsum(text.chunks_per_snippet(snippets, seq_len))])
    return FederatedData({"x": x, "y": y}, ends[data.offsets].astype(np.int64), data.client_ids)


def _text_info(seq_len: int, sources: dict[str, list[str] | None]) -> Info:
    return {
        "num_classes": text.VOCAB_SIZE,
        "vocab_size": text.VOCAB_SIZE,
        "pad_id": text.PAD,
        "seq_len": seq_len,
        "input_shape": (seq_len,),
        "input_dtype": "int32",
        "source_files": sources,
    }


# ---------------------------------------------------------------------------- TFF HDF5


def _read_tff(path: PathLike, features: Sequence[str] | None,
              convert: Mapping[str, Converter] | None = None) -> FederatedData:
    """Reads examples/<client_id>/<feature> of every client into one FederatedData.

    Strings come back as object arrays of str (decoded as UTF-8). A feature with a
    converter is read client by client and converted (e.g. to a smaller dtype) before it
    goes into the concatenated array; other numeric features are read straight into it.
    Either way each client dataset is read once and the output arrays are allocated once.
    """
    import h5py

    path = _existing(path, "HDF5 file")
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
        examples = handle.get("examples")
        if not isinstance(examples, h5py.Group):
            raise UserError(
                f"{path}: no 'examples' group (top level has {sorted(handle)[:5]}); TFF "
                f"files store one dataset per client at examples/<client_id>/<feature>")
        ids = sorted(examples)
        if not ids:
            raise UserError(f"{path}: the 'examples' group has no clients; check the file")
        groups = []
        for cid in ids:
            group = examples[cid]
            if not isinstance(group, h5py.Group):
                raise UserError(
                    f"{path}: examples/{cid} is a dataset, not a client group; TFF files "
                    f"store one dataset per client at examples/<client_id>/<feature>")
            groups.append(group)
        names = list(features) if features is not None else sorted(groups[0])
        if not names:
            raise UserError(f"{path}: client {ids[0]!r} has no features; check the file")

        # Metadata pass: shapes and dtypes only, no data read yet.
        sizes = np.zeros(len(ids), np.int64)
        datasets: list[dict[str, Any]] = []
        example_shape: dict[str, tuple[tuple[int, ...], str]] = {}
        dtypes: dict[str, list[np.dtype]] = {name: [] for name in names}
        is_string: dict[str, bool] = {}
        for i, (cid, group) in enumerate(zip(ids, groups)):
            found = {}
            for name in names:
                dset = group.get(name)
                if not isinstance(dset, h5py.Dataset):
                    raise UserError(
                        f"{path}: client {cid!r} has no feature {name!r} (examples/{cid}/"
                        f"{name}); it has {sorted(group)}; check that this is the right file or "
                        f"load only features every client has")
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
                found[name] = dset
            lengths = {name: int(d.shape[0]) for name, d in found.items()}
            if len(set(lengths.values())) > 1:
                raise UserError(
                    f"{path}: client {cid!r} has features of different lengths {lengths}; "
                    f"every feature of a client needs one entry per example")
            sizes[i] = next(iter(lengths.values()))
            datasets.append(found)

        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
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


def _tff_pair(train_path: PathLike, test_path: PathLike | None,
              load: Callable[[PathLike], FederatedData], drop_empty: bool,
              ) -> tuple[FederatedData, FederatedData | None, dict[str, list[str] | None]]:
    train = load(train_path)
    test = load(test_path) if test_path is not None else None
    train_file = os.fspath(train_path)
    train, test = _finish(train, [train_file] * train.num_clients, test, drop_empty, "client")
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
            "pixels": lambda p: _pixels_to_uint8(p, IMAGE_28), "label": _int_labels})
        data = _renamed(data, {"pixels": "x", "label": "y"})
        _check_labels(data, "y", num_classes, [os.fspath(path)] * data.num_clients, "client",
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
    return train, test, _text_info(seq_len, sources)


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
        data = _read_tff(path, ["image", label], {"image": _cifar_images, label: _int_labels})
        data = _renamed(data, {"image": "x", label: "y"})
        _check_labels(data, "y", num_classes, [os.fspath(path)] * data.num_clients, "client",
                      f"CIFAR-100 {label} values are 0..{num_classes - 1}")
        return data

    train, test, sources = _tff_pair(train_path, test_path, load, drop_empty)
    info = {"num_classes": num_classes, "input_shape": CIFAR_SHAPE, "input_dtype": "uint8",
            "source_files": sources}
    return train, test, info


# ---------------------------------------------------------------------------- LEAF JSON


def _leaf_files(path: PathLike) -> list[str]:
    """The .json files of one split: the file itself, or a directory's *.json (sorted)."""
    p = _existing(path, "LEAF .json file or directory")
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
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return FederatedData(features, offsets, tuple(ids)), [f for f, _ in owners], files


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
        _check_labels(data, "y", num_classes, owners, "user",
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
    train, test = _finish(train, owners, test, drop_empty, "user")
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
    return _pixels_to_uint8(pixels.reshape(-1, *IMAGE_28), IMAGE_28)


def _femnist_y(raw: list) -> np.ndarray:
    return _int_labels(_numeric(raw))


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
        _check_labels(data, "y", EMNIST_CLASSES, owners, "user", "FEMNIST labels are 0..61")
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
    return train, test, _text_info(seq_len, sources)
