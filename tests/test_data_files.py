"""Tests for fedjax_sim.data.sources.tff_h5 / .leaf and fedjax_sim.data.text: on-disk
federated datasets.

Every test writes small files in the real layouts (TFF HDF5 examples/<client>/<feature>,
LEAF JSON users / num_samples / user_data) with h5py / json, then compares what the
loaders return with the arrays it wrote, and the text encodings with ids worked out by
hand from the vocabulary's definition.
"""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

from fedjax_sim.data import text
from fedjax_sim.data.sources import leaf, tff_h5
from fedjax_sim.errors import UserError

# Ids by hand from the vocabulary: 0 PAD, 1 OOV, 2 BOS, 3 EOS, 4 space, 5 newline,
# 6.. a-z, 32.. A-Z, 58.. 0-9, 68.. the punctuation of string.punctuation ('!' first,
# '~' last).
PAD, OOV, BOS, EOS = 0, 1, 2, 3
SPACE, NEWLINE = 4, 5


def lower(c: str) -> int:
    return 6 + ord(c) - ord("a")


def upper(c: str) -> int:
    return 32 + ord(c) - ord("A")


BANG, TILDE, NINE = 68, 99, 67


# ------------------------------------------------------------------------ writers


def write_tff(path, clients: dict[str, dict[str, np.ndarray]]) -> str:
    """TFF layout: examples/<client_id>/<feature>; str arrays as UTF-8 variable-length."""
    with h5py.File(path, "w") as f:
        for cid, feats in clients.items():
            group = f.create_group(f"examples/{cid}")
            for name, value in feats.items():
                value = np.asarray(value)
                if value.dtype.kind in "UO":
                    group.create_dataset(
                        name, data=np.array([s.encode() for s in value.tolist()], object),
                        dtype=h5py.string_dtype("utf-8"))
                else:
                    group.create_dataset(name, data=value)
    return str(path)


def write_leaf(path, users: dict[str, tuple[list, list]], num_samples=None) -> str:
    """LEAF layout: {'users', 'num_samples', 'user_data': {uid: {'x', 'y'}}}."""
    doc = {
        "users": list(users),
        "num_samples": num_samples if num_samples is not None
        else [len(x) for x, _ in users.values()],
        "user_data": {u: {"x": x, "y": y} for u, (x, y) in users.items()},
    }
    with open(path, "w") as f:
        json.dump(doc, f)
    return str(path)


def emnist_clients(rng, sizes: dict[str, int], num_classes: int = 62):
    """Per client: pixel levels k uint8 [n, 28, 28], pixels k / 255 float32, labels."""
    out = {}
    for cid, n in sizes.items():
        k = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        out[cid] = {"k": k, "pixels": (k / 255.0).astype(np.float32),
                    "label": rng.integers(0, num_classes, n).astype(np.int32)}
    return out


def assert_one_line(err: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)


# ------------------------------------------------------------------------ text


def test_vocabulary_and_encode_by_hand():
    assert text.VOCAB_SIZE == 100 and text.PAD == 0
    assert (text.OOV, text.BOS, text.EOS) == (OOV, BOS, EOS)
    ids = text.encode("a Z\n9~!H\u00e9\t")
    np.testing.assert_array_equal(
        ids, [lower("a"), SPACE, upper("Z"), NEWLINE, NINE, TILDE, BANG, upper("H"), OOV, OOV])
    assert ids.dtype == np.int32
    assert text.encode("").shape == (0,)
    # Every listed character has its own id and decodes back; specials decode to nothing.
    assert len(set(text.encode(text.CHARACTERS).tolist())) == len(text.CHARACTERS)
    assert text.decode(text.encode(text.CHARACTERS)) == text.CHARACTERS
    assert text.decode([BOS, lower("h"), lower("i"), EOS, PAD, PAD]) == "hi"
    assert text.decode([OOV]) == "\ufffd"
    with pytest.raises(UserError, match="ids must lie in"):
        text.decode([100])
    with pytest.raises(UserError, match="needs a str"):
        text.encode(b"bytes")


def test_snippets_to_sequences_by_hand():
    h, e, l, o = upper("H"), lower("e"), lower("l"), lower("o")
    # T = 4: "ab" -> [BOS a b EOS] fits one chunk of 5 with one pad; "Hello!" -> 8 ids ->
    # two chunks [BOS H e l l] [o ! EOS 0 0]; "" -> [BOS EOS 0 0 0].
    x, y = text.snippets_to_sequences(["ab", "Hello!", ""], seq_len=4)
    a, b = lower("a"), lower("b")
    np.testing.assert_array_equal(x, [[BOS, a, b, EOS], [BOS, h, e, l], [o, BANG, EOS, PAD],
                                      [BOS, EOS, PAD, PAD]])
    np.testing.assert_array_equal(y, [[a, b, EOS, PAD], [h, e, l, l], [BANG, EOS, PAD, PAD],
                                      [EOS, PAD, PAD, PAD]])
    assert x.dtype == y.dtype == np.int32
    np.testing.assert_array_equal(text.chunks_per_snippet(["ab", "Hello!", ""], 4), [1, 2, 1])
    # Exactly T + 1 ids fill one chunk without padding.
    x, y = text.snippets_to_sequences(["abc"], seq_len=4)
    np.testing.assert_array_equal(x, [[BOS, a, b, lower("c")]])
    np.testing.assert_array_equal(y, [[a, b, lower("c"), EOS]])


def test_leaf_to_sequences_by_hand():
    c = {ch: lower(ch) for ch in "abcdefg"}
    x, y = text.leaf_to_sequences(["abcd", "ab", "abcdef"], ["e", "c", "g"], seq_len=4)
    # Full window; short input padded at the end; long input keeps its last T characters.
    np.testing.assert_array_equal(x, [[c["a"], c["b"], c["c"], c["d"]],
                                      [c["a"], c["b"], PAD, PAD],
                                      [c["c"], c["d"], c["e"], c["f"]]])
    np.testing.assert_array_equal(y, [[c["b"], c["c"], c["d"], c["e"]],
                                      [c["b"], c["c"], PAD, PAD],
                                      [c["d"], c["e"], c["f"], c["g"]]])
    with pytest.raises(UserError, match="not a single character"):
        text.leaf_to_sequences(["ab"], ["cd"], 4)


# ------------------------------------------------------------------------ TFF HDF5


def test_load_tff_h5_generic(tmp_path):
    rng = np.random.default_rng(0)
    written = {
        "b": {"f": rng.normal(size=(3, 2)).astype(np.float32),
              "label": np.array([1, 2, 3], np.int32), "s": np.array(["x", "yy", "\u00e9"])},
        "a": {"f": rng.normal(size=(2, 2)).astype(np.float32),
              "label": np.array([4, 5], np.int32), "s": np.array(["p", "q"])},
        "c10": {"f": np.zeros((0, 2), np.float32), "label": np.zeros(0, np.int32),
                "s": np.array([], dtype=str)},
        "c2": {"f": rng.normal(size=(1, 2)).astype(np.float32),
               "label": np.array([6], np.int32), "s": np.array(["z"])},
    }
    path = write_tff(tmp_path / "d.h5", written)
    data = tff_h5.load_tff_h5(path)
    assert data.client_ids == ("a", "b", "c10", "c2")
    assert set(data.features) == {"f", "label", "s"}
    np.testing.assert_array_equal(data.client_sizes, [2, 3, 0, 1])
    for i, cid in enumerate(data.client_ids):
        got = data.client(i)
        np.testing.assert_array_equal(got["f"], written[cid]["f"])
        assert got["f"].dtype == np.float32
        np.testing.assert_array_equal(got["label"], written[cid]["label"])
        assert got["s"].dtype == object and got["s"].tolist() == written[cid]["s"].tolist()
    only = tff_h5.load_tff_h5(path, ["label"], drop_empty=True)
    assert set(only.features) == {"label"} and only.client_ids == ("a", "b", "c2")


def test_missing_h5py_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "x.h5"
    path.write_bytes(b"")
    monkeypatch.setitem(__import__("sys").modules, "h5py", None)  # import h5py fails
    with pytest.raises(UserError, match=r"needs h5py.*pip install 'fedjax_sim\[tff\]'"):
        tff_h5.load_tff_h5(str(path))


def test_tff_emnist_train_test(tmp_path):
    rng = np.random.default_rng(1)
    train_w = emnist_clients(rng, {"f0002": 3, "f0001": 2, "f0010": 4})
    test_w = emnist_clients(rng, {"f0002": 1, "f0001": 2, "f0010": 1})
    strip = lambda cl: {c: {k: v for k, v in d.items() if k != "k"} for c, d in cl.items()}
    train_path = write_tff(tmp_path / "fed_emnist_train.h5", strip(train_w))
    test_path = write_tff(tmp_path / "fed_emnist_test.h5", strip(test_w))
    train, test, info = tff_h5.tff_emnist(train_path, test_path)
    assert train.client_ids == test.client_ids == ("f0001", "f0002", "f0010")
    for data, written in ((train, train_w), (test, test_w)):
        assert data.features["x"].dtype == np.uint8 and data.features["y"].dtype == np.int32
        for i, cid in enumerate(data.client_ids):
            got = data.client(i)
            np.testing.assert_array_equal(got["x"], written[cid]["k"][..., None])
            np.testing.assert_array_equal(got["y"], written[cid]["label"])
    assert info["num_classes"] == 62 and info["input_shape"] == (28, 28, 1)
    assert info["source_files"] == {"train": [train_path], "test": [test_path]}
    train_only, none, _ = tff_h5.tff_emnist(train_path)
    assert none is None and train_only.num_examples == 9

    digits = emnist_clients(rng, {"a": 2}, num_classes=10)
    dpath = write_tff(tmp_path / "digits.h5", strip(digits))
    train, _, info = tff_h5.tff_emnist(dpath, only_digits=True)
    assert info["num_classes"] == 10
    np.testing.assert_array_equal(train.features["y"], digits["a"]["label"])


def test_tff_cifar100(tmp_path):
    rng = np.random.default_rng(2)

    def clients(ids, sizes):
        return {c: {"image": rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8),
                    "label": rng.integers(0, 100, n).astype(np.int64),
                    "coarse_label": rng.integers(0, 20, n).astype(np.int64)}
                for c, n in zip(ids, sizes)}

    train_w, test_w = clients(["7", "12", "3"], [2, 1, 3]), clients(["0", "1"], [2, 2])
    train_path = write_tff(tmp_path / "fed_cifar100_train.h5", train_w)
    test_path = write_tff(tmp_path / "fed_cifar100_test.h5", test_w)
    for label, k in (("label", 100), ("coarse_label", 20)):
        train, test, info = tff_h5.tff_cifar100(train_path, test_path, label=label)
        assert train.client_ids == ("12", "3", "7") and test.client_ids == ("0", "1")
        assert info["num_classes"] == k and info["input_shape"] == (32, 32, 3)
        for data, written in ((train, train_w), (test, test_w)):
            for i, cid in enumerate(data.client_ids):
                np.testing.assert_array_equal(data.client(i)["x"], written[cid]["image"])
                np.testing.assert_array_equal(data.client(i)["y"], written[cid][label])
                assert data.features["y"].dtype == np.int32
    with pytest.raises(UserError, match="label must be one of"):
        tff_h5.tff_cifar100(train_path, label="fine")


def test_tff_shakespeare_by_hand(tmp_path):
    a, b = lower("a"), lower("b")
    train_path = write_tff(tmp_path / "shakespeare_train.h5", {
        "ROLE_B": {"snippets": np.array(["ab", "ba"])},
        "ROLE_A": {"snippets": np.array(["abab"])},
    })
    test_path = write_tff(tmp_path / "shakespeare_test.h5", {
        "ROLE_B": {"snippets": np.array(["a"])},
        "ROLE_A": {"snippets": np.array(["b"])},
    })
    train, test, info = tff_h5.tff_shakespeare(train_path, test_path, seq_len=3)
    assert train.client_ids == test.client_ids == ("ROLE_A", "ROLE_B")
    # ROLE_A "abab" -> [BOS a b a | b EOS 0 0]; ROLE_B "ab" -> [BOS a b EOS], "ba" -> [BOS b a EOS].
    np.testing.assert_array_equal(train.client_sizes, [2, 2])
    np.testing.assert_array_equal(train.client(0)["x"], [[BOS, a, b], [b, EOS, PAD]])
    np.testing.assert_array_equal(train.client(0)["y"], [[a, b, a], [EOS, PAD, PAD]])
    np.testing.assert_array_equal(train.client(1)["x"], [[BOS, a, b], [BOS, b, a]])
    np.testing.assert_array_equal(train.client(1)["y"], [[a, b, EOS], [b, a, EOS]])
    np.testing.assert_array_equal(test.client(0)["x"], [[BOS, b, EOS]])
    np.testing.assert_array_equal(test.client(1)["y"], [[a, EOS, PAD]])
    assert info["vocab_size"] == info["num_classes"] == 100
    assert info["pad_id"] == 0 and info["input_shape"] == (3,)


# ------------------------------------------------------------------------ LEAF JSON


def femnist_users(rng, sizes: dict[str, int]):
    """uid -> (pixel levels k [n, 784], x lists k / 255, y list)."""
    out = {}
    for uid, n in sizes.items():
        k = rng.integers(0, 256, (n, 784))
        out[uid] = (k, (k / 255.0).tolist(), rng.integers(0, 62, n).tolist())
    return out


def test_leaf_femnist_directory(tmp_path):
    rng = np.random.default_rng(3)
    train_w = femnist_users(rng, {"f_03": 2, "f_01": 3, "f_02": 1})
    test_w = femnist_users(rng, {"f_03": 1, "f_01": 1, "f_02": 2})
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    # Two training files, users split across them out of order.
    f1 = write_leaf(tmp_path / "train" / "all_0.json",
                    {u: train_w[u][1:] for u in ("f_03", "f_01")})
    f2 = write_leaf(tmp_path / "train" / "all_1.json", {"f_02": train_w["f_02"][1:]})
    (tmp_path / "train" / "README.txt").write_text("not data")
    t1 = write_leaf(tmp_path / "test" / "all_0.json", {u: test_w[u][1:] for u in test_w})
    train, test, info = leaf.leaf_femnist(tmp_path / "train", tmp_path / "test")
    assert train.client_ids == test.client_ids == ("f_01", "f_02", "f_03")
    for data, written in ((train, train_w), (test, test_w)):
        for i, uid in enumerate(data.client_ids):
            got = data.client(i)
            np.testing.assert_array_equal(got["x"],
                                          written[uid][0].reshape(-1, 28, 28, 1))
            np.testing.assert_array_equal(got["y"], written[uid][2])
        assert data.features["x"].dtype == np.uint8 and data.features["y"].dtype == np.int32
    assert info["num_classes"] == 62
    assert info["source_files"] == {"train": [f1, f2], "test": [t1]}
    # A single file works as well.
    one, _, _ = leaf.leaf_femnist(f2)
    assert one.client_ids == ("f_02",)


def test_load_leaf_generic(tmp_path):
    path = write_leaf(tmp_path / "d.json", {
        "u2": ([[1.5, 2.0], [3.0, 4.0]], [1, 0]),
        "u1": ([[0.5, -1.0]], [2]),
        "u0": ([], []),
    })
    data = leaf.load_leaf(path, num_classes=3)
    assert data.client_ids == ("u0", "u1", "u2")
    np.testing.assert_array_equal(data.client_sizes, [0, 1, 2])
    np.testing.assert_array_equal(data.features["x"], [[0.5, -1.0], [1.5, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(data.features["y"], [2, 1, 0])
    assert data.features["x"].dtype == np.float32 and data.features["y"].dtype == np.int32
    assert leaf.load_leaf(path, drop_empty=True).client_ids == ("u1", "u2")
    # Raw (Sent140-style) inputs through x_fn.
    raw = write_leaf(tmp_path / "raw.json", {"b": (["hi there", "yo"], [1, 0]),
                                             "a": (["one two three"], [1])})
    data = leaf.load_leaf(raw, x_fn=lambda xs: np.array([len(s.split()) for s in xs]))
    np.testing.assert_array_equal(data.features["x"], [3, 2, 1])
    np.testing.assert_array_equal(data.features["y"], [1, 1, 0])
    with pytest.raises(UserError) as err:
        leaf.load_leaf(raw)
    assert_one_line(err, raw, "user 'b'", "'x'", "not numbers", "x_fn")
    with pytest.raises(UserError) as err:
        leaf.load_leaf(path, num_classes=2)
    assert_one_line(err, path, "'u1'", "label 2 outside [0, 2)")


def test_leaf_shakespeare(tmp_path):
    c = {ch: lower(ch) for ch in "abcdef"}
    train_path = write_leaf(tmp_path / "train.json", {
        "KING": (["abcd", "bcde"], ["e", "f"]),
        "FOOL": (["ab"], ["c"]),
    })
    test_path = write_leaf(tmp_path / "test.json", {"KING": (["dcba"], ["a"]), "FOOL": ([], [])})
    train, test, info = leaf.leaf_shakespeare(train_path, test_path, seq_len=4)
    assert train.client_ids == test.client_ids == ("FOOL", "KING")
    np.testing.assert_array_equal(train.client(0)["x"], [[c["a"], c["b"], PAD, PAD]])
    np.testing.assert_array_equal(train.client(0)["y"], [[c["b"], c["c"], PAD, PAD]])
    np.testing.assert_array_equal(train.client(1)["x"], [[c["a"], c["b"], c["c"], c["d"]],
                                                         [c["b"], c["c"], c["d"], c["e"]]])
    np.testing.assert_array_equal(train.client(1)["y"], [[c["b"], c["c"], c["d"], c["e"]],
                                                         [c["c"], c["d"], c["e"], c["f"]]])
    np.testing.assert_array_equal(test.client_sizes, [0, 1])
    np.testing.assert_array_equal(test.client(1)["y"], [[c["c"], c["b"], c["a"], c["a"]]])
    assert test.features["x"].shape == (1, 4) and info["seq_len"] == 4
    bad = write_leaf(tmp_path / "bad.json", {"KING": (["abcd"], ["ef"])})
    with pytest.raises(UserError) as err:
        leaf.leaf_shakespeare(bad)
    assert_one_line(err, bad, "'KING'", "'y'", "not a single character")


# ------------------------------------------------------------------------ bad input


def test_empty_training_client(tmp_path):
    rng = np.random.default_rng(4)
    written = emnist_clients(rng, {"a": 2, "b": 0, "c": 1})
    strip = {c: {k: v for k, v in d.items() if k != "k"} for c, d in written.items()}
    train_path = write_tff(tmp_path / "train.h5", strip)
    test_path = write_tff(tmp_path / "test.h5", strip)
    with pytest.raises(UserError) as err:
        tff_h5.tff_emnist(train_path, test_path)
    assert_one_line(err, train_path, "'b'", "no examples", "drop_empty=True")
    train, test, _ = tff_h5.tff_emnist(train_path, test_path, drop_empty=True)
    assert train.client_ids == test.client_ids == ("a", "c")
    np.testing.assert_array_equal(train.client(1)["y"], written["c"]["label"])

    leaf_dir = tmp_path / "leaf"
    leaf_dir.mkdir()
    write_leaf(leaf_dir / "0.json", {"u1": ([[0.0] * 784], [3])})
    empty_file = write_leaf(leaf_dir / "1.json", {"u0": ([], [])})
    with pytest.raises(UserError) as err:
        leaf.leaf_femnist(leaf_dir)
    assert_one_line(err, empty_file, "'u0'", "no examples", "drop_empty=True")
    train, _, _ = leaf.leaf_femnist(leaf_dir, drop_empty=True)
    assert train.client_ids == ("u1",)


def test_tff_file_errors(tmp_path):
    missing = str(tmp_path / "nope.h5")
    with pytest.raises(UserError) as err:
        tff_h5.load_tff_h5(missing)
    assert_one_line(err, missing, "no such file")

    text_file = tmp_path / "text.h5"
    text_file.write_text("hello")
    with pytest.raises(UserError) as err:
        tff_h5.tff_emnist(text_file)
    assert_one_line(err, str(text_file), "not an HDF5 file")

    flat = str(tmp_path / "flat.h5")
    with h5py.File(flat, "w") as f:
        f.create_dataset("pixels", data=np.zeros((2, 28, 28), np.float32))
    with pytest.raises(UserError) as err:
        tff_h5.tff_emnist(flat)
    assert_one_line(err, flat, "no 'examples' group")

    rng = np.random.default_rng(5)
    good = emnist_clients(rng, {"a": 2, "b": 2})
    no_label = write_tff(tmp_path / "no_label.h5", {
        "a": {"pixels": good["a"]["pixels"], "label": good["a"]["label"]},
        "b": {"pixels": good["b"]["pixels"]}})
    with pytest.raises(UserError) as err:
        tff_h5.tff_emnist(no_label)
    assert_one_line(err, no_label, "client 'b'", "no feature 'label'")

    ragged = write_tff(tmp_path / "ragged.h5", {
        "a": {"pixels": good["a"]["pixels"], "label": good["a"]["label"][:1]}})
    with pytest.raises(UserError) as err:
        tff_h5.load_tff_h5(ragged)
    assert_one_line(err, ragged, "client 'a'", "different lengths")

    for labels, kwargs, bound in (([0, -1], {}, "[0, 62)"), ([0, 62], {}, "[0, 62)"),
                                  ([10, 1], {"only_digits": True}, "[0, 10)")):
        path = write_tff(tmp_path / "labels.h5", {
            "a": {"pixels": good["a"]["pixels"], "label": np.array(labels, np.int32)}})
        with pytest.raises(UserError) as err:
            tff_h5.tff_emnist(path, **kwargs)
        assert_one_line(err, path, "client 'a'", bound)

    scaled = write_tff(tmp_path / "scaled.h5", {
        "a": {"pixels": good["a"]["pixels"] * 255, "label": good["a"]["label"]}})
    with pytest.raises(UserError) as err:
        tff_h5.tff_emnist(scaled)
    assert_one_line(err, scaled, "client 'a'", "'pixels'", "outside [0, 1]")


def overwrite(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def emnist_file(tmp_path, name: str, gzip: bool = False) -> str:
    """A TFF EMNIST file of clients f0000, f0001; with gzip, every dataset compressed in
    chunks."""
    rng = np.random.default_rng(6)
    clients = emnist_clients(rng, {"f0000": 3, "f0001": 2})
    path = str(tmp_path / name)
    with h5py.File(path, "w") as f:
        for cid, feats in clients.items():
            for feature in ("pixels", "label"):
                options = {"compression": "gzip", "chunks": True} if gzip else {}
                f.create_dataset(f"examples/{cid}/{feature}", data=feats[feature], **options)
    return path


def assert_damaged(path: str, reading: str, *parts: str) -> None:
    """Both loaders stop with one line naming the file, what was read and the fix."""
    h5py.File(path, "r").close()  # the damage does not show when the file is opened
    for load in (tff_h5.tff_emnist, tff_h5.load_tff_h5):
        with pytest.raises(UserError) as err:
            load(path)
        assert err.type is UserError
        assert_one_line(err, f"{path} is damaged (reading {reading}: ", "); download it again",
                        *parts)


def test_damaged_group_metadata(tmp_path):
    # A client group's object header: opening that client fails.
    path = emnist_file(tmp_path, "fed_emnist_train.h5")
    with h5py.File(path, "r") as f:
        header = h5py.h5o.get_info(f["examples/f0001"].id).addr
    overwrite(path, header, b"\xff" * 8)
    assert_damaged(path, "examples/f0001", "object header")

    # The B-tree that indexes the clients (written right after the group's object
    # header): listing the clients fails.
    path = emnist_file(tmp_path, "fed_emnist_test.h5")
    with h5py.File(path, "r") as f:
        header = h5py.h5o.get_info(f["examples"].id).addr
    with open(path, "rb") as f:
        tree = f.read().index(b"TREE", header)
    overwrite(path, tree, b"XXXX")
    assert_damaged(path, "the list of clients in examples/", "B-tree")


def test_damaged_gzip_chunk(tmp_path):
    path = emnist_file(tmp_path, "fed_emnist_train.h5", gzip=True)
    with h5py.File(path, "r") as f:
        chunk = f["examples/f0001/pixels"].id.get_chunk_info(0)
    overwrite(path, chunk.byte_offset, b"\xff" * chunk.size)
    assert_damaged(path, "examples/f0001/pixels", "filter returned failure during read")


def leaf_doc(path, doc) -> str:
    with open(path, "w") as f:
        json.dump(doc, f)
    return str(path)


@pytest.mark.parametrize("doc, parts", [
    ({"num_samples": [1], "user_data": {}}, ["no 'users' field"]),
    ({"users": ["a"], "user_data": {}}, ["no 'num_samples' field"]),
    ({"users": ["a"], "num_samples": [1]}, ["no 'user_data' field"]),
    ({"users": ["a", "b"], "num_samples": [1], "user_data": {}},
     ["2 users but 1 num_samples"]),
    ({"users": ["a"], "num_samples": [1], "user_data": {}},
     ["user 'a'", "missing from 'user_data'"]),
    ({"users": ["a"], "num_samples": [2], "user_data": {"a": {"x": [[0.0] * 784], "y": [1]}}},
     ["user 'a'", "1 'x' values but num_samples says 2"]),
    ({"users": ["a"], "num_samples": [1],
      "user_data": {"a": {"x": [[0.0] * 784], "y": [1, 2]}}},
     ["user 'a'", "2 'y' values but num_samples says 1"]),
    ({"users": ["a"], "num_samples": [1], "user_data": {"a": {"x": [[0.0] * 784], "y": [-1]}}},
     ["user 'a'", "label -1 outside [0, 62)"]),
    ({"users": ["a"], "num_samples": [1], "user_data": {"a": {"x": [[0.0] * 784], "y": [62]}}},
     ["user 'a'", "label 62 outside [0, 62)"]),
    ({"users": ["a"], "num_samples": [1], "user_data": {"a": {"x": [[2.0] * 784], "y": [1]}}},
     ["user 'a'", "'x'", "outside [0, 1]"]),
    ({"users": ["a"], "num_samples": [1], "user_data": {"a": {"x": [[0.0] * 10], "y": [1]}}},
     ["user 'a'", "784"]),
])
def test_leaf_json_errors(tmp_path, doc, parts):
    path = leaf_doc(tmp_path / "bad.json", doc)
    with pytest.raises(UserError) as err:
        leaf.leaf_femnist(path)
    assert_one_line(err, path, *parts)


def test_leaf_file_errors(tmp_path):
    missing = str(tmp_path / "train")
    with pytest.raises(UserError) as err:
        leaf.leaf_femnist(missing)
    assert_one_line(err, missing, "no such file")

    not_json = tmp_path / "x.json"
    not_json.write_text("{'users': [")
    with pytest.raises(UserError) as err:
        leaf.load_leaf(not_json)
    assert_one_line(err, str(not_json), "not valid JSON")

    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(UserError) as err:
        leaf.load_leaf(empty_dir)
    assert_one_line(err, str(empty_dir), "no .json files")

    split = tmp_path / "split"
    split.mkdir()
    first = write_leaf(split / "a.json", {"u": ([[0.0]], [0])})
    second = write_leaf(split / "b.json", {"u": ([[1.0]], [1])})
    with pytest.raises(UserError) as err:
        leaf.load_leaf(split)
    assert_one_line(err, second, "'u'", "appears twice", os.path.basename(first))
