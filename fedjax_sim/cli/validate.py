"""Checks a whole experiment config up front, before any data is loaded or anything compiled.

`validate_config(config)` raises `UserError` with a one-line message for the first problem
it finds: an unknown key (with a `did you mean` and the keys allowed at that level), a
missing section or key, or a value of the wrong type or out of range. Messages name the key
as `config.<path>`, the value and what is allowed, e.g.

    config.algorithm.batch_size must be an integer >= 1, got 0

The names a config may use (algorithms, data sources, privacy levels) and what each reads
come from `fedjax_sim.registry`; the section keys from `layout`; the value rules and the
checkers from `rules`. Free-form argument dicts (`data.partition_args`, `model.args`, an
optimizer's `args`) are checked against the signature of the function they are passed to
(the partitioner, the zoo model builder, the optax optimizer), so the schema follows the code.

`data` accepts the keys of every source (an override can change `data.source` but cannot
delete keys), and checks the ones the chosen source reads; the others are ignored by it.
Likewise `privacy` accepts the keys of both levels, but a key of the other level must keep
its unset value (None, or 'poisson' for `sampling`), so a setting is never silently
ignored. Its values are checked by building the `fedjax_sim.privacy` dataclass
(`options.privacy_options`), as `checkpoint` is by `CheckpointOptions`.

What needs the data itself (e.g. num_clients larger than the dataset, num_outputs below the
number of classes, a cnn on flat features) is still checked when the experiment is built.
"""

from __future__ import annotations

import difflib
import inspect

import ml_collections
import optax

from fedjax_sim import registry
from fedjax_sim.aggregators.dp import count_noise_stddev, split_noise_multiplier
from fedjax_sim.algorithms import WEIGHTINGS
from fedjax_sim.data import PARTITIONERS
from fedjax_sim.errors import UserError
from fedjax_sim.models import ZOO, tasks
from fedjax_sim.models.pretrained import FORMATS as PRETRAINED_FORMATS
from fedjax_sim.privacy import ClientLevelDP, MatrixFactorizationDP
from fedjax_sim.privacy.matrix_factorization import check_min_separation
from fedjax_sim.simulation import BATCH_NORM_MODES, resolve_engine
from fedjax_sim.cli import layout
from fedjax_sim.cli.options import (build_algorithm, checkpoint_options, distributed_options,
                                    engine_options,
                                    finetune_options, preprocess_options, privacy_options,
                                    aggregator_options, attack_options, broadcast_options)
from fedjax_sim.cli.rules import (ALGORITHM_RULES, ARG_RULES, BOOL, DATA_RULES, FRACTION,
                                  LAYER_SIZES, PATHS, POSITIVE_INT, Rule, check, check_args,
                                  check_choice, check_keys, free_args, get, int_at_least,
                                  is_int, is_section, number_above, one_of, or_none, section,
                                  show)

__all__ = ["validate_config"]

# Parameters every algorithm builder shares, checked by _check_schedule.
SCHEDULE_KEYS = ("local_epochs", "local_steps", "batch_size", "weighting")
# Arguments the simulator passes itself, so a config may not set them.
PARTITIONER_FIXED = ("labels", "num_clients", "seed")
MODEL_FIXED = ("input_shape", "num_outputs")
OPTIMIZER_FIXED = ("learning_rate",)

_HELDOUT = Rule(lambda v: v is None or (is_int(v) and v >= 1) or (isinstance(v, float) and 0 < v < 1),
                "None, a client count >= 1 or a fraction in (0, 1)")
_FEATURE_CACHE = Rule(lambda v: v == "auto" or isinstance(v, bool), "'auto', True or False")
_TRAINABLE = Rule(PATHS.ok, "'all', 'head', '+'-joined path prefixes such as 'layer4+head', or a "
                            "list of prefixes")
_PRETRAINED = {
    "path": Rule(lambda v: isinstance(v, str) and len(v) > 0, "the path of a weights file "
                 "(.safetensors, .npz) or a saved result's directory"),
    "format": one_of(PRETRAINED_FORMATS),
    "skip": Rule(lambda v: isinstance(v, (list, tuple)) and all(isinstance(s, str) and s for s in v),
                 "a list of parameter paths or prefixes never to load (e.g. ['fc'])"),
    "strip_prefix": or_none(Rule(lambda v: isinstance(v, str), "a string")),
    "strict": Rule(lambda v: isinstance(v, bool), "True or False"),
}
_PRETRAINED_DEFAULTS = {"format": "auto", "skip": (), "strip_prefix": None, "strict": False}


def _check_unknown_keys(config, path: tuple[str, ...] = ()) -> None:
    """Every key of every fixed-layout section is known (free-form arg dicts excluded)."""
    known = layout.keys_at(config, path)
    if known is layout.FREE:
        return
    node = config
    for key in path:
        node = node[key]
    if path == ("algorithm",):
        _check_algorithm_keys(node, known)
    check_keys(node, ".".join(path), known)
    for key, value in node.items():
        if is_section(value):
            try:
                _check_unknown_keys(config, (*path, key))
            except KeyError:  # a section the layout does not describe (e.g. nested args)
                pass


def _check_algorithm_keys(alg, known) -> None:
    """A parameter of another algorithm says which algorithms take it."""
    name = get(alg, "name", "fedavg")
    for key in alg.keys():
        owners = [n for n, entry in registry.ALGORITHMS.items() if key in entry.parameters]
        if key not in known and owners:
            raise UserError(f"unknown config key 'algorithm.{key}' for algorithm {name!r}: it is "
                            f"a parameter of {', '.join(owners)}; set config.algorithm.name to "
                            f"one of them or drop it; known keys in config.algorithm: "
                            f"{', '.join(sorted(known))}")


def _check_top_level(config) -> None:
    check(get(config, "seed", 0), "seed", int_at_least(0))
    for key in ("rounds", "clients_per_round", "eval_every"):
        if key not in config:
            raise UserError(f"config.{key} is missing; set it to an integer >= 1")
        check(config[key], key, POSITIVE_INT)
    check_choice(get(config, "task", "classification"), "task", sorted(tasks.TASKS),
                 "a known task")
    check(get(config, "batch_norm", "auto"), "batch_norm", one_of(BATCH_NORM_MODES))
    check(get(config, "feature_cache", "auto"), "feature_cache", _FEATURE_CACHE)
    check(get(config, "evaluate_initial", False), "evaluate_initial", BOOL)


def _check_data(config) -> int | None:
    """Checks config.data; returns the number of clients it makes (None: known only once
    the files are read)."""
    data = section(config, "data", example=", e.g. data=dict(source='digits', num_clients=100, "
                                           "partition='iid')")
    name = get(data, "source")
    check_choice(name, "data.source", registry.DATA_SOURCES, "a known dataset")
    source = registry.DATA_SOURCES[name]
    if "seed" in data:
        check(data["seed"], "data.seed", int_at_least(0))
    check(get(data, "heldout_clients"), "data.heldout_clients", _HELDOUT)
    if source.datasets:
        check_choice(get(data, "dataset"), "data.dataset", source.datasets, f"a {name} dataset")
    for key, param in source.arguments.items():
        if key != "dataset":
            default = None if param.default is param.empty else param.default
            check(get(data, key, default), f"data.{key}", DATA_RULES[key])
    if name == "synthetic":
        alpha, beta = get(data, "alpha", 1.0), get(data, "beta", 1.0)
        if get(data, "iid", False) and (alpha != 0 or beta != 0):
            raise UserError(f"config.data.iid=True needs config.data.alpha=0 and "
                            f"config.data.beta=0 (one shared model and input distribution), got "
                            f"alpha={alpha!r}, beta={beta!r}; set them to 0 or iid=False")
    if source.partitioned:
        return _check_partition(data, name)
    clients = source.arguments.get("num_clients")
    return None if clients is None else int(get(data, "num_clients", clients.default))


def _check_partition(data, source: str) -> int:
    if "num_clients" not in data:
        raise UserError(f"config.data.num_clients is missing; the {source!r} source needs it "
                        f"(an integer >= 1)")
    check(data["num_clients"], "data.num_clients", POSITIVE_INT)
    name = get(data, "partition", "iid")
    check_choice(name, "data.partition", sorted(PARTITIONERS), "a known partitioner")
    args = free_args(data, "partition_args", "data")
    check_args("data.partition_args", args, PARTITIONERS[name], PARTITIONER_FIXED,
               f"partitioner {name!r}", ARG_RULES["partition"])
    # None: no per-client test split, like 0
    check(get(data, "client_test_fraction"), "data.client_test_fraction", or_none(FRACTION, FRACTION.allowed))
    return int(data["num_clients"])


def _check_model(config) -> None:
    model = section(config, "model", example=", e.g. model=dict(name='mlp', args={})")
    name = get(model, "name")
    check_choice(name, "model.name", sorted(ZOO), "a zoo model")
    check(get(model, "num_outputs"), "model.num_outputs",
          or_none(POSITIVE_INT, "None (from the data) or an integer >= 1"))
    args = free_args(model, "args", "model")
    check_args("model.args", args, ZOO[name], MODEL_FIXED, f"model {name!r}", ARG_RULES["model"])
    if name == "mlp" and "hidden" in args:
        check(args["hidden"], "model.args.hidden", LAYER_SIZES)
    check(get(model, "trainable", "all"), "model.trainable", _TRAINABLE)
    pretrained = get(model, "pretrained")
    if pretrained is None:
        return
    if isinstance(pretrained, str):
        pretrained = {"path": pretrained}
    if not is_section(pretrained):
        raise UserError(f"config.model.pretrained must be None, a weights file path or a dict "
                        f"with keys {list(layout.PRETRAINED_KEYS)}, got {show(pretrained)}")
    for key, rule in _PRETRAINED.items():
        check(get(pretrained, key, _PRETRAINED_DEFAULTS.get(key)), f"model.pretrained.{key}", rule)


def _optimizer_names() -> list[str]:
    return [n for n in dir(optax) if not n.startswith("_") and _is_optimizer(getattr(optax, n))]


def _is_optimizer(fn) -> bool:
    try:
        return inspect.isfunction(fn) and "learning_rate" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _check_optimizer(alg, key: str) -> None:
    path = f"algorithm.{key}"
    cfg = section(alg, key, "algorithm", example=", e.g. dict(name='sgd', learning_rate=1.0, args={})")
    name = get(cfg, "name")
    fn = getattr(optax, name, None) if isinstance(name, str) else None
    if not _is_optimizer(fn):
        close = difflib.get_close_matches(name, _optimizer_names(), n=1) \
            if isinstance(name, str) else []
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(f"config.{path}.name={name!r} is not an optax optimizer; {hint}use e.g. "
                        f"'sgd', 'adam', 'yogi', 'adagrad'")
    check(get(cfg, "learning_rate"), f"{path}.learning_rate", number_above(0))
    args = free_args(cfg, "args", path)
    check_args(f"{path}.args", args, fn, OPTIMIZER_FIXED, f"optax.{name}")


def _check_algorithm(config) -> None:
    alg = section(config, "algorithm", example=", e.g. algorithm=dict(name='fedavg', ...)")
    name = get(alg, "name", "fedavg")
    check_choice(name, "algorithm.name", registry.ALGORITHMS)
    entry = registry.ALGORITHMS[name]
    for key, param in entry.parameters.items():
        if key in entry.optimizers:
            if not (key in entry.optional_optimizers and get(alg, key) is None):
                _check_optimizer(alg, key)
        elif key in ALGORITHM_RULES:
            if key in alg:
                check(alg[key], f"algorithm.{key}", ALGORITHM_RULES[key])
            elif param.default is param.empty:
                raise UserError(f"config.algorithm.{key} is missing; {name} needs it "
                                f"({ALGORITHM_RULES[key].allowed})")
    _check_schedule(alg)
    try:  # constraints between values (e.g. FedNova: momentum and mu not both)
        build_algorithm(alg)
    except UserError as e:
        raise UserError(f"config.algorithm: {e}") from None


def _check_schedule(alg) -> None:
    epochs, steps = get(alg, "local_epochs"), get(alg, "local_steps")
    if (epochs is None) == (steps is None):
        raise UserError(f"set exactly one of config.algorithm.local_epochs and "
                        f"config.algorithm.local_steps (the other to None), got "
                        f"local_epochs={epochs!r}, local_steps={steps!r}")
    for key, value in (("local_epochs", epochs), ("local_steps", steps)):
        check(value, f"algorithm.{key}", or_none(POSITIVE_INT, POSITIVE_INT.allowed))
    check(get(alg, "batch_size", 10), "algorithm.batch_size",
          or_none(POSITIVE_INT, POSITIVE_INT.allowed), hint=" (or None: each client's data as one batch)")
    check_choice(get(alg, "weighting", "num_examples"), "algorithm.weighting", WEIGHTINGS)


def _check_section(config, key: str, build) -> None:
    """An optional section whose values its options class checks (messages `<key>.<field>
    ...` become `config.<key>.<field> ...`, others `config.<key>: ...`)."""
    if section(config, key, required=False) is None:
        return
    try:
        build(config)
    except UserError as e:
        message = str(e)
        raise UserError(f"config.{message}" if message.startswith(f"{key}.")
                        else f"config.{key}: {message}") from None


def _check_engine(config) -> None:
    def build(config):  # only validates: the 'auto' choices it makes are not used
        resolve_engine(engine_options(config), backend="cpu", conv=False, num_steps=1,
                       clients_per_round=int(config["clients_per_round"]))
    _check_section(config, "engine", build)


def _check_finetune(config) -> None:
    _check_section(config, "finetune", finetune_options)
    if get(config, "finetune") is None:
        return
    data = config["data"]
    source = registry.DATA_SOURCES[data["source"]]
    if not source.partitioned and source.arguments.get("test_path"):
        if not get(data, "test_path") and not get(data, "heldout_clients"):
            raise UserError("config.finetune needs per-client test splits; set "
                            "config.data.test_path to the dataset's test file")
    elif source.partitioned and not get(data, "client_test_fraction"):
        raise UserError("config.finetune needs per-client test splits; set "
                        "config.data.client_test_fraction (e.g. 0.2)")


def _check_preprocess(config) -> None:
    preprocess = get(config, "preprocess")
    if preprocess is None or preprocess == "auto":
        return
    if not is_section(preprocess):
        raise UserError(f"config.preprocess must be None, 'auto' or a dict of "
                        f"{list(layout.PREPROCESS_KEYS)}, got {show(preprocess)}")
    _check_section(config, "preprocess", preprocess_options)


def _check_privacy(config, num_clients: int | None) -> None:
    options = privacy_options(config)
    if isinstance(options, MatrixFactorizationDP):
        if num_clients is not None and options.min_separation is not None:
            try:
                check_min_separation(options.min_separation, num_clients,
                                     config["clients_per_round"])
            except UserError as e:
                raise UserError(f"config.privacy: {e}") from None
    if not isinstance(options, (ClientLevelDP, MatrixFactorizationDP)):
        return
    weighting = get(config["algorithm"], "weighting", "num_examples")
    if weighting != "uniform":
        level = get(config["privacy"], "level")
        raise UserError(f"config.privacy.level={level!r} needs config.algorithm.weighting='uniform', "
                        f"got {weighting!r}: weighting by example counts makes one client's "
                        f"influence on the aggregate, and so the noise it needs, depend on its "
                        f"data; set config.algorithm.weighting='uniform'")
    adaptive = getattr(options, "adaptive_clipping", None)
    if adaptive is None:
        return
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
    if not is_section(config):
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
        _check_section(config, "checkpoint", checkpoint_options)
        _check_section(config, "distributed", distributed_options)
        _check_privacy(config, num_clients)
        aggregator_options(config)  # its messages name config.aggregator.<key> themselves
        attack_options(config)
        broadcast_options(config, build_algorithm(config["algorithm"]))
        _check_finetune(config)
        _check_preprocess(config)
    except UserError as e:
        message = str(e)
        if "\n" in message:  # keep the CLI's error to one line whatever a value looked like
            raise UserError(" ".join(message.split())) from None
        raise
