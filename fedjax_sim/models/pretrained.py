"""Pretrained weights for federated transfer learning: load a checkpoint into a model.

`load_pretrained(params, state, path)` takes the trees of a freshly initialised model
(`params, state = model.init(rng)`) and returns new trees in which every leaf the file
has a tensor for is replaced (cast to the leaf's dtype), plus a `LoadReport` saying what
was loaded, what the file had that the model does not use, and which leaves kept their
initial values. Nothing is modified in place.

Formats (chosen by the file's content and extension, or by `format=`):

    .safetensors   read with `safetensors.numpy`; torchvision / timm ResNet names are
                   converted (see the table below). Default `names='torchvision'`.
    .npz           arrays already in the model's layout, named by '/'-joined path
                   ('layer1/0/conv1/kernel'): fedjax_sim's `export_params` files and
                   big_vision / BiT-style exports. Default `names='identity'`.
    a directory    a fedjax_sim orbax checkpoint: a `Result.save` directory, or its
                   `arrays/` directory. Its 'params' tree is matched against `params` and
                   its 'model_state' tree against `state`, by path (the result of a
                   `with_trainable` model gives its frozen parameters back as
                   parameters); a checkpoint of a plain tree (no 'params' key) is matched
                   against both.
    .pth .pt .bin .ckpt .pkl .pickle, and any file that is a Python pickle or a PyTorch
                   zip archive: REFUSED. Unpickling a file can run arbitrary code, so
                   fedjax_sim never does it; convert such files to safetensors once where
                   PyTorch is installed:
                   `safetensors.torch.save_file(model.state_dict(), 'resnet50.safetensors')`.

torchvision / timm ResNet names (`names='torchvision'`), PyTorch layout -> fedjax_sim:

    PyTorch name                    PyTorch shape   fedjax_sim path                 shape
    ------------------------------  --------------  ------------------------------  ------------
    conv1.weight                    [O, I, H, W]    conv1/kernel                    [H, W, I, O]
    layer1.0.conv2.weight           [O, I, H, W]    layer1/0/conv2/kernel           [H, W, I, O]
    layer2.0.downsample.0.weight    [O, I, 1, 1]    layer2/0/downsample/0/kernel    [1, 1, I, O]
    bn1.weight, bn1.bias            [C]             bn1/scale, bn1/bias  (params)   [C]
    layer2.0.downsample.1.weight    [C]             layer2/0/downsample/1/scale     [C]
    bn1.running_mean, .running_var  [C]             bn1/mean, bn1/var    (state)    [C]
    bn1.num_batches_tracked         []              skipped
    fc.weight                       [out, in]       fc/kernel                       [in, out]
    fc.bias                         [out]           fc/bias                         [out]

In general: the name is split on '.' and joined with '/'; a `weight` of 2 or more
dimensions becomes `kernel` with the output and input axes moved last
([O, I, *spatial] -> [*spatial, I, O]); a 1-D `weight` becomes `scale` (BatchNorm,
GroupNorm, LayerNorm); `running_mean` / `running_var` become `mean` / `var`; every other
name keeps its last part. Where a converted name lands (params or state) is decided by
the target trees, so running statistics go to `state` when the model has them there
(BatchNorm) and are skipped and reported when it does not (GroupNorm). For other naming
schemes pass `names=` a function, which may build on `torchvision_name`.

Shapes: a tensor whose (converted) shape differs from the model's leaf is an error naming
both shapes, except for the classification head (paths under 'fc') and paths given in
`skip`: a 1000-class ImageNet head loaded into a 10-class model is reported as skipped and
the model's new head keeps its initial values.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Any, Callable, Iterable

import jax
import numpy as np

from fedjax_sim.errors import UserError
from fedjax_sim.trees import path_name as _path_name

PyTree = Any
NameFn = Callable[[str, np.ndarray], "str | tuple[str, np.ndarray] | None"]

FORMATS = ("auto", "safetensors", "npz", "orbax")
TORCH_EXTENSIONS = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pickle")
HEAD = ("fc",)  # target paths whose shape may differ from the file's: a new classifier

_SUFFIXES = {"running_mean": "mean", "running_var": "var"}
_NOT_WEIGHTS = {"num_batches_tracked": "BatchNorm batch counter, not a weight"}
_LISTED = 5  # names shown per list in messages and summaries


# -- the report -----------------------------------------------------------------------------
@dataclasses.dataclass
class LoadReport:
    """What `load_pretrained` did.

    source / format / names: the file or directory read, its format and the naming scheme.
    loaded: target paths (in `params` or `state`) whose values now come from the file.
    skipped: names of the file's tensors that were not used; `reasons[name]` says why
      (not in the model, a new head of another shape, listed in `skip`, a counter...).
    missing: target leaves the file has no tensor for; they keep their initial values.
    kept: target leaves the file does have but that were left at their initial values on
      purpose: a head whose shape differs from the file's, or paths listed in `skip`.
    params_loaded / params_total: numbers of trainable scalars loaded / in the model.
    state_loaded: number of non-trainable scalars (running statistics) loaded.
    """

    source: str
    format: str
    names: str
    loaded: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    reasons: dict[str, str] = dataclasses.field(default_factory=dict)
    missing: list[str] = dataclasses.field(default_factory=list)
    kept: list[str] = dataclasses.field(default_factory=list)
    params_loaded: int = 0
    params_total: int = 0
    state_loaded: int = 0

    def __str__(self) -> str:
        share = 100.0 * self.params_loaded / self.params_total if self.params_total else 0.0
        lines = [f"loaded {len(self.loaded)} arrays from {self.source} ({self.format}, "
                 f"{self.names} names): {self.params_loaded:,} of {self.params_total:,} "
                 f"parameters ({share:.1f}%) and {self.state_loaded:,} running-statistic values"]
        if self.kept:
            lines.append(f"kept at initial values on purpose ({len(self.kept)}): "
                         f"{_listing(self.kept)}")
        if self.missing:
            lines.append(f"missing from the file, kept at initial values ({len(self.missing)}): "
                         f"{_listing(self.missing)}")
        if self.skipped:
            groups: dict[str, list[str]] = {}  # reason -> names, in file order
            for name in self.skipped:
                groups.setdefault(self.reasons[name], []).append(name)
            shown = [f"{_listing(names)} ({reason})"
                     for reason, names in list(groups.items())[:_LISTED]]
            more = len(groups) - len(shown)
            lines.append(f"skipped from the file ({len(self.skipped)}): " + "; ".join(shown) +
                         (f"; ... and {more} more reasons" if more > 0 else ""))
        return "\n".join(lines)


def _listing(names: list[str]) -> str:
    more = len(names) - _LISTED
    return ", ".join(names[:_LISTED]) + (f", ... and {more} more" if more > 0 else "")


# -- names ----------------------------------------------------------------------------------
def torchvision_name(name: str, array: np.ndarray) -> tuple[str, np.ndarray] | None:
    """Converts one torchvision / timm ResNet tensor to fedjax_sim's (path, array), or
    None for tensors that are not weights (`num_batches_tracked`). See the module table."""
    *parents, last = name.split(".")
    if last in _NOT_WEIGHTS:
        return None
    if last == "weight":
        if array.ndim >= 2:  # conv [O, I, *spatial] / linear [O, I] -> [*spatial, I, O]
            order = (*range(2, array.ndim), 1, 0)
            return "/".join([*parents, "kernel"]), np.transpose(array, order)
        if array.ndim == 1:  # a normalization layer's per-channel scale
            return "/".join([*parents, "scale"]), array
    return "/".join([*parents, _SUFFIXES.get(last, last)]), array


def identity_name(name: str, array: np.ndarray) -> tuple[str, np.ndarray]:
    """Names that already are fedjax_sim paths ('layer1/0/conv1/kernel'), arrays unchanged."""
    return name, array


def _name_fn(names, fmt: str) -> tuple[NameFn, str]:
    if names is None or names == "auto":
        names = "torchvision" if fmt == "safetensors" else "identity"
    if names == "torchvision":
        return torchvision_name, "torchvision"
    if names == "identity":
        return identity_name, "identity"
    if callable(names):
        return names, getattr(names, "__name__", "custom")
    raise UserError(f"names={names!r} is not a naming scheme; use 'torchvision', 'identity' "
                    f"or a function (name, array) -> path | (path, array) | None")


# -- reading files --------------------------------------------------------------------------
@dataclasses.dataclass
class _Tensor:
    name: str           # as in the file, for the report
    array: np.ndarray
    tree: str | None    # 'params' / 'state' when the file says which tree it belongs to
    key: str = ""       # the name to convert: `name` less a tree prefix ('params/')

    def __post_init__(self):
        self.key = self.key or self.name


def _torch_refusal(path: str, what: str) -> UserError:
    stem = os.path.splitext(os.path.basename(path))[0] or "model"
    return UserError(
        f"{path} is {what}; fedjax_sim never unpickles files (unpickling can run arbitrary "
        f"code): convert it once where PyTorch is installed with "
        f"safetensors.torch.save_file(model.state_dict(), '{stem}.safetensors') "
        f"and load the .safetensors file")


def _sniff(path: str) -> str:
    """What the file's bytes say it is: 'safetensors', 'npz', 'torch-zip', 'pickle',
    'zip' (another zip archive) or 'unknown'. Reads headers only; unpickles nothing."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9:
        header_len = int.from_bytes(head[:8], "little")
        if 2 <= header_len <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(path) as z:
                members = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return "unknown"
        if any(m.endswith(".pkl") for m in members):
            return "torch-zip"
        if members and all(m.endswith(".npy") for m in members):
            return "npz"
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and head[1] <= 5:  # pickle PROTO opcode
        return "pickle"
    return "unknown"


def _is_orbax_dir(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f))
               for f in ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt"))


def _detect(path: str, fmt: str) -> str:
    """The format to read `path` with, refusing pickles whatever `fmt` says."""
    if fmt not in FORMATS:
        raise UserError(f"format={fmt!r} is not supported; use one of {', '.join(FORMATS)}")
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}; check the path")
    if os.path.isdir(path):
        if fmt not in ("auto", "orbax"):
            raise UserError(f"{path} is a directory, not a {fmt} file; pass the file's path, "
                            f"or format='orbax' for a fedjax_sim checkpoint directory")
        return "orbax"
    if path.lower().endswith(TORCH_EXTENSIONS):
        raise _torch_refusal(path, "a PyTorch pickle checkpoint (by its extension)")
    kind = _sniff(path)
    if kind == "torch-zip":
        raise _torch_refusal(path, "a PyTorch checkpoint (a zip archive holding a pickle)")
    if kind == "pickle":
        raise _torch_refusal(path, "a Python pickle")
    if fmt == "orbax":
        raise UserError(f"{path} is a file, not an orbax checkpoint directory; pass the "
                        f"directory Result.save wrote, or format='auto'")
    if fmt != "auto":
        return fmt
    if kind in ("safetensors", "npz"):
        return kind
    ext = os.path.splitext(path)[1].lower()
    if ext in (".safetensors", ".npz"):
        return ext[1:]  # let the reader say what is wrong with it
    raise UserError(f"{path} is not a checkpoint fedjax_sim can read (not safetensors, .npz "
                    f"or an orbax directory); pass a .safetensors or .npz file")


def _read_safetensors(path: str) -> list[_Tensor]:
    from safetensors.numpy import load_file

    try:
        arrays = load_file(path)
    except Exception as e:  # SafetensorError, OSError, ...: a damaged or foreign file
        raise UserError(f"{path} is not a readable safetensors file ({_short(e)}); "
                        f"re-create it with safetensors' save_file") from None
    return [_Tensor(name, arrays[name], None) for name in sorted(arrays)]


def _read_npz(path: str) -> list[_Tensor]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return [_Tensor(name, npz[name], None) for name in sorted(npz.files)]
    except Exception as e:  # bad zip, object arrays (which would need pickle), ...
        raise UserError(f"{path} is not a readable .npz file of numeric arrays ({_short(e)}); "
                        f"write it with numpy.savez or fedjax_sim's export_params") from None


def _read_orbax(path: str) -> list[_Tensor]:
    import logging

    import orbax.checkpoint as ocp

    arrays_dir = os.path.join(path, "arrays")
    if not os.path.isdir(arrays_dir):
        arrays_dir = path
    if not _is_orbax_dir(arrays_dir):
        raise UserError(f"{path} is neither a saved Result (Result.save) nor an orbax "
                        f"checkpoint directory; pass a .safetensors / .npz file or such a "
                        f"directory")
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        with ocp.StandardCheckpointer() as ckpt:
            tree = ckpt.restore(os.path.abspath(arrays_dir))
    except Exception as e:
        raise UserError(f"cannot read the orbax checkpoint in {arrays_dir} ({_short(e)}); "
                        f"check that it was completely written") from None
    if isinstance(tree, dict) and "params" in tree:
        parts = [("params", tree["params"], "params")]
        model_state = tree.get("model_state")
        if isinstance(model_state, dict) and set(model_state) == {"frozen", "model"}:
            # A `with_trainable` model's result: its frozen parameters are parameters of
            # the underlying model, and its inner state is that model's state.
            parts.append(("model_state/frozen", model_state["frozen"], "params"))
            parts.append(("model_state/model", model_state["model"], "state"))
        elif model_state is not None:
            parts.append(("model_state", model_state, "state"))
    else:
        parts = [("", tree, None)]
    out = []
    for prefix, subtree, which in parts:
        for name, leaf in _flatten(subtree):
            out.append(_Tensor(f"{prefix}/{name}" if prefix else name, np.asarray(leaf),
                               which, key=name))
    return out


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160]}" if text else type(error).__name__


# -- trees ----------------------------------------------------------------------------------


def _flatten(tree: PyTree) -> list[tuple[str, Any]]:
    return [(_path_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _expected(x, tree: str) -> bool:
    """Whether a target leaf should come from a checkpoint (counts as missing if it does
    not): every trainable leaf, and floating-point state (not RNG counters)."""
    return tree == "params" or np.issubdtype(np.asarray(x).dtype, np.floating)


def _under(path: str, prefixes: Iterable[str], sep: str = "/") -> bool:
    return any(path == p or path.startswith(p.rstrip(sep) + sep) for p in prefixes)


def _cast(value: np.ndarray, target):
    """`value` with the target leaf's dtype, as the same kind of array (jax arrays keep
    their sharding)."""
    if isinstance(target, jax.Array):
        return jax.device_put(np.asarray(value, dtype=target.dtype), target.sharding)
    return np.array(value, dtype=np.asarray(target).dtype)


def _shape(shape) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


# -- loading --------------------------------------------------------------------------------
def load_pretrained(
    params: PyTree,
    state: PyTree,
    path: str | os.PathLike,
    *,
    format: str = "auto",
    names: str | NameFn | None = None,
    strict: bool = False,
    skip: Iterable[str] = (),
    strip_prefix: str | None = None,
) -> tuple[PyTree, PyTree, LoadReport]:
    """Loads pretrained weights from `path` into copies of a model's `params` and `state`.

    Args:
      params, state: the model's initial trees (`model.init(rng)`); they define which
        leaves exist, their shapes and dtypes. They are not modified.
      path: a .safetensors or .npz file, or a fedjax_sim orbax directory (`Result.save`).
        PyTorch pickles (.pth, .pt, .bin, .ckpt, or pickle / torch-zip content) are refused.
      format: 'auto' (by content and extension), 'safetensors', 'npz' or 'orbax'.
      names: how the file's names become model paths: 'torchvision' (PyTorch ResNet names
        and layouts, see the module docstring), 'identity' (names are '/'-joined paths,
        arrays already in the model's layout), or a function `(name, array) -> path |
        (path, array) | None` (None: skip the tensor). Default: 'torchvision' for
        safetensors, 'identity' otherwise.
      strict: if True, target leaves the file has no tensor for are an error (leaves in
        `skip` and a head of another shape are still allowed).
      skip: target paths or prefixes ('fc', 'layer4/2/conv3/kernel') or file names /
        prefixes ('fc.weight', 'fc') never to load: those leaves keep their initial values.
      strip_prefix: removed from the start of the file's names before conversion, e.g.
        'module.' (DataParallel) or 'params/'.

    Returns:
      (params, state, report): new trees with the loaded leaves replaced (each cast to its
      target leaf's dtype) and a `LoadReport` (`print(report)` summarises it).

    Raises:
      UserError: unreadable or refused file, a non-head tensor whose shape differs from the
        model's, two tensors for one leaf, nothing matching at all, or (strict) missing
        leaves.
    """
    path = os.fspath(path)
    skip = tuple(skip) if not isinstance(skip, str) else (skip,)
    fmt = _detect(path, format)
    rename, names_label = _name_fn(names, fmt)
    tensors = {"safetensors": _read_safetensors, "npz": _read_npz,
               "orbax": _read_orbax}[fmt](path)
    where = os.path.basename(os.path.normpath(path)) or path

    # PRNG key leaves (RNG streams in an NNX state) are never loaded: they are not weights.
    targets = {tree: {p: x for p, x in _flatten(t) if not _is_key(x)}
               for tree, t in (("params", params), ("state", state))}
    # Linen models keep BatchNorm statistics under a 'batch_stats' collection.
    state_alias = {p.split("/", 1)[1]: p for p in targets["state"]
                   if p.startswith("batch_stats/")}
    report = LoadReport(source=path, format=fmt, names=names_label)
    new: dict[str, dict[str, Any]] = {"params": {}, "state": {}}
    origin: dict[tuple[str, str], str] = {}  # (tree, path) -> file name that filled it

    def drop(name: str, reason: str) -> None:
        report.skipped.append(name)
        report.reasons[name] = reason

    for t in tensors:
        name = t.key
        if strip_prefix and name.startswith(strip_prefix):
            name = name[len(strip_prefix):]
        converted = rename(name, t.array)
        if converted is None:
            drop(t.name, _NOT_WEIGHTS.get(name.rsplit(".", 1)[-1], "dropped by names="))
            continue
        target_path, array = ((converted, t.array) if isinstance(converted, str)
                              else converted)
        array = np.asarray(array)
        tree, leaf_path = _find(targets, state_alias, target_path, t.tree)
        if (_under(name, skip, ".") or _under(name, skip, "/")
                or (tree is not None and _under(leaf_path, skip))):
            if tree is not None and leaf_path not in report.kept:
                report.kept.append(leaf_path)
            drop(t.name, "listed in skip")
            continue
        if tree is None:
            stats = target_path.rsplit("/", 1)[-1] in ("mean", "var")
            drop(t.name, "the model keeps no running statistics there, as with GroupNorm"
                 if stats else f"the model has no leaf {target_path}")
            continue
        target = targets[tree][leaf_path]
        if tuple(array.shape) != tuple(np.shape(target)):
            if _under(leaf_path, HEAD):
                report.kept.append(leaf_path)
                drop(t.name, f"new head: the file's {leaf_path} is {_shape(array.shape)}, "
                             f"the model's {_shape(np.shape(target))}")
                continue
            raise UserError(
                f"tensor {t.name!r} in {where} has shape {_shape(array.shape)} (as "
                f"{leaf_path}, after conversion) but the model's {leaf_path} is "
                f"{_shape(np.shape(target))}; load a checkpoint of the same architecture "
                f"or pass skip=({leaf_path!r},) to keep that leaf's initial value")
        if (tree, leaf_path) in origin:
            raise UserError(f"{where} has two tensors for the model's {leaf_path} "
                            f"({origin[tree, leaf_path]!r} and {t.name!r}); pass skip= or "
                            f"names= to choose one")
        origin[tree, leaf_path] = t.name
        new[tree][leaf_path] = _cast(array, target)
        report.loaded.append(leaf_path)
        if tree == "params":
            report.params_loaded += int(array.size)
        else:
            report.state_loaded += int(array.size)

    kept = set(report.kept)
    for tree in ("params", "state"):
        for leaf_path, x in targets[tree].items():
            if leaf_path not in new[tree] and leaf_path not in kept and _expected(x, tree):
                report.missing.append(leaf_path)
    report.params_total = int(sum(np.size(x) for x in targets["params"].values()))

    if not report.loaded:
        file_names = _listing([t.name for t in tensors]) or "no tensors"
        model_paths = _listing(list(targets["params"])) or "no leaves"
        raise UserError(f"nothing in {where} matched the model (file: {file_names}; model: "
                        f"{model_paths}); pass names= (e.g. names='torchvision' or a function) "
                        f"or strip_prefix= to map the file's names to the model's paths")
    if strict and report.missing:
        raise UserError(f"strict=True but {len(report.missing)} model leaves have no tensor in "
                        f"{where} ({_listing(report.missing)}); check that the checkpoint is "
                        f"of the same architecture, or pass strict=False to keep them at "
                        f"their initial values")

    return _replace(params, new["params"]), _replace(state, new["state"]), report


def _find(targets, state_alias, target_path: str, hint: str | None):
    """(tree, leaf path) of the target leaf a converted name refers to, or (None, None)."""
    for tree in (("params", "state") if hint is None else (hint,)):
        if target_path in targets[tree]:
            return tree, target_path
        if tree == "state" and target_path in state_alias:
            return tree, state_alias[target_path]
    return None, None


def _replace(tree: PyTree, values: dict[str, Any]) -> PyTree:
    """A copy of `tree` with the leaves at the paths in `values` replaced."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves = [values.get(_path_name(p), x) for p, x in flat]
    return jax.tree_util.tree_unflatten(treedef, leaves)
