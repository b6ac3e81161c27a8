"""Memory-compressed attention.

Liu, Saleh, Pot, Goodrich, Sepassi, Kaiser, Shazeer, 2018, *Generating
Wikipedia by Summarizing Long Sequences*, https://arxiv.org/abs/1801.10198
(Section 4.2.3, "Memory-compressed attention"). Surveyed by Tay et al., 2020
(Table 1: complexity O(N_b^2), decodes, class FP+M).

Intuition: the queries keep their full length N, but the keys and values are
shortened k times by a learned *strided convolution* (kernel = stride = k):
every k consecutive positions are summarised into one memory slot. Each query
then attends to M / k slots instead of M positions, so the attention matrix is
N x M/k: k times cheaper in time and memory, still quadratic in N. (The
paper's model alternates this layer with blockwise local-attention layers,
:mod:`effattn.attention.local`, so that fine local detail and a coarse global
view are both available; compose the two kernels in a model for that.)

Equations (slot s summarises positions sk, ..., sk + k - 1; K_j = 0, V_j = 0
for masked and padding positions):

    K^c_s = sum_{o<k} K_{sk+o} W^K_o                   W^K = conv_k, (k, d, d): a Conv1d with d filters
    V^c_s = sum_{o<k} w^V_o V_{sk+o}                   w^V = conv_v, (k,): one weight per offset
    S_is  = q_i . K^c_s / sqrt(d)
    P_i   = softmax_s(S_is)  over visible, non-empty slots
    o_i   = sum_s P_is V^c_s

Causal (decoder) version: slot s is visible to query i only once every
position it summarises is <= i, i.e. e_s = min((s + 1) k, M) - 1 <= i. A
query before the end of the first slot sees no slot and outputs zeros (the
lucidrains implementation adds a learned null key/value for this; here it is
an empty row, which the contract allows). Key mask: masked positions are
zeroed before the convolution, so they contribute nothing to their slot, and a
slot whose positions are all masked is itself masked out. N (M) not divisible
by k: padded with zeros at the end (right), and the last slot summarises only
its real positions (its end e_s is the last real position).

Why conv_v is a per-offset scalar, not a (k, dv, dv) convolution like the
paper's / tensor2tensor's (a Conv1d with d_model filters applied to the
memory antecedent before the heads are split): the kernel contract requires
``out == weights(cache) @ v`` with an (N, M) matrix. With a scalar per offset,

    o = P C V,     C_{s, sk+o} = w^V_o     (M/k x M),   so  W = P C  (N x M)

is exactly the matrix applied to v. A feature-mixing value convolution
sum_o V_{sk+o} A_o is not of that form; when A_o = w^V_o A it factors as
(P C V) A and A folds into the output projection W^O, which a model has
anyway. The key convolution keeps its full (k, d, d) form: it only shapes the
logits, and the weights stay a plain matrix. Both parameters are shared by all
heads (in tensor2tensor the convolution acts on d_model before the head
split; per-head filters would be a block-diagonal special case of that).
No bias: a bias on K^c adds q_i . b to every logit of row i and cancels in
the softmax; a bias on V^c would break out == W v.

Shapes: q (..., N, d), k (..., M, d), v (..., M, dv); conv_k (k, d, d);
conv_v (k,); slots M_c = ceil(M / k). Time O(N M_c d + M k d^2), memory O(N M_c).

Backward (attention part: the flash-attention derivation in
:mod:`effattn.nn.sparse`, giving dq, dK^c, dV^c):

    dW^K_o = sum_s K_{sk+o}^T dK^c_s             (reshape K to (M_c, k d): one matmul)
    dK_{sk+o} = dK^c_s (W^K_o)^T                 (then zeroed at masked positions)
    dw^V_o = sum_s V_{sk+o} . dV^c_s
    dV_{sk+o} = w^V_o dV^c_s                     (then zeroed at masked positions)

Cache: q, the reshaped masked keys/values (M_c, k d) / (M_c, k, dv), the
parameters, the slot visibility mask and the attention cache.

Conventions: tensor2tensor ``multihead_self_attention_memory_compressed(x,
mask_right, compression_factor=3, ...)`` / lucidrains
``MemoryCompressedAttention(compression_factor=3)``: ``compression_factor``
= our k (the leading axis of conv_k / conv_v). lucidrains pads on the *left*
and shows slot s to query i when its last position is <= i; we pad on the
right (slots aligned with position 0, like the local blocks) with the same
visibility rule.
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import get_namespace
from ..checks import check_bool, check_param, check_positive_float, check_qkv
from ..nn.sparse import attend_backward, attend_forward, pad_axis
from ..registry import Mechanism, register


class MemoryCompressedCache(NamedTuple):
    attend: object     # AttendCache of the compressed attention: P (..., N, M_c)
    kr: object         # (..., M_c, k d) masked, padded keys, one row per slot
    vr: object         # (..., M_c, k, dv) masked, padded values
    conv_k: object     # (k, d, d)
    conv_v: object     # (k,)
    keep: object       # (..., M, 1) float key mask (None: all real)
    m: int
    allowed: object    # (..., N, M_c) bool visibility (None: all visible)


def slot_ends(m, k, xp):
    """(M_c,) last real position of each slot: min((s + 1) k, M) - 1."""
    n_slots = -(-m // k)
    return xp.minimum((xp.arange(n_slots) + 1) * k, m) - 1


def slot_visibility(n, m, k, causal, xp):
    """(N, M_c) bool: slot s visible to query i (causal: e_s <= i), or None when all are."""
    if not causal:
        return None
    return slot_ends(m, k, xp)[None, :] <= xp.arange(n)[:, None]


def _check(q, k, v, conv_k, conv_v, causal, key_mask, scale):
    n, m, d, dv = check_qkv(q, k, v, key_mask=key_mask)
    causal = check_bool("causal", causal)
    if causal and m != n:
        raise ValueError(f"causal=True needs self-attention (k of length N={n}), got M={m}")
    check_param("conv_k", conv_k, (None, d, d), dtype=q.dtype)
    ks = conv_k.shape[0]
    if ks < 1:
        raise ValueError(f"conv_k must have shape (k, {d}, {d}) with k >= 1, got {tuple(conv_k.shape)}")
    check_param("conv_v", conv_v, (ks,), dtype=q.dtype)
    scale = d ** -0.5 if scale is None else check_positive_float("scale", scale)
    return n, m, d, dv, ks, causal, scale


def forward(q, k, v, *, conv_k, conv_v, causal=False, key_mask=None, scale=None):
    """Memory-compressed attention.

    q (..., N, d), k (..., M, d), v (..., M, dv); conv_k (k, d, d) and conv_v (k,) the
    compression parameters (k = compression factor, shared by all heads); key_mask
    (..., M) bool; causal needs M == N. Returns out (..., N, dv) and a
    :class:`MemoryCompressedCache`.
    """
    n, m, d, dv, ks, causal, scale = _check(q, k, v, conv_k, conv_v, causal, key_mask, scale)
    xp = get_namespace(q, k, v)
    lead = q.shape[:-2]
    n_slots = -(-m // ks)
    keep = None
    if key_mask is not None:
        keep = key_mask[..., :, None].astype(q.dtype)                          # (..., M, 1)
        k, v = k * keep, v * keep                                              # masked positions contribute 0
    kr = pad_axis(k, n_slots * ks).reshape(lead + (n_slots, ks * d))           # (..., M_c, k d)
    vr = pad_axis(v, n_slots * ks).reshape(lead + (n_slots, ks, dv))           # (..., M_c, k, dv)
    # K^c_s = sum_o K_{sk+o} W^K_o
    kc = kr @ conv_k.reshape(ks * d, d)                                        # (..., M_c, k d) @ (k d, d) -> (..., M_c, d)
    # V^c_s = sum_o w^V_o V_{sk+o}
    vc = vr.swapaxes(-1, -2) @ conv_v                                          # (..., M_c, dv, k) @ (k,) -> (..., M_c, dv)
    allowed = slot_visibility(n, m, ks, causal, xp)                            # (N, M_c) or None
    if key_mask is not None:
        real = pad_axis(key_mask, n_slots * ks, axis=-1, value=False)
        real = real.reshape(key_mask.shape[:-1] + (n_slots, ks)).any(axis=-1)  # (..., M_c): slot has a real key
        allowed = real[..., None, :] if allowed is None else allowed & real[..., None, :]
    out, _, acache = attend_forward(q, kc, vc, allowed, scale)                 # (..., N, dv)
    return out, MemoryCompressedCache(acache, kr, vr, conv_k, conv_v, keep, m, allowed)


def backward(dout, cache):
    """Returns {"q", "k", "v", "conv_k", "conv_v"} (derivation in the module docstring)."""
    acache, kr, vr, conv_k, conv_v, keep, m, _ = cache
    ks, d = conv_k.shape[0], conv_k.shape[-1]
    lead = kr.shape[:-2]
    n_slots, dv = vr.shape[-3], vr.shape[-1]
    g = attend_backward(dout, acache)
    dkc, dvc = g["k"], g["v"]                                                  # (..., M_c, d), (..., M_c, dv)
    # dW^K = sum over slots (and batch, heads) of K_slot^T dK^c
    dconv_k = (kr.reshape(-1, ks * d).T @ dkc.reshape(-1, d)).reshape(ks, d, d)
    dk = (dkc @ conv_k.reshape(ks * d, d).T).reshape(lead + (n_slots * ks, d))[..., :m, :]
    # dw^V_o = sum_s V_{sk+o} . dV^c_s
    dconv_v = (vr @ dvc[..., :, :, None]).reshape(-1, ks).sum(axis=0)        # (..., M_c, k, dv) @ (..., M_c, dv, 1)
    dv = (dvc[..., :, None, :] * conv_v[:, None]).reshape(lead + (n_slots * ks, dv))[..., :m, :]
    if keep is not None:
        dk, dv = dk * keep, dv * keep
    return {"q": g["q"], "k": dk, "v": dv, "conv_k": dconv_k, "conv_v": dconv_v}


def weights(cache):
    """The (..., N, M) matrix W = P C with C_{s, sk+o} = w^V_o (zero at masked keys): out == W @ v."""
    p = cache.attend.p                                                         # (..., N, M_c)
    ks = cache.conv_v.shape[0]
    w = (p[..., :, :, None] * cache.conv_v).reshape(p.shape[:-1] + (p.shape[-1] * ks,))[..., :cache.m]
    if cache.keep is not None:
        w = w * cache.keep.swapaxes(-1, -2)                                    # (..., 1, M)
    return w


def compressed_slot_pattern(cache):
    """(..., N, M_c) bool: which slots each query attended (visibility & non-empty)."""
    p = cache.attend.p
    xp = get_namespace(p)
    if cache.allowed is None:
        return xp.ones(p.shape, dtype=bool)
    return xp.broadcast_to(cache.allowed, p.shape)


def reference(q, k, v, *, conv_k, conv_v, causal=False, key_mask=None, scale=None):
    """Dense oracle written from the definitions, one slot and one query at a time:
    compress slot by slot with explicit loops, build the visibility rule pair by pair,
    then call ``full`` attention on the compressed keys with that mask."""
    from .full import forward as full_forward

    n, m, d, dv, ks, causal, scale = _check(q, k, v, conv_k, conv_v, causal, key_mask, scale)
    xp = get_namespace(q, k, v)
    lead = q.shape[:-2]
    n_slots = -(-m // ks)
    kc = xp.zeros(lead + (n_slots, d), dtype=q.dtype)
    vc = xp.zeros(lead + (n_slots, dv), dtype=q.dtype)
    real = xp.zeros(lead + (n_slots,), dtype=bool)
    for s in range(n_slots):
        for o in range(ks):
            j = s * ks + o
            if j >= m:
                continue
            w = 1.0 if key_mask is None else key_mask[..., j, None].astype(q.dtype)
            kc[..., s, :] += (k[..., j, :] * w) @ conv_k[o]
            vc[..., s, :] += conv_v[o] * (v[..., j, :] * w)
            real[..., s] |= True if key_mask is None else key_mask[..., j]
    visible = xp.zeros((n, n_slots), dtype=bool)
    for i in range(n):
        for s in range(n_slots):
            last = min((s + 1) * ks, m) - 1
            visible[i, s] = (not causal) or last <= i
    out, _ = full_forward(q, kc, vc, mask=visible & real[..., None, :], scale=scale)
    return out


def draw_compression(rng, k, d, dv=None, dtype="float64"):
    """Initial parameters drawn on the host: conv_k (k, d, d) ~ N(0, 1 / (k d)) (keeps K^c at
    unit scale) and conv_v (k,) = 1/k + N(0, 0.1^2) (close to mean pooling)."""
    from ..backend import asarray

    conv_k = rng.standard_normal((k, d, d)) / (k * d) ** 0.5
    conv_v = 1.0 / k + 0.1 * rng.standard_normal(k)
    return {"conv_k": asarray(conv_k, dtype=dtype), "conv_v": asarray(conv_v, dtype=dtype)}


def setup(rng, *, n, d, heads, causal=False, dtype="float64", compression=None):
    """Compression factor k = ``compression`` if given, else 3 (the paper's) for short
    sequences, so that padding and partial slots are exercised, and 8 from n = 64 on (the
    N x N/k scores at N = 2048 then stay at 4 MiB in float64). Parameters shared by all heads;
    k is read from their shape, so one set of parameters serves every sequence length."""
    from ..checks import check_int

    ks = (3 if n < 64 else 8) if compression is None else check_int("compression", compression)
    return draw_compression(rng, ks, d, dtype=dtype), {}


def _figures(out_dir, rng):
    from ..viz_fixed import memory_compressed_figures

    return memory_compressed_figures(out_dir, rng)


MECHANISM = register(Mechanism(
    name="memory_compressed",
    title="Memory-compressed attention",
    citation="Liu et al., 2018",
    url="https://arxiv.org/abs/1801.10198",
    classes=("FP", "M"),
    complexity="O(N_b^2)",
    causal=True,
    exact=False,
    kind="kernel",
    notebook="01_fixed_patterns",
    forward=forward,
    backward=backward,
    weights=weights,
    setup=setup,
    reference=reference,
    figures=_figures,
    summary="Keys and values shortened k times by a strided convolution; queries attend the N/k slots.",
    extra={"taxonomy_note": "Table 1 of the survey lists Memory Compressed as FP+M."},
))
