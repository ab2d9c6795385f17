"""The frozen-backbone feature cache: where only a model's head trains, every example's
backbone features are computed once and the rounds run the head alone.

It applies where the model has a features/head split (`Model.head_split`), only the
head's parameters train, the backbone computes the same in training as in inference (no
dropout; BatchNorm statistics frozen or absent) and nothing augments the inputs. Then
training through the frozen backbone and training the head on cached features give the
same results up to float round-off.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from fedjax_sim.data.augment import Preprocess
from fedjax_sim.errors import UserError
from fedjax_sim.models.adapter import Model
from fedjax_sim.trees import path_names, under


def feature_cache_blocker(model: Model, params, preprocess) -> str | None:
    """Why the feature cache cannot serve this run, or None if it can."""
    split_ = model.head_split
    if split_ is None:
        return f"model {model.name} has no features/head split (from_nnx(..., head=...))"
    outside = [n for n in path_names(params) if not any(under(n, h) for h in split_.names)]
    if outside:
        return (f"parameters outside the head {list(split_.names)} train (e.g. {outside[0]}); "
                f"freeze them with with_trainable(model, 'head')")
    if not split_.fixed:
        return ("the frozen backbone computes differently in training (dropout, or BatchNorm "
                "statistics updated: use batch_norm='frozen')")
    if isinstance(preprocess, Preprocess) and preprocess.augments:
        return "augmentation (random crop or flip) changes the inputs at every step"
    return None


def check_feature_cache(feature_cache) -> None:
    if feature_cache not in ("auto", True, False):
        raise UserError(f"feature_cache must be 'auto', True or False, got {feature_cache!r}")


def use_feature_cache(feature_cache, model: Model, params, preprocess) -> bool:
    if feature_cache is False:
        return False
    reason = feature_cache_blocker(model, params, preprocess)
    if reason is not None and feature_cache is True:
        raise UserError(f"feature_cache=True cannot apply: {reason}; or set feature_cache='auto'")
    return reason is None


def feature_extractor(head_split, params, model_state, preprocess, input_key: str,
                       batch_size: int):
    """`convert(data)`: `data` (FederatedData, dict of arrays or None) with its inputs
    replaced by the backbone's features (host numpy arrays, computed in fixed-size
    batches on the device); `convert.examples` counts the examples converted."""
    def features(p, s, x):
        if preprocess is not None:
            x = preprocess({input_key: x}, None, train=False)[input_key]
        return head_split.features(p, s, x)

    run = jax.jit(features)

    def of(x):
        x = np.asarray(x)
        n = x.shape[0]
        b = max(1, min(batch_size, n))
        parts = []
        for lo in range(0, n, b):
            chunk = x[lo:lo + b]
            if chunk.shape[0] < b:  # one shape, one compilation
                chunk = np.concatenate([chunk, np.repeat(chunk[:1], b - chunk.shape[0], axis=0)])
            parts.append(np.asarray(run(params, model_state, chunk))[:min(b, n - lo)])
        convert.examples += n
        return np.concatenate(parts) if parts else np.zeros((0,), np.float32)

    def convert(data):
        if data is None:
            return None
        if hasattr(data, "client_ids"):
            return type(data)({**data.features, input_key: of(data.features[input_key])},
                              data.offsets, data.client_ids)
        return {**data, input_key: of(data[input_key])}

    convert.examples = 0
    return convert


def head_model(model: Model, feature_shape: tuple[int, ...]) -> Model:
    """The model's head on cached features: same init (params and state), `apply` runs the
    head only."""
    head = model.head_split

    def apply(params, state, f, *, train=False, rng=None):
        return head.apply_head(params, state, f, train=train, rng=rng)

    return Model(init=model.init, apply=apply, input_shape=feature_shape,
                 name=f"{model.name}[cached features]")


def cache_features(model: Model, params, model_state, preprocess, input_key: str,
                   batch_size: int, datasets: dict) -> tuple[Model, dict, dict]:
    """Converts every dataset in `datasets` (name -> FederatedData, dict of arrays, a tuple
    of those, or None) to backbone features; returns (the head model on features, the
    converted datasets, what the summary records)."""
    start = time.perf_counter()
    to_features = feature_extractor(model.head_split, params, model_state, preprocess,
                                    input_key, batch_size)
    converted = {name: (tuple(to_features(part) for part in value)
                        if isinstance(value, tuple) else to_features(value))
                 for name, value in datasets.items()}
    shape = tuple(converted["train"].features[input_key].shape[1:])
    info = {"feature_shape": list(shape), "examples": to_features.examples,
            "seconds": round(time.perf_counter() - start, 3)}
    return head_model(model, shape), converted, info
