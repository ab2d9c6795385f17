"""Config sections as the objects the Python API takes: the algorithm (with optax
optimizers), `ClientLevelDP` / `ExampleLevelDP`, `Preprocess`, `FineTune`,
`CheckpointOptions` and `EngineOptions`.

`validate_config` builds these to check the values they check themselves (their messages
name the key); `experiment.build` builds them for `simulate()`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import optax

from fedjax_sim import aggregators, attacks, registry
from fedjax_sim.data import Preprocess
from fedjax_sim.engine.hyperparams import tunable
from fedjax_sim.errors import UserError
from fedjax_sim.privacy import AdaptiveClipping, SecureAggregation
from fedjax_sim.simulation import CheckpointOptions, DistributedOptions, EngineOptions, FineTune
from fedjax_sim.algorithms import compressed_broadcast
from fedjax_sim.cli.layout import (ADAPTIVE_CLIPPING_KEYS, AGGREGATOR_KEYS, ATTACK_KEYS, BROADCAST_KEYS,
                                   CHECKPOINT_DEFAULTS,
                                   PRIVACY_KEYS,
                                   PRIVACY_LEVEL_KEYS, PRIVACY_UNSET, SECURE_AGGREGATION_KEYS)
from fedjax_sim.cli.rules import (as_dict, check_args, check_choice, check_keys, get, is_section,
                                  section, show)

__all__ = ["build_optimizer", "build_algorithm", "privacy_options", "preprocess_options",
           "aggregator_options", "attack_options", "broadcast_options",
           "finetune_options", "checkpoint_options", "engine_options", "distributed_options"]


def build_optimizer(cfg) -> optax.GradientTransformation:
    """`{name: 'adam', learning_rate: 1e-3, args: {b1: 0.9}}` -> optax.adam(1e-3, b1=0.9)
    (name, learning rate and args are checked by validate_config), with its float
    hyperparameters injected (`optax.inject_hyperparams`): inputs of the compiled round
    program, so runs that change only them reuse it (engine.hyperparams)."""
    learning_rate = get(cfg, "learning_rate")
    if isinstance(learning_rate, int) and not isinstance(learning_rate, bool):
        learning_rate = float(learning_rate)
    return tunable(getattr(optax, cfg["name"]), learning_rate=learning_rate,
                   **dict(get(cfg, "args", {}) or {}))


def build_algorithm(alg):
    """The algorithm of a (checked) config.algorithm section: its builder called with the
    section's keys, optimizer sections turned into optax optimizers, lists into tuples."""
    entry = registry.ALGORITHMS[get(alg, "name", "fedavg")]
    kwargs = {}
    for key in entry.parameters:
        if key not in alg:
            continue
        value = alg[key]
        if key in entry.optimizers:
            value = None if value is None else build_optimizer(value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return entry.builder(**kwargs)


def finetune_options(config) -> FineTune | None:
    """config.finetune as a `FineTune`, or None when absent."""
    finetune = get(config, "finetune")
    return None if finetune is None else FineTune(**as_dict(finetune))


def checkpoint_options(config) -> CheckpointOptions:
    """config.checkpoint (absent keys: CHECKPOINT_DEFAULTS) as `CheckpointOptions`."""
    return CheckpointOptions(**{**CHECKPOINT_DEFAULTS, **dict(get(config, "checkpoint") or {})})


def engine_options(config) -> EngineOptions:
    return EngineOptions(**dict(get(config, "engine") or {}))


def distributed_options(config) -> DistributedOptions | None:
    """config.distributed as `DistributedOptions`; None where the config has no such
    section (a single-process run unless the command line asks for one)."""
    section = get(config, "distributed")
    if section is None:
        return None
    values = dict(section)
    if values.get("local_device_ids") is not None:
        values["local_device_ids"] = tuple(values["local_device_ids"])
    return DistributedOptions(**values)


def preprocess_options(config):
    """config.preprocess as a `fedjax_sim.data.Preprocess`, 'auto', or None."""
    preprocess = get(config, "preprocess", "auto")
    if preprocess is None or preprocess == "auto":
        return preprocess
    fields = as_dict(preprocess)
    for key in ("mean", "std"):
        if fields.get(key) is not None:
            fields[key] = tuple(float(v) for v in np.ravel(fields[key]))
    return Preprocess(**fields)


_PRIVACY_REQUIRED = {
    "noise_multiplier": "the noise std / clip norm, e.g. 1.0",
    "delta": "δ of the (ε, δ) guarantee, well below 1/num_clients (client level) or 1/examples "
             "per client (example level), e.g. 1e-5",
    "clip_norm": "the per-example clip norm C, e.g. 1.0",
    "sampling_rate": "the probability that an example joins a local step's batch, e.g. 0.1",
}


def _required(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]


_LEVELS = {"client": "DP-FedAvg", "example": "DP-SGD in every client",
           "dp_ftrl": "DP-FTRL, matrix factorization (BandMF or tree)"}


def _privacy_level(values: dict) -> str:
    """The section's `level`, with the keys each level needs where it is missing or wrong."""
    level = values.pop("level", None)
    if isinstance(level, str) and level in registry.PRIVACY_LEVELS:
        return level
    if level is None:
        choices = [f"{name!r} ({_LEVELS.get(name, name)}; it also needs "
                   f"{', '.join(_required(cls))})" for name, cls in registry.PRIVACY_LEVELS.items()]
        needs = ", ".join(choices[:-1]) + " or " + choices[-1]
        raise UserError(f"config.privacy.level is missing; set it to {needs}, e.g. "
                        f"--config.privacy.level=client --config.privacy.noise_multiplier=1.0 "
                        f"--config.privacy.clip_norm=1.0 --config.privacy.delta=1e-5")
    described = ", ".join(f"{name!r}: {_LEVELS.get(name, name)}" for name in registry.PRIVACY_LEVELS)
    raise UserError(f"config.privacy.level must be one of {list(registry.PRIVACY_LEVELS)} "
                    f"({described}), got {show(level)}")


def _privacy_error(e: UserError) -> UserError:
    """A dataclass's message (naming `privacy.<key>`) as a config error."""
    message = str(e)
    return UserError(f"config.{message}" if message.startswith("privacy.")
                     else f"config.privacy: {message}")


def _subsection(values: dict, key: str, keys: tuple, allowed: str) -> dict | None:
    """config.privacy.<key> as a dict of its checked keys, or None."""
    value = values.get(key)
    if value is None:
        return None
    if not is_section(value):
        raise UserError(f"config.privacy.{key} must be {allowed}, got {show(value)}")
    value = as_dict(value)
    check_keys(value, f"privacy.{key}", keys)
    return value


def privacy_options(config):
    """`config.privacy` as `ClientLevelDP` / `ExampleLevelDP` (None when absent or None).

    Checks the section's own keys and values, not how they fit the rest of the config
    (`validate_config` does that); raises `UserError` naming `config.privacy.<key>`.
    """
    privacy = section(config, "privacy", required=False)
    if privacy is None:
        return None
    values = as_dict(privacy)
    check_keys(values, "privacy", PRIVACY_KEYS)
    level = _privacy_level(values)
    own = PRIVACY_LEVEL_KEYS[level]
    for key, value in values.items():
        if key not in own and value != PRIVACY_UNSET.get(key):
            other = next(name for name, keys in PRIVACY_LEVEL_KEYS.items() if key in keys)
            raise UserError(f"config.privacy.{key} applies to level={other!r}; drop it or set it "
                            f"to {PRIVACY_UNSET.get(key)!r} for level={level!r}, got {show(value)}")
    cls = registry.PRIVACY_LEVELS[level]
    for key in _required(cls):
        if values.get(key) is None:
            raise UserError(f"config.privacy.{key} is missing; level={level!r} needs it "
                            f"({_PRIVACY_REQUIRED.get(key, 'see fedjax_sim.privacy')})")
    kwargs = {k: v for k, v in values.items() if k in own}
    adaptive = _subsection(kwargs, "adaptive_clipping", ADAPTIVE_CLIPPING_KEYS,
                           "None (a fixed clip norm) or a section, e.g. "
                           "dict(target_quantile=0.5, learning_rate=0.2)")
    secure = _subsection(kwargs, "secure_aggregation", SECURE_AGGREGATION_KEYS,
                         "None (central DP: the server adds the noise) or a section, e.g. "
                         "dict(modulus_bits=32, dropout_rate=0.1)")
    try:
        if adaptive is not None:
            kwargs["adaptive_clipping"] = AdaptiveClipping(**adaptive)
        if secure is not None:
            kwargs["secure_aggregation"] = SecureAggregation(**secure)
        if kwargs.get("sampling") == "fixed" and kwargs.get("accountant", "rdp") == "pld":
            raise UserError("privacy.accountant='pld' cannot account for sampling='fixed' "
                            "(fixed-size sampling without replacement); use accountant='rdp' or "
                            "sampling='poisson'")
        return cls(**kwargs)
    except UserError as e:
        raise _privacy_error(e) from None


# config.aggregator.robust: {name, <the rule's arguments>} (fedjax_sim.aggregators.robust).
ROBUST_RULES = {"coordinate_median": aggregators.coordinate_median,
                "trimmed_mean": aggregators.trimmed_mean, "krum": aggregators.krum,
                "geometric_median": aggregators.geometric_median,
                "norm_bounding": aggregators.norm_bounding,
                "centered_clipping": aggregators.centered_clipping}
# config.aggregator.compression: a list of {name, <the part's arguments>}, applied in order.
COMPRESSORS = {"quantize": aggregators.quantize, "sign": aggregators.sign,
               "top_k": aggregators.top_k, "random_k": aggregators.random_k}


def _named_part(entry, key: str, builders: dict, example: str, what: str):
    """The part `entry` = dict(name=..., <its arguments>) names among `builders`."""
    if not is_section(entry):
        raise UserError(f"config.{key} must be a section such as {example}, got {show(entry)}")
    args = as_dict(entry)
    name = args.pop("name", None)
    check_choice(name, f"{key}.name", builders, what)
    check_args(key, args, builders[name], (), f"{name}()")
    return _built(key, builders[name], args)


def aggregator_options(config):
    """`config.aggregator` as one `AggregatorPart` (None when absent or None): the
    compression parts in order, then a robust rule (`robust`: dict(name=<a ROBUST_RULES
    name>, <its arguments>)), or secure aggregation (`secure`, the arguments of
    fedjax_sim.aggregators.secure_aggregation; cohort_size defaults to clients_per_round)
    or homomorphically encrypted aggregation (`encrypted`, those of encrypted_sum)."""
    values = section(config, "aggregator", required=False)
    if values is None:
        return None
    values = as_dict(values)
    check_keys(values, "aggregator", AGGREGATOR_KEYS)
    parts = []
    compression = values.get("compression") or []
    if not isinstance(compression, (list, tuple)):
        raise UserError(f"config.aggregator.compression must be a list of parts, e.g. "
                        f"[dict(name='top_k', fraction=0.1), dict(name='quantize', bits=8)], "
                        f"got {show(compression)}")
    for i, entry in enumerate(compression):
        parts.append(_named_part(entry, f"aggregator.compression[{i}]", COMPRESSORS,
                                 "dict(name='quantize', bits=8)", "a known compression"))
    secure, encrypted = values.get("secure"), values.get("encrypted")
    robust = values.get("robust")
    if robust is not None:
        if secure is not None or encrypted is not None:
            raise UserError(f"config.aggregator.robust ({show(as_dict(robust).get('name'))}) needs "
                            f"every client's update, but under {'secure' if secure is not None else 'encrypted'} "
                            f"aggregation the server sees only their sum; keep one of them")
        parts.append(_named_part(robust, "aggregator.robust", ROBUST_RULES,
                                 "dict(name='trimmed_mean', beta=0.1)", "a robust aggregation rule"))
    if secure is not None and encrypted is not None:
        raise UserError("config.aggregator holds both secure and encrypted aggregation; keep one "
                        "of them (each replaces the server's plain sum)")
    for key, fn in (("secure", aggregators.secure_aggregation),
                    ("encrypted", aggregators.encrypted_sum)):
        args = values.get(key)
        if args is None:
            continue
        if not is_section(args):
            raise UserError(f"config.aggregator.{key} must be None or a section of "
                            f"{fn.__name__}'s arguments, got {show(args)}")
        args = as_dict(args)
        if key == "secure":
            args.setdefault("cohort_size", config["clients_per_round"])
        check_args(f"aggregator.{key}", args, fn, (), f"{fn.__name__}()")
        parts.append(_built(f"aggregator.{key}", fn, args))
    return aggregators.chain(*parts) if parts else None


def _built(key: str, fn, args: dict):
    """fn(**args), its UserError naming the config key."""
    try:
        return fn(**args)
    except UserError as e:
        raise UserError(f"config.{key}: {e}") from None


def attack_options(config):
    """`config.attack` as a `fedjax_sim.attacks.Attack` (None when absent or None):
    `fraction` or `clients`, `seed`, and `data` / `update`, each dict(name=..., <the
    builder's arguments>) naming one of fedjax_sim.attacks.DATA_ATTACKS / UPDATE_ATTACKS."""
    values = section(config, "attack", required=False)
    if values is None:
        return None
    values = as_dict(values)
    check_keys(values, "attack", ATTACK_KEYS)
    kwargs = {k: values[k] for k in ("fraction", "clients", "seed") if values.get(k) is not None}
    if isinstance(kwargs.get("clients"), tuple):
        kwargs["clients"] = list(kwargs["clients"])
    for key, builders, example in (
            ("data", attacks.DATA_ATTACKS, "dict(name='label_flip')"),
            ("update", attacks.UPDATE_ATTACKS, "dict(name='sign_flip', scale=1.0)")):
        if values.get(key) is not None:
            kwargs[key] = _named_part(values[key], f"attack.{key}", builders, example,
                                      f"a known {key} attack")
    return _built("attack", attacks.Attack, kwargs)


def broadcast_options(config, algorithm):
    """`algorithm` wrapped by `config.broadcast` (bits, rotation, seed: what every client
    receives is compressed, fedjax_sim.algorithms.compressed_broadcast), or as it is when
    the section is absent or None."""
    values = section(config, "broadcast", required=False)
    if values is None:
        return algorithm
    values = as_dict(values)
    check_keys(values, "broadcast", BROADCAST_KEYS)
    if values.get("bits") is None:
        raise UserError("config.broadcast.bits is missing: how many bits each broadcast value "
                        "is quantized to (1..16), e.g. --config.broadcast.bits=8")
    return _built("broadcast", lambda **kw: compressed_broadcast(algorithm, **kw), values)
