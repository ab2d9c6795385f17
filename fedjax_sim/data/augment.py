"""What happens to a batch on the device before the model sees it.

Images are stored as uint8 (a 50,000-image CIFAR-10 training set takes 147 MiB instead of
586 MiB as float32) and converted inside the compiled step, batch by batch:

    x_float = x * scale                        (integer inputs; float inputs are kept)
    x_norm  = (x_float - mean) / std           (per channel, when mean/std are given)
    x_big   = resize(x_norm, (H', W'))         (bilinear, with `resize`: e.g. CIFAR's 32x32
                                                images to the 224x224 an ImageNet backbone
                                                was trained on)

During local training (`train=True`) each example of a batch is also augmented, the
standard CIFAR recipe (He et al. 2016):

    random crop: pad each side with `crop_padding` zero (black) pixels, then cut a random
                 H x W window, offsets uniform in [0, 2 * crop_padding] on each axis;
    flip:        mirror left-right with probability 1/2.

The random draws come from the key the engine passes, which for local training derives
from the client's own key and the step index (engine.local.LocalData), so augmentation
differs per client and per step and does not depend on how clients are batched, chunked
or placed. Evaluation converts and normalises, never augments.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.errors import UserError


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """On-device conversion (and, in training, augmentation) of one input feature.

    Attributes:
      key: the feature it transforms (the model's input).
      scale: integer inputs are cast to float32 and multiplied by this (1/255 maps uint8
        pixels to [0, 1]); None leaves integer inputs as they are (e.g. token ids).
      mean, std: per-channel normalisation applied after scaling (None: none).
      crop_padding: random crop with this much zero padding per side (0: no crop).
      flip: random horizontal flip.
      resize: (height, width) every image is resized to (bilinear, antialiased when
        shrinking), after augmentation and normalisation; None keeps the stored size.
    """

    key: str = "x"
    scale: float | None = 1.0 / 255.0
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    crop_padding: int = 0
    flip: bool = False
    resize: Sequence[int] | None = None

    def __post_init__(self):
        if self.resize is not None:
            size = tuple(self.resize) if isinstance(self.resize, (list, tuple)) else ()
            if len(size) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                         and v >= 1 for v in size):
                raise UserError(f"resize must be None or (height, width), two integers >= 1, "
                                f"got {self.resize!r}")
            object.__setattr__(self, "resize", tuple(int(v) for v in size))
        if isinstance(self.crop_padding, bool) or not isinstance(self.crop_padding, int) \
                or self.crop_padding < 0:
            raise UserError(f"crop_padding must be an integer >= 0, got {self.crop_padding!r}")
        if (self.mean is None) != (self.std is None):
            raise UserError("give both mean and std for normalisation, or neither")
        if self.std is not None and any(float(s) <= 0 for s in np.ravel(self.std)):
            raise UserError(f"std must be > 0 in every channel, got {list(np.ravel(self.std))}")
        if self.scale is not None and not float(self.scale) > 0:
            raise UserError(f"scale must be > 0 or None, got {self.scale!r}")

    @property
    def augments(self) -> bool:
        return self.crop_padding > 0 or self.flip

    def check(self, example_shape: tuple[int, ...]) -> None:
        """Raises UserError when this preprocessing cannot apply to examples of this shape."""
        if self.resize is not None and len(example_shape) != 3:
            raise UserError(f"resize needs image inputs [height, width, channels], got examples "
                            f"of shape {list(example_shape)}; set resize=None")
        if self.augments and len(example_shape) != 3:
            raise UserError(f"random crop and flip need image inputs [height, width, channels], "
                            f"got examples of shape {list(example_shape)}; set crop_padding=0 "
                            f"and flip=False")
        if self.mean is not None:
            channels = example_shape[-1] if example_shape else 1
            for name, values in (("mean", self.mean), ("std", self.std)):
                size = np.size(values)
                if size not in (1, channels):
                    raise UserError(f"preprocess {name} has {size} values but the inputs have "
                                    f"{channels} channels; give one value per channel")

    def __call__(self, batch: dict, rng: jax.Array | None, train: bool) -> dict:
        x = batch[self.key]
        if train and self.augments:
            x = augment(x, rng, self.crop_padding, self.flip)
        if jnp.issubdtype(x.dtype, jnp.integer) and self.scale is not None:
            x = x.astype(jnp.float32) * jnp.float32(self.scale)
        if self.mean is not None:
            x = (x.astype(jnp.float32) - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(
                self.std, jnp.float32)
        if self.resize is not None:
            b, _, _, c = x.shape
            x = jax.image.resize(x.astype(jnp.promote_types(x.dtype, jnp.float32)),
                                 (b, *self.resize, c), method="bilinear")
        return {**batch, self.key: x}

    def output_shape(self, example_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of one example after preprocessing."""
        if self.resize is None:
            return tuple(example_shape)
        return (*self.resize, example_shape[-1])


def augment(x: jax.Array, rng: jax.Array, crop_padding: int, flip: bool) -> jax.Array:
    """Random crop (zero padding) and horizontal flip of every image of `x` [B, H, W, C].

    One PRNG call draws two uint32 words per example: the crop offsets are the words
    modulo 2p+1 (bias below 2^-22 for p <= 512) and the flip is the first word's top bit.
    Works on any dtype, so uint8 batches are augmented before conversion.
    """
    b, h, w, c = x.shape
    words = jax.random.bits(rng, (b, 2), jnp.uint32)
    if crop_padding:
        p = crop_padding
        span = jnp.uint32(2 * p + 1)
        dy = (words[:, 0] % span).astype(jnp.int32)
        dx = (words[:, 1] % span).astype(jnp.int32)
        padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        x = jax.vmap(lambda img, i, j: jax.lax.dynamic_slice(img, (i, j, 0), (h, w, c)))(
            padded, dy, dx)
    if flip:
        mirror = (words[:, 0] >> 31).astype(bool)
        x = jnp.where(mirror[:, None, None, None], x[:, :, ::-1, :], x)
    return x


def default_preprocess(example: np.ndarray, key: str = "x") -> Preprocess | None:
    """What `preprocess='auto'` means: uint8 images ([N, H, W] or [N, H, W, C]) are scaled
    to [0, 1] on device; anything else (floats, int token ids) is passed through."""
    if example.dtype == np.uint8 and example.ndim >= 3:
        return Preprocess(key=key)
    return None
