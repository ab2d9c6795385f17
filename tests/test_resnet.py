"""ResNets (models/resnet.py) against an independent float64 numpy forward pass.

The numpy reference below knows the torchvision layout on its own: PyTorch's paddings
(3 for 7x7, 1 for 3x3, 0 for 1x1), which block of a stage strides, the -inf padded
3x3/2 max-pool, BatchNorm in eval mode and GroupNorm. Parameters and running statistics
are random (not the initial ones), so every scale, bias, mean and variance matters.

Models are compiled with `jax.jit` (one compilation per test) and their parameters are
made from `jax.eval_shape(model.init, ...)`: eager initialisation compiles every random
op separately, which costs more than the whole test on a small CPU. The CPU im2col
convolutions (conv_impl 'auto') compile several times slower than XLA's, so only the
ResNet-18 check (and the slow ResNet-50 one) use them; the others pass conv_impl='xla'.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

import fedjax_sim as fs
from fedjax_sim.cli import rules as schema
from fedjax_sim.models import get_model, resnet

EPS = 1e-5


# -- the numpy reference ------------------------------------------------------------------
def np_conv(x, kernel, stride):
    """NHWC x HWIO -> NHWC with PyTorch's padding k // 2 on every side."""
    kh, kw = kernel.shape[:2]
    p = kh // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    windows = sliding_window_view(xp, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]
    return np.einsum("nhwcij,ijco->nhwo", windows, kernel)


def np_norm(p, s, x, groups):
    if not p:  # norm='none'
        return x
    if s:  # BatchNorm, eval mode: the running statistics
        y = (x - s["mean"]) / np.sqrt(s["var"] + EPS)
    else:  # GroupNorm over (H, W, channels of the group)
        n, h, w, c = x.shape
        g = x.reshape(n, h, w, groups, c // groups)
        y = ((g - g.mean(axis=(1, 2, 4), keepdims=True))
             / np.sqrt(g.var(axis=(1, 2, 4), keepdims=True) + EPS)).reshape(x.shape)
    return y * p["scale"] + p["bias"]


def np_max_pool(x):
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    return sliding_window_view(xp, (3, 3), axis=(1, 2))[:, ::2, ::2].max(axis=(-2, -1))


def relu(x):
    return np.maximum(x, 0)


def np_block(p, s, x, stride, bottleneck, groups):
    def norm(name, y):
        return np_norm(p.get(name, {}), s.get(name, {}), y, groups)

    if bottleneck:  # v1.5: the stride is on the 3x3 conv
        y = relu(norm("bn1", np_conv(x, p["conv1"]["kernel"], 1)))
        y = relu(norm("bn2", np_conv(y, p["conv2"]["kernel"], stride)))
        y = norm("bn3", np_conv(y, p["conv3"]["kernel"], 1))
    else:
        y = relu(norm("bn1", np_conv(x, p["conv1"]["kernel"], stride)))
        y = norm("bn2", np_conv(y, p["conv2"]["kernel"], 1))
    if "downsample" in p:
        ds_p, ds_s = p["downsample"], s.get("downsample", {})
        shortcut = np_norm(ds_p.get(1, {}), ds_s.get(1, {}),
                           np_conv(x, ds_p[0]["kernel"], stride), groups)
    else:
        shortcut = x
    return relu(y + shortcut)


def np_resnet(p, s, x, *, stages, bottleneck=False, stem="imagenet", groups=2):
    x = np_conv(x, p["conv1"]["kernel"], 2 if stem == "imagenet" else 1)
    x = relu(np_norm(p.get("bn1", {}), s.get("bn1", {}), x, groups))
    if stem == "imagenet":
        x = np_max_pool(x)
    for i in range(1, stages + 1):
        layer_p, layer_s = p[f"layer{i}"], s.get(f"layer{i}", {})
        for b in range(len(layer_p)):
            stride = 2 if (i > 1 and b == 0) else 1
            x = np_block(layer_p[b], layer_s.get(b, {}), x, stride, bottleneck, groups)
    return x.mean(axis=(1, 2)) @ p["fc"]["kernel"] + p["fc"]["bias"]


# -- helpers --------------------------------------------------------------------------------
def path_str(path):
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def flat(tree):
    return {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def leaf_paths(tree):
    return set(flat(tree))


def random_variables(model, seed=0):
    """Random float32 (params, state) of the model's shapes: kernels ~ N(0, 1/fan_in),
    scales and variances in [0.5, 1.5] / [0.5, 2], biases and means ~ N(0, 0.2^2)."""
    rng = np.random.default_rng(seed)
    params, state = jax.eval_shape(model.init, jax.random.key(0))

    def make(path, leaf):
        name, shape = path_str(path).rsplit("/", 1)[-1], leaf.shape
        if name == "kernel":
            v = rng.normal(size=shape) / math.sqrt(math.prod(shape[:-1]))
        elif name in ("scale", "var"):
            v = rng.uniform(0.5, 1.5 if name == "scale" else 2.0, size=shape)
        else:
            v = 0.2 * rng.normal(size=shape)
        return v.astype(np.float32)

    return (jax.tree_util.tree_map_with_path(make, params),
            jax.tree_util.tree_map_with_path(make, state))


def as_float64(tree):
    return jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), tree)


def check_against_numpy(model, x, **arch):
    params, state = random_variables(model)
    out, new_state = jax.jit(lambda p, s, x: model.apply(p, s, x, train=False))(params, state, x)
    ref = np_resnet(as_float64(params), as_float64(state), np.asarray(x, np.float64), **arch)
    assert out.shape == ref.shape
    assert np.abs(ref).max() > 0.1  # a non-degenerate output
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=1e-4)
    jax.tree_util.tree_map(np.testing.assert_array_equal, new_state, state)  # eval: unchanged
    return params, state


def images(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# -- tests ------------------------------------------------------------------------------------
def test_resnet18_matches_numpy_and_has_torchvision_names():
    model = get_model("resnet18", (32, 32, 3), 10, width=4)
    params, state = check_against_numpy(model, images((2, 32, 32, 3)), stages=4)
    paths, state_paths = leaf_paths(params), leaf_paths(state)
    for p in ("conv1/kernel", "bn1/scale", "bn1/bias", "layer1/0/conv1/kernel",
              "layer1/1/bn2/scale", "layer2/0/downsample/0/kernel",
              "layer2/0/downsample/1/scale", "layer4/1/conv2/kernel", "fc/kernel", "fc/bias"):
        assert p in paths, p
    assert {p.split("/downsample")[0] for p in paths if "downsample" in p} == {
        "layer2/0", "layer3/0", "layer4/0"}
    assert "layer5/0/conv1/kernel" not in paths and "layer1/2/conv1/kernel" not in paths
    assert {"bn1/mean", "bn1/var", "layer2/0/downsample/1/mean"} <= state_paths
    assert {p.rsplit("/", 1)[1] for p in state_paths} == {"mean", "var"}
    assert params["conv1"]["kernel"].shape == (7, 7, 3, 4)  # HWIO
    assert params["layer2"][0]["downsample"][0]["kernel"].shape == (1, 1, 4, 8)
    assert params["fc"]["kernel"].shape == (32, 10)


def test_resnet20_cifar_stem_matches_numpy_with_xla_convolutions():
    model = get_model("resnet20", (16, 16, 3), 5, width=4, conv_impl="xla")
    params, _ = check_against_numpy(model, images((2, 16, 16, 3)), stages=3, stem="cifar")
    assert params["conv1"]["kernel"].shape == (3, 3, 3, 4)
    assert sorted(k for k in params if k.startswith("layer")) == ["layer1", "layer2", "layer3"]
    assert all(len(params[f"layer{i}"]) == 3 for i in (1, 2, 3))


@pytest.mark.parametrize("norm", ["group", "none"])
def test_group_norm_and_no_norm_match_numpy_and_keep_no_state(norm):
    model = get_model("resnet18", (12, 12, 3), 3, width=4, stem="cifar", norm=norm,
                      conv_impl="xla")
    params, state = check_against_numpy(model, images((2, 12, 12, 3)), stages=4, stem="cifar",
                                        groups=2)
    assert state == {}
    bn = {p for p in leaf_paths(params) if "bn" in p or "downsample/1" in p}
    if norm == "group":
        assert {"bn1/scale", "bn1/bias", "layer2/0/downsample/1/scale"} <= bn
    else:
        assert not bn


@pytest.mark.parametrize("conv_impl", ["xla", pytest.param("auto", marks=pytest.mark.slow)])
def test_bottleneck_resnet50_matches_numpy(conv_impl):
    model = get_model("resnet50", (32, 32, 3), 10, width=4, conv_impl=conv_impl)
    params, _ = check_against_numpy(model, images((2, 32, 32, 3)), stages=4, bottleneck=True)
    # Every stage's first block projects (layer1: 4 -> 16 channels at stride 1).
    paths = leaf_paths(params)
    assert {p.split("/downsample")[0] for p in paths if "downsample" in p} == {
        "layer1/0", "layer2/0", "layer3/0", "layer4/0"}
    assert params["layer2"][0]["conv2"]["kernel"].shape == (3, 3, 8, 8)  # stride on the 3x3
    assert params["layer1"][0]["conv3"]["kernel"].shape == (1, 1, 4, 16)
    assert params["fc"]["kernel"].shape == (128, 10)


def test_parameter_counts_equal_torchvision():
    def count(name, shape, classes):
        params, _ = jax.eval_shape(get_model(name, shape, classes).init, jax.random.key(0))
        return sum(math.prod(v.shape) for v in jax.tree_util.tree_leaves(params))

    assert count("resnet18", (224, 224, 3), 1000) == 11_689_512
    assert count("resnet34", (224, 224, 3), 1000) == 21_797_672
    assert count("resnet50", (224, 224, 3), 1000) == 25_557_032
    # He et al.'s CIFAR ResNet-20 has 269,722 parameters with parameter-free (option A)
    # shortcuts; the two 1x1 projections add 16*32 + 32*64 weights and 2*(32+64) norm ones.
    assert count("resnet20", (32, 32, 3), 10) == 269_722 + 16 * 32 + 32 * 64 + 2 * (32 + 64)


def test_training_mode_updates_batch_norm_statistics_and_eval_mode_does_not():
    model = get_model("resnet18", (8, 8, 3), 3, width=2, stem="cifar", conv_impl="xla")
    params, state = random_variables(model)
    x = images((4, 8, 8, 3))

    @jax.jit
    def train_and_eval(p, s, x):
        return (model.apply(p, s, x, train=True, rng=jax.random.key(0)),
                model.apply(p, s, x, train=False))

    (out_train, new_state), (out_eval, eval_state) = train_and_eval(params, state, x)
    assert np.all(np.isfinite(out_train))
    old, new = flat(state), flat(new_state)
    assert old.keys() == new.keys()
    for path in old:
        assert not np.allclose(old[path], new[path]), f"{path} did not change in training mode"
    # The stem's statistics: running = 0.9 * running + 0.1 * batch (PyTorch momentum 0.1),
    # over batch and spatial axes, with the biased batch variance.
    h = np_conv(np.asarray(x, np.float64), np.asarray(params["conv1"]["kernel"], np.float64), 1)
    np.testing.assert_allclose(new_state["bn1"]["mean"],
                               0.9 * state["bn1"]["mean"] + 0.1 * h.mean(axis=(0, 1, 2)),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new_state["bn1"]["var"],
                               0.9 * state["bn1"]["var"] + 0.1 * h.var(axis=(0, 1, 2)),
                               rtol=1e-5, atol=1e-5)
    jax.tree_util.tree_map(np.testing.assert_array_equal, eval_state, state)
    assert not np.allclose(out_eval, out_train)  # eval normalizes with the running stats


def test_bad_arguments_are_user_errors():
    cases = [
        (dict(name="resnet18", input_shape=(32, 32, 3), norm="layer"), "norm"),
        (dict(name="resnet18", input_shape=(32, 32, 3), stem="x"), "stem"),
        (dict(name="resnet18", input_shape=(3072,)), r"\[height, width, channels\]"),
        (dict(name="resnet50", input_shape=(32, 32)), r"\[height, width, channels\]"),
        (dict(name="resnet34", input_shape=(32, 32, 3), width=0), "width"),
        (dict(name="resnet18", input_shape=(32, 32, 3), norm="group", width=6, groups=4),
         "divisible"),
        (dict(name="resnet18", input_shape=(32, 32, 3), conv_impl="fft"), "conv_impl"),
        (dict(name="resnet20", input_shape=(32, 32, 3), stem="imagenet"),
         "bad options for model 'resnet20'"),
    ]
    for kwargs, match in cases:
        kwargs = dict(kwargs)
        with pytest.raises(fs.UserError, match=match):
            get_model(kwargs.pop("name"), kwargs.pop("input_shape"), 10, **kwargs)


def test_config_rules_allow_exactly_the_builders_choices():
    rules = schema.ARG_RULES["model"]
    for key, allowed in (("norm", resnet.NORMS), ("stem", resnet.STEMS)):
        ok, _ = rules[key]
        assert all(ok(v) for v in allowed) and not ok("layer") and not ok(None)
    assert rules["width"][0](4) and not rules["width"][0](0)
    assert rules["groups"][0](2) and not rules["groups"][0](1.5)


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["batch", "group"])
def test_tiny_resnet_trains_in_simulate(norm):
    import optax

    rng = np.random.default_rng(0)
    data = fs.data.FederatedData({"x": rng.normal(size=(24, 8, 8, 3)).astype(np.float32),
                                  "y": rng.integers(0, 3, 24).astype(np.int32)},
                                 np.array([0, 8, 16, 24]), ("a", "b", "c"))
    model = get_model("resnet20", (8, 8, 3), 3, width=2, norm=norm)
    res = fs.simulate(model, fs.algorithms.fedavg(optax.sgd(0.05), batch_size=4), data,
                      rounds=2, clients_per_round=2, progress=False)
    assert np.isfinite(res.history[-1]["train_loss"])
