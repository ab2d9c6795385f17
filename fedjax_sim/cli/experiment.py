"""Builds a simulation from a config and runs it: the config-file face of `simulate()`.

Config layout (see configs/*.py):

    seed, rounds, clients_per_round, eval_every
    data:      source ('digits' | 'diabetes' | 'synthetic'), num_clients, partition,
               partition_args, client_test_fraction, seed, (synthetic: alpha, beta, iid)
    model:     name (zoo name), args
    task:      'classification' | 'regression'
    algorithm: name (a key of schema.ALGORITHMS: 'fedavg', 'fedprox', 'scaffold',
               'fednova', 'fedper', 'ditto') and the parameters of its builder in
               fedjax_sim.algorithms: optimizer sections {name, learning_rate, args}
               (client_optimizer, server_optimizer, ...), local_epochs, local_steps,
               batch_size, weighting, and the algorithm's own (mu, learning_rate,
               global_learning_rate, momentum, proximal_mu, head, head_passes, lam)
    engine:    clients_per_chunk, unroll, rounds_per_call
    checkpoint: every_rounds, every_seconds, max_to_keep (optional; CHECKPOINT_DEFAULTS)
    finetune:  (optional) steps, learning_rate, batch_size: per-client evaluation also
               after fine-tuning each client's model on its own training split
    privacy:   (optional; absent or None: no differential privacy)
               level ('client': DP-FedAvg | 'example': DP-SGD in every client),
               noise_multiplier, clip_norm, delta, accountant ('rdp' | 'pld'), target_epsilon;
               client only: sampling ('poisson' | 'fixed'), max_cohort_size,
               noise_cohort_size, adaptive_clipping (None | {target_quantile,
               learning_rate, count_stddev}); example only: sampling_rate, max_batch_size.
               The keys are the fields of `fedjax_sim.privacy.ClientLevelDP` /
               `ExampleLevelDP`; those of the other level stay None ('poisson' for
               sampling). Client level needs algorithm.weighting='uniform'; at the
               example level each local step's batch is Poisson-sampled with
               sampling_rate, so algorithm.batch_size is not used.

Every key and value is checked up front by `schema.validate_config`; the checks left here
are those that need the data.
"""

from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np

from fedjax_sim import data as fdata
from fedjax_sim.errors import UserError
from fedjax_sim.models import get_model, get_task, load_pretrained, with_trainable
from fedjax_sim.models.trainable import count_parameters
from fedjax_sim.simulation import EngineOptions, simulate
from fedjax_sim.simulation.checkpoint import CheckpointOptions
from fedjax_sim.simulation import INIT_STREAM
from fedjax_sim.cli.schema import (CHECKPOINT_DEFAULTS, build_algorithm, build_optimizer,
                                   finetune_options, preprocess_options, privacy_options,
                                   validate_config)

__all__ = ["build", "build_data", "build_algorithm", "build_optimizer", "run"]


def _get(config, key, default=None):
    return config[key] if key in config else default


def build_data(cfg: ml_collections.ConfigDict, seed: int):
    """Returns (train FederatedData, pooled test dict or None, per-client test FederatedData
    or None, info). With `heldout_clients`, info['heldout'] holds the held-out clients
    (their training split and test split, or their data alone)."""
    source = _get(cfg, "source")
    data_seed = _get(cfg, "seed", seed)
    info = {}
    if source == "synthetic":
        train, client_test, info = fdata.synthetic(
            _get(cfg, "alpha", 1.0), _get(cfg, "beta", 1.0),
            num_clients=_get(cfg, "num_clients", 30), seed=data_seed,
            iid=_get(cfg, "iid", False))
        info = {}
    elif source in ("tff_h5", "leaf"):
        train, client_test, info = _load_files(cfg, source)
    else:
        if source == "digits":
            train_arrays, test = fdata.load_digits(seed=data_seed)
        elif source == "diabetes":
            train_arrays, test, stats = fdata.load_diabetes(seed=data_seed)
            info["target_stats"] = stats
        elif source == "tfds":
            train_arrays, test, info = fdata.load_tfds(
                _get(cfg, "name"), data_dir=_get(cfg, "data_dir"),
                download=_get(cfg, "download", True), label_key=_get(cfg, "label_key"))
        else:  # validate_config names the known sources
            raise UserError(f"config.data.source={source!r} is not a known dataset")
        name = _get(cfg, "partition", "iid")
        num_clients = _get(cfg, "num_clients")
        args = dict(_get(cfg, "partition_args", {}) or {})
        train = fdata.partition(train_arrays, train_arrays["y"], name, num_clients,
                                seed=data_seed, **args)
        fraction = _get(cfg, "client_test_fraction", 0.0) or 0.0
        client_test = None
        if fraction:
            train, client_test = train.split(fraction, seed=data_seed)
        heldout = _get(cfg, "heldout_clients")
        if heldout is not None:
            train, client_test, info["heldout"] = _hold_out(train, client_test, heldout, data_seed)
        return train, test, client_test, info
    heldout = _get(cfg, "heldout_clients")
    if heldout is not None:
        train, client_test, info["heldout"] = _hold_out(train, client_test, heldout, data_seed)
    # Natural datasets: the pooled test set is every test client's examples.
    test = None if client_test is None else dict(client_test.features)
    return train, test, client_test, info


def _load_files(cfg, source):
    """(train, per-client test or None, info) of a TFF HDF5 or LEAF JSON dataset."""
    dataset, train_path, test_path = _get(cfg, "dataset"), _get(cfg, "train_path"), _get(cfg, "test_path")
    common = dict(drop_empty=_get(cfg, "drop_empty", False))
    if dataset == "shakespeare":
        common["seq_len"] = _get(cfg, "seq_len", 80)
    if source == "tff_h5":
        if dataset == "emnist":
            common["only_digits"] = _get(cfg, "only_digits", False)
            return fdata.tff_emnist(train_path, test_path, **common)
        if dataset == "cifar100":
            return fdata.tff_cifar100(train_path, test_path, label=_get(cfg, "label", "label"),
                                      **common)
        return fdata.tff_shakespeare(train_path, test_path, **common)
    if dataset == "femnist":
        return fdata.leaf_femnist(train_path, test_path, **common)
    return fdata.leaf_shakespeare(train_path, test_path, **common)


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


def build(config: ml_collections.ConfigDict) -> dict:
    """Everything `simulate()` needs, built from the config after `validate_config` has
    checked every value (before any data is loaded or anything compiled)."""
    validate_config(config)
    seed = _get(config, "seed", 0)
    train, test, client_test, info = build_data(config.data, seed)

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

    algorithm = build_algorithm(config.algorithm)
    engine_cfg = dict(_get(config, "engine", {}) or {})
    checkpoint = CheckpointOptions(**{**CHECKPOINT_DEFAULTS, **dict(_get(config, "checkpoint", {}) or {})})
    privacy = privacy_options(config)  # ClientLevelDP / ExampleLevelDP, or None
    return dict(model=model, algorithm=algorithm, train_data=train, task=task, checkpoint=checkpoint,
                privacy=privacy, eval_data=test, client_eval_data=client_test,
                heldout_data=info.pop("heldout", None), preprocess=preprocess,
                finetune=finetune_options(config),
                rounds=config.rounds, clients_per_round=config.clients_per_round,
                eval_every=config.eval_every, seed=seed, engine=EngineOptions(**engine_cfg),
                batch_norm=_get(config, "batch_norm", "auto"),
                feature_cache=_get(config, "feature_cache", "auto"), info=info)


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
        allow_config_change: bool = False):
    """Builds and runs the experiment; writes config.json, metrics.jsonl, summary.json,
    params.npz and checkpoints into `workdir`, or resumes the run already there."""
    parts = build(config)
    info = parts.pop("info")
    metadata = {}
    if info.get("target_stats"):
        metadata["target_stats"] = {k: float(v) for k, v in info["target_stats"].items()}
    return simulate(**parts, workdir=workdir, progress=progress, metadata=metadata,
                    config=json.loads(json.dumps(config.to_dict(), default=str)),
                    allow_config_change=allow_config_change)
