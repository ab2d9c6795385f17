"""Builds a simulation from a config and runs it: the config-file face of `simulate()`.

Config layout (see configs/*.py; docs/configs-and-cli.md lists every key):

    seed, rounds, clients_per_round, eval_every, task, batch_norm, feature_cache,
    evaluate_initial (also evaluate the initial model, logged as round 0)
    data:      source (a key of fedjax_sim.registry.DATA_SOURCES) and the keys its loader
               reads: num_clients, partition, partition_args, client_test_fraction for
               the partitioned sources; heldout_clients, seed for all
    model:     name (zoo name), num_outputs, args, trainable, pretrained
    preprocess: None | 'auto' | the fields of fedjax_sim.data.Preprocess
    algorithm: name (a key of fedjax_sim.registry.ALGORITHMS) and the parameters of its
               builder: optimizer sections {name, learning_rate, args}, local_epochs,
               local_steps, batch_size, weighting and the algorithm's own
    engine:    the fields of EngineOptions (optional)
    checkpoint: every_rounds, every_seconds, max_to_keep (optional; CHECKPOINT_DEFAULTS)
    finetune:  (optional) steps, learning_rate, batch_size: per-client evaluation also
               after fine-tuning each client's model on its own training split
    privacy:   (optional; absent or None: no differential privacy) level ('client':
               DP-FedAvg | 'example': DP-SGD in every client) and the fields of that
               level's dataclass (fedjax_sim.registry.PRIVACY_LEVELS); those of the other
               level stay None ('poisson' for sampling)

Every key and value is checked up front by `validate.validate_config`; the checks left
here are those that need the data.
"""

from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np

from fedjax_sim import data as fdata
from fedjax_sim import registry
from fedjax_sim.models import get_model, get_task, load_pretrained, with_trainable
from fedjax_sim.models.trainable import count_parameters
from fedjax_sim.simulation import INIT_STREAM, simulate
from fedjax_sim.cli.options import (aggregator_options, attack_options, broadcast_options,
                                    build_algorithm,
                                    build_optimizer, checkpoint_options, engine_options,
                                    finetune_options, preprocess_options, privacy_options)
from fedjax_sim.cli.rules import get as _get
from fedjax_sim.cli.validate import validate_config

__all__ = ["build", "build_data", "build_algorithm", "build_optimizer", "run"]


def build_data(cfg: ml_collections.ConfigDict, seed: int):
    """Returns (train FederatedData, pooled test dict or None, per-client test FederatedData
    or None, info) of the (checked) data section: its source's loader
    (`fedjax_sim.registry.DATA_SOURCES`) called with the keys it reads, the examples of a
    partitioned source split into clients. With `heldout_clients`, info['heldout'] holds
    the held-out clients (their training split and test split, or their data alone)."""
    source = registry.DATA_SOURCES[cfg["source"]]
    data_seed = _get(cfg, "seed", seed)
    args = {key: cfg[key] for key in source.arguments if key in cfg}
    if source.partitioned:
        arrays, test, info = source.load(seed=data_seed, **args)
        train = fdata.partition(arrays, arrays["y"], _get(cfg, "partition", "iid"),
                                cfg["num_clients"], seed=data_seed,
                                **dict(_get(cfg, "partition_args", {}) or {}))
        client_test = None
        fraction = _get(cfg, "client_test_fraction", 0.0) or 0.0
        if fraction:
            train, client_test = train.split(fraction, seed=data_seed)
    else:
        train, client_test, info = source.load(seed=data_seed, **args)
    info = dict(info)
    heldout = _get(cfg, "heldout_clients")
    if heldout is not None:
        train, client_test, info["heldout"] = _hold_out(train, client_test, heldout, data_seed)
    if not source.partitioned:  # the pooled test set is every test client's examples
        test = None if client_test is None else dict(client_test.features)
    return train, test, client_test, info


def _hold_out(train, client_test, heldout, seed):
    """(kept training clients, their per-client test split, held-out clients): the held-out
    part is (their training split, their test split) where the test split has them, else
    their training data alone (evaluated with the global model)."""
    kept, held = train.holdout(heldout, seed=seed)
    if client_test is None:
        return kept, None, held
    index = {cid: i for i, cid in enumerate(client_test.client_ids)}
    own = lambda ids: client_test.subset([index[c] for c in ids if c in index])
    held_test = own(held.client_ids)
    held_ids = set(held.client_ids)
    kept_test = client_test.subset([i for c, i in index.items() if c not in held_ids])
    return kept, kept_test, ((held, held_test) if held_test.num_clients else held)


def build(config: ml_collections.ConfigDict, data_cache: dict | None = None) -> dict:
    """Everything `simulate()` needs, built from the config after `validate_config` has
    checked every value (before any data is loaded or anything compiled).

    `data_cache` (a dict kept by the caller, e.g. a sweep): configs whose data section
    and data seed are the same share one loaded dataset instead of loading it again."""
    validate_config(config)
    seed = _get(config, "seed", 0)
    if data_cache is None:
        train, test, client_test, info = build_data(config.data, seed)
    else:
        key = json.dumps([config.data.to_dict(), _get(config.data, "seed", seed)],
                         sort_keys=True, default=str)
        if key not in data_cache:
            data_cache[key] = build_data(config.data, seed)
        train, test, client_test, info = data_cache[key]
        info = dict(info)

    task = get_task(_get(config, "task", "classification"))
    labels = train.features["y"]
    if info.get("vocab_size") or info.get("num_classes"):  # loaders that know their classes
        num_outputs = int(info.get("vocab_size") or info["num_classes"])
    elif task.name in ("classification", "sequence"):
        num_outputs = int(max(labels.max(), test["y"].max() if test else 0)) + 1
    else:
        num_outputs = int(np.prod(labels.shape[1:]))
    model_cfg = config.model
    preprocess = preprocess_options(config)
    input_shape = tuple(train.features["x"].shape[1:])
    if hasattr(preprocess, "output_shape"):  # e.g. images resized on the device
        input_shape = preprocess.output_shape(input_shape)
    model = get_model(model_cfg.name, input_shape,
                      _get(model_cfg, "num_outputs") or num_outputs,
                      **dict(_get(model_cfg, "args", {}) or {}))

    model = _transfer(model, model_cfg, seed)

    algorithm = broadcast_options(config, build_algorithm(config.algorithm))
    return dict(model=model, algorithm=algorithm, train_data=train,
                task=task, checkpoint=checkpoint_options(config),
                privacy=privacy_options(config), aggregator=aggregator_options(config),
                attack=attack_options(config),
                eval_data=test, client_eval_data=client_test,
                heldout_data=info.pop("heldout", None), preprocess=preprocess,
                finetune=finetune_options(config),
                rounds=config.rounds, clients_per_round=config.clients_per_round,
                eval_every=config.eval_every, seed=seed, engine=engine_options(config),
                batch_norm=_get(config, "batch_norm", "auto"),
                feature_cache=_get(config, "feature_cache", "auto"),
                evaluate_initial=bool(_get(config, "evaluate_initial", False)), info=info)


def _transfer(model, model_cfg, seed: int):
    """The zoo model with config.model.pretrained weights loaded and only
    config.model.trainable training (the rest frozen); the model itself if neither is set."""
    pretrained = _get(model_cfg, "pretrained")
    trainable = _get(model_cfg, "trainable", "all")
    if isinstance(trainable, (list, tuple)):
        trainable = list(trainable)
    if pretrained is None and trainable == "all":
        return model
    params = state = None
    if pretrained is not None:
        options = {"path": pretrained} if isinstance(pretrained, str) else dict(pretrained)
        path = options.pop("path")
        # The key simulate() initialises with, so leaves the file does not set (a new head)
        # start where they would without it.
        params, state = model.init(jax.random.fold_in(jax.random.key(seed), INIT_STREAM))
        params, state, report = load_pretrained(params, state, path, **{
            k: (tuple(v) if k == "skip" else v) for k, v in options.items()})
        print(report)
    model = with_trainable(model, trainable, params=params, state=state)
    print(f"{model.name}: {count_parameters(model)}")
    return model


def run(config: ml_collections.ConfigDict, workdir: str | None, progress: bool = True,
        allow_config_change: bool = False, callback=None, tensorboard: bool | str = False):
    """Builds and runs the experiment; writes config.json, metrics.jsonl, summary.json,
    params.npz and checkpoints into `workdir` (with `tensorboard`, TensorBoard event files
    too), or resumes the run already there."""
    parts = build(config)
    info = parts.pop("info")
    metadata = {}
    if info.get("target_stats"):
        metadata["target_stats"] = {k: float(v) for k, v in info["target_stats"].items()}
    return simulate(**parts, workdir=workdir, progress=progress, metadata=metadata,
                    config=json.loads(json.dumps(config.to_dict(), default=str)),
                    allow_config_change=allow_config_change, callback=callback,
                    tensorboard=tensorboard)
