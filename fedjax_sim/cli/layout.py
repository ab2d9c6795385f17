"""The documented keys of every config section: what a config file may hold and what
`--config.KEY=VALUE` may set.

`keys_at(config, path)` gives the keys of the section at `path` (a tuple of key names):
the fixed sections below, the `algorithm` section from the builder of the algorithm it
names (`fedjax_sim.registry`), the `data` section from every data source's keys. Free-form
argument dicts (`data.partition_args`, `model.args`, an optimizer's `args`) have no fixed
keys (None): their keys are checked against the function they are passed to.
"""

from __future__ import annotations

import dataclasses

from fedjax_sim import registry
from fedjax_sim.privacy import AdaptiveClipping, SecureAggregation
from fedjax_sim.simulation import DistributedOptions, EngineOptions, FineTune
from fedjax_sim.cli.rules import get, is_section

__all__ = ["TOP_LEVEL_KEYS", "CHECKPOINT_DEFAULTS", "MODEL_KEYS", "PRETRAINED_KEYS",
           "OPTIMIZER_KEYS", "PREPROCESS_KEYS", "FINETUNE_KEYS", "ENGINE_KEYS", "DISTRIBUTED_KEYS", "PRIVACY_KEYS",
           "PRIVACY_LEVEL_KEYS", "PRIVACY_UNSET", "ADAPTIVE_CLIPPING_KEYS", "SECURE_AGGREGATION_KEYS", "AGGREGATOR_KEYS", "ATTACK_KEYS", "BROADCAST_KEYS", "FREE", "keys_at",
           "algorithm_keys"]

TOP_LEVEL_KEYS = ("seed", "rounds", "clients_per_round", "eval_every", "task", "data", "model",
                  "algorithm", "engine", "checkpoint", "privacy", "finetune", "preprocess",
                  "batch_norm", "feature_cache", "distributed", "aggregator", "broadcast",
                  "evaluate_initial", "attack")
# When a config has no `checkpoint` section (or leaves a key of it out).
CHECKPOINT_DEFAULTS = dict(every_rounds=None, every_seconds=60.0, max_to_keep=3)
MODEL_KEYS = ("name", "num_outputs", "args", "trainable", "pretrained")
# config.model.pretrained: a weights file and load_pretrained's options.
PRETRAINED_KEYS = ("path", "format", "skip", "strip_prefix", "strict")
OPTIMIZER_KEYS = ("name", "learning_rate", "args")
# config.preprocess: the fields of fedjax_sim.data.Preprocess (or None / 'auto').
PREPROCESS_KEYS = ("scale", "mean", "std", "crop_padding", "flip", "resize")
# The per-client fine-tuning evaluation (config.finetune; absent or None: none).
FINETUNE_KEYS = tuple(f.name for f in dataclasses.fields(FineTune) if f.name != "optimizer")
ENGINE_KEYS = tuple(f.name for f in dataclasses.fields(EngineOptions))
# config.distributed: how this process joins a multi-process run (DistributedOptions).
DISTRIBUTED_KEYS = tuple(f.name for f in dataclasses.fields(DistributedOptions))
# config.privacy: `level` picks the dataclass (registry.PRIVACY_LEVELS), whose fields are
# that level's keys; the section accepts the keys of both levels.
PRIVACY_LEVEL_KEYS = {level: tuple(f.name for f in dataclasses.fields(cls))
                      for level, cls in registry.PRIVACY_LEVELS.items()}
PRIVACY_KEYS = ("level", *sorted({k for keys in PRIVACY_LEVEL_KEYS.values() for k in keys}))
# The value a key of the other level may hold (the dataclass default; None where not listed).
PRIVACY_UNSET = {"sampling": "poisson"}
ADAPTIVE_CLIPPING_KEYS = tuple(f.name for f in dataclasses.fields(AdaptiveClipping))
# config.aggregator: compression parts (a list), a robust rule, secure or encrypted aggregation.
AGGREGATOR_KEYS = ("compression", "robust", "secure", "encrypted")
# config.attack: who is malicious (fraction or clients, seed) and what they do (data, update:
# each a section naming a fedjax_sim.attacks builder and its arguments).
ATTACK_KEYS = ("fraction", "clients", "seed", "data", "update")
# config.broadcast: what every client receives, compressed (compressed_broadcast's arguments).
BROADCAST_KEYS = ("bits", "rotation", "seed")
# config.privacy.secure_aggregation: distributed DP (SecureAggregation's fields).
SECURE_AGGREGATION_KEYS = tuple(f.name for f in dataclasses.fields(SecureAggregation))

FREE = None  # a free-form argument dict
_FIXED = {
    (): TOP_LEVEL_KEYS,
    ("data",): registry.all_data_keys(),
    ("data", "partition_args"): FREE,
    ("model",): MODEL_KEYS,
    ("model", "args"): FREE,
    ("model", "pretrained"): PRETRAINED_KEYS,
    ("engine",): ENGINE_KEYS,
    ("distributed",): DISTRIBUTED_KEYS,
    ("checkpoint",): tuple(CHECKPOINT_DEFAULTS),
    ("privacy",): PRIVACY_KEYS,
    ("privacy", "adaptive_clipping"): ADAPTIVE_CLIPPING_KEYS,
    ("privacy", "secure_aggregation"): SECURE_AGGREGATION_KEYS,
    ("aggregator",): AGGREGATOR_KEYS,
    ("broadcast",): BROADCAST_KEYS,
    ("aggregator", "secure"): FREE,
    ("aggregator", "encrypted"): FREE,
    ("aggregator", "robust"): FREE,
    ("attack",): ATTACK_KEYS,
    ("attack", "data"): FREE,
    ("attack", "update"): FREE,
    ("finetune",): FINETUNE_KEYS,
    ("preprocess",): PREPROCESS_KEYS,
}


def algorithm_keys(name) -> tuple[str, ...]:
    """The `algorithm` section's keys for `name` (fedavg's for a name that is not known)."""
    return registry.ALGORITHMS.get(name, registry.ALGORITHMS["fedavg"]).keys


def _optimizers(name, any_algorithm: bool) -> set[str]:
    entries = (registry.ALGORITHMS.values() if any_algorithm
               else [registry.ALGORITHMS.get(name, registry.ALGORITHMS["fedavg"])])
    return {key for entry in entries for key in entry.optimizers}


def keys_at(config, path: tuple[str, ...], any_algorithm: bool = False):
    """The documented keys of the section at `path`, or FREE (None) for a free-form
    argument dict; KeyError where `path` is no section of the layout.

    The `algorithm` section's keys are those of the algorithm `config` names, or with
    `any_algorithm` those of every algorithm (so an override may set `algorithm.mu` before
    or after `algorithm.name=fedprox`; `validate_config` then checks the chosen one's).
    """
    if path in _FIXED:
        return _FIXED[path]
    if not path or path[0] != "algorithm":
        raise KeyError(path)
    alg = get(config, "algorithm")
    name = get(alg, "name", "fedavg") if is_section(alg) else "fedavg"
    if path == ("algorithm",):
        if any_algorithm:
            return tuple(sorted({k for e in registry.ALGORITHMS.values() for k in e.keys}))
        return algorithm_keys(name)
    if path[1] in _optimizers(name, any_algorithm):
        if len(path) == 2:
            return OPTIMIZER_KEYS
        if path[2:] == ("args",):
            return FREE
    raise KeyError(path)
