"""Tests for fedjax_sim.data: FederatedData, partitioners and the offline datasets.

Each check compares against something computed independently of the code under test:
hand-worked values, a plain-Python/numpy reference, or a statistical bound.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedjax_sim.data import (
    PARTITIONERS,
    FederatedData,
    dirichlet,
    get_partitioner,
    iid,
    label_skew,
    load_diabetes,
    load_digits,
    partition,
    quantity_skew,
    shards,
    synthetic,
)
from fedjax_sim.errors import UserError

# Parameters that make every partitioner valid on the labels below.
PARTITIONER_PARAMS = {
    "iid": {},
    "dirichlet": {"alpha": 0.5},
    "shards": {"shards_per_client": 2},
    "quantity_skew": {"sigma": 1.0},
}


def _labels(n: int = 503, num_classes: int = 10, seed: int = 123) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, n)


def _rows(n_per_client: list[int]) -> FederatedData:
    """Clients with the given sizes; feature `rid` is the global row id, `y` a label."""
    n = sum(n_per_client)
    offsets = np.concatenate([[0], np.cumsum(n_per_client)]).astype(np.int64)
    return FederatedData(
        {"rid": np.arange(n), "y": np.arange(n) % 3},
        offsets,
        tuple(f"c{i}" for i in range(len(n_per_client))),
    )


# ------------------------------------------------------------------------ partitioners


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
@pytest.mark.parametrize("num_clients", [1, 3, 10])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_partitioner_covers_every_index_exactly_once(name, num_clients, seed):
    labels = _labels()
    parts = PARTITIONERS[name](labels, num_clients, seed=seed, **PARTITIONER_PARAMS[name])
    assert len(parts) == num_clients
    assert all(p.dtype == np.int64 and p.ndim == 1 for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(labels.size))


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_partitioner_deterministic_in_seed(name):
    labels = _labels()
    fn, params = PARTITIONERS[name], PARTITIONER_PARAMS[name]
    a = fn(labels, 8, seed=3, **params)
    b = fn(labels, 8, seed=3, **params)
    c = fn(labels, 8, seed=4, **params)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_sizes_near_equal():
    sizes = [p.size for p in iid(_labels(1003), 10, seed=0)]
    # 1003 = 10 * 100 + 3: three clients of 101, seven of 100.
    assert sorted(sizes) == [100] * 7 + [101] * 3


def test_label_skew_hand_computed():
    # Two pure clients of a balanced 2-class set: TV = 1/2 each.
    assert label_skew(np.array([[2, 0], [0, 2]])) == pytest.approx(0.5)
    # g = (5/6, 1/6); TV_0 = 1/2 (1/6 + 1/6) = 1/6, TV_1 = 1/2 (1/3 + 1/3) = 1/3;
    # weighted: (4 * 1/6 + 2 * 1/3) / 6 = 2/9.
    assert label_skew(np.array([[4, 0], [1, 1]])) == pytest.approx(2 / 9)
    # An empty client has weight 0.
    assert label_skew(np.array([[4, 0], [1, 1], [0, 0]])) == pytest.approx(2 / 9)
    # Every client has the global mix.
    assert label_skew(np.array([[3, 1], [6, 2]])) == pytest.approx(0.0)
    # One class per client out of K = 4 balanced: TV = 1/2 (3/4 + 3 * 1/4) = 3/4.
    assert label_skew(np.eye(4) * 5) == pytest.approx(0.75)


def test_label_skew_rejects_bad_histograms():
    with pytest.raises(UserError, match="histogram"):
        label_skew(np.array([1, 2, 3]))
    with pytest.raises(UserError, match="all zeros"):
        label_skew(np.zeros((2, 3)))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    labels = np.repeat(np.arange(10), 200)
    features = {"y": labels}

    def mean_skew(alpha: float) -> float:
        return float(np.mean([
            label_skew(partition(features, labels, "dirichlet", 50, seed=s, alpha=alpha)
                       .label_histogram(num_classes=10))
            for s in range(3)
        ]))

    skews = [mean_skew(a) for a in (100.0, 1.0, 0.1)]
    assert skews[0] < skews[1] < skews[2]
    # alpha = 100 is close to IID; alpha = 0.1 puts most of a client on few classes.
    assert skews[0] < 0.15 and skews[2] > 0.5


def test_dirichlet_large_alpha_splits_each_class_evenly():
    labels = np.repeat(np.arange(10), 100)
    parts = dirichlet(labels, 4, seed=0, alpha=1e6)
    counts = np.array([np.bincount(labels[p], minlength=10) for p in parts])
    # Proportions are 1/4 up to ~1e-4, so only the floor at the cuts moves a count.
    assert np.all(np.abs(counts - 25) <= 1)


def test_dirichlet_min_size_and_errors():
    labels = np.repeat(np.arange(10), 200)
    parts = dirichlet(labels, 20, seed=0, alpha=0.5, min_size=10)
    assert min(p.size for p in parts) >= 10
    with pytest.raises(UserError, match="lower min_size"):
        dirichlet(labels, 50, seed=0, alpha=0.001, min_size=30, max_tries=3)
    with pytest.raises(UserError, match="alpha must be > 0"):
        dirichlet(labels, 5, seed=0, alpha=0.0)


def test_shards_pathological_split_on_balanced_labels():
    labels = np.repeat(np.arange(10), 200)  # sorted, 200 per class
    parts = shards(labels, 100, seed=0, shards_per_client=2)
    # 200 shards of 10; 10 divides 200, so every shard holds one label.
    assert all(p.size == 20 for p in parts)
    assert max(np.unique(labels[p]).size for p in parts) <= 2


def test_shards_label_bound_on_unbalanced_labels():
    labels = _labels(1003, num_classes=5, seed=9)
    num_clients, per_client = 20, 3
    shard_size = math.ceil(labels.size / (num_clients * per_client))
    # With shards no larger than the smallest class, a shard crosses at most one class
    # boundary, so it holds at most 2 labels and a client at most 2 * per_client.
    assert shard_size <= np.bincount(labels).min()
    parts = shards(labels, num_clients, seed=1, shards_per_client=per_client)
    assert max(np.unique(labels[p]).size for p in parts) <= 2 * per_client
    # Each client holds per_client shards of floor/ceil(1003 / 60) = 16/17 examples.
    assert all(3 * 16 <= p.size <= 3 * 17 for p in parts)


def test_shards_needs_enough_examples():
    with pytest.raises(UserError, match="at least 20 examples"):
        shards(np.arange(19), 10, seed=0, shards_per_client=2)


def test_quantity_skew_sizes():
    labels = _labels(2000)

    def sizes(sigma: float, seed: int, min_size: int = 1) -> np.ndarray:
        return np.array([p.size for p in
                         quantity_skew(labels, 40, seed=seed, sigma=sigma, min_size=min_size)])

    for seed in range(3):
        s = sizes(1.5, seed, min_size=7)
        assert s.sum() == 2000 and s.min() >= 7

    def mean_cv(sigma: float) -> float:
        return float(np.mean([sizes(sigma, s).std() / sizes(sigma, s).mean() for s in range(5)]))

    assert mean_cv(0.25) < mean_cv(1.0) < mean_cv(2.0)
    # sigma = 0 makes all weights equal: 2000 / 40 = 50 each.
    np.testing.assert_array_equal(sizes(0.0, 0), np.full(40, 50))
    with pytest.raises(UserError, match="lower min_size or num_clients"):
        quantity_skew(labels, 40, seed=0, min_size=51)


def test_get_partitioner_and_partition_errors():
    assert get_partitioner("shards") is shards
    with pytest.raises(UserError, match="dirichlet"):
        get_partitioner("dirichlett")
    x = np.arange(10.0)[:, None]
    y = np.arange(10) % 2
    with pytest.raises(UserError, match="at most 10 clients"):
        partition({"x": x, "y": y}, y, "iid", 11, seed=0)
    with pytest.raises(UserError, match="num_clients must be >= 1"):
        partition({"x": x, "y": y}, y, "iid", 0, seed=0)
    with pytest.raises(UserError, match="same leading dimension"):
        partition({"x": x, "y": y}, y[:9], "iid", 2, seed=0)
    with pytest.raises(UserError, match="bad parameters"):
        partition({"x": x, "y": y}, y, "dirichlet", 2, seed=0, alhpa=1.0)


def test_partition_builds_federated_data_from_partitioner_rows():
    x = np.arange(60.0).reshape(30, 2)
    y = np.arange(30) % 3
    data = partition({"x": x, "y": y}, y, "dirichlet", 4, seed=5, alpha=1.0)
    parts = dirichlet(y, 4, seed=5, alpha=1.0)
    assert data.client_ids == ("0", "1", "2", "3")
    for i, rows in enumerate(parts):
        np.testing.assert_array_equal(data.client(i)["x"], x[rows])
        np.testing.assert_array_equal(data.client(i)["y"], y[rows])


# ------------------------------------------------------------------------ FederatedData


def test_from_client_column_matches_dict_of_lists():
    rng = np.random.default_rng(0)
    column = rng.choice([10, 2, 7, 33], size=50)
    x = rng.normal(size=(50, 3))
    data = FederatedData.from_client_column({"x": x, "row": np.arange(50)}, column)
    groups: dict[int, list[int]] = {}
    for row, cid in enumerate(column.tolist()):
        groups.setdefault(cid, []).append(row)
    expected_ids = sorted(groups)  # numeric order: 2, 7, 10, 33
    assert data.client_ids == tuple(str(c) for c in expected_ids)
    for i, cid in enumerate(expected_ids):
        np.testing.assert_array_equal(data.client(i)["row"], groups[cid])
        np.testing.assert_array_equal(data.client(i)["x"], x[groups[cid]])
    np.testing.assert_array_equal(data.client_sizes, [len(groups[c]) for c in expected_ids])


def test_from_client_column_string_ids():
    data = FederatedData.from_client_column(
        {"v": np.arange(5)}, np.array(["bob", "amy", "bob", "cat", "amy"]))
    assert data.client_ids == ("amy", "bob", "cat")
    assert [data.client(i)["v"].tolist() for i in range(3)] == [[1, 4], [0, 2], [3]]
    with pytest.raises(UserError, match="one id per example"):
        FederatedData.from_client_column({"v": np.arange(5)}, np.array(["a", "b"]))


def test_from_partition_rows_and_ids():
    x = np.arange(20).reshape(10, 2)
    lists = [[3, 1], [], np.array([9, 0, 5])]  # a subset of rows, in a given order
    data = FederatedData.from_partition({"x": x}, lists)
    assert data.client_ids == ("0", "1", "2")
    np.testing.assert_array_equal(data.offsets, [0, 2, 2, 5])
    for i, rows in enumerate(lists):
        np.testing.assert_array_equal(data.client(i)["x"], x[np.asarray(rows, dtype=int)])
    named = FederatedData.from_partition({"x": x}, [[0], [1]], client_ids=["a", "b"])
    assert named.client_ids == ("a", "b")
    with pytest.raises(UserError, match=r"outside \[0, 10\)"):
        FederatedData.from_partition({"x": x}, [[0, 10]])
    with pytest.raises(UserError, match=r"outside \[0, 10\)"):
        FederatedData.from_partition({"x": x}, [[-1]])


def test_properties_and_repr():
    data = _rows([3, 0, 5])
    assert data.num_clients == 3 and data.num_examples == 8
    np.testing.assert_array_equal(data.client_sizes, [3, 0, 5])
    assert data.client_sizes.dtype == np.int64
    assert data.max_client_size == 5
    assert data.feature_names == ("rid", "y")
    text = repr(data)
    assert "num_clients=3" in text and "num_examples=8" in text and "rid" in text
    np.testing.assert_array_equal(data.client(2)["rid"], [3, 4, 5, 6, 7])
    with pytest.raises(UserError, match="out of range"):
        data.client(3)


@pytest.mark.parametrize("test_fraction", [0.0, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 1])
def test_split_partitions_each_client(test_fraction, seed):
    data = _rows([0, 1, 2, 3, 5, 10, 37])
    train, test = data.split(test_fraction, seed)
    assert train.client_ids == test.client_ids == data.client_ids
    for i in range(data.num_clients):
        own = data.client(i)["rid"]
        got = np.concatenate([train.client(i)["rid"], test.client(i)["rid"]])
        np.testing.assert_array_equal(np.sort(got), np.sort(own))
        if own.size >= 1:
            assert train.client(i)["rid"].size >= 1
        # Features stay aligned with the row they came from.
        np.testing.assert_array_equal(train.client(i)["y"], train.client(i)["rid"] % 3)


def test_split_test_counts_hand_computed():
    data = _rows([0, 1, 2, 5, 10])
    # round-half-even of n * f, then capped at n - 1 (n >= 2) and 0 (n <= 1).
    expected = {0.5: [0, 0, 1, 2, 5], 0.9: [0, 0, 1, 4, 9], 0.2: [0, 0, 0, 1, 2]}
    for fraction, counts in expected.items():
        train, test = data.split(fraction, seed=0)
        np.testing.assert_array_equal(test.client_sizes, counts)
        np.testing.assert_array_equal(train.client_sizes, data.client_sizes - counts)
    _, test = data.split(0.2, seed=0)
    assert test.empty_clients() == ["c0", "c1", "c2"]


def test_split_deterministic_and_validated():
    data = _rows([20, 30])
    a = data.split(0.3, seed=5)[1].features["rid"]
    b = data.split(0.3, seed=5)[1].features["rid"]
    c = data.split(0.3, seed=6)[1].features["rid"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(UserError, match=r"test_fraction must be in \[0, 1\)"):
            data.split(bad, seed=0)


def test_subset_empty_clients_and_drop_empty():
    data = _rows([2, 0, 3, 0, 1])
    sub = data.subset([4, 0])
    assert sub.client_ids == ("c4", "c0")
    np.testing.assert_array_equal(sub.features["rid"], [5, 0, 1])
    assert data.empty_clients() == ["c1", "c3"]
    dropped = data.drop_empty()
    assert dropped.client_ids == ("c0", "c2", "c4")
    np.testing.assert_array_equal(dropped.features["rid"], np.arange(6))
    assert dropped.empty_clients() == []
    with pytest.raises(UserError, match="repeated"):
        data.subset([0, 0])
    with pytest.raises(UserError, match="client_indices must lie"):
        data.subset([5])


def test_label_histogram_matches_bincount_loop():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 6, 200).astype(np.int32)
    column = rng.integers(0, 9, 200)
    data = FederatedData.from_client_column({"y": y}, column)
    hist = data.label_histogram(num_classes=8)
    assert hist.shape == (data.num_clients, 8)
    for i in range(data.num_clients):
        np.testing.assert_array_equal(hist[i], np.bincount(data.client(i)["y"], minlength=8))
    # Column-vector labels give the same counts; K defaults to max label + 1.
    column_y = FederatedData(
        {"y": data.features["y"][:, None]}, data.offsets, data.client_ids)
    np.testing.assert_array_equal(column_y.label_histogram(), hist[:, : y.max() + 1])
    with pytest.raises(UserError, match="raise num_classes"):
        data.label_histogram(num_classes=3)
    with pytest.raises(UserError, match="pick one of"):
        data.label_histogram("label")


def test_validation_errors_are_user_errors():
    x, y = np.zeros((5, 2)), np.zeros(5)
    with pytest.raises(UserError, match="same leading dimension"):
        FederatedData({"x": x, "y": np.zeros(4)}, np.array([0, 5]), ("a",))
    with pytest.raises(UserError, match="end at the number of examples 5"):
        FederatedData({"x": x}, np.array([0, 4]), ("a",))
    with pytest.raises(UserError, match="non-decreasing"):
        FederatedData({"x": x}, np.array([0, 3, 2, 5]), ("a", "b", "c"))
    with pytest.raises(UserError, match="not unique"):
        FederatedData({"x": x, "y": y}, np.array([0, 2, 5]), ("a", "a"))
    with pytest.raises(UserError, match="one id per client"):
        FederatedData({"x": x}, np.array([0, 2, 5]), ("a",))
    with pytest.raises(UserError, match="non-empty dict"):
        FederatedData({}, np.array([0]), ())
    with pytest.raises(UserError, match="not a numpy array"):
        FederatedData({"x": [1, 2]}, np.array([0, 2]), ("a",))
    with pytest.raises(UserError, match="integer"):
        FederatedData({"x": x}, np.array([0.0, 5.0]), ("a",))
    # Every message is a single line.
    try:
        FederatedData({"x": x, "y": np.zeros(4)}, np.array([0, 5]), ("a",))
    except UserError as e:
        assert "\n" not in str(e)


# ------------------------------------------------------------------------ builtin sources


def test_load_digits_shapes_and_stratification():
    from sklearn.datasets import load_digits as sk_load_digits

    train, test = load_digits()
    assert train["x"].shape == (1437, 8, 8, 1) and test["x"].shape == (360, 8, 8, 1)
    assert train["x"].dtype == np.float32 and train["y"].dtype == np.int32
    assert train["x"].min() >= 0.0 and train["x"].max() <= 1.0
    assert test["x"].max() == 1.0  # pixels reach 16, so 16 / 16 appears
    all_counts = np.bincount(sk_load_digits().target, minlength=10)
    test_counts = np.bincount(test["y"], minlength=10)
    np.testing.assert_array_equal(
        np.bincount(train["y"], minlength=10) + test_counts, all_counts)
    assert np.all(np.abs(test_counts - all_counts * 360 / 1797) <= 1)
    again, _ = load_digits(seed=0)
    np.testing.assert_array_equal(again["y"], train["y"])


def test_load_diabetes_standardised_with_train_stats():
    from sklearn.datasets import load_diabetes as sk_load_diabetes

    train, test, stats = load_diabetes()
    assert train["x"].shape == (353, 10) and test["x"].shape == (89, 10)
    assert train["y"].shape == (353, 1) and train["y"].dtype == np.float32
    assert abs(float(train["y"].mean())) < 1e-5
    assert float(train["y"].std()) == pytest.approx(1.0, abs=1e-5)
    # Undoing the scaling recovers the raw targets, test included.
    restored = np.concatenate([train["y"], test["y"]])[:, 0] * stats["std"] + stats["mean"]
    np.testing.assert_allclose(np.sort(restored), np.sort(sk_load_diabetes().target), atol=1e-3)


def test_synthetic_structure_and_labels():
    train, test, info = synthetic(1.0, 1.0, seed=0)
    assert train.num_clients == 30
    assert train.client_ids == test.client_ids == tuple(f"device_{i}" for i in range(30))
    totals = train.client_sizes + test.client_sizes
    np.testing.assert_array_equal(totals, info["num_samples"])
    assert totals.min() >= 50
    # Reference split: floor(0.9 * n) train per device.
    np.testing.assert_array_equal(train.client_sizes, [int(0.9 * n) for n in totals])
    assert info["W"].shape == (30, 60, 10) and info["b"].shape == (30, 10)
    assert info["v"].shape == (30, 60)
    for part in (train, test):
        assert part.features["x"].dtype == np.float32 and part.features["y"].dtype == np.int32
        for i in range(30):
            c = part.client(i)
            logits = c["x"].astype(np.float64) @ info["W"][i] + info["b"][i]
            np.testing.assert_array_equal(c["y"], np.argmax(logits, axis=1))


def test_synthetic_feature_covariance_is_diag_power_law():
    train, test, info = synthetic(0.5, 0.5, seed=1)
    centred = np.concatenate([
        part.client(i)["x"].astype(np.float64) - info["v"][i]
        for part in (train, test) for i in range(30)])
    m = centred.shape[0]
    sigma = np.arange(1, 61) ** -1.2
    expected = np.diag(sigma)
    estimate = centred.T @ centred / m  # true mean known, so no degree of freedom lost
    # Sampling sd of a Gaussian covariance entry is sqrt((S_ii S_jj + S_ij^2) / m).
    sd = np.sqrt((np.outer(sigma, sigma) + expected**2) / m)
    assert np.all(np.abs(estimate - expected) <= 5 * sd)


def test_synthetic_heterogeneity_grows_with_alpha_and_beta():
    def device_mean_spread(beta: float) -> float:
        train, _, _ = synthetic(0.0, beta, seed=2)
        return float(np.var([train.client(i)["x"].mean() for i in range(30)]))

    # Device input means are B_k + N(0, 1/60)-ish: variance ~ beta^2 + 1/60.
    assert device_mean_spread(0.0) < 0.1 < 0.3 < device_mean_spread(1.0)

    def model_mean_spread(alpha: float) -> float:
        return float(np.var(synthetic(alpha, 0.0, seed=2)[2]["W"].mean(axis=(1, 2))))

    # Mean of W_k over its 600 entries is u_k + N(0, 1/600).
    assert model_mean_spread(0.0) < 0.01 < 0.3 < model_mean_spread(1.0)


def test_synthetic_iid_shares_model_and_inputs():
    train, _, info = synthetic(0.0, 0.0, iid=True, seed=0)
    assert np.all(info["W"] == info["W"][0]) and np.all(info["b"] == info["b"][0])
    assert np.all(info["v"] == 0)
    non_iid, _, _ = synthetic(1.0, 1.0, seed=0)
    assert (label_skew(train.label_histogram(num_classes=10))
            < label_skew(non_iid.label_histogram(num_classes=10)))
    with pytest.raises(UserError, match="alpha=0, beta=0"):
        synthetic(1.0, 0.0, iid=True)


def test_synthetic_deterministic_per_seed():
    a, at, _ = synthetic(0.5, 0.5, seed=3)
    b, bt, _ = synthetic(0.5, 0.5, seed=3)
    c, _, _ = synthetic(0.5, 0.5, seed=4)
    np.testing.assert_array_equal(a.features["x"], b.features["x"])
    np.testing.assert_array_equal(at.features["y"], bt.features["y"])
    np.testing.assert_array_equal(a.offsets, b.offsets)
    assert a.features["x"].shape != c.features["x"].shape or not np.array_equal(
        a.features["x"], c.features["x"])
    _, empty_test, _ = synthetic(0.5, 0.5, seed=3, test_fraction=0.0)
    assert empty_test.num_examples == 0


def test_save_and_memory_mapped_load_round_trip(tmp_path):
    from fedjax_sim.data import FederatedData
    from fedjax_sim.engine.streaming import HostData

    rng = np.random.default_rng(0)
    sizes = [3, 0, 5, 2]
    x = rng.normal(size=(10, 4)).astype(np.float32)
    y = np.arange(10, dtype=np.int32)
    data = FederatedData({"x": x, "y": y}, np.concatenate([[0], np.cumsum(sizes)]),
                         ("a", "b", "c", "d"))
    data.save(str(tmp_path / "d"))
    loaded = FederatedData.load(str(tmp_path / "d"))
    assert isinstance(loaded.features["x"], np.memmap)  # nothing read until used
    assert loaded.client_ids == data.client_ids
    np.testing.assert_array_equal(loaded.offsets, data.offsets)
    for i in range(4):
        for k in ("x", "y"):
            np.testing.assert_array_equal(loaded.client(i)[k], data.client(i)[k])
    # streaming reads exactly the requested clients' rows from the mapped arrays
    feats, starts = HostData(loaded).gather_rows(np.array([2, 3]), 8)
    np.testing.assert_array_equal(feats["y"][:7], np.concatenate([y[3:8], y[8:10]]))
    assert starts.tolist() == [0, 5]
    in_memory = FederatedData.load(str(tmp_path / "d"), mmap=False)
    assert not isinstance(in_memory.features["x"], np.memmap)
    with pytest.raises(UserError, match="no saved FederatedData"):
        FederatedData.load(str(tmp_path / "missing"))
