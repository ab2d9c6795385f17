"""FedAvg vs FedProx on Synthetic(1,1): the FedProx paper's training-loss comparison.

    python benchmarks/fedprox_synthetic.py             # mu in {0, 0.01, 0.1, 1}, 3 seeds (~5 min)
    python benchmarks/fedprox_synthetic.py --seeds 1   # one seed per row
    python benchmarks/fedprox_synthetic.py --mus 0 1   # FedAvg and FedProx mu = 1 only

Li et al. 2020 (FedProx), Figures 1-2, Synthetic(1,1) with 0% stragglers: multinomial
logistic regression (60 -> 10) trained by 30 devices, 10 sampled per round, client SGD at
learning rate 0.01, batch 10, E = 20 local epochs, 200 rounds. FedAvg is FedProx with
mu = 0; the paper's claim is that mu = 1 gives a lower and more stable training loss on this
heterogeneous data. Every row runs with the same training seeds, so the rows share their
initial model, their client cohorts and their local batch orders (as the reference code,
which seeds its sampling with the round number, does too).

The reported loss is the paper's: the global model's cross-entropy on ALL training
examples pooled (the pooled training split is passed as `eval_data`, so `test_loss` at an
evaluation round is that training loss), evaluated every `--eval-every` rounds (the paper
evaluates every round). Columns: that loss at rounds 20, 50, 100, 150, 200; two measures of
instability over the evaluated rounds after round 20, the maximum loss and the largest rise
of the loss above the lowest value it had reached before; the final model's accuracy on the
pooled per-device test split (sum of correct / sum of examples, as the paper counts it);
whether any round's loss or parameters were non-finite; and for how many seeds the final
loss is below FedAvg's with the same seed. Means over `--seeds` training seeds (± std
where there is more than one) on one data draw (`--data-seed`, 0 by default).

How this matches the paper's setup:
- Data: `fs.data.synthetic(1, 1)` follows the reference generator (litian96/FedProx,
  data/synthetic_1_1/generate_synthetic.py): n_k = floor(LogNormal(4, 2)) + 50, u_k ~ N(0, 1)
  shared by W_k and b_k, v_k ~ N(B_k, 1), Sigma = diag(j^-1.2), y = argmax(x W_k + b_k), and
  a per-device 90 / 10 train / test split. It is another random draw, though: the published
  files hold ~10,800 examples of which one device has ~6,600 (its test split alone is 662),
  whereas data seed 0 gives 30 devices of 50 to 889 examples (5,385 in all, 4,833 for
  training). A draw as skewed as the paper's would make every round ~7x longer here (every
  client's local loop is padded to the largest client's 20 * ceil(n_max / 10) steps).
- Sampling and averaging: the paper's Algorithms 1-2 sample devices with probability
  p_k = n_k / n and average the returned models uniformly. fedjax_sim samples 10 devices
  uniformly without replacement and weights the average by n_k, the other standard
  estimator of the n_k-weighted objective. That is also what the reference code runs
  (flearn/trainers/fedbase.py: `select_clients` draws uniformly without replacement,
  `aggregate` weights each solution by its number of samples), so the comparison uses the
  paper's actual experimental scheme.
- Local solver: E epochs over the device's shuffled data in ceil(n_k / 10) batches, the last
  one partial, with plain SGD on the loss plus mu/2 ||w - w_global||^2 (the reference's
  PerturbedGradientDescent). The model's L2 regularizer in the reference is declared but not
  added to its loss, so the objective is plain cross-entropy here too. Initialisation
  differs slightly: LeCun-normal kernel (flax) instead of Glorot-uniform (TensorFlow), zero
  bias in both.

Measured (3 seeds, data seed 0, evaluation every 5 rounds; 269 s on a shared 2-core CPU,
611 s for the same run while the machine was busy with other jobs):

| algorithm | loss @20 | loss @50 | loss @100 | loss @150 | loss @200 | max loss after round 20 | largest rise above best so far (after round 20) | test accuracy | non-finite | final loss < FedAvg's (seeds) |
|---|---|---|---|---|---|---|---|---|---|---|
| FedAvg (mu = 0) | 1.127 ± 0.198 | 0.769 ± 0.079 | 0.581 ± 0.050 | 0.460 ± 0.023 | 0.466 ± 0.016 | 1.032 ± 0.056 | 0.084 ± 0.022 | 0.842 ± 0.016 | no | — |
| FedProx mu = 0.01 | 1.133 ± 0.201 | 0.767 ± 0.079 | 0.576 ± 0.049 | 0.456 ± 0.023 | 0.461 ± 0.015 | 1.031 ± 0.055 | 0.082 ± 0.021 | 0.844 ± 0.018 | no | 3/3 |
| FedProx mu = 0.1 | 1.173 ± 0.207 | 0.752 ± 0.079 | 0.545 ± 0.044 | 0.431 ± 0.019 | 0.425 ± 0.014 | 1.026 ± 0.047 | 0.062 ± 0.019 | 0.851 ± 0.006 | no | 3/3 |
| FedProx mu = 1 | 1.299 ± 0.176 | 0.771 ± 0.044 | 0.516 ± 0.035 | 0.410 ± 0.013 | 0.369 ± 0.012 | 1.120 ± 0.067 | 0.027 ± 0.015 | 0.862 ± 0.010 | no | 3/3 |

FedProx's final training loss falls with mu (0.466, 0.461, 0.425, 0.369), and with mu = 1 it
is lower than FedAvg's for each of the 3 seeds; the loss also climbs back less (largest rise
0.027 against 0.084; FedAvg with seed 0, for instance, goes from 0.416 at round 185 to 0.472
at round 200), and the final test accuracy is 2 points higher. mu = 1 is slower at first
(higher loss at round 20), which is what its higher "max after round 20" measures: with
seed 0 that maximum is the round-25 value for both FedAvg and mu = 1, still on the initial
descent, not a late jump. Nothing diverges: on this data draw FedAvg fluctuates and ends
higher, but does not oscillate as strongly as in the paper's figure (whose data set, unlike
this draw, is dominated by one large device). The qualitative result, a lower and steadier
training loss with mu = 1, is reproduced.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import jax.numpy as jnp
import numpy as np
import optax

import fedjax_sim as fs

REPORT_ROUNDS = (20, 50, 100, 150, 200)
INSTABILITY_AFTER = 20


def _one(model, train, pooled_train, pooled_test, mu: float, seed: int, args) -> dict:
    """Training losses {round: loss}, final pooled test accuracy and divergence of one run."""
    algorithm = fs.algorithms.fedprox(optax.sgd(args.lr), mu, local_epochs=args.local_epochs,
                                      batch_size=args.batch_size)
    rows: list[dict] = []
    diverged = False
    result = None
    try:
        result = fs.simulate(model, algorithm, train, rounds=args.rounds,
                             clients_per_round=args.clients_per_round, eval_data=pooled_train,
                             eval_every=args.eval_every, seed=seed, progress=False,
                             callback=rows.append)
    except fs.UserError as e:
        if "diverged" not in str(e):
            raise
        diverged = True  # the rows logged up to the divergence are kept
    losses = {row["round"]: row["test_loss"] for row in rows if "test_loss" in row}
    diverged = diverged or any(not math.isfinite(v) for v in losses.values()) or any(
        not math.isfinite(row["train_loss"]) for row in rows)
    accuracy = float("nan")
    if result is not None:
        logits, _ = model.apply(result.params, result.model_state, jnp.asarray(pooled_test["x"]),
                                train=False)
        accuracy = float(np.mean(np.asarray(jnp.argmax(logits, -1)) == pooled_test["y"]))
    return {"losses": losses, "accuracy": accuracy, "diverged": diverged}


def _largest_rise(losses: dict[int, float]) -> float:
    """max over evaluated rounds t > INSTABILITY_AFTER of loss(t) - min_{s <= t} loss(s):
    how far the training loss climbs back above the best value reached before."""
    best, rise = float("inf"), 0.0
    for r in sorted(losses):
        best = min(best, losses[r])
        if r > INSTABILITY_AFTER:
            rise = max(rise, losses[r] - best)
    return rise


def _fmt(values: list[float]) -> str:
    bad = sum(not math.isfinite(v) for v in values)
    if bad:
        return "nan" if len(values) == 1 else f"nan ({bad}/{len(values)} runs)"
    spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.3f}{spread}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per row")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the Synthetic(1,1) draw")
    parser.add_argument("--mus", type=float, nargs="+", default=[0.0, 0.01, 0.1, 1.0],
                        help="proximal mu of each row (0 = FedAvg)")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--clients-per-round", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.01, help="client SGD learning rate")
    parser.add_argument("--local-epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=5)
    args = parser.parse_args()

    train, test, _ = fs.data.synthetic(1.0, 1.0, num_clients=30, seed=args.data_seed)
    pooled_train = {"x": train.features["x"], "y": train.features["y"]}
    pooled_test = {"x": test.features["x"], "y": test.features["y"]}
    model = fs.models.get_model("logistic_regression", (60,), 10)
    shown = [r for r in REPORT_ROUNDS if r <= args.rounds]

    t0 = time.perf_counter()
    print(f"Synthetic(1,1), data seed {args.data_seed}: {train.num_clients} devices, "
          f"{train.num_examples} training / {test.num_examples} test examples, device sizes "
          f"{int(np.min(train.client_sizes))}..{int(np.max(train.client_sizes))}; "
          f"{args.seeds} seed(s), training loss on all training data\n")
    print("| algorithm | " + " | ".join(f"loss @{r}" for r in shown)
          + f" | max loss after round {INSTABILITY_AFTER} | largest rise above best so far"
          f" (after round {INSTABILITY_AFTER}) | test accuracy | non-finite"
          f" | final loss < FedAvg's (seeds) |")
    print("|---|" + "---|" * (len(shown) + 5))
    baseline = None  # FedAvg's final losses, seed by seed, for the paired comparison
    for mu in sorted(args.mus):  # FedAvg (mu = 0) first
        name = "FedAvg (mu = 0)" if mu == 0 else f"FedProx mu = {mu:g}"
        runs = [_one(model, train, pooled_train, pooled_test, mu, seed, args)
                for seed in range(args.seeds)]
        cells = [_fmt([run["losses"].get(r, float("nan")) for run in runs]) for r in shown]
        late = [{r: v for r, v in run["losses"].items() if r > INSTABILITY_AFTER} for run in runs]
        if args.rounds <= INSTABILITY_AFTER:
            cells += ["—", "—"]
        else:
            cells.append(_fmt([max(v.values()) if v and not run["diverged"] else float("nan")
                               for v, run in zip(late, runs)]))
            cells.append(_fmt([float("nan") if run["diverged"] else _largest_rise(run["losses"])
                               for run in runs]))
        cells.append(_fmt([run["accuracy"] for run in runs]))
        bad = sum(run["diverged"] for run in runs)
        cells.append("no" if bad == 0 else f"yes ({bad}/{len(runs)} runs)")
        final = [run["losses"].get(args.rounds, float("nan")) for run in runs]
        if mu == 0:
            baseline = final
            cells.append("—")
        elif baseline is None:
            cells.append("(no FedAvg row)")
        else:
            cells.append(f"{sum(f < b for f, b in zip(final, baseline))}/{len(final)}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
