"""Models researchers use as FL baselines, as Flax NNX modules behind the functional adapter.

- `logistic_regression`: one dense layer on the flattened input (multinomial logistic
  regression; McMahan et al. 2017's convex baseline, FedProx's Synthetic model).
- `mlp`: dense layers with ReLU (e.g. 10-10-1 for diabetes, 200-200 for the FedAvg 2NN).
- `cnn`: the EMNIST CNN of Reddi et al. 2021 / TFF's FedAvg baselines:
  conv3x3(32)-relu, conv3x3(64)-relu, maxpool 2x2, dropout 0.25, dense 128-relu,
  dropout 0.5, dense num_classes (valid padding: 1.2 M parameters on 28x28x1 inputs).
  On CPU its convolutions are computed as im2col + matmul (models/conv.py), which is
  what makes vmapped and scanned local training fast there.

Every zoo model's dense layers take `dense_impl` ('auto': on CPU the gradient's
transposes are explicit copies, models/dense.py, which makes vmapped small dense layers
~1.6x faster there; 'xla': XLA's own dot).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
from flax import nnx

from fedjax_sim.errors import UserError
from fedjax_sim.models.adapter import Model, from_nnx
from fedjax_sim.models.conv import conv_function
from fedjax_sim.models.dense import dense_function


class LogisticRegression(nnx.Module):
    def __init__(self, in_features: int, num_outputs: int, *, dense_impl: str = "auto",
                 rngs: nnx.Rngs):
        self.dense = nnx.Linear(in_features, num_outputs, dot_general=dense_function(dense_impl),
                                rngs=rngs)

    def __call__(self, x):
        return self.dense(x.reshape(x.shape[0], -1))


class MLP(nnx.Module):
    def __init__(self, in_features: int, hidden: Sequence[int], num_outputs: int, *,
                 dropout: float = 0.0, dense_impl: str = "auto", rngs: nnx.Rngs):
        sizes = [in_features, *hidden]
        dot = dense_function(dense_impl)
        self.hidden = nnx.List([nnx.Linear(a, b, dot_general=dot, rngs=rngs)
                                for a, b in zip(sizes, sizes[1:])])
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.out = nnx.Linear(sizes[-1], num_outputs, dot_general=dot, rngs=rngs)

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for layer in self.hidden:
            x = self.dropout(jax.nn.relu(layer(x)))
        return self.out(x)


class CNN(nnx.Module):
    def __init__(self, input_shape: Sequence[int], num_outputs: int, *, conv_impl: str = "auto",
                 dense_impl: str = "auto", rngs: nnx.Rngs):
        h, w, c = input_shape
        conv = conv_function(conv_impl)
        dot = dense_function(dense_impl)
        self.conv1 = nnx.Conv(c, 32, (3, 3), padding="VALID", conv_general_dilated=conv, rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, (3, 3), padding="VALID", conv_general_dilated=conv, rngs=rngs)
        self.drop1 = nnx.Dropout(0.25, rngs=rngs)
        flat = ((h - 4) // 2) * ((w - 4) // 2) * 64
        if flat <= 0:
            raise UserError(f"the cnn needs inputs of at least 6x6 pixels, got {h}x{w}; "
                            f"use model.name='mlp' for smaller inputs")
        self.dense = nnx.Linear(flat, 128, dot_general=dot, rngs=rngs)
        self.drop2 = nnx.Dropout(0.5, rngs=rngs)
        self.out = nnx.Linear(128, num_outputs, dot_general=dot, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.conv1(x))
        x = jax.nn.relu(self.conv2(x))
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        x = self.drop1(x).reshape(x.shape[0], -1)
        x = self.drop2(jax.nn.relu(self.dense(x)))
        return self.out(x)


def logistic_regression(input_shape: Sequence[int], num_outputs: int,
                        dense_impl: str = "auto") -> Model:
    features = math.prod(input_shape)
    dense_function(dense_impl)  # validate now, not inside the module factory
    return from_nnx(lambda rngs: LogisticRegression(features, num_outputs, dense_impl=dense_impl,
                                                    rngs=rngs),
                    tuple(input_shape), name="logistic_regression")


def mlp(input_shape: Sequence[int], num_outputs: int, hidden: Sequence[int] = (200, 200),
        dropout: float = 0.0, dense_impl: str = "auto") -> Model:
    features = math.prod(input_shape)
    hidden = tuple(int(h) for h in hidden)
    dense_function(dense_impl)
    return from_nnx(lambda rngs: MLP(features, hidden, num_outputs, dropout=dropout,
                                     dense_impl=dense_impl, rngs=rngs),
                    tuple(input_shape), name=f"mlp{list(hidden)}")


def cnn(input_shape: Sequence[int], num_outputs: int, conv_impl: str = "auto",
        dense_impl: str = "auto") -> Model:
    """The EMNIST CNN; `conv_impl` 'auto' uses im2col convolutions on CPU (models/conv.py)."""
    if len(input_shape) != 3:
        raise UserError(f"the cnn needs image inputs [height, width, channels], got "
                        f"{list(input_shape)}; use model.name='mlp' for flat features")
    conv_function(conv_impl)  # validate now, not inside the module factory
    dense_function(dense_impl)
    return from_nnx(lambda rngs: CNN(tuple(input_shape), num_outputs, conv_impl=conv_impl,
                                     dense_impl=dense_impl, rngs=rngs),
                    tuple(input_shape), name="cnn")


ZOO = {"logistic_regression": logistic_regression, "mlp": mlp, "cnn": cnn}


def get_model(name: str, input_shape: Sequence[int], num_outputs: int, **kwargs) -> Model:
    """Builds a zoo model by name, e.g. `get_model('cnn', (28, 28, 1), 10)`."""
    if name not in ZOO:
        raise UserError(f"unknown model {name!r}; choose one of {sorted(ZOO)}")
    try:
        return ZOO[name](tuple(input_shape), int(num_outputs), **kwargs)
    except TypeError as e:
        raise UserError(f"bad options for model {name!r}: {e}") from None
