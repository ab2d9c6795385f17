"""Checks a whole experiment config up front, before any data is loaded or anything compiled.

`validate_config(config)` raises `UserError` with a one-line message for the first problem
it finds: an unknown key (with a `did you mean` and the keys allowed at that level), a
missing section or key, or a value of the wrong type or out of range. Messages name the key
as `config.<path>`, the value and what is allowed, e.g.

    config.algorithm.batch_size must be an integer >= 1, got 0

Free-form argument dicts (`data.partition_args`, `model.args`, an optimizer's `args`) are
checked against the signature of the function they are passed to (the partitioner, the zoo
model builder, the optax optimizer), so the schema follows the code. Arguments a function
takes are also range-checked where the schema knows a rule for them (`ARG_RULES`); a test
keeps those rules complete.

`data` accepts the keys of every source (an override can change `data.source` but cannot
delete keys), and checks the ones the chosen source reads; the others are ignored by it.
Likewise `privacy` accepts the keys of both levels, but a key of the other level must keep
its unset value (None, or 'poisson' for `sampling`), so a setting is never silently
ignored. Its values are checked by building the `fedjax_sim.privacy` dataclass
(`privacy_options`), as `checkpoint` is by `CheckpointOptions`.

What needs the data itself (e.g. num_clients larger than the dataset, num_outputs below the
number of classes, a cnn on flat features) is still checked when the experiment is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
from typing import Any, Callable

import ml_collections
import numpy as np
import optax

from fedjax_sim.aggregators.dp import count_noise_stddev, split_noise_multiplier
from fedjax_sim.engine.contracts import WEIGHTINGS as _WEIGHTINGS
from fedjax_sim.algorithms import ditto, fedavg, fednova, fedper, fedprox, scaffold
from fedjax_sim.data.sources.builtin import synthetic as _synthetic
from fedjax_sim.data.partition import PARTITIONERS
from fedjax_sim.errors import UserError
from fedjax_sim.models import tasks, zoo
from fedjax_sim.models.pretrained import FORMATS as PRETRAINED_FORMATS
from fedjax_sim.privacy import AdaptiveClipping, ClientLevelDP, ExampleLevelDP
from fedjax_sim.simulation.checkpoint import CheckpointOptions
from fedjax_sim.simulation.evaluation import FineTune
from fedjax_sim.simulation import BATCH_NORM_MODES, EngineOptions, resolve_engine

__all__ = ["validate_config", "privacy_options", "preprocess_options", "build_algorithm", "build_optimizer",
           "finetune_options", "ALGORITHM_RULES", "FINETUNE_KEYS", "CHECKPOINT_DEFAULTS", "TOP_LEVEL_KEYS",
           "DATA_SOURCES", "DATA_KEYS", "ALGORITHMS", "WEIGHTINGS", "DENSE_IMPLS", "CONV_IMPLS",
           "ARG_RULES", "PRIVACY_LEVELS", "PRIVACY_LEVEL_KEYS", "PRIVACY_KEYS", "PRIVACY_UNSET",
           "ADAPTIVE_CLIPPING_KEYS"]

# When a config has no `checkpoint` section (or leaves a key of it out).
CHECKPOINT_DEFAULTS = dict(every_rounds=None, every_seconds=60.0, max_to_keep=3)

TOP_LEVEL_KEYS = ("seed", "rounds", "clients_per_round", "eval_every", "task", "data", "model",
                  "algorithm", "engine", "checkpoint", "privacy", "finetune", "preprocess",
                  "batch_norm", "feature_cache")
DATA_SOURCES = ("digits", "diabetes", "synthetic", "tfds", "tff_h5", "leaf")
# Sources whose clients are natural users read from files, with their own test splits.
NATURAL_SOURCES = ("tff_h5", "leaf")
# The datasets each file source knows (data.dataset), and what each reads.
FILE_DATASETS = {"tff_h5": ("emnist", "shakespeare", "cifar100"),
                 "leaf": ("femnist", "shakespeare")}
_PARTITIONED = ("num_clients", "partition", "partition_args", "client_test_fraction")
# The `data` keys each source reads (experiment.build_data).
DATA_KEYS = {
    "digits": ("source", *_PARTITIONED, "heldout_clients", "seed"),
    "diabetes": ("source", *_PARTITIONED, "heldout_clients", "seed"),
    "synthetic": ("source", "num_clients", "alpha", "beta", "iid", "heldout_clients", "seed"),
    "tfds": ("source", "name", "data_dir", "download", "label_key", *_PARTITIONED,
             "heldout_clients", "seed"),
    "tff_h5": ("source", "dataset", "train_path", "test_path", "only_digits", "label", "seq_len",
               "drop_empty", "heldout_clients", "seed"),
    "leaf": ("source", "dataset", "train_path", "test_path", "seq_len", "drop_empty",
             "heldout_clients", "seed"),
}
# config.preprocess: the fields of fedjax_sim.data.Preprocess (or None / 'auto').
PREPROCESS_KEYS = ("scale", "mean", "std", "crop_padding", "flip", "resize")
MODEL_KEYS = ("name", "num_outputs", "args", "trainable", "pretrained")
# config.model.pretrained: a weights file and load_pretrained's options.
PRETRAINED_KEYS = ("path", "format", "skip", "strip_prefix", "strict")
OPTIMIZER_KEYS = ("name", "learning_rate", "args")
# Algorithm name -> its builder; the algorithm section's keys are `name` plus the builder's
# parameters (client_optimizer, server_optimizer, local_epochs, ...). Parameters named
# *_optimizer are optimizer sections; the others are checked by ALGORITHM_RULES.
ALGORITHMS: dict[str, Callable] = {"fedavg": fedavg, "fedprox": fedprox, "scaffold": scaffold,
                                   "fednova": fednova, "fedper": fedper, "ditto": ditto}
# Optimizer sections an algorithm may leave out (None: the builder's default).
OPTIONAL_OPTIMIZERS = {"scaffold": ("server_optimizer",), "fednova": ("server_optimizer",),
                       "ditto": ("personal_optimizer",)}
# The per-client fine-tuning evaluation (config.finetune; absent or None: none).
FINETUNE_KEYS = tuple(f.name for f in dataclasses.fields(FineTune) if f.name != "optimizer")
WEIGHTINGS = _WEIGHTINGS  # the Algorithm base's check
DENSE_IMPLS = ("auto", "explicit_transpose", "xla")  # models/dense.py dense_function
CONV_IMPLS = ("auto", "matmul", "xla")  # models/conv.py conv_function
# config.privacy: `level` picks the dataclass, whose fields are that level's keys
# (tests/test_config_validation.py keeps these lists equal to the dataclasses' fields).
PRIVACY_LEVELS = {"client": ClientLevelDP, "example": ExampleLevelDP}
PRIVACY_LEVEL_KEYS = {
    "client": ("noise_multiplier", "delta", "clip_norm", "adaptive_clipping", "sampling",
               "max_cohort_size", "noise_cohort_size", "accountant", "target_epsilon"),
    "example": ("clip_norm", "noise_multiplier", "sampling_rate", "delta", "max_batch_size",
                "accountant", "target_epsilon"),
}
PRIVACY_KEYS = ("level", *sorted({k for keys in PRIVACY_LEVEL_KEYS.values() for k in keys}))
# The value a key of the other level may hold (the dataclass default; None where not listed).
PRIVACY_UNSET = {"sampling": "poisson"}
ADAPTIVE_CLIPPING_KEYS = ("target_quantile", "learning_rate", "count_stddev")


# -- value predicates ---------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _int_at_least(low: int):
    return (lambda v: _is_int(v) and v >= low), f"an integer >= {low}"


def _number_above(low: float):
    return (lambda v: _is_number(v) and math.isfinite(v) and v > low), f"a number > {low:g}"


def _number_at_least(low: float):
    return (lambda v: _is_number(v) and math.isfinite(v) and v >= low), f"a number >= {low:g}"


def _one_of(choices):
    return (lambda v: isinstance(v, str) and v in choices), f"one of {list(choices)}"


_FRACTION = ((lambda v: _is_number(v) and 0 <= v < 1), "a number in [0, 1)")
_LAYER_SIZES = ((lambda v: isinstance(v, (list, tuple)) and all(_is_int(h) and h >= 1 for h in v)),
                "a list of integers >= 1")

# Range rules for the arguments of partitioners and zoo models, by parameter name:
# (predicate, what is allowed). tests/test_config_validation.py checks that every parameter
# of every partitioner and zoo model has one.
ARG_RULES: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "partition": {
        "alpha": _number_above(0),                # dirichlet concentration
        "min_size": _int_at_least(0),             # dirichlet, quantity_skew
        "max_tries": _int_at_least(1),            # dirichlet
        "shards_per_client": _int_at_least(1),    # shards
        "sigma": _number_at_least(0),             # quantity_skew
    },
    "model": {
        "hidden": ((lambda v: _LAYER_SIZES[0](v) or (_is_int(v) and v >= 1)),
                   "a list of layer sizes (mlp) or one size (char_lstm), each an integer >= 1"),
        "embed_dim": _int_at_least(1),            # char_lstm
        "num_layers": _int_at_least(1),           # char_lstm
        "dim": _int_at_least(1),                  # char_transformer
        "heads": _int_at_least(1),                # char_transformer
        "layers": _int_at_least(1),               # char_transformer
        "mlp_dim": _int_at_least(1),              # char_transformer
        "dropout": _FRACTION,                     # mlp
        "dense_impl": _one_of(DENSE_IMPLS),
        "conv_impl": _one_of(CONV_IMPLS),         # cnn, resnets
        "norm": _one_of(("batch", "group", "none")),   # resnets (models/resnet.py NORMS)
        "stem": _one_of(("imagenet", "cifar")),        # resnets (models/resnet.py STEMS)
        "width": _int_at_least(1),                # resnets: the first stage's channels
        "groups": _int_at_least(1),               # resnets: GroupNorm groups (norm='group')
        "head_hidden": _int_at_least(0),          # resnets: hidden dense layer of the head
    },
}
_HEAD = ((lambda v: (isinstance(v, str) and v) or (isinstance(v, (list, tuple)) and v and all(
    isinstance(h, str) and h for h in v))),
    "a parameter path prefix such as 'out' (the zoo models' output layer) or a list of them")
# Range rules for the algorithm builders' parameters that are not optimizer sections or the
# local schedule (tests/test_config_validation.py checks that every one has a rule).
ALGORITHM_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "mu": _number_at_least(0),                    # fedprox
    "learning_rate": _number_above(0),            # scaffold, fednova (client SGD)
    "global_learning_rate": _number_above(0),     # scaffold
    "momentum": _FRACTION,                        # fednova
    "proximal_mu": _number_at_least(0),           # fednova
    "lam": _number_at_least(0),                   # ditto
    "head": _HEAD,                                # fedper
    "head_passes": ((lambda v: v is None or (_is_int(v) and v >= 1)),
                    "an integer >= 1 (FedRep) or None (FedPer)"),
}
# Parameters every builder shares, checked by _check_algorithm itself.
_SCHEDULE_KEYS = ("local_epochs", "local_steps", "batch_size", "weighting")
# Arguments the simulator passes itself, so a config may not set them.
_PARTITIONER_FIXED = ("labels", "num_clients", "seed")
_MODEL_FIXED = ("input_shape", "num_outputs")
_OPTIMIZER_FIXED = ("learning_rate",)


# -- helpers ------------------------------------------------------------------------------
def _is_section(v) -> bool:
    return isinstance(v, (ml_collections.ConfigDict, dict))


def _as_dict(v) -> dict:
    return v.to_dict() if isinstance(v, ml_collections.ConfigDict) else dict(v)


def _show(v) -> str:
    """A one-line repr (a ConfigDict's own repr is multi-line YAML)."""
    if isinstance(v, ml_collections.ConfigDict):
        v = v.to_dict()
    return repr(v)


def _has(section, key) -> bool:
    return key in section


def _get(section, key, default=None):
    return section[key] if key in section else default


def _check(value, key: str, rule) -> None:
    predicate, allowed = rule
    if not predicate(value):
        raise UserError(f"config.{key} must be {allowed}, got {_show(value)}")


def _positive_int(value, key: str) -> None:
    if not (_is_int(value) and value >= 1):
        raise UserError(f"config.{key} must be an integer >= 1, got {_show(value)}")


def _unknown_key(path: str, key: str, known) -> UserError:
    full = f"{path}.{key}" if path else key
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {(f'{path}.' if path else '') + close[0]!r}? " if close else ""
    where = f"in config.{path}" if path else "at the top level"
    return UserError(f"unknown config key {full!r}; {hint}known keys {where}: {', '.join(known)}")


def _check_keys(section, path: str, known) -> None:
    for key in section.keys():
        if key not in known:
            raise _unknown_key(path, key, known)


def _section(config, key: str, path: str = "", required: bool = True, example: str = ""):
    """The sub-section `key` as a ConfigDict/dict, or None when optional and absent/None."""
    full = f"{path}.{key}" if path else key
    if not _has(config, key) or config[key] is None:
        if required:
            raise UserError(f"config.{full} is missing; add it to the config file{example}")
        return None
    value = config[key]
    if not _is_section(value):
        raise UserError(f"config.{full} must be a section (a dict of keys), got {_show(value)}")
    return value


def _free_args(section, key: str, path: str):
    """A free-form argument dict (None/absent -> {})."""
    value = _get(section, key)
    if value is None:
        return {}
    if not _is_section(value):
        raise UserError(f"config.{path}.{key} must be a dict of keyword arguments, got "
                        f"{_show(value)}")
    return _as_dict(value)


def _check_args(key: str, args: dict, fn: Callable, fixed: tuple[str, ...], what: str,
                rules: dict | None = None) -> None:
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
        p = params[name]
        if p.default is p.empty and name not in args:
            raise UserError(f"config.{key} needs {name!r} for {what}; it takes: {', '.join(takes)}")
    try:
        inspect.signature(fn).bind(**{n: None for n in fixed if n in params}, **args)
    except TypeError as e:
        raise UserError(f"config.{key} {args} do not fit {what}: {e}") from None
    for name, value in args.items():
        if rules and name in rules:
            _check(value, f"{key}.{name}", rules[name])


# -- sections -----------------------------------------------------------------------------
def _all_data_keys():
    return sorted({k for keys in DATA_KEYS.values() for k in keys})


def _algorithm_keys(name: str):
    builder = ALGORITHMS.get(name, fedavg)
    return ("name", *inspect.signature(builder).parameters)


def _check_unknown_keys(config) -> None:
    """Every key of every fixed-layout section is known (free-form arg dicts excluded)."""
    _check_keys(config, "", TOP_LEVEL_KEYS)
    fixed_layout = {
        "data": _all_data_keys(),
        "model": MODEL_KEYS,
        "engine": [f.name for f in dataclasses.fields(EngineOptions)],
        "checkpoint": list(CHECKPOINT_DEFAULTS),
        "privacy": PRIVACY_KEYS,
        "preprocess": PREPROCESS_KEYS,
    }
    model = _get(config, "model")
    if _is_section(model) and _is_section(_get(model, "pretrained")):
        _check_keys(model["pretrained"], "model.pretrained", PRETRAINED_KEYS)
    for name, known in fixed_layout.items():
        section = _get(config, name)
        if _is_section(section):
            _check_keys(section, name, known)
    privacy = _get(config, "privacy")
    if _is_section(privacy) and _is_section(_get(privacy, "adaptive_clipping")):
        _check_keys(privacy["adaptive_clipping"], "privacy.adaptive_clipping", ADAPTIVE_CLIPPING_KEYS)
    alg = _get(config, "algorithm")
    if _is_section(alg):
        name = _get(alg, "name", "fedavg")
        _check_keys(alg, "algorithm", _algorithm_keys(name if name in ALGORITHMS else "fedavg"))
        for opt in ("client_optimizer", "server_optimizer"):
            if _is_section(_get(alg, opt)):
                _check_keys(alg[opt], f"algorithm.{opt}", OPTIMIZER_KEYS)


def _check_top_level(config) -> None:
    _check(_get(config, "seed", 0), "seed", _int_at_least(0))
    for key in ("rounds", "clients_per_round", "eval_every"):
        if not _has(config, key):
            raise UserError(f"config.{key} is missing; set it to an integer >= 1")
        _positive_int(config[key], key)
    task = _get(config, "task", "classification")
    if not isinstance(task, str) or task not in tasks.TASKS:
        raise UserError(f"config.task={task!r} is not a known task; choose one of "
                        f"{sorted(tasks.TASKS)}")
    _check(_get(config, "batch_norm", "auto"), "batch_norm", _one_of(BATCH_NORM_MODES))
    feature_cache = _get(config, "feature_cache", "auto")
    if not (feature_cache == "auto" or isinstance(feature_cache, bool)):
        raise UserError(f"config.feature_cache must be 'auto', True or False, got "
                        f"{_show(feature_cache)}")


def _check_data(config) -> int | None:
    """Checks config.data; returns the number of clients it makes (None: known only once
    the files are read)."""
    data = _section(config, "data", example=", e.g. data=dict(source='digits', num_clients=100, "
                                            "partition='iid')")
    source = _get(data, "source")
    if not isinstance(source, str) or source not in DATA_SOURCES:
        raise UserError(f"config.data.source={source!r} is not a known dataset; choose one of "
                        f"{list(DATA_SOURCES)}")
    if _has(data, "seed"):
        _check(data["seed"], "data.seed", _int_at_least(0))
    heldout = _get(data, "heldout_clients")
    if heldout is not None and not ((_is_int(heldout) and heldout >= 1) or (
            isinstance(heldout, float) and 0 < heldout < 1)):
        raise UserError(f"config.data.heldout_clients must be None, a client count >= 1 or a "
                        f"fraction in (0, 1), got {_show(heldout)}")
    if source in NATURAL_SOURCES:
        _check_file_source(data, source)
        return None
    if source == "tfds":
        name = _get(data, "name")
        if not isinstance(name, str) or not name:
            raise UserError(f"config.data.name must be a TFDS dataset name such as 'cifar10' or "
                            f"'emnist/balanced', got {_show(name)}")
        for key in ("data_dir", "label_key"):
            value = _get(data, key)
            if value is not None and not isinstance(value, str):
                raise UserError(f"config.data.{key} must be a string or None, got {_show(value)}")
        if not isinstance(_get(data, "download", True), (bool, np.bool_)):
            raise UserError(f"config.data.download must be True or False, got "
                            f"{_show(_get(data, 'download'))}")
    if source == "synthetic":
        default_clients = inspect.signature(_synthetic).parameters["num_clients"].default
        num_clients = _get(data, "num_clients", default_clients)
        _positive_int(num_clients, "data.num_clients")
        alpha, beta = _get(data, "alpha", 1.0), _get(data, "beta", 1.0)
        _check(alpha, "data.alpha", _number_at_least(0))
        _check(beta, "data.beta", _number_at_least(0))
        iid = _get(data, "iid", False)
        if not isinstance(iid, (bool, np.bool_)):
            raise UserError(f"config.data.iid must be True or False, got {_show(iid)}")
        if iid and (alpha != 0 or beta != 0):
            raise UserError(f"config.data.iid=True needs config.data.alpha=0 and "
                            f"config.data.beta=0 (one shared model and input distribution), got "
                            f"alpha={alpha!r}, beta={beta!r}; set them to 0 or iid=False")
        return int(num_clients)

    if not _has(data, "num_clients"):
        raise UserError(f"config.data.num_clients is missing; the {source!r} source needs it "
                        f"(an integer >= 1)")
    num_clients = data["num_clients"]
    _positive_int(num_clients, "data.num_clients")
    name = _get(data, "partition", "iid")
    if not isinstance(name, str) or name not in PARTITIONERS:
        raise UserError(f"config.data.partition={name!r} is not a known partitioner; choose one "
                        f"of {sorted(PARTITIONERS)}")
    args = _free_args(data, "partition_args", "data")
    _check_args("data.partition_args", args, PARTITIONERS[name], _PARTITIONER_FIXED,
                f"partitioner {name!r}", ARG_RULES["partition"])
    fraction = _get(data, "client_test_fraction")
    if fraction is not None:  # None: no per-client test split, like 0
        _check(fraction, "data.client_test_fraction", _FRACTION)
    return int(num_clients)


def _check_file_source(data, source: str) -> None:
    dataset = _get(data, "dataset")
    if dataset not in FILE_DATASETS[source]:
        raise UserError(f"config.data.dataset={_show(dataset)} is not a {source} dataset; choose "
                        f"one of {list(FILE_DATASETS[source])}")
    path = _get(data, "train_path")
    if not isinstance(path, str) or not path:
        raise UserError(f"config.data.train_path must be the path of the training file"
                        f"{' or directory' if source == 'leaf' else ''}, got {_show(path)}")
    test = _get(data, "test_path")
    if test is not None and not isinstance(test, str):
        raise UserError(f"config.data.test_path must be a path or None, got {_show(test)}")
    if dataset == "shakespeare":
        _positive_int(_get(data, "seq_len", 80), "data.seq_len")
    for key in ("only_digits", "drop_empty"):
        if not isinstance(_get(data, key, False), (bool, np.bool_)):
            raise UserError(f"config.data.{key} must be True or False, got {_show(_get(data, key))}")
    label = _get(data, "label", "label")
    if label not in ("label", "coarse_label"):
        raise UserError(f"config.data.label must be 'label' or 'coarse_label' (CIFAR-100's 100 "
                        f"or 20 classes), got {_show(label)}")


def _check_preprocess(config) -> None:
    section = _get(config, "preprocess")
    if section is None or section == "auto":
        return
    if not _is_section(section):
        raise UserError(f"config.preprocess must be None, 'auto' or a dict of "
                        f"{list(PREPROCESS_KEYS)}, got {_show(section)}")
    try:
        preprocess_options(config)
    except UserError as e:
        raise UserError(f"config.preprocess: {e}") from None


def preprocess_options(config):
    """config.preprocess as a `fedjax_sim.data.Preprocess`, 'auto', or None."""
    from fedjax_sim.data.augment import Preprocess

    section = _get(config, "preprocess", "auto")
    if section is None or section == "auto":
        return section
    fields = _as_dict(section)
    for key in ("mean", "std"):
        if fields.get(key) is not None:
            fields[key] = tuple(float(v) for v in np.ravel(fields[key]))
    return Preprocess(**fields)


def _check_model(config) -> None:
    model = _section(config, "model", example=", e.g. model=dict(name='mlp', args={})")
    name = _get(model, "name")
    if not isinstance(name, str) or name not in zoo.ZOO:
        raise UserError(f"config.model.name={name!r} is not a zoo model; choose one of "
                        f"{sorted(zoo.ZOO)}")
    num_outputs = _get(model, "num_outputs")
    if num_outputs is not None and not (_is_int(num_outputs) and num_outputs >= 1):
        raise UserError(f"config.model.num_outputs must be None (from the data) or an integer "
                        f">= 1, got {_show(num_outputs)}")
    args = _free_args(model, "args", "model")
    _check_args("model.args", args, zoo.ZOO[name], _MODEL_FIXED, f"model {name!r}",
                ARG_RULES["model"])
    if name == "mlp" and "hidden" in args and not _LAYER_SIZES[0](args["hidden"]):
        raise UserError(f"config.model.args.hidden must be a list of integers >= 1, got "
                        f"{_show(args['hidden'])}")
    trainable = _get(model, "trainable", "all")
    if not ((isinstance(trainable, str) and trainable) or (
            isinstance(trainable, (list, tuple)) and trainable
            and all(isinstance(t, str) and t for t in trainable))):
        raise UserError(f"config.model.trainable must be 'all', 'head', '+'-joined path "
                        f"prefixes such as 'layer4+head', or a list of prefixes, got "
                        f"{_show(trainable)}")
    pretrained = _get(model, "pretrained")
    if pretrained is None:
        return
    if isinstance(pretrained, str):
        pretrained = {"path": pretrained}
    if not _is_section(pretrained):
        raise UserError(f"config.model.pretrained must be None, a weights file path or a dict "
                        f"with keys {list(PRETRAINED_KEYS)}, got {_show(pretrained)}")
    path = _get(pretrained, "path")
    if not isinstance(path, str) or not path:
        raise UserError("config.model.pretrained.path must be the path of a weights file "
                        "(.safetensors, .npz) or a saved result's directory")
    _check(_get(pretrained, "format", "auto"), "model.pretrained.format",
           _one_of(PRETRAINED_FORMATS))
    skip = _get(pretrained, "skip", ())
    if not (isinstance(skip, (list, tuple)) and all(isinstance(v, str) and v for v in skip)):
        raise UserError(f"config.model.pretrained.skip must be a list of parameter paths or "
                        f"prefixes never to load (e.g. ['fc']), got {_show(skip)}")
    strip = _get(pretrained, "strip_prefix")
    if strip is not None and not isinstance(strip, str):
        raise UserError(f"config.model.pretrained.strip_prefix must be None or a string, got "
                        f"{_show(strip)}")
    _check(_get(pretrained, "strict", False), "model.pretrained.strict",
           ((lambda v: isinstance(v, bool)), "True or False"))


def _optimizer_names() -> list[str]:
    names = []
    for n in dir(optax):
        fn = getattr(optax, n)
        if n.startswith("_") or not inspect.isfunction(fn):
            continue
        try:
            if "learning_rate" in inspect.signature(fn).parameters:
                names.append(n)
        except (TypeError, ValueError):
            pass
    return names


def _check_optimizer(alg, key: str) -> None:
    path = f"algorithm.{key}"
    cfg = _section(alg, key, "algorithm",
                   example=", e.g. dict(name='sgd', learning_rate=1.0, args={})")
    name = _get(cfg, "name")
    fn = getattr(optax, name, None) if isinstance(name, str) else None
    try:
        ok = callable(fn) and "learning_rate" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        ok = False
    if not ok:
        close = difflib.get_close_matches(name, _optimizer_names(), n=1) \
            if isinstance(name, str) else []
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(f"config.{path}.name={name!r} is not an optax optimizer; {hint}use e.g. "
                        f"'sgd', 'adam', 'yogi', 'adagrad'")
    lr = _get(cfg, "learning_rate")
    if not (_is_number(lr) and math.isfinite(lr) and lr > 0):
        raise UserError(f"config.{path}.learning_rate must be a number > 0, got {_show(lr)}")
    args = _free_args(cfg, "args", path)
    _check_args(f"{path}.args", args, fn, _OPTIMIZER_FIXED, f"optax.{name}")


def _check_algorithm(config) -> None:
    alg = _section(config, "algorithm", example=", e.g. algorithm=dict(name='fedavg', ...)")
    name = _get(alg, "name", "fedavg")
    if not isinstance(name, str) or name not in ALGORITHMS:
        raise UserError(f"config.algorithm.name={name!r} is not known; choose one of "
                        f"{list(ALGORITHMS)}")
    params = inspect.signature(ALGORITHMS[name]).parameters
    for key, p in params.items():
        if key.endswith("optimizer"):
            if key in OPTIONAL_OPTIMIZERS.get(name, ()) and _get(alg, key) is None:
                continue
            _check_optimizer(alg, key)
        elif key in ALGORITHM_RULES:
            if not _has(alg, key):
                if p.default is p.empty:
                    raise UserError(f"config.algorithm.{key} is missing; {name} needs it "
                                    f"({ALGORITHM_RULES[key][1]})")
                continue
            _check(alg[key], f"algorithm.{key}", ALGORITHM_RULES[key])
    epochs, steps = _get(alg, "local_epochs"), _get(alg, "local_steps")
    if (epochs is None) == (steps is None):
        raise UserError(f"set exactly one of config.algorithm.local_epochs and "
                        f"config.algorithm.local_steps (the other to None), got "
                        f"local_epochs={epochs!r}, local_steps={steps!r}")
    if epochs is not None:
        _positive_int(epochs, "algorithm.local_epochs")
    if steps is not None:
        _positive_int(steps, "algorithm.local_steps")
    batch_size = _get(alg, "batch_size", 10)
    if batch_size is not None and not (_is_int(batch_size) and batch_size >= 1):
        raise UserError(f"config.algorithm.batch_size must be an integer >= 1, got "
                        f"{_show(batch_size)} (or None: each client's data as one batch)")
    weighting = _get(alg, "weighting", "num_examples")
    if not isinstance(weighting, str) or weighting not in WEIGHTINGS:
        raise UserError(f"config.algorithm.weighting={weighting!r} is not known; choose one of "
                        f"{list(WEIGHTINGS)}")
    try:  # constraints between values (e.g. FedNova: momentum and mu not both)
        build_algorithm(alg)
    except UserError as e:
        raise UserError(f"config.algorithm: {e}") from None


def build_optimizer(cfg) -> optax.GradientTransformation:
    """`{name: 'adam', learning_rate: 1e-3, args: {b1: 0.9}}` -> optax.adam(1e-3, b1=0.9)
    (name, learning rate and args are checked by validate_config)."""
    return getattr(optax, cfg["name"])(_get(cfg, "learning_rate"),
                                       **dict(_get(cfg, "args", {}) or {}))


def build_algorithm(alg):
    """The algorithm of a (checked) config.algorithm section: its builder called with the
    section's keys, optimizer sections turned into optax optimizers."""
    name = _get(alg, "name", "fedavg")
    builder = ALGORITHMS[name]
    kwargs = {}
    for key in inspect.signature(builder).parameters:
        if not _has(alg, key):
            continue
        value = alg[key]
        if key.endswith("optimizer"):
            value = None if value is None else build_optimizer(value)
        elif key == "head" and not isinstance(value, str):
            value = tuple(value)
        kwargs[key] = value
    return builder(**kwargs)


def finetune_options(config) -> FineTune | None:
    """config.finetune as a `FineTune`, or None when absent."""
    section = _get(config, "finetune")
    if section is None:
        return None
    return FineTune(**_as_dict(section))


def _check_finetune(config) -> None:
    section = _section(config, "finetune", required=False)
    if section is None:
        return
    _check_keys(section, "finetune", FINETUNE_KEYS)
    try:
        finetune_options(config)
    except UserError as e:
        raise UserError(f"config.finetune: {e}") from None
    data = config["data"]
    if _get(data, "source") in NATURAL_SOURCES:
        if not _get(data, "test_path") and not _get(data, "heldout_clients"):
            raise UserError("config.finetune needs per-client test splits; set "
                            "config.data.test_path to the dataset's test file")
        return
    if _get(data, "source") != "synthetic" and not _get(data, "client_test_fraction"):
        raise UserError("config.finetune needs per-client test splits; set "
                        "config.data.client_test_fraction (e.g. 0.2)")


def _check_engine(config) -> None:
    engine = _section(config, "engine", required=False)
    if engine is None:
        return
    try:
        options = EngineOptions(**_as_dict(engine))
        # Only validates here: the 'auto' choices it makes are not used.
        resolve_engine(options, backend="cpu", conv=False, num_steps=1,
                       clients_per_round=int(config["clients_per_round"]))
    except UserError as e:
        message = str(e)
        raise UserError(f"config.{message}" if message.startswith("engine.") else message) from None


def _check_checkpoint(config) -> None:
    ckpt = _section(config, "checkpoint", required=False)
    if ckpt is None:
        return
    try:  # CheckpointOptions checks its own values, with messages naming checkpoint.<key>
        CheckpointOptions(**{**CHECKPOINT_DEFAULTS, **_as_dict(ckpt)})
    except UserError as e:
        raise UserError(f"config.{e}") from None


def _privacy_error(e: UserError) -> UserError:
    """A dataclass's message (naming `privacy.<key>`) as a config error."""
    message = str(e)
    return UserError(f"config.{message}" if message.startswith("privacy.")
                     else f"config.privacy: {message}")


_PRIVACY_REQUIRED = {
    "noise_multiplier": "the noise std / clip norm, e.g. 1.0",
    "delta": "δ of the (ε, δ) guarantee, well below 1/num_clients (client level) or 1/examples "
             "per client (example level), e.g. 1e-5",
    "clip_norm": "the per-example clip norm C, e.g. 1.0",
    "sampling_rate": "the probability that an example joins a local step's batch, e.g. 0.1",
}


def privacy_options(config) -> ClientLevelDP | ExampleLevelDP | None:
    """`config.privacy` as `ClientLevelDP` / `ExampleLevelDP` (None when absent or None).

    Checks the section's own keys and values, not how they fit the rest of the config
    (`validate_config` does that); raises `UserError` naming `config.privacy.<key>`.
    """
    section = _section(config, "privacy", required=False)
    if section is None:
        return None
    values = _as_dict(section)
    _check_keys(values, "privacy", PRIVACY_KEYS)
    level = values.pop("level", None)
    if not isinstance(level, str) or level not in PRIVACY_LEVELS:
        raise UserError(f"config.privacy.level must be one of {list(PRIVACY_LEVELS)} ('client': "
                        f"DP-FedAvg, 'example': DP-SGD in every client), got {_show(level)}")
    own = PRIVACY_LEVEL_KEYS[level]
    for key, value in values.items():
        if key not in own and value != PRIVACY_UNSET.get(key):
            other = next(name for name, keys in PRIVACY_LEVEL_KEYS.items() if key in keys)
            unset = PRIVACY_UNSET.get(key)
            raise UserError(f"config.privacy.{key} applies to level={other!r}; drop it or set it "
                            f"to {unset!r} for level={level!r}, got {_show(value)}")
    cls = PRIVACY_LEVELS[level]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, field in fields.items():
        if field.default is dataclasses.MISSING and values.get(key) is None:
            raise UserError(f"config.privacy.{key} is missing; level={level!r} needs it "
                            f"({_PRIVACY_REQUIRED.get(key, 'see fedjax_sim.privacy')})")
    kwargs = {k: v for k, v in values.items() if k in fields}
    adaptive = kwargs.get("adaptive_clipping")
    if adaptive is not None:
        if not _is_section(adaptive):
            raise UserError(f"config.privacy.adaptive_clipping must be None (a fixed clip norm) or "
                            f"a section, e.g. dict(target_quantile=0.5, learning_rate=0.2), got "
                            f"{_show(adaptive)}")
        adaptive = _as_dict(adaptive)
        _check_keys(adaptive, "privacy.adaptive_clipping", ADAPTIVE_CLIPPING_KEYS)
    try:
        if adaptive is not None:
            kwargs["adaptive_clipping"] = AdaptiveClipping(**adaptive)
        if kwargs.get("sampling") == "fixed" and kwargs.get("accountant", "rdp") == "pld":
            raise UserError("privacy.accountant='pld' cannot account for sampling='fixed' "
                            "(fixed-size sampling without replacement); use accountant='rdp' or "
                            "sampling='poisson'")
        return cls(**kwargs)
    except UserError as e:
        raise _privacy_error(e) from None


def _check_privacy(config) -> None:
    options = privacy_options(config)
    if not isinstance(options, ClientLevelDP):
        return
    weighting = _get(config["algorithm"], "weighting", "num_examples")
    if weighting != "uniform":
        raise UserError(f"config.privacy.level='client' needs config.algorithm.weighting='uniform', "
                        f"got {weighting!r}: weighting by example counts makes one client's "
                        f"influence on the aggregate, and so the noise it needs, depend on its "
                        f"data; set config.algorithm.weighting='uniform'")
    adaptive = options.adaptive_clipping
    if adaptive is not None:
        # dp_fedavg splits the noise multiplier between the clipped count and the update.
        m = config["clients_per_round"]
        _, sigma_b = count_noise_stddev(m, adaptive.count_stddev, options.noise_cohort_size)
        scale = 1.0 if options.noise_cohort_size is None else options.noise_cohort_size / m
        try:
            split_noise_multiplier(options.noise_multiplier, sigma_b)
        except UserError:
            default = " (the default: clients_per_round / 20)" if adaptive.count_stddev is None else ""
            raise UserError(
                f"config.privacy.adaptive_clipping.count_stddev={adaptive.count_stddev!r} is too "
                f"small for noise_multiplier={options.noise_multiplier:g}: adaptive clipping splits "
                f"the noise between the clipped count and the update, which needs 2·σ_b > "
                f"noise_multiplier, and σ_b is {sigma_b:g}{default}; set count_stddev above "
                f"{options.noise_multiplier / 2 / scale:g} or lower the noise multiplier") from None


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks the whole experiment config; raises `UserError` (one line) on the first problem.

    Loads no data and builds or compiles nothing; see the module doc for what it checks.
    """
    if not _is_section(config):
        raise UserError(f"a config must be an ml_collections.ConfigDict, got {type(config).__name__}; "
                        f"return one from get_config()")
    try:
        _check_unknown_keys(config)
        _check_top_level(config)
        num_clients = _check_data(config)
        if num_clients is not None and config["clients_per_round"] > num_clients:
            raise UserError(f"config.clients_per_round={config['clients_per_round']} exceeds the "
                            f"{num_clients} clients of config.data.num_clients; lower "
                            f"clients_per_round or raise data.num_clients")
        _check_model(config)
        _check_algorithm(config)
        _check_engine(config)
        _check_checkpoint(config)
        _check_privacy(config)
        _check_finetune(config)
        _check_preprocess(config)
    except UserError as e:
        message = str(e)
        if "\n" in message:  # keep the CLI's error to one line whatever a value looked like
            raise UserError(" ".join(message.split())) from None
        raise
