"""A cohort spread over a mesh of devices gives the numbers one device gives.

The runs happen in a subprocess with 8 host CPU devices (XLA's
--xla_force_host_platform_device_count). Each workload runs on 1 device (no mesh), on a
mesh of 2 and of 8; everything a client draws depends only on (seed, round, client id),
so the metrics agree up to the order of the float additions in the weighted sums
(within a device, then across devices): well below 1e-5 relative. 11 clients a round do
not divide among 2 or 8 devices (padding slots); SCAFFOLD's 40 client states are split
across devices (40 rows divide by 2 and 8); DP-FedAvg samples a Poisson cohort (its real
clients dealt out among the devices) and adds its noise once, after the reduction.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fedjax_sim.engine.mesh import deal

SCRIPT = textwrap.dedent("""
    import json, sys
    import optax
    import fedjax_sim as fs
    from fedjax_sim.privacy import ClientLevelDP

    def streamed_layout(clients):
        # Host-streamed data on a mesh of 8: which rows each device receives.
        import jax, numpy as np
        from fedjax_sim.engine.mesh import resolve_mesh
        from fedjax_sim.engine.streaming import MeshHostData

        class Cohorts:  # two rounds of 11 slots, the second with 3 padding slots
            def cohorts(self, root, start, rounds):
                ids = np.arange(22).reshape(2, 11) + 5
                return ids, np.arange(22).reshape(2, 11) < 19

        stream = MeshHostData(clients, resolve_mesh(8), 11)
        stream.set_window(22)
        layout = stream.layout(Cohorts(), None, 0, 2)
        packed = stream.pack_devices(layout)
        blocks = np.asarray(packed.features["y"]).reshape(8, stream.capacity)
        offsets, sizes = np.asarray(packed.offsets), np.asarray(packed.sizes)
        rows = []
        for j, ids in enumerate(layout):
            rows.append({"ids": ids.tolist(), "rows_match": all(
                np.array_equal(blocks[j, offsets[j, c]:offsets[j, c] + sizes[c]],
                               clients.client(c)["y"]) for c in ids),
                "used": int(sizes[ids].sum())})
        return {"devices": rows, "capacity": stream.capacity}

    train, test = fs.data.load_digits()
    clients = fs.data.partition(train, train["y"], "dirichlet", 40, seed=0, alpha=0.5)
    model = fs.models.get_model("logistic_regression", (8, 8, 1), 10)
    out = {}
    for name in sys.argv[1].split(","):
        for devices in map(int, sys.argv[2].split(",")):
            engine, kw = dict(mesh=devices, rounds_per_call=2), {}
            if name == "fedavg":
                algorithm = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=10)
            elif name == "scaffold":
                algorithm = fs.algorithms.scaffold(0.1, batch_size=10)
            elif name == "dp_poisson":
                algorithm = fs.algorithms.fedavg(optax.sgd(0.3), optax.sgd(0.5), batch_size=10,
                                                 weighting="uniform")
                kw["privacy"] = ClientLevelDP(noise_multiplier=0.5, clip_norm=0.5, delta=1e-3,
                                              sampling="poisson")
            elif name == "chunked":
                algorithm = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=10)
                engine["clients_per_chunk"] = 2
            elif name == "robust_attack":  # a whole-cohort attack, then a robust rule
                algorithm = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=10,
                                                 weighting="uniform")
                kw["aggregator"] = fs.aggregators.trimmed_mean(0.2)
                kw["attack"] = fs.attacks.Attack(fraction=0.25,
                                                 update=fs.attacks.little_is_enough())
            elif name == "streamed":
                algorithm = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=10)
                engine["data_placement"] = "host"
            result = fs.simulate(model, algorithm, clients, rounds=4, clients_per_round=11,
                                 eval_data=test, eval_every=2, engine=fs.EngineOptions(**engine),
                                 progress=False, **kw)
            out[f"{name}/{devices}"] = {"history": result.history,
                                        "mesh": result.summary["engine"]["mesh"]}
    out["layout"] = streamed_layout(clients)
    print("RESULT" + json.dumps(out))
""")


def run_on_devices(workloads: str, meshes: str, devices: int = 8) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS", ""),
                                              f"--xla_force_host_platform_device_count={devices}"]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, workloads, meshes], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def assert_same_metrics(reference: list[dict], other: list[dict], rtol: float = 1e-5):
    assert [r["round"] for r in reference] == [r["round"] for r in other]
    for a, b in zip(reference, other):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=rtol, atol=1e-7, err_msg=key)


def test_deal_balances_devices_and_inverts():
    order, inverse = deal(11, 4)
    assert len(order) == 12 and sorted(order) == list(range(12))
    # device j's block holds slots j, j+4, j+8: the first live slots go one per device
    assert order.reshape(4, 3).tolist() == [[0, 4, 8], [1, 5, 9], [2, 6, 10], [3, 7, 11]]
    assert (np.arange(12)[order][inverse] == np.arange(12)).all()


def check_meshes(out: dict, names: tuple[str, ...], meshes: tuple[int, ...]):
    for name in names:
        one = out[f"{name}/1"]
        assert one["mesh"]["devices"] == 1
        assert "test_accuracy" in one["history"][-1]
        for devices in meshes:
            run = out[f"{name}/{devices}"]
            assert run["mesh"] == {"devices": devices, "processes": 1, "platform": "cpu"}
            assert_same_metrics(one["history"], run["history"])


@pytest.mark.slow  # half a minute of 8-device compiles; with the other workloads below
def test_mesh_of_8_devices_matches_one_device():
    """DP-FedAvg with Poisson sampling (cohorts of varying size, dealt out among 8
    devices with padding slots); and host-streamed data reaches each device as its own
    clients' rows only. Every workload on 2 and 8 devices: also the slow tier."""
    out = run_on_devices("dp_poisson", "1,8")
    check_meshes(out, ("dp_poisson",), (8,))
    # slots 0..10 of a round (clients 5..15, then 16..26 with 24..26 padding) dealt to 8
    # devices: device j trains slots j and j+8 of each round
    devices = out["layout"]["devices"]
    for j, device in enumerate(devices):
        slots = [s for s in (j, j + 8) if s < 11]
        expected = sorted({5 + s for s in slots} | {16 + s for s in slots if 11 + s < 19})
        assert device["ids"] == expected
        assert device["rows_match"] and device["used"] <= out["layout"]["capacity"]
    # the DP run's Poisson cohorts vary in size, and are the same on every mesh
    sizes = [r["cohort_size"] for r in out["dp_poisson/8"]["history"]]
    assert sizes == [r["cohort_size"] for r in out["dp_poisson/1"]["history"]]
    assert len(set(sizes)) > 1


@pytest.mark.slow
def test_mesh_of_2_and_8_devices_matches_one_device_for_every_workload():
    names = ("fedavg", "scaffold", "dp_poisson", "chunked", "streamed", "robust_attack")
    check_meshes(run_on_devices(",".join(names), "1,2,8"), names, (2, 8))

