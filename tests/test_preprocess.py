"""On-device uint8 conversion and augmentation (data.augment), checked against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.data.augment import Preprocess, augment, default_preprocess
from fedjax_sim.engine.round import DeviceData
from fedjax_sim.errors import UserError


def _numpy_augment(x, words, p, flip):
    """Reference: pad with zeros, cut the window at (w0 mod 2p+1, w1 mod 2p+1), mirror when
    the first word's top bit is set."""
    out = []
    h, w = x.shape[1:3]
    for img, (w0, w1) in zip(x, words):
        if p:
            padded = np.pad(img, ((p, p), (p, p), (0, 0)))
            i, j = int(w0) % (2 * p + 1), int(w1) % (2 * p + 1)
            img = padded[i:i + h, j:j + w]
        if flip and (int(w0) >> 31):
            img = img[:, ::-1]
        out.append(img)
    return np.stack(out)


def test_conversion_matches_numpy():
    x = np.random.default_rng(0).integers(0, 256, (6, 5, 4, 3), dtype=np.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    out = Preprocess(mean=mean, std=std)({"x": jnp.asarray(x), "y": jnp.zeros(6)}, None, train=True)
    expect = (x.astype(np.float64) / 255 - np.asarray(mean)) / np.asarray(std)
    assert out["x"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out["x"]), expect, rtol=1e-5, atol=1e-6)
    # evaluation and training convert alike when nothing augments
    same = Preprocess()({"x": jnp.asarray(x)}, None, train=False)["x"]
    np.testing.assert_allclose(np.asarray(same), x / 255.0, rtol=1e-6)


@pytest.mark.parametrize("p,flip", [(4, True), (2, False), (0, True)])
def test_augment_matches_numpy(p, flip):
    x = np.random.default_rng(1).integers(0, 256, (16, 8, 7, 3), dtype=np.uint8)
    key = jax.random.key(3)
    got = np.asarray(augment(jnp.asarray(x), key, p, flip))
    words = np.asarray(jax.random.bits(key, (16, 2), jnp.uint32))
    np.testing.assert_array_equal(got, _numpy_augment(x, words, p, flip))
    assert got.dtype == np.uint8


def test_augment_distribution():
    """Flips happen half the time and crop offsets are uniform on [0, 2p] (chi-square)."""
    x = np.zeros((4000, 4, 4, 1), np.uint8)
    x[:, 0, 0, 0] = 1  # marks where the top-left pixel lands
    out = np.asarray(augment(jnp.asarray(x), jax.random.key(0), 1, False))
    # the marker moves to (1 - dy, 1 - dx) when inside the window; count dy = dx = 1 (centre)
    centre = out[:, 0, 0, 0] == 1
    assert abs(centre.mean() - 1 / 9) < 4 * np.sqrt((1 / 9) * (8 / 9) / 4000)
    flipped = np.asarray(augment(jnp.asarray(x), jax.random.key(1), 0, True))[:, 0, 3, 0] == 1
    assert abs(flipped.mean() - 0.5) < 4 * np.sqrt(0.25 / 4000)


def test_eval_never_augments():
    x = jnp.asarray(np.arange(2 * 4 * 4 * 1, dtype=np.uint8).reshape(2, 4, 4, 1))
    pre = Preprocess(crop_padding=2, flip=True)
    a = pre({"x": x}, None, train=False)["x"]
    np.testing.assert_allclose(np.asarray(a), np.asarray(x) / 255.0, rtol=1e-6)


def test_default_preprocess_and_checks():
    assert default_preprocess(np.zeros((3, 8, 8, 3), np.uint8)) == Preprocess()
    assert default_preprocess(np.zeros((3, 80), np.int32)) is None  # token ids
    assert default_preprocess(np.zeros((3, 8, 8), np.float32)) is None
    with pytest.raises(UserError, match="crop_padding"):
        Preprocess(crop_padding=-1)
    with pytest.raises(UserError, match="image inputs"):
        Preprocess(flip=True).check((64,))
    with pytest.raises(UserError, match="channels"):
        Preprocess(mean=(0.5, 0.5), std=(1.0, 1.0)).check((8, 8, 3))


def test_uint8_cifar_sized_dataset_memory():
    """50,000 CIFAR-sized images stay uint8 on device: 153.6 MB (146 MiB), not 614 MB."""
    n = 50_000
    x = np.zeros((n, 32, 32, 3), np.uint8)
    data = fs.data.FederatedData({"x": x, "y": np.zeros(n, np.int32)},
                                 np.linspace(0, n, 501).astype(np.int64),
                                 tuple(str(i) for i in range(500)))
    placed = DeviceData.from_federated(data)
    assert placed.features["x"].dtype == jnp.uint8
    assert placed.features["x"].nbytes == n * 32 * 32 * 3 == 153_600_000
    assert placed.features["x"].nbytes * 4 == np.zeros((n, 32, 32, 3), np.float32).nbytes


def _images(seed=0, n=240, clients=12):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n).astype(np.int32)
    x = np.clip(rng.normal(80 + 60 * y[:, None, None, None], 30, (n, 8, 8, 3)), 0, 255).astype(np.uint8)
    return fs.data.partition({"x": x, "y": y}, y, "iid", clients, seed=seed)


def test_uint8_training_equals_float_training():
    """Training on uint8 images with on-device conversion equals training on the same
    images stored as float32 in [0, 1] (the conversion happens inside the step)."""
    data = _images()
    as_float = fs.data.FederatedData({"x": data.features["x"].astype(np.float32) / 255,
                                      "y": data.features["y"]}, data.offsets, data.client_ids)
    model = fs.models.get_model("mlp", (8, 8, 3), 3, hidden=[16])
    algo = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=8)
    kw = dict(rounds=3, clients_per_round=4, progress=False, eval_every=3)
    a = fs.simulate(model, algo, data, **kw)
    b = fs.simulate(model, algo, as_float, **kw)
    for u, v in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6)


def test_augmentation_is_per_client_and_per_step():
    """Each client's step batches are augmented from its own key: a client's run is
    reproducible, and two clients with identical data see different crops."""
    from fedjax_sim.engine.local import LocalData

    x = np.random.default_rng(0).integers(0, 256, (8, 6, 6, 1), dtype=np.uint8)
    feats = {"x": jnp.asarray(np.concatenate([x, x])), "y": jnp.zeros(16, jnp.int32)}
    idx = jnp.tile(jnp.arange(8)[None], (3, 1))
    mask = jnp.ones((3, 8), bool)
    pre = Preprocess(crop_padding=2, flip=True)
    fn = lambda batch, rng: pre(batch, rng, train=True)

    def sums(offset, key):
        local = LocalData(feats, jnp.int32(offset), idx, mask, jnp.int32(8), jnp.int32(0), True,
                          preprocess=fn)
        step = lambda c, b, m, k: (c + 1, {"sig": jnp.sum(b["x"] * jnp.arange(1, 37).reshape(1, 6, 6, 1))})
        _, out = local.run(step, jnp.int32(0), key)
        return float(out["sig"])

    k1, k2 = jax.random.key(1), jax.random.key(2)
    assert sums(0, k1) == sums(0, k1)  # reproducible
    assert sums(0, k1) == sums(8, k1)  # the same key on the same examples: the same crops
    assert sums(0, k1) != sums(0, k2)  # another client's key: other crops


@pytest.mark.slow
def test_simulate_with_augmentation_runs_and_learns():
    data = _images(n=360)
    train, test = data.split(0.25, seed=0)
    model = fs.models.get_model("mlp", (8, 8, 3), 3, hidden=[32])
    algo = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=8)
    pre = Preprocess(mean=(0.5,), std=(0.25,), crop_padding=1, flip=True)
    res = fs.simulate(model, algo, train, rounds=15, clients_per_round=6, eval_every=15,
                      eval_data=dict(test.features), preprocess=pre, progress=False)
    assert res.summary["final"]["test_accuracy"] > 0.6  # chance: 1/3


def test_resize_matches_pillow_bilinear_and_rejects_bad_sizes():
    """Upsampling (e.g. CIFAR 32x32 for an ImageNet backbone) is bilinear with half-pixel
    centres: it equals Pillow's BILINEAR resize of each channel."""
    from PIL import Image

    x = np.random.default_rng(0).random((2, 8, 8, 3)).astype(np.float32)
    pre = fs.data.Preprocess(scale=None, resize=[16, 20])
    out = np.asarray(pre({"x": jnp.asarray(x)}, None, train=False)["x"])
    ref = np.stack([np.stack([np.asarray(Image.fromarray(x[b, :, :, c], mode="F").resize(
        (20, 16), Image.BILINEAR)) for c in range(3)], -1) for b in range(2)])
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert pre.output_shape((8, 8, 3)) == (16, 20, 3)
    with pytest.raises(UserError, match="resize must be None or"):
        fs.data.Preprocess(resize=(0, 4))
    with pytest.raises(UserError, match="resize needs image inputs"):
        fs.data.Preprocess(resize=(4, 4)).check((64,))
