"""Up-front config validation (fedjax_sim/cli/validate.py): one line per bad value, nothing
loaded; the registry, the key layout and the value rules follow the code."""

import dataclasses
import glob
import inspect
import os
import re

import ml_collections
import pytest

from fedjax_sim import registry
from fedjax_sim.cli import experiment, layout, options, rules, validate
from fedjax_sim.cli.config import load_config
from fedjax_sim.cli.layout import CHECKPOINT_DEFAULTS
from fedjax_sim.cli.validate import validate_config
from fedjax_sim.data import PARTITIONERS
from fedjax_sim.errors import UserError
from fedjax_sim.models import ZOO
from fedjax_sim.simulation import CheckpointOptions, EngineOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
SHIPPED = sorted(glob.glob(os.path.join(CONFIGS, "*.py")))


def _config(overrides=None, name="digits_fedavg"):
    return load_config(os.path.join(CONFIGS, f"{name}.py"),
                       {k: str(v) if not isinstance(v, str) else v for k, v in (overrides or {}).items()})


def _error(config) -> str:
    with pytest.raises(UserError) as info:
        validate_config(config)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# (config file, overrides, expected substring): one case (at least) for every check.
BAD = [
    # top level
    ("digits_fedavg", {"seed": "-1"}, "config.seed must be an integer >= 0, got -1"),
    ("digits_fedavg", {"seed": "1.5"}, "config.seed must be an integer >= 0, got 1.5"),
    ("digits_fedavg", {"rounds": "0"}, "config.rounds must be an integer >= 1, got 0"),
    ("digits_fedavg", {"rounds": "True"}, "config.rounds must be an integer >= 1, got True"),
    ("digits_fedavg", {"clients_per_round": "2.5"},
     "config.clients_per_round must be an integer >= 1, got 2.5"),
    ("digits_fedavg", {"clients_per_round": "0"},
     "config.clients_per_round must be an integer >= 1, got 0"),
    ("digits_fedavg", {"eval_every": "None"}, "config.eval_every must be an integer >= 1, got None"),
    ("digits_fedavg", {"task": "ranking"},
     "config.task='ranking' is not a known task; choose one of ['classification', 'regression', "
     "'sequence']"),
    # public and natural datasets
    ("emnist_tff", {"data.dataset": "mnist"},
     "config.data.dataset='mnist' is not a tff_h5 dataset; choose one of ['emnist', "
     "'shakespeare', 'cifar100']"),
    ("emnist_tff", {"data.train_path": "None"}, "config.data.train_path must be the path"),
    ("shakespeare_leaf", {"data.seq_len": "0"}, "config.data.seq_len must be an integer >= 1"),
    ("femnist_leaf", {"data.heldout_clients": "1.5"},
     "config.data.heldout_clients must be None, a client count >= 1 or a fraction in (0, 1)"),
    ("femnist_leaf", {"data.drop_empty": "'yes'"}, "config.data.drop_empty must be True or False"),
    ("cifar10_dirichlet", {"data.name": "None"}, "config.data.name must be a TFDS dataset name"),
    ("cifar10_dirichlet", {"data.download": "'no'"}, "config.data.download must be True or False"),
    ("cifar10_dirichlet", {"preprocess.crop_padding": "-2"},
     "config.preprocess: crop_padding must be an integer >= 0, got -2"),
    ("cifar10_dirichlet", {"engine.data_placement": "'disk'"},
     "config.engine.data_placement must be one of ['auto', 'device', 'host']"),
    ("cifar10_dirichlet", {"engine.device_data_budget": "'lots'"},
     "config.engine.device_data_budget must be a number of bytes"),
    ("cifar10_dirichlet", {"engine.device_data_budget": "'2GiB'"}, None),
    ("shakespeare_leaf", {"model.args.hidden": "0"}, "config.model.args.hidden must be"),
    # data
    ("digits_fedavg", {"data": "3"}, "config.data must be a section"),
    ("digits_fedavg", {"data.source": "imagenet"},
     "config.data.source='imagenet' is not a known dataset; choose one of "
     "['digits', 'diabetes', 'synthetic', 'tfds', 'tff_h5', 'leaf']"),
    ("digits_fedavg", {"data.num_clients": "0"}, "config.data.num_clients must be an integer >= 1, got 0"),
    ("digits_fedavg", {"data.num_clients": "None"},
     "config.data.num_clients must be an integer >= 1, got None"),
    ("digits_fedavg", {"data.seed": "'a'"}, "config.data.seed must be an integer >= 0, got 'a'"),
    ("digits_fedavg", {"data.partition": "zipf"},
     "config.data.partition='zipf' is not a known partitioner; choose one of "
     "['dirichlet', 'iid', 'quantity_skew', 'shards']"),
    ("digits_fedavg", {"data.partition_args": "{'alhpa': 0.5}"},
     "config.data.partition_args has unknown argument 'alhpa' for partitioner 'dirichlet'; "
     "did you mean 'alpha'? it takes: alpha, min_size, max_tries"),
    ("digits_fedavg", {"data.partition_args": "{}"},
     "config.data.partition_args needs 'alpha' for partitioner 'dirichlet'"),
    ("digits_fedavg", {"data.partition_args": "{'alpha': 0.5, 'seed': 3}"},
     "unknown argument 'seed' for partitioner 'dirichlet' (the simulator sets it)"),
    ("digits_fedavg", {"data.partition": "iid"},
     "config.data.partition_args has unknown argument 'alpha' for partitioner 'iid'"),
    ("digits_fedavg", {"data.partition_args": "[0.5]"},
     "config.data.partition_args must be a dict of keyword arguments, got [0.5]"),
    ("digits_fedavg", {"data.partition_args.alpha": "0"},
     "config.data.partition_args.alpha must be a number > 0, got 0"),
    ("digits_fedavg", {"data.partition_args": "{'alpha': 0.5, 'max_tries': 0}"},
     "config.data.partition_args.max_tries must be an integer >= 1, got 0"),
    ("digits_fedavg", {"data.partition": "shards", "data.partition_args": "{'shards_per_client': 0}"},
     "config.data.partition_args.shards_per_client must be an integer >= 1, got 0"),
    ("digits_fedavg", {"data.partition": "quantity_skew", "data.partition_args": "{'sigma': -1}"},
     "config.data.partition_args.sigma must be a number >= 0, got -1"),
    ("digits_fedavg", {"data.partition": "quantity_skew", "data.partition_args": "{'min_size': -1}"},
     "config.data.partition_args.min_size must be an integer >= 0, got -1"),
    ("digits_fedavg", {"data.client_test_fraction": "1.0"},
     "config.data.client_test_fraction must be a number in [0, 1), got 1.0"),
    ("digits_fedavg", {"data.client_test_fraction": "-0.1"},
     "config.data.client_test_fraction must be a number in [0, 1), got -0.1"),
    ("synthetic_fedavg", {"data.alpha": "-1"}, "config.data.alpha must be a number >= 0, got -1"),
    ("synthetic_fedavg", {"data.beta": "'big'"}, "config.data.beta must be a number >= 0, got 'big'"),
    ("synthetic_fedavg", {"data.iid": "'yes'"}, "config.data.iid must be True or False, got 'yes'"),
    ("synthetic_fedavg", {"data.iid": "True"},
     "config.data.iid=True needs config.data.alpha=0 and config.data.beta=0"),
    ("synthetic_fedavg", {"data.num_clients": "0"},
     "config.data.num_clients must be an integer >= 1, got 0"),
    ("digits_fedavg", {"clients_per_round": "500"}, "clients_per_round=500 exceeds the 100 clients"),
    ("synthetic_fedavg", {"clients_per_round": "31"}, "clients_per_round=31 exceeds the 30 clients"),
    # transfer learning
    ("cifar10_resnet50_transfer", {"model.trainable": "5"},
     "config.model.trainable must be 'all', 'head', '+'-joined path prefixes"),
    ("cifar10_resnet50_transfer", {"model.pretrained.path": "None"},
     "config.model.pretrained.path must be the path of a weights file"),
    ("cifar10_resnet50_transfer", {"model.pretrained.format": "'pth'"},
     "config.model.pretrained.format must be one of ['auto', 'safetensors', 'npz', 'orbax']"),
    ("cifar10_resnet50_transfer", {"model.pretrained.skip": "'fc'"},
     "config.model.pretrained.skip must be a list of parameter paths or prefixes"),
    ("cifar10_resnet50_transfer", {"model.args.head_hidden": "-1"},
     "config.model.args.head_hidden must be an integer >= 0, got -1"),
    ("cifar10_resnet50_transfer", {"batch_norm": "'fedbn'"},
     "config.batch_norm must be one of ['auto', 'frozen', 'averaged', 'local'], got 'fedbn'"),
    ("cifar10_resnet50_transfer", {"feature_cache": "'yes'"},
     "config.feature_cache must be 'auto', True or False, got 'yes'"),
    ("cifar10_resnet50_transfer", {"preprocess.resize": "(224,)"},
     "config.preprocess: resize must be None or (height, width), two integers >= 1"),
    # model
    ("digits_fedavg", {"model.name": "resnet"},
     "config.model.name='resnet' is not a zoo model; choose one of "
     "['char_lstm', 'char_transformer', 'cnn', 'logistic_regression', 'mlp', 'resnet18', "
     "'resnet20', 'resnet34', 'resnet50']"),
    ("digits_fedavg", {"model.num_outputs": "0"},
     "config.model.num_outputs must be None (from the data) or an integer >= 1, got 0"),
    ("digits_fedavg", {"model.args": "{'hiden': [10]}"},
     "config.model.args has unknown argument 'hiden' for model 'mlp'; did you mean 'hidden'?"),
    ("digits_fedavg", {"model.args": "{'num_outputs': 10}"},
     "unknown argument 'num_outputs' for model 'mlp' (the simulator sets it)"),
    ("digits_fedavg", {"model.args.hidden": "[0]"},
     "config.model.args.hidden must be a list of layer sizes (mlp) or one size (char_lstm), each "
     "an integer >= 1, got [0]"),
    ("digits_fedavg", {"model.args.hidden": "200"},
     "config.model.args.hidden must be a list of integers >= 1, got 200"),
    ("digits_fedavg", {"model.args": "{'dropout': 1.0}"},
     "config.model.args.dropout must be a number in [0, 1), got 1.0"),
    ("digits_fedavg", {"model.args.dense_impl": "fast"},
     "config.model.args.dense_impl must be one of ['auto', 'explicit_transpose', 'xla'], got 'fast'"),
    ("digits_cnn", {"model.args.conv_impl": "fft"},
     "config.model.args.conv_impl must be one of ['auto', 'matmul', 'xla'], got 'fft'"),
    ("synthetic_fedavg", {"model.args": "{'hidden': [10]}"},
     "unknown argument 'hidden' for model 'logistic_regression'"),
    # algorithm
    ("digits_fedavg", {"algorithm.name": "fedprx"},
     "config.algorithm.name='fedprx' is not known; choose one of ['fedavg', 'fedprox', "
     "'scaffold', 'fednova', 'fedper', 'ditto']"),
    ("digits_fedavg", {"algorithm.name": "fedprox"},
     "config.algorithm.mu is missing; fedprox needs it (a number >= 0)"),
    ("digits_fedprox", {"algorithm.name": "fedavg"},
     "unknown config key 'algorithm.mu' for algorithm 'fedavg': it is a parameter of fedprox; "
     "set config.algorithm.name to one of them or drop it"),
    ("digits_fedprox", {"algorithm.mu": "-1"}, "config.algorithm.mu must be a number >= 0, got -1"),
    ("digits_scaffold", {"algorithm.learning_rate": "0"},
     "config.algorithm.learning_rate must be a number > 0, got 0"),
    ("digits_scaffold", {"algorithm.global_learning_rate": "None"},
     "config.algorithm.global_learning_rate must be a number > 0, got None"),
    ("digits_scaffold", {"algorithm.server_optimizer": "{'name': 'adamw', 'learning_rate': 1}"},
     None),  # a server optimizer may replace the global step size
    ("digits_fednova", {"algorithm.momentum": "1.0"},
     "config.algorithm.momentum must be a number in [0, 1), got 1.0"),
    ("digits_fednova", {"algorithm.proximal_mu": "0.1"},
     "config.algorithm: FedNova with both momentum and a proximal term is not supported"),
    ("digits_fedper", {"algorithm.head": "''"}, "config.algorithm.head must be a parameter path prefix"),
    ("digits_fedper", {"algorithm.head_passes": "0"},
     "config.algorithm.head_passes must be an integer >= 1 (FedRep) or None (FedPer), got 0"),
    ("digits_ditto", {"algorithm.lam": "-0.1"}, "config.algorithm.lam must be a number >= 0, got -0.1"),
    ("digits_ditto", {"algorithm.personal_optimizer": "{'name': 'sgd'}"},
     "config.algorithm.personal_optimizer.learning_rate must be a number > 0, got None"),
    ("digits_ditto", {"finetune.steps": "0"}, "config.finetune: FineTune.steps must be an integer >= 1, got 0"),
    ("digits_ditto", {"finetune": "{'step': 3}"},
     "unknown config key 'finetune.step'; did you mean 'finetune.steps'?"),
    ("digits_ditto", {"data.client_test_fraction": "0"},
     "config.finetune needs per-client test splits; set config.data.client_test_fraction"),
    ("digits_fedavg", {"algorithm.client_optimizer.name": "sgdd"},
     "config.algorithm.client_optimizer.name='sgdd' is not an optax optimizer; did you mean 'sgd'?"),
    ("digits_fedavg", {"algorithm.server_optimizer.name": "chain"},
     "config.algorithm.server_optimizer.name='chain' is not an optax optimizer"),
    ("digits_fedavg", {"algorithm.client_optimizer.learning_rate": "-1"},
     "config.algorithm.client_optimizer.learning_rate must be a number > 0, got -1"),
    ("digits_fedavg", {"algorithm.server_optimizer.learning_rate": "'high'"},
     "config.algorithm.server_optimizer.learning_rate must be a number > 0, got 'high'"),
    ("digits_fedavg", {"algorithm.server_optimizer.args": "{'momentun': 0.9}"},
     "config.algorithm.server_optimizer.args has unknown argument 'momentun' for optax.sgd; "
     "did you mean 'momentum'?"),
    ("digits_fedavg", {"algorithm.server_optimizer.args": "{'learning_rate': 0.9}"},
     "unknown argument 'learning_rate' for optax.sgd (the simulator sets it)"),
    ("digits_fedavg", {"algorithm.server_optimizer": "None"},
     "config.algorithm.server_optimizer is missing"),
    ("digits_fedavg", {"algorithm.local_steps": "5"},
     "set exactly one of config.algorithm.local_epochs and config.algorithm.local_steps "
     "(the other to None), got local_epochs=1, local_steps=5"),
    ("digits_fedavg", {"algorithm.local_epochs": "None"},
     "set exactly one of config.algorithm.local_epochs and config.algorithm.local_steps"),
    ("digits_fedavg", {"algorithm.local_epochs": "0"},
     "config.algorithm.local_epochs must be an integer >= 1, got 0"),
    ("digits_fedavg", {"algorithm.local_epochs": "None", "algorithm.local_steps": "2.5"},
     "config.algorithm.local_steps must be an integer >= 1, got 2.5"),
    ("digits_fedavg", {"algorithm.batch_size": "0"},
     "algorithm.batch_size must be an integer >= 1, got 0"),
    ("digits_fedavg", {"algorithm.batch_size": "-4"},
     "algorithm.batch_size must be an integer >= 1, got -4"),
    ("digits_fedavg", {"algorithm.weighting": "equal"},
     "config.algorithm.weighting='equal' is not known; choose one of ['num_examples', 'uniform']"),
    # engine
    ("digits_fedavg", {"engine.unroll": "-2"},
     "config.engine.unroll must be 'auto', True or an integer >= 1, got -2"),
    ("digits_fedavg", {"engine.clients_per_chunk": "0"},
     "config.engine.clients_per_chunk must be 'auto', None or an integer >= 1, got 0"),
    ("digits_fedavg", {"engine.rounds_per_call": "fast"},
     "config.engine.rounds_per_call must be 'auto' or an integer >= 1, got 'fast'"),
    ("digits_fedavg", {"engine": "[1]"}, "config.engine must be a section"),
    # checkpoint
    ("digits_fedavg", {"checkpoint.every_rounds": "0"},
     "config.checkpoint.every_rounds must be None or an integer >= 1, got 0"),
    ("digits_fedavg", {"checkpoint.every_rounds": "True"},
     "config.checkpoint.every_rounds must be None or an integer >= 1, got True"),
    ("digits_fedavg", {"checkpoint.every_seconds": "0"},
     "config.checkpoint.every_seconds must be None or a number > 0, got 0"),
    ("digits_fedavg", {"checkpoint.max_to_keep": "0"},
     "config.checkpoint.max_to_keep must be an integer >= 1, got 0"),
    # unknown keys below the top level
    ("digits_fedavg", {"checkpoint": "{'every_round': 5}"},
     "unknown config key 'checkpoint.every_round'; did you mean 'checkpoint.every_rounds'? "
     "known keys in config.checkpoint: every_rounds, every_seconds, max_to_keep"),
    ("digits_fedavg", {"engine": "{'unrol': 2}"},
     "unknown config key 'engine.unrol'; did you mean 'engine.unroll'? known keys in config.engine: "
     "client_states, clients_per_chunk, data_placement, device_data_budget, mesh, rounds_per_call, unroll"),
    ("digits_fedavg", {"model": "{'name': 'mlp', 'arg': {}}"},
     "unknown config key 'model.arg'; did you mean 'model.args'?"),
    ("digits_fedavg", {"data": "{'source': 'digits', 'num_client': 10}"},
     "unknown config key 'data.num_client'; did you mean 'data.num_clients'?"),
    ("digits_fedavg", {"algorithm.client_optimizer": "{'name': 'sgd', 'lr': 0.1}"},
     "unknown config key 'algorithm.client_optimizer.lr'; "),
    # privacy
    ("digits_dp_fedavg", {"privacy": "'yes'"}, "config.privacy must be a section"),
    ("digits_dp_fedavg", {"privacy.level": "'user'"},
     "config.privacy.level must be one of ['client', 'example', 'dp_ftrl']"),
    ("digits_dp_fedavg", {"privacy.level": "None"},
     "config.privacy.level is missing; set it to 'client' (DP-FedAvg; it also needs "
     "noise_multiplier, delta), 'example' (DP-SGD in every client; it also needs clip_norm, "),
    ("digits_dp_ftrl", {"privacy.min_separation": "10"},
     "config.privacy: privacy.min_separation=10 splits the 100 clients into groups of 10, fewer "
     "than clients_per_round=20"),
    ("digits_dp_ftrl", {"privacy.bands": "0"}, "config.privacy.bands must be an integer >= 1, got 0"),
    ("digits_dp_ftrl", {"privacy.sampling": "'fixed'"},
     "config.privacy.sampling applies to level='client'"),
    ("digits_dp_fedavg", {"privacy.clip_norm": "0"}, "config.privacy.clip_norm must be a number > 0, got 0"),
    ("digits_dp_fedavg", {"privacy.clip_norm": "-1"}, "config.privacy.clip_norm must be a number > 0"),
    ("digits_dp_fedavg", {"privacy.noise_multiplier": "-0.5"},
     "config.privacy.noise_multiplier must be a number >= 0, got -0.5"),
    ("digits_dp_fedavg", {"privacy.noise_multiplier": "None"},
     "config.privacy.noise_multiplier is missing; level='client' needs it"),
    ("digits_dp_fedavg", {"privacy.delta": "1.0"}, "config.privacy.delta must be a number > 0 and < 1"),
    ("digits_dp_fedavg", {"privacy.delta": "0"}, "config.privacy.delta must be a number > 0 and < 1"),
    ("digits_dp_fedavg", {"privacy.accountant": "'moments'"},
     "config.privacy.accountant='moments' is not known; choose one of ['rdp', 'pld']"),
    ("digits_dp_fedavg", {"privacy.sampling": "'uniform'"},
     "config.privacy.sampling='uniform' is not known; choose one of ['poisson', 'fixed']"),
    ("digits_dp_fedavg", {"privacy.sampling": "'fixed'", "privacy.accountant": "'pld'"},
     "config.privacy.accountant='pld' cannot account for sampling='fixed'"),
    ("digits_dp_fedavg", {"privacy.sampling_rate": "0.1"},
     "config.privacy.sampling_rate applies to level='example'; drop it or set it to None"),
    ("digits_dp_fedavg", {"privacy.target_epsilon": "0"},
     "config.privacy.target_epsilon must be a number > 0, got 0"),
    ("digits_dp_fedavg", {"privacy.max_cohort_size": "0"},
     "config.privacy.max_cohort_size must be an integer >= 1, got 0"),
    ("digits_dp_fedavg", {"privacy.noise_cohort_size": "1.5"},
     "config.privacy.noise_cohort_size must be an integer >= 1, got 1.5"),
    ("digits_dp_fedavg", {"algorithm.weighting": "'num_examples'"},
     "config.privacy.level='client' needs config.algorithm.weighting='uniform', got 'num_examples'"),
    ("digits_dp_fedavg", {"clients_per_round": "10", "privacy.adaptive_clipping": "{'target_quantile': 0.5}"},
     "config.privacy.adaptive_clipping.count_stddev=None is too small for noise_multiplier=1: "),
    ("digits_dp_fedavg", {"privacy.adaptive_clipping": "{'target_quantile': 1.5}"},
     "config.privacy.adaptive_clipping.target_quantile must be a number > 0 and < 1, got 1.5"),
    ("digits_dp_fedavg", {"privacy.adaptive_clipping": "{'learning_rate': -1}"},
     "config.privacy.adaptive_clipping.learning_rate must be a number > 0, got -1"),
    ("digits_dp_fedavg", {"privacy.adaptive_clipping": "{'target_quantil': 0.5}"},
     "unknown config key 'privacy.adaptive_clipping.target_quantil'; did you mean "
     "'privacy.adaptive_clipping.target_quantile'?"),
    ("digits_dp_fedavg", {"privacy.adaptive_clipping": "3"},
     "config.privacy.adaptive_clipping must be None (a fixed clip norm) or a section"),
    ("digits_compressed", {"aggregator.compression": "[{'name': 'zip'}]"},
     "config.aggregator.compression[0].name='zip' is not a known compression; choose one of "
     "['quantize', 'sign', 'top_k', 'random_k']"),
    ("digits_compressed", {"aggregator.compression": "[{'name': 'quantize', 'bits': 20}]"},
     "config.aggregator.compression[0]: quantize bits must be an integer from 1 to 16, got 20"),
    ("digits_compressed", {"aggregator.compression": "[{'name': 'top_k', 'fracton': 0.1}]"},
     "config.aggregator.compression[0] has unknown argument 'fracton' for top_k(); did you "
     "mean 'fraction'?"),
    ("digits_compressed", {"aggregator.compression": "{'name': 'sign'}"},
     "config.aggregator.compression must be a list of parts"),
    ("digits_robust", {"aggregator.robust": "dict(name='mediann')"},
     "config.aggregator.robust.name='mediann' is not a robust aggregation rule; choose one of "),
    ("digits_robust", {"aggregator.robust": "dict(name='trimmed_mean', beta=0.6)"},
     "config.aggregator.robust: "),
    ("digits_robust", {"aggregator.robust": "dict(name='krum', beta=0.2)"},
     "config.aggregator.robust has unknown argument 'beta' for krum()"),
    ("digits_robust", {"aggregator.secure": "dict(clip_norm=5.0)"},
     "config.aggregator.robust ('trimmed_mean') needs every client's update, but under secure "
     "aggregation the server sees only their sum; keep one of them"),
    ("digits_robust", {"attack.update": "dict(name='flip')"},
     "config.attack.update.name='flip' is not a known update attack; choose one of "),
    ("digits_robust", {"attack.update": "dict(name='sign_flip', scale=-1)"},
     "config.attack.update: sign_flip scale must be a positive finite number, got -1"),
    ("digits_robust", {"attack.data": "dict(name='backdoor')"},
     "config.attack.data needs 'target' for backdoor()"),
    ("digits_robust", {"attack.fraction": "1.5"},
     "config.attack: attack fraction must be a number in [0, 1], got 1.5"),
    ("digits_robust", {"attack.clients": "[1, 2]"},
     "config.attack: an Attack needs either fraction="),
    ("digits_robust", {"attack.update": "None"},
     "config.attack: an Attack needs data=... "),
    ("digits_robust", {"attack": "dict(fractoin=0.1, update=dict(name='sign_flip'))"},
     "unknown config key 'attack.fractoin'; did you mean 'attack.fraction'?"),
    ("digits_secure_aggregation", {"aggregator.encrypted": "{'scheme': 'ckks'}"},
     "config.aggregator holds both secure and encrypted aggregation; keep one of them"),
    ("digits_secure_aggregation", {"aggregator.secure.modulus_bits": "8"},
     "config.aggregator.secure: "),
    ("digits_distributed_dp", {"privacy.secure_aggregation.modulus_bits": "40"},
     "config.privacy.secure_aggregation.modulus_bits must be an integer in [2, 32], got 40"),
    ("digits_distributed_dp", {"privacy.secure_aggregation.dropout_rate": "1.0"},
     "config.privacy.secure_aggregation.dropout_rate must be a number >= 0 and < 1, got 1.0"),
    ("digits_distributed_dp", {"privacy.secure_aggregation": "{'modulus_bit': 32}"},
     "unknown config key 'privacy.secure_aggregation.modulus_bit'; did you mean "
     "'privacy.secure_aggregation.modulus_bits'?"),
    ("digits_fedavg", {"broadcast.bits": "17"},
     "config.broadcast: "),
    ("digits_fedavg", {"broadcast.rotation": "'kashin'"},
     "config.broadcast.bits is missing"),
    ("digits_fedavg", {"broadcast": "{'bits': 8, 'rotation': 'kashin'}"},
     "config.broadcast: "),
    ("digits_dp_sgd", {"privacy.sampling_rate": "0"},
     "config.privacy.sampling_rate must be a number > 0 and <= 1, got 0"),
    ("digits_dp_sgd", {"privacy.sampling_rate": "1.5"},
     "config.privacy.sampling_rate must be a number > 0 and <= 1, got 1.5"),
    ("digits_dp_sgd", {"privacy.clip_norm": "None"},
     "config.privacy.clip_norm is missing; level='example' needs it"),
    ("digits_dp_sgd", {"privacy.max_batch_size": "0"},
     "config.privacy.max_batch_size must be an integer >= 1, got 0"),
    ("digits_dp_sgd", {"privacy.noise_cohort_size": "100"},
     "config.privacy.noise_cohort_size applies to level='client'"),
]


@pytest.mark.parametrize("name,overrides,expected", BAD,
                         ids=[f"{n}:{','.join(o)}={','.join(o.values())}" for n, o, _ in BAD])
def test_bad_value_gives_one_line_error(name, overrides, expected):
    if expected is None:
        validate_config(_config(overrides, name))
        return
    message = _error(_config(overrides, name))
    assert expected in message, message


@pytest.mark.parametrize("path", SHIPPED, ids=[os.path.basename(p) for p in SHIPPED])
def test_every_shipped_config_validates(path):
    validate_config(load_config(path))


def test_good_variants_validate():
    for name, overrides in [
        ("digits_fedavg", {"algorithm.local_epochs": "None", "algorithm.local_steps": "5"}),
        ("digits_fedavg", {"algorithm.batch_size": "None", "model.num_outputs": "10"}),
        ("digits_fedavg", {"data.partition": "shards", "data.partition_args": "{'shards_per_client': 3}"}),
        ("digits_fedavg", {"data.partition": "quantity_skew", "data.partition_args": "{}"}),
        ("digits_fedavg", {"data.partition": "iid", "data.partition_args": "None",
                           "data.client_test_fraction": "0"}),
        ("digits_fedavg", {"data.source": "synthetic"}),  # digits-only keys are ignored
        ("digits_fedavg", {"engine.unroll": "True", "engine.clients_per_chunk": "None",
                           "engine.rounds_per_call": "4", "engine": "None"}),
        ("digits_fedavg", {"checkpoint": "None"}),
        ("digits_fedavg", {"checkpoint.every_rounds": "5", "checkpoint.every_seconds": "None"}),
        ("digits_fedavg", {"model.args": "{'hidden': [], 'dropout': 0.5, 'dense_impl': 'xla'}"}),
        ("digits_cnn", {"model.args.conv_impl": "xla", "model.args.dense_impl": "explicit_transpose"}),
        ("synthetic_fedavg", {"data.iid": "True", "data.alpha": "0", "data.beta": "0"}),
        ("digits_fedavg", {"algorithm.server_optimizer": "{'name': 'adam', 'learning_rate': 1e-3, "
                                                         "'args': {'b1': 0.9}}"}),
        ("digits_dp_fedavg", {"privacy": "None"}),
        ("digits_dp_fedavg", {"privacy.sampling": "'fixed'", "privacy.max_cohort_size": "None"}),
        ("digits_dp_fedavg", {"privacy.accountant": "'pld'", "privacy.target_epsilon": "10"}),
        ("digits_dp_fedavg", {"privacy.adaptive_clipping": "{'target_quantile': 0.7}",
                              "privacy.clip_norm": "None", "privacy.noise_multiplier": "0.5"}),
        ("digits_dp_fedavg", {"privacy.noise_cohort_size": "1000", "privacy.noise_multiplier": "0"}),
        ("digits_dp_sgd", {"privacy.max_batch_size": "20", "privacy.accountant": "'pld'"}),
        ("digits_dp_sgd", {"algorithm.weighting": "'num_examples'"}),  # fine at the example level
    ]:
        validate_config(_config(overrides, name))


def test_minimal_config_uses_defaults():
    """seed, task, engine, checkpoint and most section keys are optional."""
    validate_config(ml_collections.ConfigDict(dict(
        rounds=1, clients_per_round=2, eval_every=1,
        data=dict(source="digits", num_clients=5),
        model=dict(name="logistic_regression"),
        algorithm=dict(client_optimizer=dict(name="sgd", learning_rate=0.1),
                       server_optimizer=dict(name="sgd", learning_rate=1.0), local_epochs=1))))


def test_missing_sections_and_keys():
    base = _config().to_dict()
    for drop, expected in [("data", "config.data is missing"), ("model", "config.model is missing"),
                           ("algorithm", "config.algorithm is missing"),
                           ("rounds", "config.rounds is missing")]:
        config = ml_collections.ConfigDict({k: v for k, v in base.items() if k != drop})
        assert expected in _error(config)
    config = _config()
    del config.data["num_clients"]
    assert "config.data.num_clients is missing; the 'digits' source needs it" in _error(config)
    assert "a config must be an ml_collections.ConfigDict" in _error(3)


def _write(tmp_path, body: str) -> str:
    path = tmp_path / "my_config.py"
    path.write_text("import ml_collections\n\n\ndef get_config():\n    c = ml_collections.ConfigDict()\n"
                    + "".join(f"    {line}\n" for line in body.strip().splitlines())
                    + "    return c\n")
    return str(path)


GOOD_BODY = """
c.seed = 0
c.rounds = 3
c.clients_per_round = 10
c.eval_every = 1
c.data = dict(source='digits', num_clients=20, partition='iid', partition_args={})
c.model = dict(name='mlp', num_outputs=None, args=dict(hidden=[16]))
c.algorithm = dict(name='fedavg', client_optimizer=dict(name='sgd', learning_rate=0.1, args={}),
                   server_optimizer=dict(name='sgd', learning_rate=1.0, args={}),
                   local_epochs=1, local_steps=None, batch_size=10, weighting='uniform')
"""


def test_config_file_with_a_typo_key(tmp_path):
    validate_config(load_config(_write(tmp_path, GOOD_BODY)))
    typo = GOOD_BODY.replace("c.clients_per_round = 10", "c.clients_per_rond = 10")
    message = _error(load_config(_write(tmp_path, typo)))
    assert message.startswith("unknown config key 'clients_per_rond'; did you mean "
                              "'clients_per_round'? known keys at the top level: "), message
    for key in layout.TOP_LEVEL_KEYS:
        assert key in message
    nested = GOOD_BODY.replace("weighting='uniform'", "weighting='uniform', batchsize=4")
    assert "unknown config key 'algorithm.batchsize'; did you mean 'algorithm.batch_size'" in \
        _error(load_config(_write(tmp_path, nested)))
    extra = GOOD_BODY + "c.checkpoint = dict(max_to_keep=2, every_minutes=5)\n"
    assert "unknown config key 'checkpoint.every_minutes'" in _error(load_config(_write(tmp_path, extra)))


def test_validation_loads_no_data_and_compiles_nothing(monkeypatch):
    import jax

    import fedjax_sim.data as fdata
    from fedjax_sim.data.sources import builtin

    def forbidden(*args, **kwargs):
        raise AssertionError("validate_config must not load data or compile")

    for module in (fdata, builtin):
        for name in ("load_digits", "load_diabetes", "synthetic"):
            monkeypatch.setattr(module, name, forbidden)
    monkeypatch.setattr(fdata, "partition", forbidden)
    monkeypatch.setattr(jax, "jit", forbidden)
    for path in SHIPPED:
        validate_config(load_config(path))


# -- the schema follows the code ----------------------------------------------------------
def test_checkpoint_defaults_match_the_code():
    assert CHECKPOINT_DEFAULTS == dict(every_rounds=None, every_seconds=60.0, max_to_keep=3)
    fields = {f.name: f.default for f in dataclasses.fields(CheckpointOptions)}
    assert {k: fields[k] for k in CHECKPOINT_DEFAULTS} == CHECKPOINT_DEFAULTS


def test_registry_names_what_build_data_reads():
    # build_data looks the source up and reads only the keys the registry names.
    build_data = inspect.getsource(experiment.build_data)
    read = set(re.findall(r'_get\(cfg, "(\w+)"', build_data)) | set(re.findall(r'cfg\["(\w+)"\]', build_data))
    assert read and read <= set(registry.PARTITION_KEYS) | set(registry.COMMON_DATA_KEYS)
    assert "if source ==" not in build_data and "elif" not in build_data
    for name, source in registry.DATA_SOURCES.items():
        for key in source.arguments:
            assert key == "dataset" or key in rules.DATA_RULES, f"{name}: add DATA_RULES[{key!r}]"
        assert bool(source.datasets) == ("dataset" in source.arguments), name
    assert set(layout.keys_at(None, ("data",))) == set(registry.all_data_keys())
    build = inspect.getsource(experiment.build)
    read = set(re.findall(r'_get\(config, "(\w+)"', build)) | set(re.findall(r"\bconfig\.(\w+)", build))
    read -= {"to_dict"}
    assert read and read <= set(layout.TOP_LEVEL_KEYS)


def _taken(fn, fixed):
    return {n for n, p in inspect.signature(fn).parameters.items()
            if n not in fixed and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def test_every_partitioner_and_model_argument_has_a_rule():
    for name, fn in PARTITIONERS.items():
        missing = _taken(fn, validate.PARTITIONER_FIXED) - set(rules.ARG_RULES["partition"])
        assert not missing, f"partitioner {name!r}: add ARG_RULES['partition'] for {missing}"
    for name, fn in ZOO.items():
        missing = _taken(fn, validate.MODEL_FIXED) - set(rules.ARG_RULES["model"])
        assert not missing, f"model {name!r}: add ARG_RULES['model'] for {missing}"


def test_every_algorithm_parameter_is_checked():
    """Each builder parameter is an optimizer section, part of the local schedule, or has an
    ALGORITHM_RULES entry; and the defaults of optional ones are accepted."""
    for name, entry in registry.ALGORITHMS.items():
        assert set(entry.optional_optimizers) <= set(entry.optimizers), name
        for param in entry.parameters:
            assert (param in entry.optimizers or param in validate.SCHEDULE_KEYS
                    or param in rules.ALGORITHM_RULES), f"{name}: add a rule for {param!r}"
            assert param.endswith("optimizer") == (param in entry.optimizers), (name, param)
    from fedjax_sim.simulation import FineTune
    assert set(layout.FINETUNE_KEYS) | {"optimizer"} == {f.name for f in dataclasses.fields(FineTune)}


def test_client_level_dp_applies_to_the_algorithms_whose_clients_send_only_updates():
    assert registry.client_dp_algorithms() == ["fedavg", "fedprox", "fedper", "ditto"]
    assert "each client also sends" in registry.ALGORITHMS["scaffold"].client_dp


def _quoted(message):
    return set(re.findall(r"'(\w+)'", message.split(", got")[0]))


def test_allowed_values_match_the_code():
    from fedjax_sim.algorithms import fedavg
    from fedjax_sim.models.conv import conv_function
    from fedjax_sim.models.dense import dense_function
    import optax

    for fn, allowed in ((dense_function, rules.DENSE_IMPLS), (conv_function, rules.CONV_IMPLS)):
        for value in allowed:
            fn(value)
        with pytest.raises(UserError) as info:
            fn("no_such_impl")
        assert _quoted(str(info.value)) == set(allowed)
    from fedjax_sim.algorithms import WEIGHTINGS

    for value in WEIGHTINGS:
        fedavg(optax.sgd(1.0), weighting=value)
    with pytest.raises(UserError) as info:
        fedavg(optax.sgd(1.0), weighting="no_such_weighting")
    assert _quoted(str(info.value)) == set(WEIGHTINGS)
    engine_keys = {f.name for f in dataclasses.fields(EngineOptions)}
    assert "unknown config key 'engine.x'; known keys in config.engine: " + \
        ", ".join(sorted(engine_keys)) in _error(_config({"engine": "{'x': 1}"}))


def test_privacy_keys_match_the_dataclasses():
    from fedjax_sim.privacy import AdaptiveClipping

    for level, cls in registry.PRIVACY_LEVELS.items():
        assert set(layout.PRIVACY_LEVEL_KEYS[level]) == {f.name for f in dataclasses.fields(cls)}
    assert set(layout.ADAPTIVE_CLIPPING_KEYS) == {f.name for f in dataclasses.fields(AdaptiveClipping)}
    for key, unset in layout.PRIVACY_UNSET.items():
        owners = [cls for cls in registry.PRIVACY_LEVELS.values()
                  if key in {f.name for f in dataclasses.fields(cls)}]
        assert [{f.name: f.default for f in dataclasses.fields(c)}[key] for c in owners] == [unset]


def test_privacy_section_builds_the_options_the_python_api_takes():
    from fedjax_sim.privacy import AdaptiveClipping, ClientLevelDP, ExampleLevelDP

    assert options.privacy_options(_config()) is None  # no section: no privacy
    assert options.privacy_options(_config(name="digits_dp_fedavg")) == ClientLevelDP(
        noise_multiplier=1.0, delta=1e-3, clip_norm=0.5)
    adaptive = _config({"privacy.adaptive_clipping": "{'target_quantile': 0.7}",
                        "privacy.clip_norm": "None"}, name="digits_dp_fedavg")
    assert options.privacy_options(adaptive).adaptive_clipping == AdaptiveClipping(target_quantile=0.7)
    assert options.privacy_options(_config(name="digits_dp_sgd")) == ExampleLevelDP(
        clip_norm=1.0, noise_multiplier=1.5, sampling_rate=0.1, delta=1e-4)
