"""Finite-difference gradient checks (CS231n style), used by the tests and the notebooks.

For a function ``out = f(inputs)`` and an upstream gradient ``dout``, the
scalar ``L = sum(out * dout)`` has dL/dx = backward(dout)["x"]; central
differences estimate it entry by entry:

    dL/dx_i ~ (L(x + h e_i) - L(x - h e_i)) / (2 h)

Run in float64 (h = 1e-5 gives ~1e-10 absolute accuracy for O(1) values).
"""
from __future__ import annotations

import numpy as np

from .backend import get_namespace, to_numpy


def rel_error(a, b) -> float:
    """max|a - b| / max(max|a| + max|b|, 1e-8): one relative error for a whole array
    (robust to entries that are ~0, unlike an entrywise ratio)."""
    a = np.asarray(to_numpy(a), dtype=np.float64)
    b = np.asarray(to_numpy(b), dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)) + np.max(np.abs(b)), 1e-8))


def numerical_gradient(f, x, dout, h=1e-5):
    """Central-difference gradient of sum(f() * dout) with respect to the array ``x``,
    which ``f`` reads; ``x`` is perturbed in place and restored exactly."""
    xp = get_namespace(x)
    grad = xp.zeros_like(x)
    if not x.flags.c_contiguous:
        raise ValueError("x must be a C-contiguous array (perturbed in place through a flat view)")
    flat = x.reshape(-1)
    gflat = grad.reshape(-1)
    for i in range(x.size):
        old = flat[i].item()
        flat[i] = old + h
        plus = float((f() * dout).sum())
        flat[i] = old - h
        minus = float((f() * dout).sum())
        flat[i] = old
        gflat[i] = (plus - minus) / (2 * h)
    return grad


def check_gradients(forward, backward, inputs, config=None, dout=None, rng=None, h=1e-5, names=None):
    """Compare ``backward`` with finite differences for every array in ``inputs``.

    forward(**inputs, **config) -> (out, cache); backward(dout, cache) -> dict.
    Returns {name: relative error}. Inputs must be contiguous float64 arrays.
    """
    config = dict(config or {})
    rng = np.random.default_rng(0) if rng is None else rng
    out, cache = forward(**inputs, **config)
    xp = get_namespace(out)
    if dout is None:
        dout = xp.asarray(rng.standard_normal(out.shape), dtype=out.dtype)
    grads = backward(dout, cache)
    errors = {}
    for name in (names or list(inputs)):
        x = inputs[name]
        if name not in grads:
            raise KeyError(f"backward returned no gradient for {name!r} (got {sorted(grads)})")
        num = numerical_gradient(lambda: forward(**inputs, **config)[0], x, dout, h=h)
        if tuple(grads[name].shape) != tuple(x.shape):
            raise ValueError(f"gradient of {name} has shape {tuple(grads[name].shape)}, expected {tuple(x.shape)}")
        errors[name] = rel_error(grads[name], num)
    return errors
