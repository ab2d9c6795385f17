"""Datasets that need no download: two scikit-learn toy sets and FedProx Synthetic(alpha, beta).

The scikit-learn sets ship inside the package, so these loaders work offline. They return
centralised `{'x': ..., 'y': ...}` dicts; split them into clients with
`fedjax_sim.data.partition`. The synthetic generator is federated by construction.
"""

from __future__ import annotations

import math

import numpy as np

from fedjax_sim.data.federated_data import FederatedData
from fedjax_sim.errors import UserError

SYNTHETIC_DIM = 60
SYNTHETIC_CLASSES = 10


def _check_fraction(test_fraction: float, low_inclusive: bool) -> None:
    low_ok = test_fraction >= 0 if low_inclusive else test_fraction > 0
    if not (low_ok and test_fraction < 1):
        bounds = "[0, 1)" if low_inclusive else "(0, 1)"
        raise UserError(f"test_fraction must be in {bounds}, got {test_fraction}; e.g. use 0.2")


def load_digits(
    test_fraction: float = 0.2, seed: int = 0
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), split stratified.

    Returns `(train, test)`, each with `x` float32 [n, 8, 8, 1] = pixel / 16 in [0, 1] and
    `y` int32 [n]. The split is `train_test_split(test_size=test_fraction, stratify=y,
    random_state=seed)`, so every class keeps its share in both parts (1437 / 360 for 0.2).
    """
    from sklearn import datasets, model_selection

    _check_fraction(test_fraction, low_inclusive=False)
    digits = datasets.load_digits()
    x = (digits.images.astype(np.float32) / np.float32(16.0))[..., None]
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = model_selection.train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed)
    return {"x": x_train, "y": y_train}, {"x": x_test, "y": y_test}


def load_diabetes(
    test_fraction: float = 0.2, seed: int = 0
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, float]]:
    """scikit-learn's diabetes regression set (442 patients, 10 features).

    The features come already centred and scaled by scikit-learn. The target (disease
    progression after one year) is standardised with statistics of the TRAIN part only,

        y' = (y - mean_train) / std_train   (population std, ddof = 0),

    so no test information leaks into training; the same shift and scale are applied to
    test. Invert predictions with `y = y' * std + mean`.

    Returns:
      `(train, test, target_stats)`: `x` float32 [n, 10], `y` float32 [n, 1], and
      `target_stats = {'mean': mean_train, 'std': std_train}` as floats.
    """
    from sklearn import datasets, model_selection

    _check_fraction(test_fraction, low_inclusive=False)
    data = datasets.load_diabetes()
    x = data.data.astype(np.float32)
    y = data.target.astype(np.float64)
    x_train, x_test, y_train, y_test = model_selection.train_test_split(
        x, y, test_size=test_fraction, random_state=seed)
    mean, std = float(y_train.mean()), float(y_train.std())

    def standardise(values: np.ndarray) -> np.ndarray:
        return ((values - mean) / std).astype(np.float32)[:, None]

    return (
        {"x": x_train, "y": standardise(y_train)},
        {"x": x_test, "y": standardise(y_test)},
        {"mean": mean, "std": std},
    )


def synthetic(
    alpha: float,
    beta: float,
    *,
    num_clients: int = 30,
    seed: int = 0,
    iid: bool = False,
    test_fraction: float = 0.1,
) -> tuple[FederatedData, FederatedData, dict[str, np.ndarray]]:
    """Synthetic(alpha, beta) of the FedProx paper (Li et al. 2020), as its generator does it.

    Dimension d = 60, K = 10 classes. For device k = 1..C:

        n_k = floor(LogNormal(mean=4, sigma=2)) + 50           examples
        u_k ~ N(0, alpha),   B_k ~ N(0, beta)
        W_k[j, c] ~ N(u_k, 1)  [d, K],   b_k[c] ~ N(u_k, 1)  [K]
        v_k[j] ~ N(B_k, 1)  [d]
        x ~ N(v_k, Sigma),   Sigma = diag(j^-1.2), j = 1..d
        y = argmax softmax(W_k^T x + b_k) = argmax (x W_k + b_k)

    alpha controls how much the local models differ, beta how much the local inputs differ.
    As in the reference generator, alpha and beta are the *standard deviations* passed to
    numpy's `normal(loc, scale)` (the paper writes N(0, alpha)), and u_k is shared by W_k
    and b_k.

    Synthetic-IID (`iid=True`, which needs alpha = beta = 0): one W ~ N(0, 1) [d, K] and
    b ~ N(0, 1) [K] for all devices, and v_k = 0, so every device samples x and y from the
    same distribution.

    Each device then holds out its own test examples like the reference: its examples are
    shuffled and the first floor((1 - test_fraction) * n_k) train (90/10 by default), the
    rest test. Features are `x` float32 [n, 60] and `y` int32 [n]; labels are computed from
    the stored float32 `x`, so they match `argmax(x @ W_k + b_k)` exactly. All randomness
    comes from `np.random.default_rng(seed)`.

    Returns:
      `(train, test, info)` with client ids "device_0".."device_{C-1}" in both, and `info`
      holding float64 arrays `W` [C, 60, 10], `b` [C, 10], `v` [C, 60], `u` [C], `B` [C]
      and int64 `num_samples` [C] (per-device totals before the split).
    """
    if not (np.isfinite(alpha) and np.isfinite(beta)) or alpha < 0 or beta < 0:
        raise UserError(f"synthetic needs alpha >= 0 and beta >= 0, got {alpha}, {beta}")
    if iid and (alpha != 0 or beta != 0):
        raise UserError(
            f"synthetic(iid=True) shares one model and input distribution, so alpha and beta "
            f"do not apply (got {alpha}, {beta}); pass alpha=0, beta=0 or iid=False")
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) \
            or num_clients < 1:
        raise UserError(f"synthetic num_clients must be an int >= 1, got {num_clients!r}")
    _check_fraction(test_fraction, low_inclusive=True)

    rng = np.random.default_rng(seed)
    d, k = SYNTHETIC_DIM, SYNTHETIC_CLASSES
    num_samples = rng.lognormal(4.0, 2.0, num_clients).astype(np.int64) + 50
    sigma_diag = np.arange(1, d + 1, dtype=np.float64) ** -1.2
    if iid:
        u = np.zeros(num_clients)
        b_shift = np.zeros(num_clients)
        v = np.zeros((num_clients, d))
        w_all = np.repeat(rng.normal(0.0, 1.0, (1, d, k)), num_clients, axis=0)
        b_all = np.repeat(rng.normal(0.0, 1.0, (1, k)), num_clients, axis=0)
    else:
        u = rng.normal(0.0, alpha, num_clients)
        b_shift = rng.normal(0.0, beta, num_clients)
        v = rng.normal(b_shift[:, None], 1.0, (num_clients, d))
        w_all = rng.normal(u[:, None, None], 1.0, (num_clients, d, k))
        b_all = rng.normal(u[:, None], 1.0, (num_clients, k))

    xs, ys = [], []
    for i in range(num_clients):
        # Sigma is diagonal, so x = v + sqrt(diag(Sigma)) * z with z ~ N(0, I) is N(v, Sigma).
        z = rng.standard_normal((int(num_samples[i]), d))
        x = (v[i] + np.sqrt(sigma_diag) * z).astype(np.float32)
        logits = x.astype(np.float64) @ w_all[i] + b_all[i]
        xs.append(x)
        ys.append(np.argmax(logits, axis=1).astype(np.int32))

    offsets = np.concatenate([[0], np.cumsum(num_samples)]).astype(np.int64)
    full = FederatedData(
        {"x": np.concatenate(xs), "y": np.concatenate(ys)},
        offsets,
        tuple(f"device_{i}" for i in range(num_clients)),
    )
    # floor((1 - f) * n) train as in the reference generator; this can differ by one from
    # FederatedData.split, which rounds the test count instead.
    train_counts = np.array(
        [math.floor((1.0 - test_fraction) * int(n)) for n in num_samples], np.int64)
    # A seed drawn from the generator keeps the shuffle's stream apart from the data's.
    split_seed = int(rng.integers(2**63 - 1))
    train, test = full._split_with_counts(num_samples - train_counts, split_seed)
    info = {"W": w_all, "b": b_all, "v": v, "u": u, "B": b_shift, "num_samples": num_samples}
    return train, test, info
