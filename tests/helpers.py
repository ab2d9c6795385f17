"""Small independent references shared by the tests (plain numpy, no fedjax_sim code)."""

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
