"""How the project names a leaf of a pytree: its path, '/'-joined ('hidden/0/kernel').

One rule for every place that shows or matches leaves by name: exported parameters,
checkpoint specs, personal heads, trainable selections, pretrained weights and
normalisation statistics.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

PyTree = Any


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


def split(tree: PyTree, keep: Callable[[str], bool]) -> tuple[dict, dict]:
    """(selected, rest): two nested dicts holding the leaves of `tree` (a nested dict)
    whose path `keep` accepts, and the others, each in the original nesting."""
    chosen, rest = {}, {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = path_keys(path)
        node = chosen if keep(path_name(path)) else rest
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = leaf
    return chosen, rest


def merge(a: dict, b: dict) -> dict:
    """The union of two nested dicts; where both hold a leaf at the same path, `b`'s."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
