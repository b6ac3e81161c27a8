"""Linformer: project keys and values along the sequence to a fixed length k.

Wang, Li, Khabsa, Fang, Ma, 2020, *Linformer: Self-Attention with Linear
Complexity*, https://arxiv.org/abs/2006.04768

Intuition: the attention matrix P = softmax(Q K^T / sqrt(d)) is approximately
low rank (its singular values decay fast; paper Fig. 1, notebook 05_low_rank).
So instead of N keys, attend to k << N learned *mixtures* of keys: project the
length axis of K and V with learned matrices E, F in R^{k x N_max}:

    head_i = softmax( Q (E K)^T / sqrt(d) ) (F V)                           (paper eq. 7)
             (N, d) (d, k)                   (k, dv)

P_bar = softmax(Q (E K)^T / sqrt(d)) is N x k; the cost is O(N k d) time and
O(N k) memory, linear in N for fixed k.

The implied N x N matrix (what the notebooks compare with softmax):
out = P_bar F V, so W = P_bar F (N x k times k x N), out == W @ v.

Parameter sharing (``sharing``; the paper's §4 names):

- "none":       one E and one F per head: ``E``, ``F`` of shape (H, k, N_max)
- "headwise":   E and F shared by all heads of the layer: ``E``, ``F`` (k, N_max) (the default,
                as fairseq's and lucidrains' implementations do)
- "key_value":  additionally E = F: only ``E`` (k, N_max) is passed, used for keys and values
- "layerwise":  one E for keys and values of every head and *every layer*: at kernel level the
                same as "key_value" (``E`` (k, N_max)); a model passes the same E to every layer.

E and F are learnable parameters with gradients (dE sums over the batch and,
when shared, over heads; with E = F the two uses add up).

Lengths: E has a maximum length N_max (the paper fixes n); an input of length
M <= N_max uses the first M columns E[:, :M] (as lucidrains' ``linformer``
slices ``proj_k[:n]`` and fairseq pads the input up to N_max, which gives the
same result since padded rows are zero). M > N_max raises ValueError.

key_mask: masked positions are zeroed in K *and* V before projecting (as
lucidrains / HF-style implementations mask the input). Note what this means
for a linear projection: a masked key then contributes the zero vector to each
of the k projected keys E K, so it changes nothing in E K and F V: masked
tokens contribute nothing to the projections — which is all "masked keys get
zero weight" can mean here, since the k projected slots themselves always
exist (a query always has k slots to attend to, and the softmax weight of a
slot does not become zero). The implied W has exactly zero columns at masked
keys. A batch element with every key masked gets E K = 0 and F V = 0, hence
out = 0.

Causal decoding is impossible: each projected key mixes all positions,
including future ones, so ``causal=True`` raises ValueError.

Backward (P_bar from :func:`effattn.nn.sparse.attend_forward`):

    dV_p = P_bar^T dO,  dK_p = dS^T Q / sqrt(d),  dQ = dS K_p / sqrt(d)
    K_p = E_M K~ (K~ = K masked)  =>  dE_M = dK_p K~^T,  dK~ = E_M^T dK_p,  dK = dK~ * mask
    V_p = F_M V~                  =>  dF_M = dV_p V~^T,  dV~ = F_M^T dV_p,  dV = dV~ * mask
    dE = [dE_M, 0] (k, N_max), summed over batch (and heads when shared).

Peer mapping (lucidrains ``linformer`` 0.2.3, ``LinformerSelfAttention(dim, seq_len, k, heads,
one_kv_head, share_kv)``): its ``proj_k``, ``proj_v`` of shape (seq_len, k) are E^T, F^T
(k, N_max = seq_len), one pair for all heads (``sharing="headwise"``; the peer has no per-head
"none"), sliced to the first N rows when N < seq_len like ours; ``share_kv=True`` is
``sharing="key_value"`` with v = k; ``one_kv_head=True`` is k, v repeated over the heads. With
q, k, v from the peer's own projections and out taken before its ``to_out``, out and the
gradients of q, k, v, E, F agree to 1.3e-15 (fixtures ``linformer__lucidrains_linformer__*``).
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import asarray
from ..validate import check_causal, check_choice, check_float_array, check_qkv, check_scale
from ..nn.functional import softmax_forward
from ..nn.sparse import attend_backward, attend_forward, pad_axis
from ..registry import Mechanism, backward_of, forward_of, reads_cache, register

SHARING = ("none", "headwise", "key_value", "layerwise")
WHY_NOT_CAUSAL = ("Linformer projects the whole sequence (E K mixes every position, future ones included), "
                  "so a query cannot be kept from seeing later keys")


class LinformerCache(NamedTuple):
    attend: object     # AttendCache: q, K_p (..., k, d), V_p (..., k, dv), P_bar (..., N, k)
    k_masked: object   # (..., M, d) K with masked rows zeroed
    v_masked: object   # (..., M, dv)
    e: object          # (k, M) or (H, k, M): E[..., :M]
    f: object          # F[..., :M] (the same array as e when shared)
    key_mask: object
    sharing: str
    n_max: int
    e_shape: tuple     # shape of the E parameter (for the gradient)


def _check_projection(name, a, sharing, heads, m, dtype):
    check_float_array(name, a, min_ndim=2)
    per_head = sharing == "none"
    want = 3 if per_head else 2
    if a.ndim != want:
        shape = "(H, k, N_max)" if per_head else "(k, N_max)"
        raise ValueError(f"{name} must have shape {shape} for sharing={sharing!r}, got {tuple(a.shape)}")
    if per_head and a.shape[0] != heads:
        raise ValueError(f"{name} must have one projection per head (H={heads}) for sharing='none', got {tuple(a.shape)}")
    if a.shape[-1] < m:
        raise ValueError(f"{name} has length N_max={a.shape[-1]} but the keys have M={m} > N_max positions")
    if a.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype} like q, got {a.dtype}")
    return a[..., :m]                                          # first M columns


@forward_of("linformer")
def forward(q, k, v, *, E, F=None, causal=False, key_mask=None, sharing="headwise", scale=None):
    """Linformer attention. q (..., N, d), k (..., M, d), v (..., M, dv).

    E, F: (H, k, N_max) for sharing="none", (k, N_max) for "headwise"; only E (k, N_max)
    for "key_value" / "layerwise" (F must be None). Returns out (..., N, dv), a LinformerCache.
    """
    n, m, d, _ = check_qkv(q, k, v, key_mask=key_mask)
    check_causal(causal, False, WHY_NOT_CAUSAL)
    check_choice("sharing", sharing, SHARING)
    heads = q.shape[-3] if q.ndim >= 3 else 1
    scale = check_scale(scale, d)
    e = _check_projection("E", E, sharing, heads, m, q.dtype)
    if sharing in ("key_value", "layerwise"):
        if F is not None:
            raise ValueError(f"F must be None for sharing={sharing!r} (E is used for keys and values)")
        f = e
    else:
        if F is None:
            raise ValueError(f"F is required for sharing={sharing!r}")
        f = _check_projection("F", F, sharing, heads, m, q.dtype)
        if F.shape != E.shape:
            raise ValueError(f"F must have the shape of E {tuple(E.shape)}, got {tuple(F.shape)}")
    km = key_mask
    k_m = k if km is None else k * km[..., :, None]            # (..., M, d): masked keys zeroed
    v_m = v if km is None else v * km[..., :, None]            # (..., M, dv)
    kp = e @ k_m                                               # (H, k, M) or (k, M) @ (..., M, d) -> (..., k, d)
    vp = f @ v_m                                               # (.., k, M) @ (..., M, dv) -> (..., k, dv)
    out, _, ac = attend_forward(q, kp, vp, None, scale)       # softmax(Q K_p^T / sqrt(d)) V_p
    return out, LinformerCache(ac, k_m, v_m, e, f, km, sharing, E.shape[-1], tuple(E.shape))


def _projection_grad(dp, x, ndim):
    """sum over batch (and, when shared, heads) of dp @ x^T without a (B, H, k, M) intermediate.

    dp (..., H, k, d), x (..., H, M, d). ndim = 2: shared (k, M); ndim = 3: per head (H, k, M).
    The summed axes are folded into the contraction: (k, B H d) @ (B H d, M)."""
    kk, d = dp.shape[-2:]
    m = x.shape[-2]
    if ndim == 2:
        a = dp.reshape(-1, kk, d).transpose(1, 0, 2).reshape(kk, -1)          # (k, L d)
        b = x.reshape(-1, m, d).transpose(0, 2, 1).reshape(-1, m)            # (L d, M)
        return a @ b                                                         # (k, M)
    h = dp.shape[-3]
    a = dp.reshape(-1, h, kk, d).transpose(1, 2, 0, 3).reshape(h, kk, -1)    # (H, k, B d)
    b = x.reshape(-1, h, m, d).transpose(1, 0, 3, 2).reshape(h, -1, m)       # (H, B d, M)
    return a @ b                                                             # (H, k, M)


@backward_of("linformer")
def backward(dout, cache):
    """Returns {"q", "k", "v", "E"} and "F" unless E = F."""
    ac, k_m, v_m, e, f, km, sharing, n_max, e_shape = cache
    g = attend_backward(dout, ac)
    dkp, dvp = g["k"], g["v"]                                  # (..., k, d), (..., k, dv)
    dk = e.swapaxes(-1, -2) @ dkp                              # (.., M, k) @ (..., k, d) -> (..., M, d)
    dv = f.swapaxes(-1, -2) @ dvp                              # (..., M, dv)
    if km is not None:
        dk = dk * km[..., :, None]
        dv = dv * km[..., :, None]
    de = _projection_grad(dkp, k_m, len(e_shape))              # dE_M = sum dK_p K~^T: (k, M) or (H, k, M)
    df = _projection_grad(dvp, v_m, len(e_shape))              # dF_M = sum dV_p V~^T
    grads = {"q": g["q"], "k": dk, "v": dv}
    if sharing in ("key_value", "layerwise"):
        grads["E"] = pad_axis(de + df, n_max, axis=-1)          # (k, N_max): zero beyond M
    else:
        grads["E"] = pad_axis(de, n_max, axis=-1)
        grads["F"] = pad_axis(df, n_max, axis=-1)
    return grads


@reads_cache("linformer")
def weights(cache):
    """The implied matrix W = P_bar F[:, :M] (..., N, M), zero at masked keys: out == W @ v."""
    w = cache.attend.p @ cache.f                               # (..., N, k) @ (.., k, M) -> (..., N, M)
    if cache.key_mask is not None:
        w = w * cache.key_mask[..., None, :]
    return w


def reference(q, k, v, *, E, F=None, causal=False, key_mask=None, sharing="headwise", scale=None):
    """The paper's equation as one dense O(N M) formula: out = (P_bar F_M diag(mask)) V, with
    P_bar = softmax(Q (E_M (K * mask))^T / sqrt(d)) — an oracle built without the kernel's cache."""
    check_causal(causal, False, WHY_NOT_CAUSAL)
    m = k.shape[-2]
    scale = check_scale(scale, q.shape[-1])
    e = E[..., :m]
    f = e if F is None else F[..., :m]
    keep = 1.0 if key_mask is None else key_mask[..., :, None]
    kp = e @ (k * keep)                                        # (..., k, d)
    p_bar = softmax_forward((q * scale) @ kp.swapaxes(-1, -2))[0]   # (..., N, k)
    w = p_bar @ f                                              # (..., N, M)
    if key_mask is not None:
        w = w * key_mask[..., None, :]
    return w @ v


def init_projection(rng, k, n_max, *, heads=None):
    """Initial E or F: N(0, 1/n_max) entries, (k, n_max) or (heads, k, n_max), a host NumPy array.

    The scale matters: E K sums n_max rows, so entries of size 1/sqrt(n_max) keep the projected
    keys O(1) at any length (fairseq's Linformer uses xavier_uniform, std ~ sqrt(2 / (n_max + k)),
    the same order). lucidrains' ``linformer`` uses uniform(-1/sqrt(k), 1/sqrt(k)), whose projected
    keys grow like sqrt(n_max / k): at N = 65536 the softmax over the k slots is then one-hot and
    float32 underflows to denormals (slow)."""
    shape = (k, n_max) if heads is None else (heads, k, n_max)
    return rng.standard_normal(shape) * n_max ** -0.5


def default_k(n):
    """Projected length: 128 at large n (the paper uses k = 128 and 256 for n = 512), always
    below n so the projection compresses."""
    return max(1, min(128, n // 2))


def setup(rng, *, n, d, heads, causal=False, dtype="float64", sharing="headwise"):
    """Headwise-shared E, F (k, N_max = n), k = min(128, n // 2) (:func:`init_projection`)."""
    kk = default_k(n)
    heads_arg = heads if sharing == "none" else None
    params = {"E": asarray(init_projection(rng, kk, n, heads=heads_arg), dtype=dtype)}
    if sharing in ("none", "headwise"):
        params["F"] = asarray(init_projection(rng, kk, n, heads=heads_arg), dtype=dtype)
    return params, {"sharing": sharing}


MECHANISM = register(Mechanism(
    name="linformer",
    title="Linformer",
    citation="Wang et al., 2020",
    url="https://arxiv.org/abs/2006.04768",
    classes=("LR",),
    complexity="O(N)",
    causal=False,
    exact=False,
    kind="kernel",
    notebook="05_low_rank",
    forward=forward,
    backward=backward,
    weights=weights,
    setup=setup,
    reference=reference,
    summary="Learned k x N projections E, F compress keys and values along the sequence: O(N k).",
))
