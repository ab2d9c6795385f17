"""What homomorphically encrypted aggregation costs, side by side with the plaintext round.

    python benchmarks/encrypted.py            # 300 rounds, 3 repetitions (~5 min, 2-core CPU)
    python benchmarks/encrypted.py --quick    # 30 rounds, 1 repetition

FedSGD on the diabetes regression MLP (10-10-1, 121 parameters) of
configs/diabetes_fedsgd.py: 10 clients, each round all 10 send one full-batch gradient.
Contenders, each a full `simulate()` timed round-robin (`--reps` times, medians compared):

  plaintext         the engine's weighted sum on the device (no host work);
  host sum (BFV-q)  the same sum computed on the host through jax.pure_callback, with
                    BFV's fixed-point quantization and no encryption: the cost of leaving
                    the device, and BFV's exact reference;
  CKKS, BFV         `encrypted_sum('ckks')`, `encrypted_sum('bfv')` at their defaults
                    (N = 8192).

Columns: ms per round (training only, compile excluded) and that over the 10 clients;
the per-round costs the encrypted part logs (median over rounds: encryption per client,
the server's ciphertext sum, decryption); bytes a client sends (the engine's
`uplink_bytes_per_client`: 121 float32 values in plaintext, serialized ciphertexts
encrypted); and the final parameters' max |difference| from the plaintext run (CKKS) or
from the host sum's (BFV: 0 means bit-exact).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_sim as fs
from fedjax_sim.aggregators.encrypted import encrypted_sum
from fedjax_sim.models.tasks import regression

FRACTION_BITS = 24  # encrypted_sum('bfv')'s default


def host_quantized_sum(fraction_bits: int = FRACTION_BITS):
    """A reducing part that sums sum_i round(2^f w_i d_i) (and the weights) with numpy on the
    host, through jax.pure_callback, as `encrypted_sum('bfv')` does without encrypting."""
    def host(flat, weights, live):
        flat, weights, live = np.asarray(flat), np.asarray(weights), np.asarray(live)
        scale = 2.0 ** fraction_bits
        q = [np.rint(np.append(np.float64(weights[i]) * flat[i].astype(np.float64),
                               weights[i]) * scale).astype(np.int64)
             for i in np.flatnonzero(live)]
        if not q:
            return np.zeros(flat.shape[1], np.float32), np.float32(0.0)
        total = np.sum(q, axis=0).astype(np.float64) / scale
        return total[:-1].astype(np.float32), np.float32(total[-1])

    def reduce(cohort, state, rng):
        del state, rng
        leaves, treedef = jax.tree_util.tree_flatten(cohort.updates)
        m = cohort.weights.shape[0]
        flat = jnp.concatenate([x.reshape(m, -1).astype(jnp.float32) for x in leaves], axis=1)
        total, denominator = jax.pure_callback(
            host, (jax.ShapeDtypeStruct(flat.shape[1:], jnp.float32),
                   jax.ShapeDtypeStruct((), jnp.float32)), flat, cohort.weights, cohort.live,
            vmap_method="sequential")
        splits = np.cumsum([math.prod(x.shape[1:]) for x in leaves])[:-1]
        out = [p.reshape(x.shape[1:]) for p, x in zip(jnp.split(total, splits), leaves)]
        return jax.tree_util.tree_unflatten(treedef, out), denominator

    return fs.aggregators.part(reduce=reduce)


def diabetes_fedsgd(aggregator, rounds: int):
    train, test, _ = fs.data.load_diabetes(seed=0)
    clients = fs.data.partition(train, train["y"], "iid", 10, seed=0)
    model = fs.models.get_model("mlp", (10,), 1, hidden=[10])
    algorithm = fs.algorithms.fedavg(optax.sgd(1.0), optax.sgd(0.1, momentum=0.9),
                                     batch_size=None)
    return fs.simulate(model, algorithm, clients, task=regression(), rounds=rounds,
                       clients_per_round=10, eval_data=test, eval_every=rounds, seed=0,
                       aggregator=aggregator, progress=False)


CONTENDERS = {
    "plaintext": lambda: None,
    "host sum (BFV-q)": host_quantized_sum,
    "CKKS": lambda: encrypted_sum("ckks"),
    "BFV": lambda: encrypted_sum("bfv"),
}
COST_COLUMNS = ("he_encrypt_ms_per_client", "he_server_sum_ms", "he_decrypt_ms")


def measure(rounds: int, reps: int) -> dict:
    """{name: {'s_per_round': median, 'result': the last run's Result}}, round-robin."""
    times = {name: [] for name in CONTENDERS}
    last = {}
    for _ in range(reps):
        for name, make in CONTENDERS.items():
            result = diabetes_fedsgd(make(), rounds)
            times[name].append(result.summary["seconds_per_round"])
            last[name] = result
    return {name: {"s_per_round": statistics.median(t), "result": last[name]}
            for name, t in times.items()}


def _max_difference(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def table(results: dict) -> list[dict]:
    """One row per contender (printed as a markdown table)."""
    base = results["plaintext"]["s_per_round"]
    references = {"CKKS": "plaintext", "BFV": "host sum (BFV-q)"}
    rows = []
    for name, r in results.items():
        history = r["result"].history
        row = {"contender": name, "ms_per_round": r["s_per_round"] * 1e3,
               "ms_per_client": r["s_per_round"] * 1e3 / 10,
               "x_plaintext": r["s_per_round"] / base,
               "uplink_bytes_per_client": history[-1]["uplink_bytes_per_client"],
               "test_mse": history[-1]["test_mse"]}
        for column in COST_COLUMNS:
            values = [h[column] for h in history if column in h]
            row[column] = statistics.median(values) if values else None
        ref = references.get(name)
        row["max_param_difference"] = (None if ref is None else _max_difference(
            r["result"].params, results[ref]["result"].params))
        row["vs"] = ref
        rows.append(row)
    fmt = lambda v, spec: "—" if v is None else format(v, spec)
    print("| contender | ms/round | ms/client | × plaintext | encrypt ms/client | server sum ms "
          "| decrypt ms | uplink bytes/client | test MSE | max param diff (vs) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['contender']} | {row['ms_per_round']:.2f} | {row['ms_per_client']:.3f} "
              f"| {row['x_plaintext']:.1f} | {fmt(row['he_encrypt_ms_per_client'], '.2f')} "
              f"| {fmt(row['he_server_sum_ms'], '.2f')} | {fmt(row['he_decrypt_ms'], '.2f')} "
              f"| {row['uplink_bytes_per_client']:.0f} | {row['test_mse']:.4f} "
              f"| {fmt(row['max_param_difference'], '.2e')}"
              f"{'' if row['vs'] is None else ' (' + row['vs'] + ')'} |")
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args(argv)
    rounds = args.rounds or (30 if args.quick else 300)
    reps = args.reps or (1 if args.quick else 3)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
          f"{jax.devices()[0].device_kind}; diabetes FedSGD, 10 clients, {rounds} rounds, "
          f"{reps} round-robin repetitions")
    return table(measure(rounds, reps))


if __name__ == "__main__":
    main()
    sys.exit(0)
