"""Configs are plain Python files with `get_config()` returning an `ml_collections.ConfigDict`.

`load_config(path, overrides)` runs the file and applies command-line overrides of the form
`--config.algorithm.client_optimizer.learning_rate=0.05`. A value is parsed as a Python
literal when it is one (`0.05`, `None`, `[200, 200]`, `True`, or a section written as
`dict(name='krum', num_byzantine=4)`), else kept as a string.

An override may set any documented key (`layout.keys_at`), also one the file leaves out: a
missing section on the way is created empty (its keys take their defaults), and a section
the file set to None (or `preprocess='auto'`, `model.pretrained='PATH'`) becomes one.
`validate_config` then checks the result as it checks a file. Overriding a key that is
documented nowhere is an error that suggests the closest documented key and lists the
keys of that section.

A file that does not run (a syntax error, an exception), has no `get_config()`, or whose
`get_config()` fails or returns something else is a `UserError` naming the file, the line
where there is one, and the fix.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import traceback

import ml_collections

from fedjax_sim.errors import UserError
from fedjax_sim.cli import layout
from fedjax_sim.cli.rules import show, unknown_key


def _literal(node: ast.AST):
    """A Python literal, where `dict(key=literal, ...)` (as config files write sections)
    counts as one too."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict"
            and not node.args and all(k.arg is not None for k in node.keywords)):
        return {k.arg: _literal(k.value) for k in node.keywords}
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_literal(e) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


def _parse_value(text: str):
    try:
        return _literal(ast.parse(text.strip(), mode="eval").body)
    except (ValueError, SyntaxError, TypeError):
        return text


def _new_section(path: str, old) -> ml_collections.ConfigDict:
    """A section in place of `old` (absent, None, or a shorthand the section replaces)."""
    if old is None or (path == "preprocess" and old == "auto"):
        return ml_collections.ConfigDict(type_safe=False)
    if path == "model.pretrained" and isinstance(old, str):
        return ml_collections.ConfigDict({"path": old}, type_safe=False)
    raise UserError(f"cannot set a key under config.{path}: it is {show(old)}, not a section; "
                    f"set --config.{path}=... to a whole value instead")


def apply_override(config: ml_collections.ConfigDict, key: str, value) -> None:
    """Sets `config.<key> = value` where `key` is dotted and documented (or already in the
    config), creating the sections on the way (see the module doc)."""
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts):
        path = tuple(parts[:i])
        if part not in node:
            try:
                known = layout.keys_at(config, path, any_algorithm=True)
            except KeyError:  # below a section the layout does not describe
                known = tuple(node.keys())
            if known is not layout.FREE and part not in known:
                rest = "".join(f".{p}" for p in parts[i + 1:])
                raise unknown_key(".".join(path), part, known, rest)
        if i == len(parts) - 1:
            node[part] = value
            return
        child = node[part] if part in node else None
        if not isinstance(child, ml_collections.ConfigDict):
            node[part] = _new_section(".".join(parts[:i + 1]), child)
            child = node[part]
        node = child


def _where(error: BaseException, path: str) -> str:
    """' (line N)' of the innermost traceback frame in the config file, if any."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if os.path.abspath(f.filename) == os.path.abspath(path)]
    return f" (line {frames[-1].lineno})" if frames else ""


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


def _run_file(path: str):
    """The config file as a module."""
    spec = importlib.util.spec_from_file_location("fedjax_sim_user_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise UserError(f"config file {path!r} has a syntax error at line {e.lineno}: {e.msg}; "
                        f"fix that line") from e
    except Exception as e:  # noqa: BLE001 - anything the user's file raises
        raise UserError(f"config file {path!r} failed to run{_where(e, path)}: {_one_line(e)}; "
                        f"fix the file (--debug shows the traceback)") from e
    return module


def _get_config(path: str) -> ml_collections.ConfigDict:
    """Runs the file's get_config() and checks what it returns."""
    module = _run_file(path)
    if not callable(getattr(module, "get_config", None)):
        raise UserError(f"config file {path!r} has no get_config() function; define one that "
                        f"returns an ml_collections.ConfigDict")
    try:
        config = module.get_config()
    except Exception as e:  # noqa: BLE001
        raise UserError(f"config file {path!r}: get_config() raised {_one_line(e)}"
                        f"{_where(e, path)}; fix get_config() in that file (--debug shows the "
                        f"traceback)") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(f"config file {path!r}: get_config() returned a "
                        f"{type(config).__name__}, not an ml_collections.ConfigDict; build the "
                        f"config as c = ml_collections.ConfigDict() and return c")
    return config


def load_config(path: str, overrides: dict[str, str] | None = None) -> ml_collections.ConfigDict:
    """Runs `get_config()` from the file at `path` and applies string overrides."""
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} does not exist; pass e.g. --config configs/digits_fedavg.py")
    # Type safety off: an override may turn 'auto' into 3 or None into a list; values are
    # checked when the experiment is built, with messages that name the key.
    config = ml_collections.ConfigDict(_get_config(path).to_dict(), type_safe=False)
    for key, text in (overrides or {}).items():
        apply_override(config, key, _parse_value(text))
    return config
