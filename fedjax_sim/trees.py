"""How the project names a leaf of a pytree: its path, '/'-joined ('hidden/0/kernel').

One rule for every place that shows or matches leaves by name: exported parameters,
checkpoint specs, personal heads, trainable selections and pretrained weights.
"""

from __future__ import annotations

from typing import Any

import jax


def path_keys(path) -> list:
    """The raw keys, attribute names and indices of a `tree_flatten_with_path` path."""
    keys = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                keys.append(getattr(entry, attr))
                break
        else:
            keys.append(entry)
    return keys


def path_name(path) -> str:
    """'/'-joined keys, attribute names and indices of a `tree_flatten_with_path` path."""
    return "/".join(str(k) for k in path_keys(path))


def path_names(tree: Any) -> list[str]:
    """'a/b/c' names of the leaves of `tree`, in flattening order."""
    return [path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def under(name: str, prefix: str) -> bool:
    """Whether leaf `name` is `prefix` itself or lies below it ('out' covers 'out/kernel',
    not 'outer/kernel')."""
    prefix = prefix.strip("/")
    return name == prefix or name.startswith(prefix + "/")
