"""How the project names a leaf of a pytree: its path, '/'-joined ('hidden/0/kernel').

One rule for every place that shows or matches leaves by name: exported parameters,
checkpoint specs, personal heads and pretrained weights.
"""

from __future__ import annotations


def path_name(path) -> str:
    """'/'-joined keys, attribute names and indices of a `tree_flatten_with_path` path."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)
