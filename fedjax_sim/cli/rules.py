"""The value rules of config keys and the few checkers every check uses.

A `Rule` is a predicate and the words for what it allows; a failed check reads

    config.algorithm.batch_size must be an integer >= 1, got 0

`check` applies a rule, `check_choice` a set of names (`config.task='ranking' is not a
known task; choose one of [...]`), `check_keys` a section's known keys (`unknown config
key ... did you mean ...`) and `check_args` a free-form argument dict against the signature
of the function it is passed to. Rules are keyed by parameter name: `ARG_RULES` for the
arguments of partitioners and zoo models, `ALGORITHM_RULES` for the algorithm builders'
parameters, `DATA_RULES` for the data sources' keys; tests keep them complete.
"""

from __future__ import annotations

import difflib
import inspect
import math
from typing import Any, Callable, NamedTuple

import ml_collections
import numpy as np

from fedjax_sim.errors import UserError


class Rule(NamedTuple):
    ok: Callable[[Any], bool]
    allowed: str  # "an integer >= 1"

    def error(self, name: str, value, hint: str = "") -> UserError:
        return UserError(f"{name} must be {self.allowed}, got {show(value)}{hint}")


# -- predicates and rules -----------------------------------------------------------------
def is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def is_section(v) -> bool:
    return isinstance(v, (ml_collections.ConfigDict, dict))


def int_at_least(low: int) -> Rule:
    return Rule(lambda v: is_int(v) and v >= low, f"an integer >= {low}")


def number_above(low: float) -> Rule:
    return Rule(lambda v: is_number(v) and math.isfinite(v) and v > low, f"a number > {low:g}")


def number_at_least(low: float) -> Rule:
    return Rule(lambda v: is_number(v) and math.isfinite(v) and v >= low, f"a number >= {low:g}")


def one_of(choices) -> Rule:
    return Rule(lambda v: isinstance(v, str) and v in choices, f"one of {list(choices)}")


def or_none(rule: Rule, allowed: str | None = None) -> Rule:
    """`rule`, or None."""
    return Rule(lambda v: v is None or rule.ok(v), allowed or f"None or {rule.allowed}")


def _names(v) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(h, str) and h for h in v)


POSITIVE_INT = int_at_least(1)
BOOL = Rule(lambda v: isinstance(v, (bool, np.bool_)), "True or False")
STRING_OR_NONE = Rule(lambda v: v is None or isinstance(v, str), "a string or None")
FRACTION = Rule(lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)")
LAYER_SIZES = Rule(lambda v: isinstance(v, (list, tuple)) and all(is_int(h) and h >= 1 for h in v),
                   "a list of integers >= 1")
NONEMPTY_STRING = Rule(lambda v: isinstance(v, str) and len(v) > 0, "a non-empty string")
# A parameter path prefix ('out'), a '+'-joined list of them, or a list.
PATHS = Rule(lambda v: (isinstance(v, str) and len(v) > 0) or _names(v), "a path prefix or a list")

DENSE_IMPLS = ("auto", "explicit_transpose", "xla")  # models/dense.py dense_function
CONV_IMPLS = ("auto", "matmul", "xla")  # models/conv.py conv_function

# Range rules for the arguments of partitioners and zoo models, by parameter name.
ARG_RULES: dict[str, dict[str, Rule]] = {
    "partition": {
        "alpha": number_above(0),                 # dirichlet concentration
        "min_size": int_at_least(0),              # dirichlet, quantity_skew
        "max_tries": POSITIVE_INT,                # dirichlet
        "shards_per_client": POSITIVE_INT,        # shards
        "sigma": number_at_least(0),              # quantity_skew
    },
    "model": {
        "hidden": Rule(lambda v: LAYER_SIZES.ok(v) or POSITIVE_INT.ok(v),
                       "a list of layer sizes (mlp) or one size (char_lstm), each an integer >= 1"),
        "embed_dim": POSITIVE_INT,                # char_lstm
        "num_layers": POSITIVE_INT,               # char_lstm
        "dim": POSITIVE_INT,                      # char_transformer
        "heads": POSITIVE_INT,                    # char_transformer
        "layers": POSITIVE_INT,                   # char_transformer
        "mlp_dim": POSITIVE_INT,                  # char_transformer
        "dropout": FRACTION,                      # mlp
        "dense_impl": one_of(DENSE_IMPLS),
        "conv_impl": one_of(CONV_IMPLS),          # cnn, resnets
        "norm": one_of(("batch", "group", "none")),    # resnets (models/resnet.py NORMS)
        "stem": one_of(("imagenet", "cifar")),         # resnets (models/resnet.py STEMS)
        "width": POSITIVE_INT,                    # resnets: the first stage's channels
        "groups": POSITIVE_INT,                   # resnets: GroupNorm groups (norm='group')
        "head_hidden": int_at_least(0),           # resnets: hidden dense layer of the head
    },
}
# The algorithm builders' parameters that are not optimizer sections or the local schedule.
ALGORITHM_RULES: dict[str, Rule] = {
    "mu": number_at_least(0),                     # fedprox
    "learning_rate": number_above(0),             # scaffold, fednova (client SGD)
    "global_learning_rate": number_above(0),      # scaffold
    "momentum": FRACTION,                         # fednova
    "proximal_mu": number_at_least(0),            # fednova
    "lam": number_at_least(0),                    # ditto
    "head": Rule(PATHS.ok, "a parameter path prefix such as 'out' (the zoo models' output "
                           "layer) or a list of them"),   # fedper
    "head_passes": or_none(POSITIVE_INT, "an integer >= 1 (FedRep) or None (FedPer)"),
}
# The data sources' own keys (fedjax_sim.registry.DataSource.arguments); data.dataset is
# checked against the source's `datasets`, the partition keys by validate._check_partition.
DATA_RULES: dict[str, Rule] = {
    "num_clients": POSITIVE_INT,                  # synthetic
    "alpha": number_at_least(0),                  # synthetic
    "beta": number_at_least(0),                   # synthetic
    "iid": BOOL,                                  # synthetic
    "name": Rule(NONEMPTY_STRING.ok, "a TFDS dataset name such as 'cifar10' or 'emnist/balanced'"),
    "data_dir": STRING_OR_NONE,                   # tfds
    "download": BOOL,                             # tfds
    "label_key": STRING_OR_NONE,                  # tfds
    "train_path": Rule(NONEMPTY_STRING.ok, "the path of the training file (leaf: or directory)"),
    "test_path": or_none(NONEMPTY_STRING, "a path or None"),
    "only_digits": BOOL,                          # tff_h5 emnist
    "label": Rule(lambda v: v in ("label", "coarse_label"),
                  "'label' or 'coarse_label' (CIFAR-100's 100 or 20 classes)"),
    "seq_len": POSITIVE_INT,                      # shakespeare
    "drop_empty": BOOL,
}


# -- checkers -----------------------------------------------------------------------------
def show(v) -> str:
    """A one-line repr (a ConfigDict's own repr is multi-line YAML)."""
    if isinstance(v, ml_collections.ConfigDict):
        v = v.to_dict()
    return repr(v)


def get(section, key, default=None):
    return section[key] if key in section else default


def as_dict(v) -> dict:
    return v.to_dict() if isinstance(v, ml_collections.ConfigDict) else dict(v)


def check(value, key: str, rule: Rule, hint: str = "") -> None:
    """Raises `config.<key> must be <allowed>, got <value><hint>` unless `rule` holds."""
    if not rule.ok(value):
        raise rule.error(f"config.{key}", value, hint)


def check_choice(value, key: str, choices, what: str = "known") -> None:
    """Raises `config.<key>=<value> is not <what>; choose one of [...]` unless it is one."""
    if not isinstance(value, str) or value not in choices:
        raise UserError(f"config.{key}={show(value)} is not {what}; choose one of {list(choices)}")


def unknown_key(path: str, key: str, known, rest: str = "") -> UserError:
    """`config.<path>` has no documented `key`; `rest` is what followed it in a dotted name."""
    full = ".".join(p for p in (path, key) if p) + rest
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {'.'.join(p for p in (path, close[0]) if p) + rest!r}? " if close else ""
    where = f"in config.{path}" if path else "at the top level"
    return UserError(f"unknown config key {full!r}; {hint}known keys {where}: {', '.join(known)}")


def check_keys(section, path: str, known) -> None:
    for key in section.keys():
        if key not in known:
            raise unknown_key(path, key, known)


def section(config, key: str, path: str = "", required: bool = True, example: str = ""):
    """The sub-section `key` as a ConfigDict/dict, or None when optional and absent/None."""
    full = f"{path}.{key}" if path else key
    value = get(config, key)
    if value is None:
        if required:
            raise UserError(f"config.{full} is missing; add it to the config file{example}")
        return None
    if not is_section(value):
        raise UserError(f"config.{full} must be a section (a dict of keys), got {show(value)}")
    return value


def free_args(section_, key: str, path: str) -> dict:
    """A free-form argument dict (None/absent -> {})."""
    value = get(section_, key)
    if value is None:
        return {}
    if not is_section(value):
        raise UserError(f"config.{path}.{key} must be a dict of keyword arguments, got "
                        f"{show(value)}")
    return as_dict(value)


def check_args(key: str, args: dict, fn: Callable, fixed: tuple[str, ...], what: str,
               rules: dict[str, Rule] | None = None) -> None:
    """`args` must bind to `fn`'s signature next to the `fixed` arguments the code passes."""
    params = inspect.signature(fn).parameters
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    takes = [n for n, p in params.items()
             if n not in fixed and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    for name in args:
        if name in fixed or (name not in takes and not var_kw):
            close = difflib.get_close_matches(name, takes, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            why = " (the simulator sets it)" if name in fixed else ""
            raise UserError(f"config.{key} has unknown argument {name!r} for {what}{why}; {hint}"
                            f"it takes: {', '.join(takes) or 'no arguments'}")
    for name in takes:
        if params[name].default is inspect.Parameter.empty and name not in args:
            raise UserError(f"config.{key} needs {name!r} for {what}; it takes: {', '.join(takes)}")
    try:
        inspect.signature(fn).bind(**{n: None for n in fixed if n in params}, **args)
    except TypeError as e:
        raise UserError(f"config.{key} {args} do not fit {what}: {e}") from None
    for name, value in args.items():
        if rules and name in rules:
            check(value, f"{key}.{name}", rules[name])
