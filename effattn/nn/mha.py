"""Multihead attention and a GELU feed-forward as pure forward/backward pairs, for layers.

The models wrap kernels in :class:`effattn.models.attention.MultiHeadAttention` (a stateful
module); registered *layers* (Funnel's pooled-query attention, Perceiver's cross- and latent
attention) are pure functions of flat parameter arrays, so they need the same computation as a
function. Written once here (Vaswani et al., 2017, https://arxiv.org/abs/1706.03762)::

    MHA(X, Y) = concat(O_1, ..., O_h) W^O + b^O,   O_j = softmax(Q_j K_j^T / sqrt(d) + mask) V_j
    Q = X W^Q + b^Q,  K = Y W^K,  V = Y W^V + b^V          (heads: contiguous column blocks of D)
    FF(x)     = GELU(x W_1 + b_1) W_2 + b_2                  (GELU in its tanh form)

Shapes: X (..., Nq, D_q), Y (..., Nk, D_k), out (..., Nq, D_o); the parameters (names without a
prefix, :data:`MHA_NAMES`): Wq (D_q, D), bq (D,), Wk (D_k, D), Wv (D_k, D), bv (D,), Wo (D, D_o),
bo (D_o,). There is no key bias: b^K adds the same q . b^K to every logit of a row, which the
softmax cancels (a peer's key bias is dropped when porting weights; outputs are equal).

Masks: ``key_mask`` (..., Nk) bool (True = real) gives masked keys exactly zero weight;
``diagonal=t0`` makes the attention causal with query row r at key position t0 + r (it sees
keys j <= t0 + r: Perceiver AR's latents are the last positions, t0 = N - m). A row with no
allowed key outputs b^O and gets no gradient through the attention.

Backward: the softmax core's (:func:`effattn.nn.sparse.attend_backward`), then each linear's
(dX = dQ W^Q^T, dY = dK W^K^T + dV W^V^T, dW = input^T d(output)). Cost O(Nq Nk D) time and
O(h Nq Nk) memory for the attention weights (what ``weights`` returns).
"""
from __future__ import annotations

from typing import NamedTuple

from ..validate import check_param
from .functional import (gelu_backward, gelu_forward, layer_norm_backward, layer_norm_forward, linear_backward,
                         linear_forward, merge_heads, split_heads)
from .mab import sub_params as sub  # noqa: F401  (the layers import it from here)
from .sparse import attend_backward, attend_forward

MHA_NAMES = ("Wq", "bq", "Wk", "Wv", "bv", "Wo", "bo")
FF_NAMES = ("W1", "b1", "W2", "b2")
LN_NAMES = ("g", "b")


def prefixed(grads, prefix):
    """{prefix + name: array}: the inverse of :func:`sub` for a gradient dict."""
    return {prefix + k: v for k, v in grads.items()}


# --------------------------------------------------------------------------- multihead attention
class MHACache(NamedTuple):
    q: object
    k: object
    v: object
    attend: object    # AttendCache: per-head q, k, v (..., h, ., d), E (..., h, Nq, Nk), out
    o: object
    heads: int


def mha_forward(X, Y, p, *, heads, key_mask=None, diagonal=None, scale=None):
    """MHA(X, Y) with parameters ``p`` (:data:`MHA_NAMES`); returns (out (..., Nq, D_o), MHACache).
    ``scale`` defaults to 1/sqrt(d), d = D / heads. No validation here: the layers validate."""
    Q, cq = linear_forward(X, p["Wq"], p["bq"])
    K, ck = linear_forward(Y, p["Wk"])
    V, cv = linear_forward(Y, p["Wv"], p["bv"])
    D = Q.shape[-1]
    scale = (D // heads) ** -0.5 if scale is None else scale
    allowed = None if key_mask is None else key_mask[..., None, None, :]      # (..., 1, 1, Nk)
    a, _, ca = attend_forward(split_heads(Q, heads), split_heads(K, heads), split_heads(V, heads),
                              allowed, scale, diagonal=diagonal)            # (..., h, Nq, d)
    out, co = linear_forward(merge_heads(a), p["Wo"], p["bo"])
    return out, MHACache(cq, ck, cv, ca, co, heads)


def mha_backward(dout, cache):
    """{"X": dX, "Y": dY, "Wq", "bq", "Wk", "Wv", "bv", "Wo", "bo"} (add dX and dY when X is Y)."""
    go = linear_backward(dout, cache.o)
    ga = attend_backward(split_heads(go["x"], cache.heads), cache.attend)
    gq = linear_backward(merge_heads(ga["q"]), cache.q)
    gk = linear_backward(merge_heads(ga["k"]), cache.k)
    gv = linear_backward(merge_heads(ga["v"]), cache.v)
    return {"X": gq["x"], "Y": gk["x"] + gv["x"], "Wq": gq["W"], "bq": gq["b"], "Wk": gk["W"],
            "Wv": gv["W"], "bv": gv["b"], "Wo": go["W"], "bo": go["b"]}


def mha_weights(cache):
    """The attention weights P (..., h, Nq, Nk) of the last call (rows sum to 1, or 0 if empty)."""
    return cache.attend.e * cache.attend.rz


# --------------------------------------------------------------------------- feed-forward
def ff_forward(x, p):
    """FF(x) = GELU(x W1 + b1) W2 + b2; returns (y, cache)."""
    z, c1 = linear_forward(x, p["W1"], p["b1"])
    h, c2 = gelu_forward(z)
    y, c3 = linear_forward(h, p["W2"], p["b2"])
    return y, (c1, c2, c3)


def ff_backward(dy, cache):
    """{"x", "W1", "b1", "W2", "b2"}."""
    c1, c2, c3 = cache
    g3 = linear_backward(dy, c3)
    g1 = linear_backward(gelu_backward(g3["x"], c2), c1)
    return {"x": g1["x"], "W1": g1["W"], "b1": g1["b"], "W2": g3["W"], "b2": g3["b"]}


# --------------------------------------------------------------------------- parameters
def check_mha(p, prefix, d_q, d_k, D, d_o, dtype):
    """Validate one attention's parameter shapes (names reported with their prefix)."""
    shapes = {"Wq": (d_q, D), "bq": (D,), "Wk": (d_k, D), "Wv": (d_k, D), "bv": (D,), "Wo": (D, d_o), "bo": (d_o,)}
    for name, shape in shapes.items():
        check_param(prefix + name, p[name], shape, dtype)


def check_ff(p, prefix, D, dtype):
    check_param(prefix + "W1", p["W1"], (D, None), dtype)
    F = p["W1"].shape[-1]
    for name, shape in (("b1", (F,)), ("W2", (F, D)), ("b2", (D,))):
        check_param(prefix + name, p[name], shape, dtype)


def check_ln(p, prefix, D, dtype):
    for name in LN_NAMES:
        check_param(prefix + name, p[name], (D,), dtype)


def init_mha(rng, prefix, d_q, d_k, D, d_o=None, jitter=0.1):
    """Host draws of one attention: weights ~ N(0, 1/fan_in), biases ~ jitter N(0, 1)."""
    d_o = D if d_o is None else d_o
    shapes = {"Wq": (d_q, D), "bq": (D,), "Wk": (d_k, D), "Wv": (d_k, D), "bv": (D,), "Wo": (D, d_o), "bo": (d_o,)}
    return {prefix + n: (rng.standard_normal(s) / s[0] ** 0.5 if n.startswith("W") else jitter * rng.standard_normal(s))
            for n, s in shapes.items()}


def init_ff(rng, prefix, D, F, jitter=0.1):
    return {prefix + "W1": rng.standard_normal((D, F)) / D ** 0.5, prefix + "b1": jitter * rng.standard_normal(F),
            prefix + "W2": rng.standard_normal((F, D)) / F ** 0.5, prefix + "b2": jitter * rng.standard_normal(D)}


def init_ln(rng, prefix, D, jitter=0.1):
    """Gain 1 + jitter N(0, 1), offset jitter N(0, 1) (the jitter lets a gradient check see both)."""
    return {prefix + "g": 1.0 + jitter * rng.standard_normal(D), prefix + "b": jitter * rng.standard_normal(D)}


def ln_forward(x, p):
    return layer_norm_forward(x, p["g"], p["b"])


def ln_backward(dy, cache):
    g = layer_norm_backward(dy, cache)
    return {"x": g["x"], "g": g["gamma"], "b": g["beta"]}
