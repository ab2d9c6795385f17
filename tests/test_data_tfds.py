"""Tests for fedjax_sim.data.sources.tfds: TFDS image datasets read without TensorFlow.

Nothing here touches the network. Two offline set-ups stand in for a downloaded dataset:

* `tfds.testing.mock_data` with `MockPolicy.USE_FILES`: a hand-written
  `dataset_info.json` (real split names and sizes, ArrayRecord format) under a temporary
  data_dir, and TFDS's deterministic random records behind `tfds.data_source`. The
  reference values are read back from that mocked data source one record at a time.
* A real ArrayRecord dataset written here: PNGs encoded with Pillow, serialised with the
  builder's own feature spec. This exercises the true read path (ArrayRecord reader,
  NumPy example parser, image decoding), and the reference is the arrays we encoded.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Iterator

import numpy as np
import pytest

tfds_lib = pytest.importorskip("tensorflow_datasets")

from tensorflow_datasets.testing import mocking  # noqa: E402

from fedjax_sim.data import FederatedData  # noqa: E402
from fedjax_sim.data.sources.tfds import load_tfds, tfds  # noqa: E402
from fedjax_sim.errors import UserError  # noqa: E402

_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"


def _write_info(
    data_dir: str, name: str, sizes: dict[str, int], file_format: str = "array_record"
) -> str:
    """Writes a minimal `dataset_info.json` (splits, file format) for `name`; returns its folder."""
    builder = tfds_lib.builder(name, data_dir=data_dir)
    os.makedirs(builder.data_dir, exist_ok=True)
    config = builder.builder_config.name if builder.builder_config else ""
    info = {
        "name": builder.name,
        "version": str(builder.version),
        "configName": config,
        "fileFormat": file_format,
        "splits": [
            {"name": split, "shardLengths": [str(n)], "numBytes": "0",
             "filepathTemplate": _TEMPLATE}
            for split, n in sizes.items()
        ],
    }
    with open(os.path.join(builder.data_dir, "dataset_info.json"), "w") as f:
        json.dump(info, f)
    return builder.data_dir


def _mock_getitems(*args, generator, serialized=False):
    """Bulk reads for the mocked ArrayRecord source.

    tfds 4.9.10's mock stores `__getitems__` as a plain attribute of a MagicMock, so it is
    called without `self` and fails; this stand-in takes the keys as its last positional
    argument, which works whether or not `self` is passed.
    """
    assert not serialized
    return [generator[int(k)] for k in args[-1]]


@contextlib.contextmanager
def _mocked(tmp_path, name: str, num_examples: int) -> Iterator[str]:
    """Mocks TFDS for `name` with `num_examples` random records in both 'train' and 'test'."""
    data_dir = str(tmp_path / "tfds")
    _write_info(data_dir, name, {"train": num_examples, "test": num_examples})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mocking, "_getitems", _mock_getitems)
        with tfds_lib.testing.mock_data(
                num_examples=num_examples, policy=tfds_lib.testing.MockPolicy.USE_FILES,
                data_dir=data_dir):
            yield data_dir


def _reference(name: str, split: str, image_key: str, label_key: str):
    """Reads the (mocked) data source one record at a time with `__getitem__`."""
    source = tfds_lib.data_source(
        name, split=split, download=False, builder_kwargs={"file_format": "array_record"})
    records = [source[i] for i in range(len(source))]
    return (np.stack([r[image_key] for r in records]),
            np.array([r[label_key] for r in records]))


# ------------------------------------------------------------------------ mocked TFDS


@pytest.mark.parametrize("name, shape, num_classes", [
    ("mnist", (28, 28, 1), 10),
    ("cifar10", (32, 32, 3), 10),
    ("emnist/balanced", (28, 28, 1), 47),
])
def test_load_shapes_dtypes_and_exact_values(tmp_path, name, shape, num_classes):
    n = 24
    with _mocked(tmp_path, name, n):
        train, test, info = load_tfds(name, download=False)
        for part, split in ((train, "train"), (test, "test")):
            assert part["x"].dtype == np.uint8 and part["x"].shape == (n, *shape)
            assert part["y"].dtype == np.int32 and part["y"].shape == (n,)
            ref_x, ref_y = _reference(name, split, "image", "label")
            np.testing.assert_array_equal(part["x"], ref_x)
            np.testing.assert_array_equal(part["y"], ref_y)
            assert part["y"].min() >= 0 and part["y"].max() < num_classes
            # uint8 storage: one byte per pixel channel, nothing more.
            assert part["x"].nbytes == n * int(np.prod(shape))
    assert info["num_classes"] == num_classes and len(info["class_names"]) == num_classes
    assert info["image_shape"] == shape
    assert (info["num_train"], info["num_test"]) == (n, n)
    assert (info["image_key"], info["label_key"]) == ("image", "label")
    assert info["name"] == name


def test_cifar100_defaults_to_fine_label_and_label_key_picks_coarse(tmp_path):
    with _mocked(tmp_path, "cifar100", 16):
        _, _, fine = load_tfds("cifar100", download=False)
        train, _, coarse = load_tfds("cifar100", download=False, label_key="coarse_label")
        _, ref_y = _reference("cifar100", "train", "image", "coarse_label")
    assert fine["label_key"] == "label" and fine["num_classes"] == 100
    assert coarse["label_key"] == "coarse_label" and coarse["num_classes"] == 20
    np.testing.assert_array_equal(train["y"], ref_y)
    assert train["y"].max() < 20


def test_tfds_dirichlet_partition_keeps_every_example(tmp_path):
    n, num_clients = 400, 20
    with _mocked(tmp_path, "mnist", n):
        ref_x, ref_y = _reference("mnist", "train", "image", "label")
        clients, test, client_test, info = tfds(
            "mnist", num_clients=num_clients, partition="dirichlet",
            partition_args={"alpha": 0.1}, seed=3, download=False)
    assert isinstance(clients, FederatedData) and client_test is None
    assert clients.num_clients == num_clients and clients.num_examples == n
    assert clients.client_sizes.min() >= 1
    assert clients.features["x"].dtype == np.uint8
    assert clients.features["x"].nbytes == n * 28 * 28
    # The clients hold exactly the train rows: same multiset of (image, label) rows.
    def rows(x, y):
        return sorted(xi.tobytes() + int(yi).to_bytes(2, "little") for xi, yi in zip(x, y))
    assert rows(clients.features["x"], clients.features["y"]) == rows(ref_x, ref_y)
    # Dirichlet(0.1) concentrates labels: far from the global mix.
    hist = clients.label_histogram(num_classes=10)
    assert (hist > 0).sum(axis=1).mean() < 6
    assert test["x"].shape == (n, 28, 28, 1)
    assert info["num_clients"] == num_clients and info["partition"] == "dirichlet"


def test_tfds_client_test_fraction_splits_each_client(tmp_path):
    with _mocked(tmp_path, "mnist", 60):
        clients, _, client_test, _ = tfds(
            "mnist", num_clients=4, client_test_fraction=0.25, seed=0, download=False)
    assert client_test is not None and client_test.client_ids == clients.client_ids
    np.testing.assert_array_equal(clients.client_sizes + client_test.client_sizes, [15] * 4)
    np.testing.assert_array_equal(client_test.client_sizes, [4] * 4)  # round(15 * 0.25)


def test_unknown_split_is_a_user_error(tmp_path):
    with _mocked(tmp_path, "mnist", 4):
        with pytest.raises(UserError, match=r"no split 'validation'.*\['test', 'train'\]") as e:
            load_tfds("mnist", download=False, test_split="validation")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------ real ArrayRecord


def _write_real_mnist(data_dir: str, arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """A prepared 'mnist' in ArrayRecord: PNGs from Pillow, serialised by TFDS's features."""
    from array_record.python.array_record_module import ArrayRecordWriter
    from PIL import Image

    folder = _write_info(data_dir, "mnist", {s: len(y) for s, (_, y) in arrays.items()})
    features = tfds_lib.builder("mnist", data_dir=data_dir).info.features
    for split, (x, y) in arrays.items():
        writer = ArrayRecordWriter(
            os.path.join(folder, f"mnist-{split}.array_record-00000-of-00001"), "group_size:1")
        for image, label in zip(x, y):
            png = io.BytesIO()
            Image.fromarray(image[:, :, 0]).save(png, format="PNG")
            writer.write(features.serialize_example({"image": png.getvalue(), "label": int(label)}))
        writer.close()


def test_real_array_record_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        split: (rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
                rng.integers(0, 10, n))
        for split, n in (("train", 40), ("test", 12))
    }
    data_dir = str(tmp_path / "real")
    _write_real_mnist(data_dir, arrays)
    train, test, info = load_tfds("mnist", data_dir=data_dir, download=False)
    for part, split in ((train, "train"), (test, "test")):
        np.testing.assert_array_equal(part["x"], arrays[split][0])
        np.testing.assert_array_equal(part["y"], arrays[split][1].astype(np.int32))
        assert part["x"].dtype == np.uint8 and part["y"].dtype == np.int32
    assert info["num_train"] == 40 and info["num_test"] == 12
    # Split slicing passes through to TFDS.
    head, _, _ = load_tfds("mnist", data_dir=data_dir, download=False, train_split="train[:10]")
    np.testing.assert_array_equal(head["x"], arrays["train"][0][:10])


# ------------------------------------------------------------------------ user errors


def _one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as e:
        fn(*args, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_unknown_name_suggests_close_matches():
    message = _one_line_error(load_tfds, "mnistt", download=False)
    assert "unknown TFDS dataset 'mnistt'" in message and "'mnist'" in message
    message = _one_line_error(load_tfds, "fashion-mnist", download=False)
    assert "'fashion_mnist'" in message


def test_unknown_config_suggests_close_configs(tmp_path):
    message = _one_line_error(
        load_tfds, "emnist/balancd", data_dir=str(tmp_path), download=False)
    assert "'balanced'" in message


def test_not_prepared_without_download_says_where_it_looked(tmp_path):
    data_dir = str(tmp_path / "empty")
    message = _one_line_error(load_tfds, "mnist", data_dir=data_dir, download=False)
    assert "not prepared" in message and data_dir in message and "download=True" in message


def test_download_failure_names_dataset_and_data_dir(tmp_path, monkeypatch):
    def offline(self, *args, **kwargs):
        raise ConnectionError("Network is unreachable\nsecond line")

    monkeypatch.setattr(
        tfds_lib.core.dataset_builder.DatasetBuilder, "download_and_prepare", offline)
    import importlib.util

    real_find_spec = importlib.util.find_spec
    # As if TensorFlow (needed for the build) were installed: the download itself fails.
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: object() if n == "tensorflow" else real_find_spec(n, *a))
    data_dir = str(tmp_path / "dl")
    message = _one_line_error(load_tfds, "cifar10", data_dir=data_dir, download=True)
    assert "'cifar10'" in message and data_dir in message
    assert "ConnectionError: Network is unreachable" in message and "tfds build" in message


def test_download_without_tensorflow_says_how_to_get_it(tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "tensorflow" else real_find_spec(n, *a))
    message = _one_line_error(load_tfds, "cifar10", data_dir=str(tmp_path / "dl"), download=True)
    assert "needs TensorFlow" in message and "fedjax_sim[tfds-build]" in message
    assert "tfds build cifar10" in message


@pytest.mark.parametrize("name, expected", [
    ("imdb_reviews", "no top-level Image feature"),
    ("div2k", "no top-level ClassLabel feature"),
    ("oxford_flowers102", "variable shape"),
])
def test_datasets_that_are_not_fixed_size_image_classification(tmp_path, name, expected):
    message = _one_line_error(load_tfds, name, data_dir=str(tmp_path), download=False)
    assert expected in message


def test_bad_feature_keys_and_tfrecord_format(tmp_path):
    message = _one_line_error(
        load_tfds, "cifar100", data_dir=str(tmp_path), download=False, label_key="fine")
    assert "label_key='fine'" in message and "coarse_label" in message
    _write_info(str(tmp_path / "tfr"), "mnist", {"train": 1, "test": 1}, file_format="tfrecord")
    message = _one_line_error(load_tfds, "mnist", data_dir=str(tmp_path / "tfr"), download=False)
    assert "tfrecord" in message and "--file_format=array_record" in message


def test_tfds_argument_errors():
    message = _one_line_error(tfds, "mnist", num_clients=2, client_test_fraction=1.0)
    assert "client_test_fraction" in message
    message = _one_line_error(tfds, "mnist", num_clients=2, partition_args=[0.1])
    assert "partition_args" in message
