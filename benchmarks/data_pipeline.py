"""What the data pipeline costs: uint8 storage, on-device augmentation, host streaming.

    python benchmarks/data_pipeline.py            # ~3 min on a 2-core CPU
    python benchmarks/data_pipeline.py --quick    # fewer rounds

A CIFAR-sized dataset (50,000 random uint8 images 32x32x3, labels split over 500
clients by Dirichlet(0.1), as in configs/cifar10_dirichlet.py), FedAvg with 10 clients a
round, 1 local epoch of batch 20, on two models: an MLP (64 hidden units: a light step,
so data movement shows) and the zoo's CNN. Rows, side by side in one process, the
variants run round-robin and the best of `--repeats` taken:

  device            uint8 images on the device, converted inside each step
  device+augment    plus random crop (4 px padding) and horizontal flip per example
  host (streamed)   images kept on the host; each call's cohort rows packed and sent,
                    the next call's prefetched while one runs
  host, budget 1/4  placement 'auto' with device_data_budget a quarter of the images:
                    streamed, with rounds_per_call lowered until a call's rows fit

Prints seconds per round, the ratio to 'device', and the bytes the training set takes
on the device (uint8 vs what float32 would take). The streamed rows must give the same
training loss as 'device' (checked and printed).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import optax

import fedjax_sim as fs


def cifar_sized(seed=0, n=50_000, clients=500):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n).astype(np.int32)
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return fs.data.partition({"x": x, "y": y}, y, "dirichlet", clients, seed=seed, alpha=0.1)


def run(data, model, rounds, preprocess, placement, budget=None):
    algo = fs.algorithms.fedavg(optax.sgd(0.03), local_epochs=1, batch_size=20)
    res = fs.simulate(model, algo, data, rounds=rounds, clients_per_round=10, eval_every=rounds,
                      preprocess=preprocess, progress=False,
                      engine=fs.EngineOptions(data_placement=placement, device_data_budget=budget))
    engine = res.summary["engine"]
    return (res.summary["seconds_per_round"], res.history[-1]["train_loss"],
            engine.get("stream", engine)["rounds_per_call"])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    t0 = time.perf_counter()
    data = cifar_sized()
    x = data.features["x"]
    print(f"data: {data.num_clients} clients, {data.num_examples} images, largest client "
          f"{data.max_client_size}; built in {time.perf_counter() - t0:.1f} s")
    print(f"training images on device: uint8 {x.nbytes / 2**20:.1f} MiB "
          f"(float32 would be {x.nbytes * 4 / 2**20:.1f} MiB)")
    plain = fs.data.Preprocess()
    augment = fs.data.Preprocess(crop_padding=4, flip=True)
    quarter = x.nbytes // 4
    variants = [("device", plain, "device", None), ("device+augment", augment, "device", None),
                ("host (streamed)", plain, "host", None),
                ("host, budget 1/4", plain, "auto", quarter)]
    models = [("mlp[64]", fs.models.get_model("mlp", (32, 32, 3), 10, hidden=[64]), 60),
              ("cnn", fs.models.get_model("cnn", (32, 32, 3), 10), 6)]
    for name, model, rounds in models:
        rounds = max(2, rounds // 3) if args.quick else rounds
        best, losses, per_call = {}, {}, {}
        for _ in range(args.repeats):
            for label, pre, placement, budget in variants:
                sec, loss, per_call[label] = run(data, model, rounds, pre, placement, budget)
                best[label] = min(best.get(label, np.inf), sec)
                losses[label] = loss
        base = best["device"]
        print(f"\n{name}, {rounds} rounds of 10 clients (ms per round, best of {args.repeats}):")
        for label, *_ in variants:
            print(f"  {label:<18} {best[label] * 1e3:9.1f}   x{best[label] / base:.2f}   "
                  f"({per_call[label]} rounds per call)")
        same = losses["device"] == losses["host (streamed)"] == losses["host, budget 1/4"]
        print(f"  streamed train_loss equals on-device: {same} ({losses['host (streamed)']:.6f})")


if __name__ == "__main__":
    main()
