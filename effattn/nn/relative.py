"""Relative positional attention with the "relative shift" (Transformer-XL, Dai et al., 2019,
https://arxiv.org/abs/1901.02860, Section 3.3 and Appendix B), written once for the recurrent layers.

A query at absolute position p_i and a key at p_j score (the paper's Eq. in Section 3.3, per head)::

    A_ij = q_i . k_j  +  q_i . W_R R_{i-j}  +  u . k_j  +  v . W_R R_{i-j}
         = (q_i + u) . k_j  +  (q_i + v) . r_{i-j},         r_t = W_R R_t   (terms (a) + (c), (b) + (d))

with R_t the sinusoid of the distance t = p_i - p_j (:func:`sinusoid`: [sin(t f), cos(t f)],
f_k = 10000^(-2k / D)), u and v learned global biases (the official code's ``r_w_bias`` and
``r_r_bias``), scaled by 1/sqrt(d) before the softmax.

The relative shift. For N queries at positions L, ..., L + N - 1 over M = L + N keys at 0, ..., M - 1
the distances L + i - j run from M - 1 (last query, first key) down to -(N - 1). One product
P = (q + v) r^T over the W = M + N - 1 distances, columns in *decreasing* distance (column c is
distance M - 1 - c), costs O(N W d) and holds every number the (N, M) score needs:
BD[i, j] = P[i, N - 1 - i + j]. Row i is row i of P read from column N - 1 - i on: a skew. The
appendix's trick reads it with reshapes alone: flattened row-major, P[i, N - 1 - i + j] sits at
i W + N - 1 - i + j = (N - 1) + i (W - 1) + j, so ``P.reshape(N W)[N - 1 : N - 1 + N (W - 1)]
.reshape(N, W - 1)[:, :M]`` is BD, a view (:func:`rel_shift`) -- no (N, M, d) tensor of r_{i-j}
and no gather. The paper pads one zero column instead, as its P covers distances >= 0 only; the
entries of its BD above the causal band are then other rows' numbers, masked afterwards (the
wider P here makes every entry right, so non-causal calls work too). Its backward writes dBD
through the same view into a zero dP (every element of the view is a distinct element of dP).

Shapes (head level): q (..., h, N, d), k, v (..., h, M, d), r (h, W, d), u, v_bias (h, d).
``diagonal = L`` makes the call causal over the extended context (query i sees keys j <= L + i);
``allowed`` (bool, broadcastable to (..., h, N, M)) masks keys. The softmax core is
:func:`effattn.nn.sparse.attend_forward` with BD as an additive bias.

Backward: with S = scale ((q + u) k^T + BD): dq = scale dS k + dP r, dk = scale dS^T (q + u),
du = sum of scale dS k over the rows, dBD = scale dS, dP = shift^T(dBD), d(v_bias) = sum of dP r
over the rows, dr = sum over the leading axes of dP^T (q + v_bias). Cost O(N M d) time, O(h N M)
memory (the score and P).
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import get_namespace
from ..validate import check_param
from .functional import layer_norm_backward, layer_norm_forward, merge_heads, split_heads
from .sparse import attend_backward, attend_forward

XL_NAMES = ("Wq", "Wk", "Wv", "Wr", "u", "vb", "Wo", "ln_g", "ln_b")


def distances(n, m, xp):
    """The W = m + n - 1 distances of the shifted product, decreasing: m - 1, m - 2, ..., -(n - 1)."""
    return xp.arange(m - 1, -n, -1, dtype="float64")


def sinusoid(t, dim, xp, dtype="float64", base=10000.0):
    """R_t = [sin(t f), cos(t f)], f_k = base^(-2k / dim), k = 0 .. dim/2 - 1: (len(t), dim) for the
    distances ``t`` (any shape; the result adds one axis). The halves are concatenated, not
    interleaved (the official ``PositionalEmbedding``); ``dim`` must be even."""
    f = 1.0 / base ** (xp.arange(0, dim, 2, dtype="float64") / dim)
    angle = xp.asarray(t, dtype="float64")[..., None] * f
    return xp.concatenate([xp.sin(angle), xp.cos(angle)], axis=-1).astype(dtype)


def rel_shift(P, m):
    """BD (..., N, m) from P (..., N, W = m + N - 1) with BD[i, j] = P[i, N - 1 - i + j]: a view."""
    *lead, n, w = P.shape
    if n == 1:                                   # one query (a decoding step): its row is P itself
        return P[..., :m]
    flat = P.reshape(*lead, n * w)
    return flat[..., n - 1: n - 1 + n * (w - 1)].reshape(*lead, n, w - 1)[..., :m]


def rel_unshift(dBD, w):
    """The transpose of :func:`rel_shift`: dP (..., N, W) with dP[i, N - 1 - i + j] = dBD[i, j], zero elsewhere."""
    xp = get_namespace(dBD)
    *lead, n, m = dBD.shape
    dP = xp.zeros((*lead, n, w), dtype=dBD.dtype)
    rel_shift(dP, m)[...] = dBD
    return dP


class RelCache(NamedTuple):
    qv: object       # q + v_bias (..., h, N, d)
    r: object        # (h, W, d)
    attend: object   # AttendCache of the softmax core
    scale: float


def rel_attend_forward(q, k, v, r, u, v_bias, *, scale, allowed=None, diagonal=None):
    """softmax(scale ((q + u) k^T + rel_shift((q + v_bias) r^T)) + masks) v: out (..., h, N, dv), RelCache."""
    m = k.shape[-2]
    qv = q + v_bias[:, None, :]
    P = qv @ r.swapaxes(-1, -2)                                   # (..., h, N, W)
    bias = rel_shift(P, m) * scale                                # (..., h, N, M): scale BD
    out, _, ca = attend_forward(q + u[:, None, :], k, v, allowed, scale, bias=bias, diagonal=diagonal)
    return out, RelCache(qv, r, ca, scale)


def rel_attend_backward(dout, cache):
    """{"q", "k", "v", "r", "u", "v_bias"}; r's gradient summed over the leading axes (it is shared)."""
    qv, r, ca, scale = cache
    g = attend_backward(dout, ca)
    dP = rel_unshift(g["bias"] * scale, r.shape[-2])              # (..., h, N, W)
    dqv = dP @ r
    lead = tuple(range(dP.ndim - 3))
    dr = (dP.swapaxes(-1, -2) @ qv).sum(axis=lead) if lead else dP.swapaxes(-1, -2) @ qv
    rows = lead + (dP.ndim - 2,)
    return {"q": g["q"] + dqv, "k": g["k"], "v": g["v"], "r": dr,
            "u": g["q"].sum(axis=rows), "v_bias": dqv.sum(axis=rows)}


def weights_of(cache):
    """The attention weights (..., h, N, M) of the last call."""
    return cache.attend.e * cache.attend.rz


# --------------------------------------------------------------------------- the recurrent layers' attention sub-layer
def check_xl_params(params, D, heads, dtype):
    """Shapes of :data:`XL_NAMES`: Wq, Wk, Wv, Wr, Wo (D, D); u, vb (heads, d); ln_g, ln_b (D,)."""
    d = D // heads
    for name in ("Wq", "Wk", "Wv", "Wr", "Wo"):
        check_param(name, params[name], (D, D), dtype)
    for name in ("u", "vb"):
        check_param(name, params[name], (heads, d), dtype)
    for name in ("ln_g", "ln_b"):
        check_param(name, params[name], (D,), dtype)


def init_xl_params(rng, D, heads, jitter=0.1):
    """Host draws: W_q, W_k, W_v, W_R, W_o ~ N(0, 1/D); u, vb ~ jitter N(0, 1); ln_g = 1 + jitter N(0, 1), ln_b = jitter N(0, 1)."""
    d = D // heads
    p = {n: rng.standard_normal((D, D)) / D ** 0.5 for n in ("Wq", "Wk", "Wv", "Wr", "Wo")}
    p["u"] = jitter * rng.standard_normal((heads, d))
    p["vb"] = jitter * rng.standard_normal((heads, d))
    p["ln_g"] = 1.0 + jitter * rng.standard_normal(D)
    p["ln_b"] = jitter * rng.standard_normal(D)
    return p


class XLLayerCache(NamedTuple):
    x: object
    h: object          # the keys' rows (..., M, D); x is its last N rows
    R: object          # (W, D) sinusoids of the distances M - 1, ..., -(N - 1)
    rel: object        # RelCache of the heads
    a: object          # merged attention output before W_o (..., N, D)
    ln: object
    heads: int
    params: dict


def xl_layer_forward(x, h, params, *, heads, mask=None, causal=False):
    """y = LN(x + RelMHA(x, h) W_o): queries x (..., N, D) at the last N positions of the keys' rows
    h (..., M, D) (x itself is h's tail); ``mask`` (..., M) bool or None. Returns (y, XLLayerCache)."""
    xp = get_namespace(x)
    n, D = x.shape[-2:]
    m = h.shape[-2]
    R = sinusoid(distances(n, m, xp), D, xp, dtype=x.dtype)                 # (W, D)
    q = split_heads(x @ params["Wq"], heads)
    k = split_heads(h @ params["Wk"], heads)
    v = split_heads(h @ params["Wv"], heads)
    r = split_heads(R @ params["Wr"], heads)                                # (h, W, d)
    allowed = None if mask is None else mask[..., None, None, :]
    o, rc = rel_attend_forward(q, k, v, r, params["u"], params["vb"], scale=(D // heads) ** -0.5,
                               allowed=allowed, diagonal=m - n if causal else None)
    a = merge_heads(o)
    y, cl = layer_norm_forward(x + a @ params["Wo"], params["ln_g"], params["ln_b"])
    return y, XLLayerCache(x, h, R, rc, a, cl, heads, params)


def xl_layer_backward(dout, cache):
    """{"x": dx (query rows and x's rows among the keys), "Wq", "Wk", "Wv", "Wr", "u", "vb", "Wo",
    "ln_g", "ln_b"}; the rows of h before x (memories) get none."""
    x, h, R, rc, a, cl, heads, p = cache
    gl = layer_norm_backward(dout, cl)
    dres = gl["x"]
    D, n = x.shape[-1], x.shape[-2]
    g = rel_attend_backward(split_heads(dres @ p["Wo"].T, heads), rc)
    dq, dk, dv = merge_heads(g["q"]), merge_heads(g["k"]), merge_heads(g["v"])

    def flat(t):
        return t.reshape(-1, D)

    dx = dres + dq @ p["Wq"].T + (dk[..., -n:, :] @ p["Wk"].T + dv[..., -n:, :] @ p["Wv"].T)
    return {"x": dx, "Wq": flat(x).T @ flat(dq), "Wk": flat(h).T @ flat(dk), "Wv": flat(h).T @ flat(dv),
            "Wr": R.T @ merge_heads(g["r"]), "u": g["u"], "vb": g["v_bias"], "Wo": flat(a).T @ flat(dres),
            "ln_g": gl["gamma"], "ln_b": gl["beta"]}


def xl_layer_loop(x, h, params, *, heads, allowed):
    """The same layer with every pair's distance written out (no shift): ``allowed`` bool
    broadcastable to (..., heads, N, M); query i at position M - N + i, key j at j."""
    xp = get_namespace(x)
    n, D = x.shape[-2:]
    m = h.shape[-2]
    d = D // heads
    q = split_heads(x @ params["Wq"], heads)
    k = split_heads(h @ params["Wk"], heads)
    dist = (m - n + xp.arange(n))[:, None] - xp.arange(m)[None, :]          # (N, M)
    r = split_heads(sinusoid(dist, D, xp, dtype=x.dtype) @ params["Wr"], heads)   # (N, h, M, d)
    ac = (q + params["u"][:, None, :]) @ k.swapaxes(-1, -2)                 # (..., h, N, M)
    bd = ((q + params["vb"][:, None, :]).swapaxes(-3, -2)[..., :, None, :] * r).sum(axis=-1)   # (..., N, h, M)
    s = xp.where(allowed, (ac + bd.swapaxes(-3, -2)) * d ** -0.5, -xp.inf)
    mx = s.max(axis=-1, keepdims=True)
    e = xp.where(allowed, xp.exp(s - xp.where(xp.isfinite(mx), mx, 0.0)), 0.0)
    z = e.sum(axis=-1, keepdims=True)
    o = merge_heads((e / xp.where(z > 0, z, 1.0)) @ split_heads(h @ params["Wv"], heads))
    y, _ = layer_norm_forward(x + o @ params["Wo"], params["ln_g"], params["ln_b"])
    return y
