"""What a model is trained to do: the per-example loss and metrics that come with a task.

A `Task` turns model outputs and labels into per-example values. The engine masks and
averages them, so padded examples never count, and every metric is a mean over the real
examples of a batch, a client or a test set.

A task may weigh its examples (`Task.example_weight`): the sequence task weighs each
sequence by its number of real tokens and reports per-sequence token means, so the
engine's means are over real tokens (TFF/LEAF's Shakespeare token accuracy), not means of
per-sequence means.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim.errors import UserError

PerExample = Callable[[jax.Array, jax.Array], jax.Array]
ExampleWeight = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Task:
    """A loss and metrics, each `(outputs [B, ...], labels [B, ...]) -> [B]`.

    Attributes:
      name: for logs.
      loss: per-example loss that training minimises.
      metrics: named per-example metrics reported at evaluation (the loss is always
        reported too, as `loss`).
      label_key: which feature of the data holds the labels.
      check: `(output_shape, labels) -> None`, raises `UserError` when the model's output
        cannot match the labels (called once, before anything is compiled).
      example_weight: optional `labels [B, ...] -> [B]`, how much each example counts
        (e.g. its number of real tokens); None: every real example counts 1. The loss and
        metrics are then per-example means over the same units (per-token means), so
        `value_i * weight_i` is the example's total.
    """

    name: str
    loss: PerExample
    metrics: dict[str, PerExample]
    label_key: str = "y"
    check: Callable[[tuple[int, ...], np.ndarray], None] | None = None
    example_weight: ExampleWeight | None = None

    def masked_sums(self, outputs: jax.Array, labels: jax.Array, mask: jax.Array) -> dict:
        """Weighted sums over the real examples (mask=True): `loss`, each metric, and
        `count` (the number of real examples, or their total `example_weight`).

        Dividing by `count` gives means that padded examples never touch, however the
        examples are split into batches.
        """
        weight = mask.astype(jnp.float32)
        if self.example_weight is not None:
            weight = weight * self.example_weight(labels).astype(jnp.float32)
        sums = {"loss": jnp.sum(self.loss(outputs, labels) * weight), "count": jnp.sum(weight)}
        for name, fn in self.metrics.items():
            sums[name] = jnp.sum(fn(outputs, labels) * weight)
        return sums


def _top1_hits(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """[argmax(z) == y] as float32 over the last axis of `logits` [..., K] (labels [...]).

    Keeps argmax's first-maximum tie rule but is written with plain max reductions:
    XLA:CPU runs argmax's (value, index) reduction several times slower.
    """
    labels = labels.astype(jnp.int32)[..., None]
    classes = jnp.arange(logits.shape[-1])
    z_y = jnp.take_along_axis(logits, labels, axis=-1)[..., 0]
    below = jnp.max(jnp.where(classes < labels, logits, -jnp.inf), axis=-1)
    above = jnp.max(jnp.where(classes > labels, logits, -jnp.inf), axis=-1)
    return ((z_y > below) & (z_y >= above)).astype(jnp.float32)


def classification(label_key: str = "y") -> Task:
    """Softmax cross-entropy on integer labels; reports `accuracy`.

    loss_i = -log softmax(z_i)[y_i];  accuracy_i = [argmax z_i == y_i].
    """

    def loss(logits, labels):
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), labels.astype(jnp.int32))

    def accuracy(logits, labels):
        return _top1_hits(logits, labels)

    def check(output_shape, labels):
        if len(output_shape) != 2:
            raise UserError(
                f"classification needs model outputs of shape [batch, num_classes], got "
                f"{list(output_shape)}; end the model with a dense layer of num_classes units")
        num_classes = output_shape[-1]
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise UserError(
                f"classification needs integer labels of shape [N], got {labels.dtype} "
                f"{list(labels.shape)}; use task=regression() for real-valued targets")
        if labels.size == 0:
            return
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0:
            raise UserError(
                f"labels must be class indices 0..num_classes-1, but {int((labels < 0).sum())} "
                f"label(s) are negative (the smallest is {lo}); map the labels to 0..K-1 first "
                f"(e.g. numpy.unique(y, return_inverse=True)[1])")
        if hi >= num_classes:
            raise UserError(
                f"the model outputs {num_classes} classes but labels range over [{lo}, {hi}]; "
                f"build the model with at least {hi + 1} outputs (config: model.num_outputs)")

    return Task("classification", loss, {"accuracy": accuracy}, label_key, check)


def regression(label_key: str = "y") -> Task:
    """Mean squared error over output dimensions; reports `mse` and `mae`.

    loss_i = mean_j (z_ij - y_ij)^2.
    """

    def loss(outputs, targets):
        diff = outputs.astype(jnp.float32) - targets.astype(jnp.float32).reshape(outputs.shape)
        return jnp.mean(jnp.square(diff).reshape(diff.shape[0], -1), axis=-1)

    def mae(outputs, targets):
        diff = outputs.astype(jnp.float32) - targets.astype(jnp.float32).reshape(outputs.shape)
        return jnp.mean(jnp.abs(diff).reshape(diff.shape[0], -1), axis=-1)

    def check(output_shape, targets):
        per_example_out = int(np.prod(output_shape[1:]))
        per_example_target = int(np.prod(targets.shape[1:]))
        if per_example_out != per_example_target:
            raise UserError(
                f"regression model outputs {list(output_shape[1:])} per example but targets "
                f"are {list(targets.shape[1:])}; make the model's last layer have "
                f"{per_example_target} unit(s)")

    return Task("regression", loss, {"mse": loss, "mae": mae}, label_key, check)


def sequence(pad_id: int = 0, label_key: str = "y") -> Task:
    """Token-level softmax cross-entropy for sequences (e.g. next-character prediction);
    reports token `accuracy`.

    Outputs are logits [B, T, V], labels integer token ids [B, T]; positions whose label is
    `pad_id` do not count. With R_i the real positions of sequence i:

        loss_i = mean_{t in R_i} -log softmax(z_it)[y_it]
        accuracy_i = mean_{t in R_i} [argmax z_it == y_it]   (first-maximum ties)
        example_weight_i = |R_i|

    so the engine's means are over all real tokens. A sequence with no real token has
    loss 0, accuracy 0 and weight 0.
    """
    pad_id = int(pad_id)

    def num_tokens(labels):
        return jnp.sum(labels != pad_id, axis=-1).astype(jnp.float32)

    def token_mean(values, labels):
        real = labels != pad_id
        total = jnp.sum(jnp.where(real, values, 0.0), axis=-1)
        return total / jnp.maximum(jnp.sum(real, axis=-1), 1).astype(jnp.float32)

    def loss(logits, labels):
        labels = labels.astype(jnp.int32)
        token_loss = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), labels)
        return token_mean(token_loss, labels)

    def accuracy(logits, labels):
        return token_mean(_top1_hits(logits, labels), labels)

    def check(output_shape, labels):
        if len(output_shape) != 3:
            raise UserError(
                f"the sequence task needs model outputs of shape [batch, length, vocabulary], "
                f"got {list(output_shape)}; use a sequence model such as model.name='char_lstm'")
        length, vocab = output_shape[1], output_shape[2]
        if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
            raise UserError(
                f"the sequence task needs integer token labels of shape [N, length], got "
                f"{labels.dtype} {list(labels.shape)}; use task=classification() for one "
                f"label per example")
        if labels.shape[1] != length:
            raise UserError(
                f"the model outputs sequences of length {length} but labels have length "
                f"{labels.shape[1]}; give the model inputs as long as the label sequences")
        real = labels[labels != pad_id]
        if real.size == 0:
            raise UserError(f"every label is the padding id {pad_id}; the data has no tokens "
                            f"to learn (check the data or the task's pad_id)")
        lo, hi = int(real.min()), int(real.max())
        if lo < 0:
            raise UserError(
                f"token labels must be ids 0..vocabulary-1, but some are negative (the "
                f"smallest is {lo}); map the tokens to a vocabulary first")
        if hi >= vocab:
            raise UserError(
                f"the model outputs {vocab} tokens per position but labels range over "
                f"[{lo}, {hi}]; set model.num_outputs to the vocabulary size (at least {hi + 1})")

    return Task("sequence", loss, {"accuracy": accuracy}, label_key, check, num_tokens)


def custom(loss: PerExample, metrics: dict[str, PerExample] | None = None,
           label_key: str = "y", name: str = "custom") -> Task:
    """A user-supplied per-example loss (and metrics); no output/label check."""
    return Task(name, loss, dict(metrics or {}), label_key, None)


TASKS = {"classification": classification, "regression": regression, "sequence": sequence}


def get_task(name: str, **kwargs) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](**kwargs)
