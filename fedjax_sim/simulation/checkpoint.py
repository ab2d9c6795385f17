"""Checkpoints of a running simulation, and resuming from them (orbax-checkpoint).

A run directory holds `checkpoints/<round>/` written by an orbax `CheckpointManager`:

    state/   the full simulation state as arrays: the algorithm's server state (global
             parameters, server optimizer state), the aggregator's state and the model's
             non-trainable state. PRNG key arrays are stored as their key data.
    meta/    JSON: the round, the root PRNG key's data, every metrics row logged so far,
             the run's config, a description of every state array (path, shape, dtype)
             and a checksum of their bytes.

All randomness of a round derives from (root key, round), so the state above plus the
round number determine the rest of the run: a resumed run computes exactly the rounds an
uninterrupted one would.

Saving is asynchronous: `save` copies the state to host memory (so the device buffers may
be reused at once) and orbax writes it in a background thread while training goes on.
Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
crash mid-save leaves no checkpoint that looks finished. Damage after the fact (a
truncated or altered file) is caught by the checksum, or by orbax failing to read; such a
checkpoint is skipped with a warning and the previous one is used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import warnings
from typing import Any

import jax
import numpy as np

from fedjax_sim.errors import UserError
from fedjax_sim.trees import path_name as _path_name

PyTree = Any
FORMAT = "fedjax_sim.run_checkpoint"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
    """When `simulate(..., workdir=...)` saves checkpoints.

    every_rounds: save after every this many rounds (None: no round cadence).
    every_seconds: save when this many seconds of training have passed since the last save
      (None: no time cadence). Both may be set; a checkpoint is always saved at the end.
    max_to_keep: how many of the newest checkpoints to keep (older ones are deleted).
    enabled: False turns checkpointing (and resuming) off.
    """

    every_rounds: int | None = None
    every_seconds: float | None = 60.0
    max_to_keep: int = 3
    enabled: bool = True

    def __post_init__(self):
        if self.every_rounds is not None and (isinstance(self.every_rounds, bool) or
                                              not isinstance(self.every_rounds, int) or
                                              self.every_rounds < 1):
            raise UserError(f"checkpoint.every_rounds must be None or an integer >= 1, got "
                            f"{self.every_rounds!r}")
        if self.every_seconds is not None and (isinstance(self.every_seconds, bool) or
                                               not isinstance(self.every_seconds, (int, float)) or
                                               not self.every_seconds > 0):
            raise UserError(f"checkpoint.every_seconds must be None or a number > 0, got "
                            f"{self.every_seconds!r}")
        if isinstance(self.max_to_keep, bool) or not isinstance(self.max_to_keep, int) or self.max_to_keep < 1:
            raise UserError(f"checkpoint.max_to_keep must be an integer >= 1, got {self.max_to_keep!r}")


# -- arrays on the host -------------------------------------------------------------------
def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_host(tree: PyTree) -> PyTree:
    """A copy of `tree` as numpy arrays (PRNG keys as their uint32 key data)."""
    return jax.tree_util.tree_map(
        lambda x: np.array(jax.random.key_data(x) if _is_key(x) else x), tree)


def from_host(template: PyTree, host: PyTree) -> PyTree:
    """Inverse of `to_host`, with the container types and key types of `template`; leaves
    that are numpy arrays in `template` (e.g. client states kept on host) stay numpy."""
    leaves, treedef = jax.tree_util.tree_flatten(template)
    values = treedef.flatten_up_to(host)
    out = [jax.random.wrap_key_data(np.asarray(v), impl=jax.random.key_impl(t)) if _is_key(t)
           else np.asarray(v, dtype=t.dtype) if isinstance(t, np.ndarray)
           else jax.numpy.asarray(v, dtype=t.dtype) for t, v in zip(leaves, values)]
    return jax.tree_util.tree_unflatten(treedef, out)


def tree_spec(host: PyTree) -> list[list]:
    """[path, shape, dtype] of every leaf, in order: what a checkpoint must match."""
    flat, _ = jax.tree_util.tree_flatten_with_path(host)
    return [[_path_name(path), list(np.shape(x)), str(np.asarray(x).dtype)] for path, x in flat]


def checksum(host: PyTree) -> str:
    """A BLAKE2b digest over every leaf's path, dtype, shape and bytes."""
    digest = hashlib.blake2b(digest_size=16)
    for (path, x) in jax.tree_util.tree_flatten_with_path(host)[0]:
        x = np.ascontiguousarray(x)
        digest.update(f"{_path_name(path)}|{x.dtype}|{x.shape}|".encode())
        digest.update(_raw_bytes(x))
    return digest.hexdigest()


def _raw_bytes(x: np.ndarray):
    """The bytes `x.tobytes()` gives for a contiguous array, as a view: hashing a large
    training set must not hold a second copy of it in memory."""
    if x.dtype.hasobject or x.size == 0:
        return x.tobytes()
    return memoryview(x.reshape(-1).view(np.uint8))


def flat_config(config: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}, with values made JSON-like (tuples -> lists)."""
    out = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_config(value, path + "."))
        else:
            out[path] = json.loads(json.dumps(value, default=str))
    return out


def config_differences(saved: dict, current: dict, ignore=lambda key: False) -> list[str]:
    """'key: saved -> current' for every dotted key whose value differs, except keys for
    which `ignore(key)` is true."""
    a, b = flat_config(saved), flat_config(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if ignore(key):
            continue
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if va != vb:
            diffs.append(f"{key}: {va!r} -> {vb!r}")
    return diffs


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160]}" if text else type(error).__name__


class RunCheckpoints:
    """The checkpoints of one run directory (`<workdir>/checkpoints`)."""

    def __init__(self, directory: str, options: CheckpointOptions, writer: bool = True):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.writer = writer
        self.directory = os.path.abspath(directory)
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise UserError(f"checkpoint directory {self.directory} exists and is not a directory; "
                            f"choose another --workdir")
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create checkpoint directory {self.directory} ({e.strerror}); "
                            f"choose a writable --workdir") from None
        # orbax logs every save at INFO level; keep the run's output to its own lines.
        logging.getLogger("absl").setLevel(logging.WARNING)
        # The state is saved whole, from host copies, by one process (the writer; the
        # others only read on resume): each process's manager coordinates with itself.
        me = jax.process_index()
        alone = ({} if jax.process_count() == 1 else {
            "multiprocessing_options": ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me})})
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=options.max_to_keep, create=False, cleanup_tmp_directories=writer,
                enable_async_checkpointing=True, read_only=not writer, **alone))

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, round_: int, state: PyTree, meta: dict) -> None:
        """Starts saving `state` at `round_` (returns once the arrays are copied to host)."""
        host = to_host(state)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "round": int(round_),
                "spec": tree_spec(host), "checksum": checksum(host), **meta}
        ocp = self._ocp
        self._manager.save(int(round_), args=ocp.args.Composite(
            state=ocp.args.StandardSave(host), meta=ocp.args.JsonSave(meta)), force=True)

    def restore_latest(self, template: PyTree) -> tuple[PyTree, dict] | None:
        """The newest checkpoint that reads back intact, as (state, meta); None if there are
        no checkpoints. Damaged checkpoints are skipped with a warning; if none is usable,
        or the checkpoints hold a differently shaped state, a UserError says what to do."""
        ocp = self._ocp
        template_host = to_host(template)
        expected = tree_spec(template_host)
        skipped = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                meta = self._manager.restore(step, args=ocp.args.Composite(
                    meta=ocp.args.JsonRestore())).meta
            except Exception as e:  # unreadable metadata: a damaged checkpoint
                skipped.append((step, f"round {step}: metadata unreadable ({_short(e)})"))
                continue
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                skipped.append((step, f"round {step}: not a fedjax_sim run checkpoint"))
                continue
            if meta.get("format_version") != FORMAT_VERSION:
                raise UserError(f"the checkpoint at round {step} in {self.directory} has format "
                                f"version {meta.get('format_version')}, this fedjax_sim reads "
                                f"version {FORMAT_VERSION}; use a fresh --workdir")
            if meta.get("spec") != expected:
                raise UserError(f"the checkpoint at round {step} in {self.directory} holds a "
                                f"different model or algorithm state ({_spec_difference(meta.get('spec'), expected)}); "
                                f"use a fresh --workdir for a different model")
            try:
                host = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(template_host))).state
            except Exception as e:
                _quiet_orphaned_reads()
                skipped.append((step, f"round {step}: arrays unreadable ({_short(e)})"))
                continue
            if checksum(host) != meta.get("checksum"):
                skipped.append((step, f"round {step}: checksum mismatch (the files were altered or truncated)"))
                continue
            if skipped and self.writer:
                # Move the damaged ones aside: the run will save those rounds again.
                aside = os.path.join(os.path.dirname(self.directory), "damaged_checkpoints")
                os.makedirs(aside, exist_ok=True)
                for bad_step, line in skipped:
                    dest = os.path.join(aside, f"{bad_step}-{int(time.time())}")
                    shutil.move(os.path.join(self.directory, str(bad_step)), dest)
                    warnings.warn(f"skipped damaged checkpoint in {self.directory}, {line}; "
                                  f"moved it to {dest}", stacklevel=3)
                self._manager.reload()
            return from_host(template, host), meta
        if skipped:
            raise UserError(f"no usable checkpoint in {self.directory} "
                            f"({'; '.join(line for _, line in skipped)}); "
                            f"delete that directory to start the run over")
        return None

    def wait(self) -> None:
        """Blocks until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _quiet_orphaned_reads() -> None:
    """After a failed read, tensorstore's pending callbacks find orbax's event loop closed
    and report 'Event loop is closed' through sys.unraisablehook, a traceback per callback.
    The failure itself is already handled (the checkpoint is skipped), so drop exactly those
    reports and pass everything else on."""
    previous = sys.unraisablehook
    if getattr(previous, "_fedjax_sim_quiet", False):
        return

    def hook(unraisable):
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        previous(unraisable)

    hook._fedjax_sim_quiet = True
    sys.unraisablehook = hook


def _spec_difference(saved, expected) -> str:
    saved = saved or []
    if len(saved) != len(expected):
        return f"{len(saved)} arrays there, {len(expected)} here"
    for a, b in zip(saved, expected):
        if a != b:
            return f"{b[0] or 'the state'} is {a[1]} {a[2]} there and {b[1]} {b[2]} here"
    return "different arrays"


# -- final parameters, for use outside fedjax_sim ------------------------------------------
def export_params(params: PyTree, path: str) -> None:
    """Writes `params` to a `.npz` file: one array per leaf, named by its path
    ('dense/kernel'); readable with numpy alone (`np.load`) or `load_params`."""
    arrays = {_path_name(p): np.asarray(jax.random.key_data(x) if _is_key(x) else x)
              for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _key(part: str):
    return int(part) if part.isdigit() else part


def load_params(path: str) -> dict:
    """Reads an `export_params` file back as nested dicts of numpy arrays (path parts that
    are integers, such as Flax NNX list indices, come back as ints)."""
    if not os.path.isfile(path):
        raise UserError(f"no parameter file at {path}")
    out: dict = {}
    with np.load(path) as npz:
        for name in npz.files:
            node = out
            *parents, leaf = name.split("/")
            for part in parents:
                node = node.setdefault(_key(part), {})
            node[_key(leaf)] = npz[name]
    return out
