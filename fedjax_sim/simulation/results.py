"""What a simulation returns (`Result`), and saving and loading it."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from fedjax_sim.engine.contracts import ROUND_FAILED
from fedjax_sim.errors import UserError
from fedjax_sim.simulation.checkpoint import export_params, from_host, to_host, tree_spec
from fedjax_sim.simulation.rundir import json_safe

PyTree = Any


@dataclasses.dataclass
class Result:
    """What a simulation returns.

    params / model_state: the final global model; server_state: the algorithm's full
    server state; history: one dict per round (what metrics.jsonl holds); summary:
    final evaluation, timings and engine choices; client_states: a stateful algorithm's
    per-client states ([C, ...] leaves; None if stateless); client_metrics: the last
    per-client evaluation, {'client_ids': [...], 'test' | 'personal' | 'finetuned':
    {metric: [C] array}} (None without client_eval_data).

    `save(path)` writes it to a directory (orbax arrays + JSON) and `Result.load(path)` reads
    it back; `export_params(path)` writes the final parameters to a plain `.npz` file for use
    outside fedjax_sim (`fedjax_sim.load_params` or `numpy.load` reads it).
    """

    params: PyTree
    model_state: PyTree
    server_state: PyTree
    history: list[dict]
    summary: dict
    client_states: PyTree = None
    client_metrics: dict | None = None

    def save(self, path: str) -> None:
        """Writes the result to directory `path` (which must not exist yet)."""
        import orbax.checkpoint as ocp

        path = os.path.abspath(path)
        if os.path.exists(path):
            raise UserError(f"{path} already exists; Result.save writes a new directory")
        arrays = to_host(self._arrays())
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(os.path.join(path, "arrays"), arrays)
            ckpt.wait_until_finished()
        with open(os.path.join(path, "result.json"), "w") as f:
            json.dump({"format": "fedjax_sim.result", "format_version": 1,
                       "history": json_safe(self.history), "summary": json_safe(self.summary),
                       "structure": skeleton(arrays)}, f)

    @classmethod
    def load(cls, path: str, template: "Result | None" = None) -> "Result":
        """Reads a saved result. Arrays come back as nested dicts and lists of arrays
        (NamedTuples as dicts, PRNG keys as key data) whose dict keys have their saved types
        (a layer list's int keys stay ints, so `params` has the tree structure of the saved
        `result.params`), or, given a `template` result of the same run (e.g. from
        `simulate(..., rounds=1)`), with the template's exact types."""
        import orbax.checkpoint as ocp

        path = os.path.abspath(path)
        meta_path = os.path.join(path, "result.json")
        if not os.path.isfile(meta_path):
            raise UserError(f"{path} is not a saved Result (no result.json); save one with "
                            f"Result.save(path)")
        with open(meta_path) as f:
            meta = json.load(f)
        with ocp.StandardCheckpointer() as ckpt:
            if template is None:
                arrays = restore_keys(ckpt.restore(os.path.join(path, "arrays")),
                                      meta.get("structure"))  # none before it was recorded
            else:
                target = to_host(template._arrays())
                arrays = ckpt.restore(os.path.join(path, "arrays"), target)
                if tree_spec(arrays) != tree_spec(target):
                    raise UserError(f"the result saved in {path} does not match the template's "
                                    f"arrays; load it without a template")
                arrays = from_host(template._arrays(), arrays)
        return cls(arrays["params"], arrays["model_state"], arrays["server_state"],
                   meta["history"], meta["summary"], arrays.get("client_states"))

    def _arrays(self) -> dict:
        """The arrays `save` writes, as one tree."""
        arrays = {"params": self.params, "model_state": self.model_state,
                  "server_state": self.server_state}
        if self.client_states is not None:
            arrays["client_states"] = self.client_states
        return arrays

    def export_params(self, path: str) -> None:
        """Writes the final global parameters to a `.npz` file (one array per leaf, named
        by its path, e.g. 'dense/kernel')."""
        export_params(self.params, path)


def skeleton(tree):
    """The containers of `tree` as JSON, for `restore_keys`: a mapping (or NamedTuple) is
    {"dict": {str(key): [key type, child]}} with key type "int" or "str", a list or tuple
    {"list": [child, ...]}, anything else (a leaf) null. Orbax writes every key as a
    string; this records which were ints."""
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        tree = tree._asdict()
    if isinstance(tree, Mapping):
        return {"dict": {str(k): ["int" if isinstance(k, int) and not isinstance(k, bool)
                                  else "str", skeleton(v)] for k, v in tree.items()}}
    if isinstance(tree, (list, tuple)):
        return {"list": [skeleton(v) for v in tree]}
    return None


def restore_keys(tree, structure):
    """`tree` as orbax restored it, with the dict keys that `structure` (a `skeleton`)
    records as ints turned back into ints; parts that do not match are left as they are."""
    if not isinstance(structure, dict):
        return tree
    if isinstance(tree, dict) and isinstance(structure.get("dict"), dict):
        entries = structure["dict"]
        out = {}
        for key, value in tree.items():
            kind, child = entries.get(str(key), ("str", None))
            if kind == "int" and isinstance(key, str) and key.lstrip("-").isdigit():
                key = int(key)
            out[key] = restore_keys(value, child)
        return out
    if isinstance(tree, (list, tuple)) and isinstance(structure.get("list"), list):
        children = structure["list"]
        return type(tree)(restore_keys(v, children[i] if i < len(children) else None)
                          for i, v in enumerate(tree))
    return tree


def final_metrics(row: dict) -> dict:
    """The evaluation metrics of a (last) metrics row."""
    return {k: v for k, v in row.items()
            if k.startswith(("test_", "client_", "heldout_", "backdoor_"))}


def communication_totals(history: list[dict]) -> dict:
    """Bytes sent up and down over the whole run, and the rounds that failed (an aggregator
    could not complete them, e.g. too few clients of a secure sum survived)."""
    totals = {"uplink_bytes_total": sum(float(r.get("uplink_bytes", 0)) for r in history),
              "downlink_bytes_total": sum(float(r.get("downlink_bytes", 0)) for r in history)}
    failed = [r["round"] for r in history if r.get(ROUND_FAILED)]
    if failed:
        totals["failed_rounds"] = failed
    return totals


def run_summary(plan, calls, history: list[dict], start_round: int, done: int,
                stopped: str | None) -> dict:
    """summary.json: final metrics, timings, the engine's choices and the data's sizes.
    With `calls=None` (a run found complete: nothing was compiled or timed) only the final
    metrics, the round it resumed from and the privacy ledger."""
    r, data = plan.request, plan.train_data
    summary = {"rounds": r.rounds, "final": final_metrics(history[-1]),
               "train_loss": history[-1].get("train_loss")}  # none after round 0 alone
    if calls is not None:
        summary.update(seconds_per_round=calls.train_seconds / max(done - start_round, 1),
                       compile_seconds=calls.compile_seconds)
    summary["resumed_from_round"] = start_round
    summary.update(communication_totals(history))
    if calls is not None:
        summary.update({
            "num_params": plan.model.num_params(plan.params),
            "batch_norm": plan.batch_norm,
            "feature_cache": plan.cache_info or False,
            "engine": calls.engine_summary(),
            "data": {"num_clients": data.num_clients, "num_examples": data.num_examples,
                     "max_client_size": data.max_client_size, **(r.metadata or {})},
        })
    if plan.private:
        summary["privacy"] = plan.private.summary(done)
    if stopped:
        summary["stopped"] = stopped
    return summary
