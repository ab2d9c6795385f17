"""Small independent references shared by the tests (plain numpy, no fedjax_sim code), and
one driver that records what a noise-adding aggregator part adds over rounds."""

import numpy as np


def softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def logreg_grad(kernel, bias, x, y):
    """Gradient of the mean softmax cross-entropy of x @ kernel + bias w.r.t. both."""
    x = x.reshape(len(x), -1).astype(np.float64)
    p = softmax(x @ kernel + bias)
    p[np.arange(len(y)), y] -= 1.0
    p /= len(y)
    return x.T @ p, p.sum(axis=0)


def logreg_sgd(kernel, bias, x, y, batches, lr):
    """Plain SGD over the given batches of row indices (real examples only)."""
    kernel, bias = kernel.astype(np.float64).copy(), bias.astype(np.float64).copy()
    for rows in batches:
        gk, gb = logreg_grad(kernel, bias, x[rows], y[rows])
        kernel -= lr * gk
        bias -= lr * gb
    return kernel, bias


def toy_clients(sizes, features=6, classes=3, seed=0):
    """(x [n, features] float32, y [n] int32, offsets [C+1]) for clients of the given sizes,
    with linearly separable-ish labels."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    x = rng.normal(size=(n, features)).astype(np.float32)
    w = rng.normal(size=(features, classes))
    y = np.argmax(x @ w + 0.3 * rng.normal(size=(n, classes)), axis=1).astype(np.int32)
    return x, y, np.concatenate([[0], np.cumsum(sizes)])


# Configs whose data must be downloaded or brought as files: they run end to end on
# generated files and mocked TFDS in tests/test_data_configs.py instead.
EXTERNAL_DATA_CONFIGS = {"cifar10_dirichlet.py", "emnist_tff.py", "femnist_leaf.py",
                         "shakespeare_leaf.py", "cifar10_resnet50_transfer.py"}


def full_batch_fedavg(w, clients, rounds, lr, steps, send=lambda cid, delta: delta):
    """FedAvg with uniform weights in numpy: from w = [kernel, bias], every client of
    `clients` (a list of (x, y)) takes `steps` full-batch SGD steps of `lr`; the server
    subtracts the mean of what the clients send, send(i, delta_i flattened) (by default
    the delta itself). Returns the final [kernel, bias]."""
    w = [np.asarray(a, np.float64) for a in w]
    for _ in range(rounds):
        sent = []
        for cid, (x, y) in enumerate(clients):
            v = [a.copy() for a in w]
            for _ in range(steps):
                v = [vi - lr * g for vi, g in zip(v, logreg_grad(v[0], v[1], x, y))]
            sent.append(send(cid, np.concatenate([(a - b).ravel() for a, b in zip(w, v)])))
        mean = np.mean(sent, axis=0)
        w = [w[0] - mean[:w[0].size].reshape(w[0].shape), w[1] - mean[w[0].size:]]
    return w


def noise_of_rounds(part, rounds: int, clip: float):
    """[rounds, 4000] float64: what the noise-adding aggregator `part` (after a clip at
    `clip`) adds to an all-zero update of 4000 entries (two leaves) in each of `rounds`
    jitted rounds with keys key(0), key(1), ..., and the last round's metrics."""
    import jax
    import jax.numpy as jnp

    zeros = {"w": jnp.zeros((3000,)), "b": jnp.zeros((2, 500))}
    state = part.init(zeros)
    step = jax.jit(lambda s, k: part.finalize(zeros, 1.0, {"dp_clip_norm": jnp.float32(clip)}, s, k))
    rows, metrics = [], None
    for r in range(rounds):
        noised, _, state, metrics = step(state, jax.random.key(r))
        rows.append(np.concatenate([np.ravel(noised["w"]), np.ravel(noised["b"])]))
    return np.stack(rows).astype(np.float64), metrics
