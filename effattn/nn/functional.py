"""Forward/backward pairs of the building blocks every mechanism uses.

Each ``x_forward(...)`` returns ``(out, cache)`` and ``x_backward(dout, cache)``
returns the gradients, derived by hand in the docstring. Functions work on
NumPy or CuPy arrays alike (``get_namespace``) and keep the input dtype.
"""
from __future__ import annotations

import math

from ..backend import asarray, get_namespace

NEG_INF = float("-inf")
IGNORE = -100  # target value ignored by the losses (padding), as in PyTorch


# --------------------------------------------------------------------------- linear
def linear_forward(x, W, b=None):
    """y = x W + b.   x (..., d_in), W (d_in, d_out), b (d_out,) -> y (..., d_out)."""
    y = x @ W
    if b is not None:
        y = y + b
    return y, (x, W, b is not None)


def linear_backward(dy, cache):
    """dx = dy W^T, dW = sum over rows of x^T dy, db = sum of dy over rows."""
    x, W, has_b = cache
    dx = dy @ W.T
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    grads = {"x": dx, "W": x2.T @ dy2}
    if has_b:
        grads["b"] = dy2.sum(axis=0)
    return grads


# --------------------------------------------------------------------------- softmax
def softmax_forward(s, mask=None, axis=-1, inplace=False):
    """p = softmax(s) along ``axis``, optionally restricted to ``mask`` (True = keep).

    Max-subtracted for stability. A row with no allowed entry gives p = 0
    (not NaN) and, in the backward, a zero gradient. With ``inplace=True`` the
    buffer of ``s`` becomes ``p`` (the attention kernels use this so a forward
    pass holds one score matrix, not three); otherwise ``s`` is left alone.
    Also returns the log-sum-exp of each row (``-inf`` for an empty row),
    which mechanisms that combine several softmaxes (Reformer) need.

    Returns (p, cache, lse) with lse keeping the reduced axis (size 1).
    """
    xp = get_namespace(s)
    if not inplace:
        s = s.copy()
    if mask is not None:
        xp.copyto(s, NEG_INF, where=~mask)
    m = s.max(axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0.0).astype(s.dtype, copy=False)
    s -= m
    p = xp.exp(s, out=s)
    z = p.sum(axis=axis, keepdims=True)
    p /= xp.where(z > 0, z, 1.0)
    with _ignore_divide(xp):
        lse = xp.log(z) + m
    return p, (p, axis), lse


def softmax_backward(dp, cache, dlse=None, rowdot=None, inplace=False):
    """ds = p * (dp - sum(p * dp)) [+ p * dlse, since d lse / ds = p].

    ``rowdot`` may supply sum(p * dp) when it is known more cheaply (for
    attention, rowsum(P * dP) = rowsum(dO * O), the flash-attention identity);
    ``inplace=True`` overwrites ``dp`` with the result.
    """
    p, axis = cache
    if rowdot is None:
        rowdot = (p * dp).sum(axis=axis, keepdims=True)
    if not inplace:
        dp = dp.copy()
    dp -= rowdot
    if dlse is not None:
        dp += dlse
    dp *= p
    return dp


class _ignore_divide:
    """Silence log(0) warnings (an empty row has lse = -inf on purpose)."""

    def __init__(self, xp):
        self.xp = xp
        self.ctx = None

    def __enter__(self):
        if hasattr(self.xp, "errstate"):
            self.ctx = self.xp.errstate(divide="ignore")
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def log_softmax_forward(s, axis=-1):
    """log p = s - logsumexp(s)."""
    xp = get_namespace(s)
    m = s.max(axis=axis, keepdims=True)
    shifted = s - m
    logp = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
    return logp, (logp, axis)


def log_softmax_backward(dlogp, cache):
    """ds = dlogp - softmax(s) * sum(dlogp)."""
    logp, axis = cache
    xp = get_namespace(logp)
    return dlogp - xp.exp(logp) * dlogp.sum(axis=axis, keepdims=True)


def cross_entropy_forward(logits, targets, ignore_index=IGNORE):
    """Mean cross-entropy over the positions whose target != ignore_index.

    logits (..., C), targets (...) integers. Returns (loss, cache); loss is a
    Python float (0.0 when every position is ignored).
    """
    xp = get_namespace(logits)
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(logits.shape[:-1])}, got {tuple(targets.shape)}")
    logp, lcache = log_softmax_forward(logits)
    valid = targets != ignore_index
    safe = xp.where(valid, targets, 0)
    picked = xp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    count = int(valid.sum())
    loss = float(-(picked * valid).sum() / max(count, 1))
    return loss, (lcache, safe, valid, count)


def cross_entropy_backward(cache, dloss=1.0):
    """d logits = (softmax - onehot) / count on valid positions, 0 elsewhere."""
    lcache, safe, valid, count = cache
    logp = lcache[0]
    xp = get_namespace(logp)
    g = xp.exp(logp)
    xp.put_along_axis(g, safe[..., None], xp.take_along_axis(g, safe[..., None], axis=-1) - 1.0, axis=-1)
    return g * (valid[..., None].astype(g.dtype) * (dloss / max(count, 1)))


# --------------------------------------------------------------------------- layer norm
def layer_norm_forward(x, gamma=None, beta=None, eps=1e-5):
    """y = (x - mean) / sqrt(var + eps) * gamma + beta over the last axis.

    gamma/beta may be None (Routing Transformer normalises without scale or bias).
    """
    xp = get_namespace(x)
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    rstd = 1.0 / xp.sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)
    xhat = xc * rstd
    y = xhat
    if gamma is not None:
        y = y * gamma
    if beta is not None:
        y = y + beta
    return y, (xhat, rstd, gamma, beta is not None)


def layer_norm_backward(dy, cache):
    """With g = dy * gamma:  dx = rstd * (g - mean(g) - xhat * mean(g * xhat))."""
    xhat, rstd, gamma, has_beta = cache
    grads = {}
    lead = tuple(range(dy.ndim - 1))
    if gamma is not None:
        grads["gamma"] = (dy * xhat).sum(axis=lead)
        g = dy * gamma
    else:
        g = dy
    if has_beta:
        grads["beta"] = dy.sum(axis=lead)
    grads["x"] = rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    return grads


# --------------------------------------------------------------------------- activations
_GELU_C = math.sqrt(2.0 / math.pi)


def gelu_forward(x):
    """GELU, tanh form (as GPT-2/BERT code): 0.5 x (1 + tanh(c (x + 0.044715 x^3)))."""
    xp = get_namespace(x)
    t = xp.tanh(_GELU_C * (x + 0.044715 * (x * x * x)))  # x*x*x: a float32 x ** 3 goes through pow, ~50x slower
    return 0.5 * x * (1.0 + t), (x, t)


def gelu_backward(dy, cache):
    """d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 * 0.044715 x^2)."""
    x, t = cache
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_C * (1.0 + 0.134145 * x * x))


def relu_forward(x):
    """relu(x) = max(x, 0)."""
    out = x * (x > 0)
    return out, x > 0


def relu_backward(dy, cache):
    return dy * cache


def elu_forward(x):
    """elu(x) = x for x > 0, exp(x) - 1 otherwise."""
    xp = get_namespace(x)
    e = xp.exp(xp.minimum(x, 0.0))
    pos = x > 0
    return xp.where(pos, x, e - 1.0), (pos, e)


def elu_backward(dy, cache):
    pos, e = cache
    return dy * get_namespace(dy).where(pos, 1.0, e)


# --------------------------------------------------------------------------- two-layer perceptron
def init_mlp(rng, *, d, width, hidden=None, dtype="float64"):
    """Parameters of :func:`mlp_forward`, drawn on the host from ``rng`` and moved to the active backend:
    W1 (d, d_h) ~ N(0, 1/d), b1 (d_h,) ~ N(0, 0.1^2), W2 (d_h, width) ~ N(0, 1/d_h), b2 (width,) ~ N(0, 0.1^2),
    with d_h = ``hidden`` (default max(d, 2)). Used by Sinkhorn's SortNet and the dense Synthesizer."""
    dh = hidden or max(d, 2)
    return {"W1": asarray(rng.standard_normal((d, dh)) * d ** -0.5, dtype=dtype),
            "b1": asarray(rng.standard_normal(dh) * 0.1, dtype=dtype),
            "W2": asarray(rng.standard_normal((dh, width)) * dh ** -0.5, dtype=dtype),
            "b2": asarray(rng.standard_normal(width) * 0.1, dtype=dtype)}


def mlp_forward(x, W1, b1, W2, b2, width=None):
    """y = ReLU(x W1 + b1) W2[:, :width] + b2[:width]   (the paper's W2^T ReLU(W1^T x + b1) + b2).

    x (..., d), W1 (d, d_h), b1 (d_h,), W2 (d_h, L), b2 (L,) -> y (..., width).
    Only the first ``width`` <= L outputs are computed: Sinkhorn's SortNet and the
    dense Synthesizer size W2 for a maximum length and slice it to the actual one.
    """
    width = W2.shape[1] if width is None else width
    z, c1 = linear_forward(x, W1, b1)                     # (..., d) @ (d, d_h) -> (..., d_h)
    h, c2 = relu_forward(z)
    y, c3 = linear_forward(h, W2[:, :width], b2[:width])  # (..., d_h) @ (d_h, width) -> (..., width)
    return y, (c1, c2, c3, W2.shape[1])


def mlp_backward(dy, cache):
    """{"x", "W1", "b1", "W2", "b2"}: the linear / ReLU / linear backwards in reverse order;
    the unused columns of W2 and b2 (beyond ``width``) get zero gradient."""
    c1, c2, c3, full_width = cache
    g3 = linear_backward(dy, c3)
    g1 = linear_backward(relu_backward(g3["x"], c2), c1)
    xp = get_namespace(dy)

    def pad(g):  # (..., width) -> (..., L)
        return xp.concatenate([g, xp.zeros(g.shape[:-1] + (full_width - g.shape[-1],), dtype=g.dtype)], axis=-1)

    return {"x": g1["x"], "W1": g1["W"], "b1": g1["b"], "W2": pad(g3["W"]), "b2": pad(g3["b"])}


# --------------------------------------------------------------------------- dropout
def dropout_forward(x, p, rng):
    """Inverted dropout with an explicit ``numpy.random.Generator`` (drawn on the host).

    p = 0 or rng None returns x unchanged. keep ~ Bernoulli(1 - p); y = x * keep / (1 - p).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p}")
    if p == 0.0 or rng is None:
        return x, None
    from ..backend import asarray  # host draw, moved to x's device

    keep = rng.random(x.shape) >= p
    scale = asarray(keep, dtype=x.dtype) * (1.0 / (1.0 - p))
    return x * scale, scale


def dropout_backward(dy, cache):
    return dy if cache is None else dy * cache


# --------------------------------------------------------------------------- embeddings
def embedding_forward(ids, table):
    """out = table[ids]. ids (...) int, table (V, D) -> (..., D)."""
    return table[ids], (ids, table.shape)


def embedding_backward(dout, cache):
    """dtable[v] = sum of dout over the positions whose id is v (xp.add.at: repeats add up)."""
    ids, shape = cache
    xp = get_namespace(dout)
    dtable = xp.zeros(shape, dtype=dout.dtype)
    xp.add.at(dtable, ids.reshape(-1), dout.reshape(-1, shape[1]))
    return dtable


def sinusoidal_positions(n, dim, xp, dtype="float64", base=10000.0):
    """PE[pos, 2i] = sin(pos / base^(2i/dim)), PE[pos, 2i+1] = cos(...)  -> (n, dim)."""
    pos = xp.arange(n, dtype="float64")[:, None]
    i = xp.arange((dim + 1) // 2, dtype="float64")[None, :]
    angle = pos / base ** (2.0 * i / dim)
    pe = xp.zeros((n, dim), dtype="float64")
    pe[:, 0::2] = xp.sin(angle)[:, : (dim + 1) // 2]
    pe[:, 1::2] = xp.cos(angle)[:, : dim // 2]
    return pe.astype(dtype)


def split_heads(x, heads):
    """(..., N, H * d) -> (..., H, N, d): the model dimension cut into ``heads`` heads."""
    *lead, n, dm = x.shape
    return x.reshape(*lead, n, heads, dm // heads).swapaxes(-3, -2)


def merge_heads(x):
    """(..., H, N, d) -> (..., N, H * d): the inverse of :func:`split_heads`."""
    *lead, h, n, d = x.shape
    return x.swapaxes(-3, -2).reshape(*lead, n, h * d)
