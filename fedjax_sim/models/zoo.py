"""Models researchers use as FL baselines, as Flax NNX modules behind the functional adapter.

- `logistic_regression`: one dense layer on the flattened input (multinomial logistic
  regression; McMahan et al. 2017's convex baseline, FedProx's Synthetic model).
- `mlp`: dense layers with ReLU (e.g. 10-10-1 for diabetes, 200-200 for the FedAvg 2NN).
- `cnn`: the EMNIST CNN of Reddi et al. 2021 / TFF's FedAvg baselines:
  conv3x3(32)-relu, conv3x3(64)-relu, maxpool 2x2, dropout 0.25, dense 128-relu,
  dropout 0.5, dense num_classes (valid padding: 1.2 M parameters on 28x28x1 inputs).
  On CPU its convolutions are computed as im2col + matmul (models/conv.py), which is
  what makes vmapped and scanned local training fast there.
- `char_lstm`: TFF's Shakespeare next-character baseline: embedding (8) of token ids,
  two LSTM layers of 256 units, dense vocabulary logits at every position (with the task
  `sequence`). Keras-style LSTM (one kernel, recurrent kernel and bias per layer, gates in
  the order input, forget, cell, output; forget-gate bias initialised to 1).
- `char_transformer`: a small causal (decoder-only) transformer for the same task:
  learned token and position embeddings, pre-LayerNorm blocks of causal self-attention and
  a GELU MLP, a final LayerNorm and dense vocabulary logits.
- `resnet18`, `resnet34`, `resnet50`, `resnet20`: ResNets in the torchvision layout
  (BatchNorm, GroupNorm or no norm; ImageNet or CIFAR stem), see models/resnet.py.

The sequence models take int token ids [batch, length] and output logits
[batch, length, num_outputs]; position t sees tokens 0..t only, and the input vocabulary
is the output one (num_outputs).

Every zoo model's dense layers take `dense_impl` ('auto': on CPU the gradient's
transposes are explicit copies, models/dense.py, which makes vmapped small dense layers
~1.6x faster there; 'xla': XLA's own dot). Their kernels are chosen by these arguments,
so they are built with `from_nnx(..., kernels='as_written')`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_sim.errors import UserError
from fedjax_sim.models.adapter import Model, from_nnx
from fedjax_sim.models.conv import conv_function
from fedjax_sim.models.dense import dense_function
from fedjax_sim.models.resnet import resnet18, resnet20, resnet34, resnet50


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

    def features(self, x):
        x = x.reshape(x.shape[0], -1)
        for layer in self.hidden:
            x = self.dropout(jax.nn.relu(layer(x)))
        return x

    def head(self, features):
        return self.out(features)

    def __call__(self, x):
        return self.head(self.features(x))


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

    def features(self, x):
        x = jax.nn.relu(self.conv1(x))
        x = jax.nn.relu(self.conv2(x))
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        x = self.drop1(x).reshape(x.shape[0], -1)
        return self.drop2(jax.nn.relu(self.dense(x)))

    def head(self, features):
        return self.out(features)

    def __call__(self, x):
        return self.head(self.features(x))


class LSTM(nnx.Module):
    """One LSTM layer run over a whole sequence, from a zero state.

    With z_t = x_t @ kernel + h_{t-1} @ recurrent_kernel + bias split into (i, f, g, o):
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g);  h_t = sigmoid(o) * tanh(c_t).
    The input projection of every step is one matmul before the scan over time.
    """

    def __init__(self, in_features: int, hidden: int, *, dot: Callable, rngs: nnx.Rngs):
        init = jax.nn.initializers
        self.hidden = hidden
        self.dot = dot
        self.kernel = nnx.Param(init.glorot_uniform()(rngs.params(), (in_features, 4 * hidden)))
        self.recurrent_kernel = nnx.Param(init.orthogonal()(rngs.params(), (hidden, 4 * hidden)))
        self.bias = nnx.Param(jnp.zeros((4 * hidden,)).at[hidden:2 * hidden].set(1.0))

    def __call__(self, x):
        """x [B, T, in] -> hidden states [B, T, hidden]."""
        def matmul(a, w):  # a [..., in] @ w [in, out], through the dense-layer kernel
            return self.dot(a, w, (((a.ndim - 1,), (0,)), ((), ())))

        gates_x = matmul(x, self.kernel[...]) + self.bias[...]
        recurrent = self.recurrent_kernel[...]

        def step(carry, gx):
            c, h = carry
            z = gx + matmul(h, recurrent)
            i, f, g, o = jnp.split(z, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (c, h), h

        zeros = jnp.zeros((x.shape[0], self.hidden), gates_x.dtype)
        _, hs = jax.lax.scan(step, (zeros, zeros), jnp.swapaxes(gates_x, 0, 1))
        return jnp.swapaxes(hs, 0, 1)


class CharLSTM(nnx.Module):
    def __init__(self, vocab: int, *, embed_dim: int, hidden: int, num_layers: int,
                 dense_impl: str = "auto", rngs: nnx.Rngs):
        dot = dense_function(dense_impl)
        self.embed = nnx.Embed(vocab, embed_dim, rngs=rngs)
        sizes = [embed_dim] + [hidden] * num_layers
        self.lstm = nnx.List([LSTM(a, b, dot=dot, rngs=rngs) for a, b in zip(sizes, sizes[1:])])
        self.out = nnx.Linear(hidden, vocab, dot_general=dot, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens.astype(jnp.int32))
        for layer in self.lstm:
            x = layer(x)
        return self.out(x)


class CausalSelfAttention(nnx.Module):
    """Multi-head self-attention where position t attends to positions 0..t only."""

    def __init__(self, dim: int, heads: int, *, dot: Callable, rngs: nnx.Rngs):
        self.heads = heads
        self.qkv = nnx.Linear(dim, 3 * dim, dot_general=dot, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, dot_general=dot, rngs=rngs)

    def __call__(self, x):
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, t, 3 * self.heads, d // self.heads), 3, axis=2)
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.reshape(b, t, d))


class TransformerBlock(nnx.Module):
    """Pre-LayerNorm block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, *, dot: Callable, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = CausalSelfAttention(dim, heads, dot=dot, rngs=rngs)
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp_in = nnx.Linear(dim, mlp_dim, dot_general=dot, rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_dim, dim, dot_general=dot, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.ln2(x))))


class CharTransformer(nnx.Module):
    def __init__(self, length: int, vocab: int, *, dim: int, heads: int, layers: int,
                 mlp_dim: int, dense_impl: str = "auto", rngs: nnx.Rngs):
        dot = dense_function(dense_impl)
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.pos_embed = nnx.Param(jax.nn.initializers.normal(0.02)(rngs.params(), (length, dim)))
        self.blocks = nnx.List([TransformerBlock(dim, heads, mlp_dim, dot=dot, rngs=rngs)
                                for _ in range(layers)])
        self.ln = nnx.LayerNorm(dim, rngs=rngs)
        self.out = nnx.Linear(dim, vocab, dot_general=dot, rngs=rngs)

    def __call__(self, tokens):
        t = tokens.shape[1]
        x = self.embed(tokens.astype(jnp.int32)) + self.pos_embed[...][:t]
        for block in self.blocks:
            x = block(x)
        return self.out(self.ln(x))


def logistic_regression(input_shape: Sequence[int], num_outputs: int,
                        dense_impl: str = "auto") -> Model:
    features = math.prod(input_shape)
    dense_function(dense_impl)  # validate now, not inside the module factory
    return from_nnx(lambda rngs: LogisticRegression(features, num_outputs, dense_impl=dense_impl,
                                                    rngs=rngs),
                    tuple(input_shape), name="logistic_regression", kernels="as_written")


def mlp(input_shape: Sequence[int], num_outputs: int, hidden: Sequence[int] = (200, 200),
        dropout: float = 0.0, dense_impl: str = "auto") -> Model:
    features = math.prod(input_shape)
    hidden = tuple(int(h) for h in hidden)
    dense_function(dense_impl)
    return from_nnx(lambda rngs: MLP(features, hidden, num_outputs, dropout=dropout,
                                     dense_impl=dense_impl, rngs=rngs),
                    tuple(input_shape), name=f"mlp{list(hidden)}", head=("out",),
                    kernels="as_written")


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
                    tuple(input_shape), name="cnn", head=("out",), kernels="as_written")


def _sequence_length(model: str, input_shape: Sequence[int]) -> int:
    if len(input_shape) != 1 or int(input_shape[0]) < 1:
        raise UserError(f"{model} needs token-id inputs of shape [sequence_length], got "
                        f"{list(input_shape)}; give it [N, length] integer token ids")
    return int(input_shape[0])


def _check_sizes(model: str, **sizes) -> None:
    for name, value in sizes.items():
        if not (isinstance(value, int) and value >= 1):
            raise UserError(f"{model} needs {name} to be an integer >= 1, got {value!r} "
                            f"(config: model.args.{name})")


def char_lstm(input_shape: Sequence[int], num_outputs: int, embed_dim: int = 8,
              hidden: int = 256, num_layers: int = 2, dense_impl: str = "auto") -> Model:
    """TFF's Shakespeare character LSTM: embed -> `num_layers` LSTMs -> dense per position.

    Inputs are token ids [B, T] of a vocabulary of `num_outputs` tokens; outputs are
    logits [B, T, num_outputs]. Parameters: `embed/embedding`, `lstm/<l>/kernel`,
    `lstm/<l>/recurrent_kernel`, `lstm/<l>/bias`, `out/kernel`, `out/bias`.
    """
    length = _sequence_length("char_lstm", input_shape)
    _check_sizes("char_lstm", num_outputs=num_outputs, embed_dim=embed_dim, hidden=hidden,
                 num_layers=num_layers)
    dense_function(dense_impl)
    return from_nnx(lambda rngs: CharLSTM(num_outputs, embed_dim=embed_dim, hidden=hidden,
                                          num_layers=num_layers, dense_impl=dense_impl,
                                          rngs=rngs),
                    (length,), name=f"char_lstm[{num_layers}x{hidden}]", kernels="as_written")


def char_transformer(input_shape: Sequence[int], num_outputs: int, dim: int = 64,
                     heads: int = 4, layers: int = 2, mlp_dim: int = 256,
                     dense_impl: str = "auto") -> Model:
    """A small causal transformer over token ids [B, T'] (T' <= T) -> logits [B, T', V].

    Parameters: `embed/embedding`, `pos_embed` [T, dim], `blocks/<l>/{ln1, ln2}/{scale,
    bias}`, `blocks/<l>/attn/{qkv, proj}/{kernel, bias}`, `blocks/<l>/{mlp_in,
    mlp_out}/{kernel, bias}`, `ln/{scale, bias}`, `out/kernel`, `out/bias`.
    """
    length = _sequence_length("char_transformer", input_shape)
    _check_sizes("char_transformer", num_outputs=num_outputs, dim=dim, heads=heads,
                 layers=layers, mlp_dim=mlp_dim)
    if dim % heads:
        raise UserError(f"char_transformer needs dim divisible by heads, got dim={dim}, "
                        f"heads={heads}; e.g. dim={heads * max(1, round(dim / heads))}")
    dense_function(dense_impl)
    return from_nnx(lambda rngs: CharTransformer(length, num_outputs, dim=dim, heads=heads,
                                                 layers=layers, mlp_dim=mlp_dim,
                                                 dense_impl=dense_impl, rngs=rngs),
                    (length,), name=f"char_transformer[{layers}x{dim}]", kernels="as_written")


ZOO = {"logistic_regression": logistic_regression, "mlp": mlp, "cnn": cnn,
       "char_lstm": char_lstm, "char_transformer": char_transformer,
       "resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50, "resnet20": resnet20}


def get_model(name: str, input_shape: Sequence[int], num_outputs: int, **kwargs) -> Model:
    """Builds a zoo model by name, e.g. `get_model('cnn', (28, 28, 1), 10)`."""
    if name not in ZOO:
        raise UserError(f"unknown model {name!r}; choose one of {sorted(ZOO)}")
    try:
        return ZOO[name](tuple(input_shape), int(num_outputs), **kwargs)
    except TypeError as e:
        raise UserError(f"bad options for model {name!r}: {e}") from None
