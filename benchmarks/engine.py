"""Seconds per round: the fedjax_sim engine vs a hand-written sequential loop vs the compute limit.

    python benchmarks/engine.py            # all cases (~10 min on a 2-core CPU)
    python benchmarks/engine.py --quick    # fewer repetitions, skips the 100-client CNN
    python benchmarks/engine.py --cases a  # only case (a); cases: a, b10, b100, user, user_a

Cases (FedAvg, client SGD, 1 local epoch = 5 steps per client):
  (a) logistic regression, 64 features, 10 classes; 100 clients x 50 examples; 50 clients
      per round, batch 10;
  (b) the EMNIST CNN (1.2 M params) on 28x28x1 inputs; clients of 100 examples; 10 and 100
      clients per round, batch 20;
  (user) the same CNN and work as (b) with 10 clients per round, written as a plain Linen
      module (`nn.Conv`, `nn.Dense`) and adapted with `from_linen`, against the zoo's CNN:
      the engine as simulate() runs each. `--as-written` adds the Linen module with
      `kernels='as_written'` (its XLA convolutions kept; several times slower, fewer
      repetitions), with the engine's choice for it and with its clients forced one by one.
  (user_a) the same for the logistic regression of (a): the zoo's, a Linen `nn.Dense` through
      `from_linen`, and that with `kernels='as_written'` (XLA's dense-layer gradient).
Compared side by side in this one process:
  engine            fedjax_sim's RoundProgram with the automatic strategy choices
  loop/step         a Python loop over clients, one jitted call per local step (FedJAX style)
  loop/client       a Python loop over clients, one jitted lax.scan per client
  central           one model, one jit, the same examples per round as m*B-example batches
                    (the compute limit: no federated overhead at all)
The loops use flax's standard layers (XLA's convolution and dot), as a user would write;
the central row takes the faster of those and the engine's CPU kernels (im2col
convolutions, dense layers with explicit gradient transposes: models/conv.py, dense.py).
All contenders are timed round-robin (one call of each in turn) and the medians compared,
so drift in the machine's speed affects them alike; compile times are reported separately.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from fedjax_sim.aggregators import weighted_mean
from fedjax_sim.algorithms import Problem, fedavg
from fedjax_sim.data import FederatedData
from fedjax_sim.engine import DeviceData, RoundProgram, make_schedule, program_cache
from fedjax_sim.models import classification, from_linen, get_model
from fedjax_sim.simulation import EngineOptions, resolve_engine
from fedjax_sim.engine.options import client_step_flops, has_convolution

LR = 0.05


def make_data(num_clients, per_client, shape, seed=0) -> FederatedData:
    rng = np.random.default_rng(seed)
    n = num_clients * per_client
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    return FederatedData({"x": x, "y": y}, np.arange(num_clients + 1) * per_client,
                         tuple(str(i) for i in range(num_clients)))


def timed(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_engine(model, data, m, batch, options=EngineOptions()):
    """The engine as simulate() runs it; returns (call, rounds per call, compile s, choice)."""
    params, mstate = model.init(jax.random.key(0))
    schedule = make_schedule(data.max_client_size, batch_size=batch, local_epochs=1, local_steps=None)
    example = jnp.asarray(data.features["x"][:2])
    problem = Problem(model, classification(), mstate, "x")
    flops = client_step_flops(problem, params, {k: jnp.asarray(v[:batch]) for k, v in data.features.items()})
    choice = resolve_engine(options, backend=jax.default_backend(),
                            conv=has_convolution(model, params, mstate, example),
                            num_steps=schedule.num_steps, clients_per_round=m, step_flops=flops)
    program = RoundProgram(fedavg(optax.sgd(LR), batch_size=batch), problem,
                           weighted_mean(), schedule, num_clients=data.num_clients,
                           max_client_size=data.max_client_size, clients_per_round=m,
                           clients_per_chunk=choice["clients_per_chunk"], unroll=choice["unroll"])
    dd = DeviceData.from_federated(data)
    root = jax.random.key(1)
    state = program.init(params)
    max_k = choice["rounds_per_call"]
    program_cache.clear()  # a true compile: no program reused from an earlier case
    t0 = time.perf_counter()
    run = program.compile(state, dd, mstate, root, max_k)
    compile_s = time.perf_counter() - t0
    holder = {"state": state, "r": 0, "k": 1}

    def call():
        k = holder["k"]
        holder["state"], metrics = run(holder["state"], dd, mstate, root, holder["r"], k)
        holder["r"] += k
        return metrics

    call()  # warm-up
    one = timed(call, 2)
    # As simulate() does: fuse about a second's worth of rounds per call.
    holder["k"] = max(1, min(max_k, int(1.0 / one)))
    return call, holder["k"], compile_s, choice


def interleaved(contenders: dict, reps: int) -> dict:
    """Median seconds per call of each callable, timed round-robin.

    This machine's speed drifts by tens of percent within a minute (shared cores), so
    timing one contender after another would fold that drift into the ratios; alternating
    them exposes every contender to the same conditions.
    """
    times = {name: [] for name in contenders}
    for _ in range(reps):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _loss_fn(model, mstate):
    def loss(params, x, y, key):
        out, _ = model.apply(params, mstate, x, train=True, rng=key)
        return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
    return loss


def make_loops(model, data, m, batch):
    """The two hand-written sequential baselines; each returns a one-round callable.

    Written as a careful user would: batches cut on the host with numpy (as FedJAX
    does), PRNG keys made once, one jitted step (or one jitted scan per client), and a
    jitted weighted average of the stacked client models.
    """
    params, mstate = model.init(jax.random.key(0))
    loss = _loss_fn(model, mstate)
    sizes = data.client_sizes
    clients = [data.client(i) for i in range(data.num_clients)]
    steps = int(np.ceil(sizes.max() / batch))
    keys = [jax.random.key(s) for s in range(steps)]

    @jax.jit
    def sgd_step(p, x, y, key):
        g = jax.grad(loss)(p, x, y, key)
        return jax.tree_util.tree_map(lambda a, b: a - LR * b, p, g)

    @jax.jit
    def client_scan(p, x, y, key):
        def body(p, i):
            g = jax.grad(loss)(p, x[i], y[i], jax.random.fold_in(key, i))
            return jax.tree_util.tree_map(lambda a, b: a - LR * b, p, g), None
        return jax.lax.scan(body, p, jnp.arange(x.shape[0]))[0]

    @jax.jit
    def average(stacked, weights):
        w = weights / weights.sum()
        return jax.tree_util.tree_map(lambda s: jnp.tensordot(w, s, axes=1), stacked)

    rng = np.random.default_rng(0)
    state = {"params": params}

    def plan():
        cohort = rng.choice(data.num_clients, m, replace=False)
        batches = []
        for c in cohort:
            idx = rng.permutation(sizes[c])[:steps * batch].reshape(steps, batch)
            batches.append((clients[c]["x"][idx], clients[c]["y"][idx]))
        return cohort, batches

    def finish(cohort, new):
        stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *new)
        state["params"] = average(stacked, jnp.asarray(sizes[cohort], jnp.float32))
        return state["params"]

    def per_step_round():
        cohort, batches = plan()
        new = []
        for x, y in batches:
            p = state["params"]
            for s in range(steps):
                p = sgd_step(p, x[s], y[s], keys[s])
            new.append(p)
        return finish(cohort, new)

    def per_client_round():
        cohort, batches = plan()
        new = [client_scan(state["params"], x, y, keys[0]) for x, y in batches]
        return finish(cohort, new)

    return per_step_round, per_client_round


def make_central(model, data, examples_per_step, steps):
    params, mstate = model.init(jax.random.key(0))
    loss = _loss_fn(model, mstate)
    x = jnp.asarray(data.features["x"][:examples_per_step * steps]).reshape(steps, examples_per_step, *data.features["x"].shape[1:])
    y = jnp.asarray(data.features["y"][:examples_per_step * steps]).reshape(steps, examples_per_step)

    @jax.jit
    def train(p, x, y):
        for s in range(steps):  # unrolled: the fastest form on every backend measured
            g = jax.grad(loss)(p, x[s], y[s], jax.random.key(s))
            p = jax.tree_util.tree_map(lambda a, b: a - LR * b, p, g)
        return p

    state = {"p": params}

    def step():
        state["p"] = train(state["p"], x, y)
        return state["p"]

    return step


def case(name, model_fn, data, m, batch, reps, rows, per_client_loop=True):
    print(f"\n== {name}: {m} clients/round, batch {batch}, 5 local steps", flush=True)
    engine, k, comp, choice = make_engine(model_fn("auto"), data, m, batch)
    print(f"engine compiled in {comp:.1f} s; {choice}; {k} rounds per call", flush=True)
    per_step, per_client = make_loops(model_fn("xla"), data, m, batch)
    contenders = {"engine": engine, "loop/step": per_step}
    if per_client_loop:
        contenders["loop/client"] = per_client
    for impl in ("auto", "xla"):
        contenders[f"central/{impl}"] = make_central(model_fn(impl), data, m * batch, 5)
    for fn in contenders.values():
        jax.block_until_ready(fn())  # compile and warm up
    t = interleaved(contenders, reps)
    eng = t["engine"] / k
    t_step, t_client = t["loop/step"], t.get("loop/client", float("nan"))
    t_central = min(t["central/auto"], t["central/xla"])
    print(f"engine            {eng * 1e3:9.2f} ms/round", flush=True)
    print(f"loop/step         {t_step * 1e3:9.2f} ms/round   engine speed-up x{t_step / eng:.1f}", flush=True)
    if per_client_loop:
        print(f"loop/client       {t_client * 1e3:9.2f} ms/round   engine speed-up x{t_client / eng:.1f}", flush=True)
    else:
        print("loop/client       skipped (an XLA convolution inside a scan: ~12x loop/step)", flush=True)
    print(f"central           {t_central * 1e3:9.2f} ms/round   engine / central = {eng / t_central:.2f}"
          f"   (engine kernels {t['central/auto'] * 1e3:.2f}, XLA's {t['central/xla'] * 1e3:.2f})", flush=True)
    rows.append((name, m, eng, t_step, t_client, t_central, comp))


class LinenCNN(nn.Module):
    """The zoo's EMNIST CNN (models/zoo.py) as a researcher would write it in Linen."""

    num_outputs: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(32, (3, 3), padding="VALID")(x))
        x = nn.relu(nn.Conv(64, (3, 3), padding="VALID")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.Dropout(0.25, deterministic=not train)(x).reshape(x.shape[0], -1)
        x = nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Dense(128)(x)))
        return nn.Dense(self.num_outputs)(x)


class LinenLogisticRegression(nn.Module):
    """The zoo's logistic regression as a researcher would write it in Linen."""

    num_outputs: int = 10

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.num_outputs)(x.reshape(x.shape[0], -1))


def user_model_case(title, contenders: dict, data, m, batch, reps, rows):
    """The engine on each of `contenders` (name -> (model, EngineOptions)), the zoo's model
    first, timed round-robin; appends rows (case, model, m, s/round, ratio to the zoo's
    model, compile s, engine choice)."""
    print(f"\n== {title}: {m} clients/round, batch {batch}, 5 local steps", flush=True)
    engines = {}
    for name, (model, options) in contenders.items():
        call, k, comp, choice = make_engine(model, data, m, batch, options)
        print(f"{name}: compiled in {comp:.1f} s; {choice}; {k} rounds per call", flush=True)
        engines[name] = (call, k, comp, choice)
    t = interleaved({name: e[0] for name, e in engines.items()}, reps)
    zoo_name = next(iter(engines))
    zoo = t[zoo_name] / engines[zoo_name][1]
    for name, (call, k, comp, choice) in engines.items():
        per_round = t[name] / k
        rows.append((title, name, m, per_round, per_round / zoo, comp, choice))
        print(f"{name:40s} {per_round * 1e3:10.2f} ms/round   x{per_round / zoo:.2f} the zoo's",
              flush=True)


def user_cases(cases, cnn_data, quick: bool, as_written: bool) -> list:
    """Case (user): models written in plain Linen against the zoo's of the same architecture."""
    rows = []
    auto = EngineOptions()
    if "user" in cases:
        shape = cnn_data.features["x"].shape[1:]
        contenders = {"zoo cnn": (get_model("cnn", shape, 10), auto),
                      "Linen CNN (from_linen)": (from_linen(LinenCNN(), shape, train_kwarg="train"), auto)}
        if as_written:
            written = from_linen(LinenCNN(), shape, train_kwarg="train", kernels="as_written")
            contenders["Linen CNN, kernels='as_written'"] = (written, auto)
            contenders["the same, clients one by one"] = (written, EngineOptions(clients_per_chunk=1))
        user_model_case("(user) EMNIST CNN", contenders, cnn_data, 10, 20,
                        3 if quick else (5 if as_written else 7), rows)
    if "user_a" in cases:
        module = LinenLogisticRegression()
        written = from_linen(module, (64,), kernels="as_written")
        contenders = {"zoo logistic_regression": (get_model("logistic_regression", (64,), 10), auto),
                      "Linen logistic regression (from_linen)": (from_linen(module, (64,)), auto),
                      "the same, kernels='as_written'": (written, auto)}
        user_model_case("(user) logistic regression", contenders, make_data(100, 50, (64,)), 50, 10,
                        25 if quick else 100, rows)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cases", default="a,b10,b100,user,user_a",
                        help="comma-separated: a, b10, b100, user, user_a")
    parser.add_argument("--as-written", action="store_true",
                        help="case user: also the Linen CNN with its XLA convolutions kept")
    args = parser.parse_args()
    cases = set(args.cases.split(","))
    reps = 5 if args.quick else 20
    print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}")
    rows = []
    logreg = lambda impl: get_model("logistic_regression", (64,), 10, dense_impl=impl)
    if "a" in cases:
        case("(a) logistic regression", logreg, make_data(100, 50, (64,)), 50, 10, reps * 5, rows)
    cnn = lambda impl: get_model("cnn", (28, 28, 1), 10, conv_impl=impl, dense_impl=impl)
    cnn_data = make_data(200, 100, (28, 28, 1))
    if "b10" in cases:
        case("(b) EMNIST CNN", cnn, cnn_data, 10, 20, 3, rows)
    if "b100" in cases and not args.quick:
        case("(b) EMNIST CNN", cnn, cnn_data, 100, 20, 2, rows, per_client_loop=False)
    user_rows = user_cases(cases, cnn_data, args.quick, args.as_written)
    if rows:
        print("\n| case | clients/round | engine s/round | loop/step s/round | loop/client s/round | central s/round | engine speed-up vs loop/step | vs loop/client | engine / central | engine compile s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    for name, m, eng, ts, tc, tcen, comp in rows:
        print(f"| {name} | {m} | {eng:.4f} | {ts:.4f} | {tc:.4f} | {tcen:.4f} | {ts / eng:.1f}x | {tc / eng:.1f}x | {eng / tcen:.2f} | {comp:.1f} |")
    if user_rows:
        print("\n| case | model | clients/round | engine s/round | vs the zoo's | engine compile s | engine choice |")
        print("|---|---|---|---|---|---|---|")
        for title, name, m, per_round, ratio, comp, choice in user_rows:
            picked = (f"clients_per_chunk={choice['clients_per_chunk']}, unroll={choice['unroll']}, "
                      f"rounds_per_call={choice['rounds_per_call']}")
            print(f"| {title} | {name} | {m} | {per_round:.4f} | {ratio:.2f}x | {comp:.1f} | {picked} |")

if __name__ == "__main__":
    main()
