"""How a checkpoint's tensor names become fedjax_sim model paths (`names=` of
`load_pretrained`).

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
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from fedjax_sim.errors import UserError
from fedjax_sim.trees import path_name

PyTree = Any
NameFn = Callable[[str, np.ndarray], "str | tuple[str, np.ndarray] | None"]

_SUFFIXES = {"running_mean": "mean", "running_var": "var"}
# Tensors that are not weights, with the reason the report gives for skipping them.
NOT_WEIGHTS = {"num_batches_tracked": "BatchNorm batch counter, not a weight"}


def torchvision_name(name: str, array: np.ndarray) -> tuple[str, np.ndarray] | None:
    """Converts one torchvision / timm ResNet tensor to fedjax_sim's (path, array), or
    None for tensors that are not weights (`num_batches_tracked`). See the module table."""
    *parents, last = name.split(".")
    if last in NOT_WEIGHTS:
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


def name_fn(names, fmt: str) -> tuple[NameFn, str]:
    """The naming function `names=` asks for and its label for the report; by default
    'torchvision' for safetensors files and 'identity' otherwise."""
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


def flatten(tree: PyTree) -> list[tuple[str, Any]]:
    """(path, leaf) of every leaf of `tree`, paths '/'-joined ('layer1/0/conv1/kernel')."""
    return [(path_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
