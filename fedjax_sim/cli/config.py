"""Configs are plain Python files with `get_config()` returning an `ml_collections.ConfigDict`.

`load_config(path, overrides)` runs the file and applies command-line overrides of the form
`--config.algorithm.client_optimizer.learning_rate=0.05`. A value is parsed as a Python
literal when it is one (`0.05`, `None`, `[200, 200]`, `True`), else kept as a string.
Overriding a key the config does not have is an error that lists the keys it does have.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os

import ml_collections

from fedjax_sim.errors import UserError


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in config.items():
        path = f"{prefix}{k}"
        keys.append(path)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(_flat_keys(v, path + "."))
    return keys


def apply_override(config: ml_collections.ConfigDict, key: str, value) -> None:
    """Sets `config.<key> = value` where `key` is dotted; the key must already exist."""
    node = config
    parts = key.split(".")
    for i, part in enumerate(parts):
        is_last = i == len(parts) - 1
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            known = _flat_keys(config)
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UserError(f"unknown config key {key!r}; {hint}known keys: {', '.join(known)}")
        if is_last:
            node[part] = value
        else:
            node = node[part]


def load_config(path: str, overrides: dict[str, str] | None = None) -> ml_collections.ConfigDict:
    """Runs `get_config()` from the file at `path` and applies string overrides."""
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} does not exist; pass e.g. --config configs/digits_fedavg.py")
    spec = importlib.util.spec_from_file_location("fedjax_sim_user_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UserError(f"config file {path!r} has no get_config() function; define one that "
                        f"returns an ml_collections.ConfigDict")
    config = module.get_config()
    # Type safety off: an override may turn 'auto' into 3 or None into a list; values are
    # checked when the experiment is built, with messages that name the key.
    config = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
    for key, text in (overrides or {}).items():
        apply_override(config, key, _parse_value(text))
    return config
