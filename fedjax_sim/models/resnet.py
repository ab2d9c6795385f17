"""ResNets in the torchvision layout, for image classification baselines.

Architectures (He et al. 2016; the ImageNet ones as torchvision's "v1.5"):

- `resnet18`, `resnet34`: BasicBlocks (two 3x3 convs) in four stages of [2, 2, 2, 2] /
  [3, 4, 6, 3] blocks of widths w, 2w, 4w, 8w (w = `width`, 64 by default).
- `resnet50`: Bottleneck blocks (1x1 reduce, 3x3, 1x1 expand by 4) in four stages of
  [3, 4, 6, 3]; the stride of a downsampling block is on its 3x3 conv (v1.5).
- `resnet20`: the CIFAR ResNet of He et al. 2016 (section 4.2): a 3x3 stem of width w
  (16 by default) with no max-pool, three stages of 3 BasicBlocks of widths w, 2w, 4w.
  Where a block changes shape the shortcut is a 1x1 conv + norm projection (the paper's
  option B, as in the ImageNet nets), not option A's zero-padded identity.

Every stage but the first halves the resolution in its first block (stride 2). A block
whose stride is not 1 or whose channel count changes adds its input through a
`downsample` projection (1x1 conv with the block's stride, then a norm); other blocks add
the input itself. After the last stage: global average pool, then the dense layer `fc`.

Stems (`stem`): 'imagenet' is a 7x7 stride-2 conv, norm, ReLU and a 3x3 stride-2 max-pool
(padding 1, padded with -inf); 'cifar' is a 3x3 stride-1 conv, norm and ReLU, no max-pool
(`resnet20` always uses it). Convolutions pad explicitly as PyTorch does (k // 2 on each
side: 3 for 7x7, 1 for 3x3, 0 for 1x1), never 'SAME', so outputs match torchvision's for
any input size, odd ones included. Convolutions have no bias.

Normalization (`norm`): 'batch' is BatchNorm with PyTorch's defaults (epsilon 1e-5,
running statistics updated as `0.9 * running + 0.1 * batch`, i.e. PyTorch momentum 0.1;
eval mode normalizes with the running statistics). One difference remains: the running
variance is updated with the biased batch variance (PyTorch uses the unbiased one; the
normalization itself uses the biased one in both). In federated training the batch
statistics count a batch's real examples only, not its padding slots (MaskedBatchNorm).
'group' is GroupNorm of `groups`
groups (2 by default, the FL ResNet-18 of Reddi et al. 2021, "Adaptive Federated
Optimization"; Hsieh et al. 2020 show BatchNorm's running statistics suffer under
non-IID clients), epsilon 1e-5; 'none' is the identity. A training-mode `apply` returns
the updated running statistics as its new state; carrying them on is up to the caller.

Initialization follows torchvision: convs Kaiming-normal (fan-out, ReLU gain), norms with
scale 1 and bias 0, `fc` uniform in +-1/sqrt(fan_in) (kernel and bias).

On CPU the convolutions are im2col + matmul (`conv_impl`, models/conv.py, which handles
explicit padding and strides) and `fc` uses the dense kernel of models/dense.py
(`dense_impl`).

Parameter names (a contract: pretrained-weight loaders depend on them) mirror
torchvision's module names. With `/`-joined paths of the pure-dict pytrees:

    conv1/kernel                 [7, 7, C, w] (HWIO; [3, 3, C, w] with the cifar stem)
    bn1/{scale, bias}            params; bn1/{mean, var} in the state ('batch' only)
    layer<s>/<b>/conv1/kernel    s = 1..4 (1..3 for resnet20), b = block index from 0
    layer<s>/<b>/bn1/...         and conv2, bn2 (+ conv3, bn3 in Bottleneck blocks)
    layer<s>/<b>/downsample/0/kernel   the projection's 1x1 conv (only where there is one)
    layer<s>/<b>/downsample/1/...      the projection's norm
    fc/kernel [in, num_outputs], fc/bias
    fc_hidden/{kernel, bias}     only with head_hidden > 0 (then fc/kernel is [head_hidden, ...])

A norm's leaves are `scale` and `bias` (params), plus `mean` and `var` (state) for
BatchNorm; with norm='none' the `bn*` (and `downsample/1`) modules exist but hold no
leaves. The only state is BatchNorm's running statistics, so with 'group' or 'none' the
state is empty. Kernels are HWIO: a torchvision OIHW weight maps to `w.transpose(2, 3,
1, 0)`, and a Linear weight [out, in] to `fc/kernel` = `w.T`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from fedjax_sim.errors import UserError
from fedjax_sim.models.adapter import MaskedBatchNorm, Model, from_nnx
from fedjax_sim.models.conv import conv_function
from fedjax_sim.models.dense import dense_function

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "Identity", "NORMS", "STEMS",
           "resnet18", "resnet34", "resnet50", "resnet20"]

NORMS = ("batch", "group", "none")
STEMS = ("imagenet", "cifar")

BATCH_NORM_MOMENTUM = 0.9  # flax convention: running = 0.9 * running + 0.1 * batch
NORM_EPSILON = 1e-5

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu'), not truncated.
_CONV_INIT = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear: weight and bias uniform in +-1/sqrt(fan_in).
_FC_KERNEL_INIT = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _fc_bias_init(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Identity(nnx.Module):
    """A module that returns its input (norm='none'); it has no variables."""

    def __call__(self, x):
        return x


@dataclasses.dataclass(frozen=True)
class _Layers:
    """Makes the convolutions and norms of one network (shared settings, one RNG stream)."""

    conv_fn: Callable
    norm: str
    groups: int
    rngs: nnx.Rngs

    def conv(self, cin: int, cout: int, kernel: int, stride: int = 1) -> nnx.Conv:
        pad = kernel // 2  # PyTorch's padding for odd kernels: 3 (7x7), 1 (3x3), 0 (1x1)
        return nnx.Conv(cin, cout, (kernel, kernel), strides=(stride, stride),
                        padding=((pad, pad), (pad, pad)), use_bias=False,
                        kernel_init=_CONV_INIT, conv_general_dilated=self.conv_fn,
                        rngs=self.rngs)

    def norm_layer(self, channels: int) -> nnx.Module:
        if self.norm == "batch":
            return MaskedBatchNorm(channels, momentum=BATCH_NORM_MOMENTUM, epsilon=NORM_EPSILON,
                                   use_fast_variance=False, rngs=self.rngs)
        if self.norm == "group":
            return nnx.GroupNorm(channels, num_groups=self.groups, epsilon=NORM_EPSILON,
                                 use_fast_variance=False, rngs=self.rngs)
        return Identity()

    def downsample(self, cin: int, cout: int, stride: int) -> nnx.List | None:
        """The projection shortcut (1x1 conv, norm) where a block changes shape, else None."""
        if stride == 1 and cin == cout:
            return None
        return nnx.List([self.conv(cin, cout, 1, stride), self.norm_layer(cout)])


class BasicBlock(nnx.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), two 3x3 convs; conv1 strides."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, layers: _Layers):
        self.conv1 = layers.conv(cin, planes, 3, stride)
        self.bn1 = layers.norm_layer(planes)
        self.conv2 = layers.conv(planes, planes, 3)
        self.bn2 = layers.norm_layer(planes)
        self.downsample = layers.downsample(cin, planes, stride)

    def __call__(self, x):
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return jax.nn.relu(y + _shortcut(self.downsample, x))


class Bottleneck(nnx.Module):
    """1x1 conv to `planes`, 3x3 conv (with the stride, v1.5), 1x1 conv to 4 * planes,
    each followed by a norm and (but the last, until after the residual add) a ReLU."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, layers: _Layers):
        cout = planes * self.expansion
        self.conv1 = layers.conv(cin, planes, 1)
        self.bn1 = layers.norm_layer(planes)
        self.conv2 = layers.conv(planes, planes, 3, stride)
        self.bn2 = layers.norm_layer(planes)
        self.conv3 = layers.conv(planes, cout, 1)
        self.bn3 = layers.norm_layer(cout)
        self.downsample = layers.downsample(cin, cout, stride)

    def __call__(self, x):
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return jax.nn.relu(y + _shortcut(self.downsample, x))


def _shortcut(downsample: nnx.List | None, x):
    if downsample is None:
        return x
    conv, norm = downsample
    return norm(conv(x))


def _max_pool_3x3_s2(x):
    """PyTorch's MaxPool2d(3, stride=2, padding=1): the padding never wins the max."""
    return lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), lax.max, (1, 3, 3, 1),
                             (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))


class ResNet(nnx.Module):
    """Stem, stages `layer1`.. of `block`s, global average pool, dense `fc` (module doc).

    Args:
      in_channels: channels of the NHWC input.
      block: `BasicBlock` or `Bottleneck`.
      stage_sizes: blocks per stage, e.g. (2, 2, 2, 2); stage s has `width * 2**s` planes.
      num_outputs: logits per example.
      width: planes of the first stage (and channels of the stem).
      stem: 'imagenet' or 'cifar'.
      norm, groups: 'batch' | 'group' | 'none', and the GroupNorm groups.
      conv_impl, dense_impl: kernels of the convolutions and of `fc`.
      head_hidden: if > 0, the head is a dense layer `fc_hidden` of this many units with a
        ReLU, then `fc` (a new head on a pretrained backbone); 0: `fc` alone.

    `features(x)` is everything before the head (the pooled [B, C] features) and
    `head(features)` the head, so `__call__(x) = head(features(x))`.
    """

    def __init__(self, in_channels: int, block: type, stage_sizes: Sequence[int],
                 num_outputs: int, *, width: int = 64, stem: str = "imagenet",
                 norm: str = "batch", groups: int = 2, conv_impl: str = "auto",
                 dense_impl: str = "auto", head_hidden: int = 0, rngs: nnx.Rngs):
        layers = _Layers(conv_function(conv_impl), norm, groups, rngs)
        if stem == "imagenet":
            self.conv1 = layers.conv(in_channels, width, 7, 2)
        else:
            self.conv1 = layers.conv(in_channels, width, 3, 1)
        self.bn1 = layers.norm_layer(width)
        self.use_max_pool = stem == "imagenet"
        self.num_stages = len(stage_sizes)
        cin = width
        for s, size in enumerate(stage_sizes):
            planes = width * 2 ** s
            blocks = []
            for b in range(size):
                blocks.append(block(cin, planes, 2 if (s > 0 and b == 0) else 1, layers))
                cin = planes * block.expansion
            setattr(self, f"layer{s + 1}", nnx.List(blocks))
        self.head_names = ("fc",)
        if head_hidden:
            self.fc_hidden = nnx.Linear(cin, head_hidden, kernel_init=_FC_KERNEL_INIT,
                                        bias_init=_fc_bias_init(cin),
                                        dot_general=dense_function(dense_impl), rngs=rngs)
            self.head_names = ("fc_hidden", "fc")
            cin = head_hidden
        self.fc = nnx.Linear(cin, num_outputs, kernel_init=_FC_KERNEL_INIT,
                             bias_init=_fc_bias_init(cin),
                             dot_general=dense_function(dense_impl), rngs=rngs)

    def features(self, x):
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        if self.use_max_pool:
            x = _max_pool_3x3_s2(x)
        for s in range(1, self.num_stages + 1):
            for block in getattr(self, f"layer{s}"):
                x = block(x)
        return jnp.mean(x, axis=(1, 2))

    def head(self, features):
        if len(self.head_names) > 1:
            features = jax.nn.relu(self.fc_hidden(features))
        return self.fc(features)

    def __call__(self, x):
        return self.head(self.features(x))


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _build(arch: str, block: type, stage_sizes: Sequence[int], input_shape: Sequence[int],
           num_outputs: int, *, norm: str, stem: str, width: int, groups: int,
           conv_impl: str, dense_impl: str, head_hidden: int = 0) -> Model:
    """Checks the arguments (UserError naming the config key) and wraps the module."""
    if len(input_shape) != 3 or not all(_is_int(d) and d >= 1 for d in input_shape):
        raise UserError(f"{arch} needs image inputs [height, width, channels], got "
                        f"{list(input_shape)}; use model.name='mlp' for flat features")
    if norm not in NORMS:
        raise UserError(f"{arch} needs norm to be one of {list(NORMS)}, got {norm!r} "
                        f"(config: model.args.norm)")
    if stem not in STEMS:
        raise UserError(f"{arch} needs stem to be one of {list(STEMS)}, got {stem!r} "
                        f"(config: model.args.stem)")
    for name, value in (("num_outputs", num_outputs), ("width", width), ("groups", groups)):
        if not (_is_int(value) and value >= 1):
            raise UserError(f"{arch} needs {name} to be an integer >= 1, got {value!r} "
                            f"(config: model.args.{name})")
    if not (_is_int(head_hidden) and head_hidden >= 0):
        raise UserError(f"{arch} needs head_hidden to be an integer >= 0 (0: no hidden layer), "
                        f"got {head_hidden!r} (config: model.args.head_hidden)")
    if norm == "group" and width % groups:
        raise UserError(f"{arch} with norm='group' needs width divisible by groups (every "
                        f"layer's channels are a multiple of width), got width={width}, "
                        f"groups={groups} (config: model.args.width, model.args.groups)")
    conv_function(conv_impl)  # validate now, not inside the module factory
    dense_function(dense_impl)
    width, groups, num_outputs = int(width), int(groups), int(num_outputs)
    head_hidden = int(head_hidden)
    in_channels = int(input_shape[2])
    hidden = f", hidden head {head_hidden}" if head_hidden else ""
    return from_nnx(lambda rngs: ResNet(in_channels, block, stage_sizes, num_outputs,
                                        width=width, stem=stem, norm=norm, groups=groups,
                                        conv_impl=conv_impl, dense_impl=dense_impl,
                                        head_hidden=head_hidden, rngs=rngs),
                    tuple(int(d) for d in input_shape),
                    name=f"{arch}[{stem} stem, {norm} norm, width {width}{hidden}]",
                    head=("fc_hidden", "fc") if head_hidden else ("fc",), kernels="as_written")


def resnet18(input_shape: Sequence[int], num_outputs: int, norm: str = "batch",
             stem: str = "imagenet", width: int = 64, groups: int = 2,
             conv_impl: str = "auto", dense_impl: str = "auto", head_hidden: int = 0) -> Model:
    """ResNet-18: BasicBlocks [2, 2, 2, 2] (11,689,512 parameters at width 64, 1000 classes).

    `norm` 'batch' | 'group' (`groups` groups) | 'none'; `stem` 'imagenet' | 'cifar' (3x3
    stride-1 stem, no max-pool, for 32x32 inputs); `width` the first stage's planes;
    `head_hidden` > 0 puts a ReLU dense layer `fc_hidden` of that width before `fc`.
    """
    return _build("resnet18", BasicBlock, (2, 2, 2, 2), input_shape, num_outputs, norm=norm,
                  stem=stem, width=width, groups=groups, conv_impl=conv_impl,
                  dense_impl=dense_impl, head_hidden=head_hidden)


def resnet34(input_shape: Sequence[int], num_outputs: int, norm: str = "batch",
             stem: str = "imagenet", width: int = 64, groups: int = 2,
             conv_impl: str = "auto", dense_impl: str = "auto", head_hidden: int = 0) -> Model:
    """ResNet-34: BasicBlocks [3, 4, 6, 3] (21,797,672 parameters at width 64, 1000 classes).
    Arguments as `resnet18`."""
    return _build("resnet34", BasicBlock, (3, 4, 6, 3), input_shape, num_outputs, norm=norm,
                  stem=stem, width=width, groups=groups, conv_impl=conv_impl,
                  dense_impl=dense_impl, head_hidden=head_hidden)


def resnet50(input_shape: Sequence[int], num_outputs: int, norm: str = "batch",
             stem: str = "imagenet", width: int = 64, groups: int = 2,
             conv_impl: str = "auto", dense_impl: str = "auto", head_hidden: int = 0) -> Model:
    """ResNet-50 v1.5: Bottlenecks [3, 4, 6, 3], expansion 4, stride on the 3x3 conv
    (25,557,032 parameters at width 64, 1000 classes). Arguments as `resnet18`."""
    return _build("resnet50", Bottleneck, (3, 4, 6, 3), input_shape, num_outputs, norm=norm,
                  stem=stem, width=width, groups=groups, conv_impl=conv_impl,
                  dense_impl=dense_impl, head_hidden=head_hidden)


def resnet20(input_shape: Sequence[int], num_outputs: int, norm: str = "batch",
             width: int = 16, groups: int = 2, conv_impl: str = "auto",
             dense_impl: str = "auto", head_hidden: int = 0) -> Model:
    """The CIFAR ResNet-20 of He et al. 2016: 3x3 stem, three stages of 3 BasicBlocks of
    widths 16/32/64 (`width` scales them), projection shortcuts (272,474 parameters for 10
    classes; 269,722 with the paper's parameter-free option A). Arguments as `resnet18`,
    without `stem` (always 'cifar')."""
    return _build("resnet20", BasicBlock, (3, 3, 3), input_shape, num_outputs, norm=norm,
                  stem="cifar", width=width, groups=groups, conv_impl=conv_impl,
                  dense_impl=dense_impl, head_hidden=head_hidden)
