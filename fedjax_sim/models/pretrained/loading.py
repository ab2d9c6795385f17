"""`load_pretrained`: a checkpoint's tensors matched to a model's leaves, and its report.

Shapes: a tensor whose (converted) shape differs from the model's leaf is an error naming
both shapes, except for the classification head (paths under 'fc') and paths given in
`skip`: a 1000-class ImageNet head loaded into a 10-class model is reported as skipped and
the model's new head keeps its initial values.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable

import jax
import numpy as np

from fedjax_sim.errors import UserError
from fedjax_sim.models.pretrained.names import NOT_WEIGHTS, NameFn, PyTree, flatten, name_fn
from fedjax_sim.models.pretrained.readers import detect, read
from fedjax_sim.trees import path_name

HEAD = ("fc",)  # target paths whose shape may differ from the file's: a new classifier
_LISTED = 5  # names shown per list in messages and summaries


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
      params: the model's initial parameters (`params, state = model.init(rng)`); with
        `state`, they define which leaves exist, their shapes and dtypes. Not modified.
      state: the model's initial state (see `params`). Not modified.
      path: a .safetensors or .npz file, or a fedjax_sim orbax directory (`Result.save`).
        PyTorch pickles (.pth, .pt, .bin, .ckpt, or pickle / torch-zip content) are refused.
      format: 'auto' (by content and extension), 'safetensors', 'npz' or 'orbax'.
      names: how the file's names become model paths: 'torchvision' (PyTorch ResNet names
        and layouts, see `fedjax_sim.models.pretrained.names`), 'identity' (names are '/'-joined paths,
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
    fmt = detect(path, format)
    rename, names_label = name_fn(names, fmt)
    tensors = read(path, fmt)
    where = os.path.basename(os.path.normpath(path)) or path

    # PRNG key leaves (RNG streams in an NNX state) are never loaded: they are not weights.
    targets = {tree: {p: x for p, x in flatten(t) if not _is_key(x)}
               for tree, t in (("params", params), ("state", state))}
    # Linen models keep BatchNorm statistics under a 'batch_stats' collection.
    state_alias = {p.split("/", 1)[1]: p for p in targets["state"]
                   if p.startswith("batch_stats/")}
    report = LoadReport(source=path, format=fmt, names=names_label)
    new = _match(tensors, targets, state_alias, rename, skip, strip_prefix, where, report)

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


def _match(tensors, targets, state_alias, rename, skip, strip_prefix, where,
           report: LoadReport) -> dict[str, dict[str, Any]]:
    """{tree: {leaf path: new value}} for the file's tensors that fill a model leaf; the
    rest are recorded in `report` as skipped, with the reason."""
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
            drop(t.name, NOT_WEIGHTS.get(name.rsplit(".", 1)[-1], "dropped by names="))
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
    return new


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
    leaves = [values.get(path_name(p), x) for p, x in flat]
    return jax.tree_util.tree_unflatten(treedef, leaves)
