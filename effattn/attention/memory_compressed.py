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
view are both available; compose the two kernels in a model for that. The
option ``local_block = b`` is a one-layer variant that is *not* in the paper:
each query also sees the raw keys of its own block of b positions, in the same
softmax as the slots — so even the first queries of a causal call see
something, and local detail survives the compression.)

Equations (slot s summarises positions sk, ..., sk + k - 1; K_j = 0, V_j = 0
for masked and padding positions):

    K^c_s = sum_{o<k} K_{sk+o} W^K_o                   W^K = conv_k, (k, d, d): a Conv1d with d filters
    V^c_s = sum_{o<k} w^V_o V_{sk+o}                   w^V = conv_v, (k,): one weight per offset
    S_is  = q_i . K^c_s / sqrt(d)
    P_i   = softmax_s(S_is)  over visible, non-empty slots
    o_i   = sum_s P_is V^c_s

Causal (decoder) version: slot s is visible to query i only once it is
*complete*, i.e. once all k positions it summarises are <= i:
e_s = (s + 1) k - 1 <= i. A query before the end of the first slot sees no
slot and outputs zeros (the lucidrains implementation adds a learned null
key/value for this; here it is an empty row, which the contract allows). Key
mask: masked positions are zeroed before the convolution, so they contribute
nothing to their slot, and a slot whose positions are all masked is itself
masked out. N (M) not divisible by k: padded with zeros at the end (right),
and the last slot summarises only its real positions; causally that partial
slot is never complete, so no query sees it (if the last query saw it, row
N - 1 would change when a token N is appended: the row would depend on the
length, not only on the tokens <= N - 1, and decoding could not reproduce it).

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

With ``local_block = b``: the queries are cut into blocks of b; block g attends
to [its own b raw keys | all M_c slots] in one softmax (an attention of
b x (b + M_c) per block, the slots shared by all blocks), masked by the local
rule (same block, causal j <= i, key mask) and by the slot rule above. The slot
gradients are summed over the blocks; W adds the local block weights.
Cost O(N (b + M_c) d).

Cache: q, the reshaped masked keys/values (M_c, k d) / (M_c, k, dv), the
parameters, the slot visibility mask and the attention cache.

Conventions: tensor2tensor ``multihead_self_attention_memory_compressed(x,
mask_right, compression_factor=3, ...)`` / lucidrains
``MemoryCompressedAttention(compression_factor=3)``: ``compression_factor``
= our k (the leading axis of conv_k / conv_v). lucidrains pads on the *left*
and shows slot s to query i when its last position is <= i; we pad on the
right (slots aligned with position 0, like the local blocks) with the same
visibility rule.

Decoding (:func:`init_state`, :func:`prefill`, :func:`step`): a slot is
compressed once, when its k-th position arrives, and stays visible to every
later query, so the state holds the completed slots K^c, V^c (and whether each
has a real key) plus the raw keys and values of the positions not yet in a
complete slot (the incomplete block; with ``local_block`` also the current
local block). The state grows as t / k slots: memory compression shortens the
KV cache k times, it does not bound it. A step attends to t / k + b keys.

Taxonomy: Table 1 of the survey lists Memory Compressed as FP+M (a fixed
pattern of slots, and the slots act as a compressed neural memory), hence
``classes=("FP", "M")``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from ..backend import asarray, get_namespace
from ..validate import broadcast_shapes, check_bool, check_float_array, check_int, check_param, check_qkv, check_scale
from ..nn.decode import check_prompt, check_state, check_step_inputs
from ..nn.sparse import attend_backward, attend_forward, dense_from_groups, group_mask, pad_axis
from ..registry import Mechanism, backward_of, forward_of, reads_cache, register


class MemoryCompressedCache(NamedTuple):
    attend: object     # AttendCache: P (..., N, M_c), or with local_block P (..., G, b, b + M_c)
    kr: object         # (..., M_c, k d) masked, padded keys, one row per slot
    vr: object         # (..., M_c, k, dv) masked, padded values
    conv_k: object     # (k, d, d)
    conv_v: object     # (k,)
    keep: object       # (..., M, 1) float key mask (None: all real)
    m: int
    allowed: object    # (..., N, M_c) bool slot visibility (None: all visible)
    local: object      # None, or (block b, q_pos (G, b), k_pos (G, b)) when local_block is used


def slot_ends(m, k, xp):
    """(M_c,) last position of each slot, (s + 1) k - 1 (beyond M - 1 for a partial last slot)."""
    n_slots = -(-m // k)
    return (xp.arange(n_slots) + 1) * k - 1


def slot_visibility(n, m, k, causal, xp):
    """(N, M_c) bool: slot s visible to query i (causal: complete, e_s = (s + 1) k - 1 <= i), or None
    when all are."""
    if not causal:
        return None
    return slot_ends(m, k, xp)[None, :] <= xp.arange(n)[:, None]


def _check(q, k, v, conv_k, conv_v, causal, key_mask, scale, local_block=None):
    n, m, d, dv = check_qkv(q, k, v, key_mask=key_mask)
    causal = check_bool("causal", causal)
    if causal and m != n:
        raise ValueError(f"causal=True needs self-attention (k of length N={n}), got M={m}")
    check_param("conv_k", conv_k, (None, d, d), dtype=q.dtype)
    ks = conv_k.shape[0]
    if ks < 1:
        raise ValueError(f"conv_k must have shape (k, {d}, {d}) with k >= 1, got {tuple(conv_k.shape)}")
    check_param("conv_v", conv_v, (ks,), dtype=q.dtype)
    scale = check_scale(scale, d)
    if local_block is not None:
        local_block = min(check_int("local_block", local_block), n)      # one block of N holds the sequence
        if m != n:
            raise ValueError(f"local_block needs self-attention (k of length N={n}), got M={m}")
    return n, m, d, dv, ks, causal, scale, local_block


def _compress(k, v, conv_k, conv_v, key_mask):
    """Zero masked positions, pad to whole slots and apply the strided convolutions.
    Returns kr (..., M_c, k d), vr (..., M_c, k, dv), K^c (..., M_c, d), V^c (..., M_c, dv), keep."""
    lead, (m, d), dv, ks = k.shape[:-2], k.shape[-2:], v.shape[-1], conv_k.shape[0]
    n_slots = -(-m // ks)
    keep = None
    if key_mask is not None:
        keep = key_mask[..., :, None].astype(k.dtype)                          # (..., M, 1)
        k, v = k * keep, v * keep                                              # masked positions contribute 0
    kr = pad_axis(k, n_slots * ks).reshape(lead + (n_slots, ks * d))           # (..., M_c, k d)
    vr = pad_axis(v, n_slots * ks).reshape(lead + (n_slots, ks, dv))           # (..., M_c, k, dv)
    # K^c_s = sum_o K_{sk+o} W^K_o
    kc = kr @ conv_k.reshape(ks * d, d)                                        # (..., M_c, k d) @ (k d, d) -> (..., M_c, d)
    # V^c_s = sum_o w^V_o V_{sk+o}
    vc = vr.swapaxes(-1, -2) @ conv_v                                          # (..., M_c, dv, k) @ (k,) -> (..., M_c, dv)
    return kr, vr, kc, vc, keep


@forward_of("memory_compressed")
def forward(q, k, v, *, conv_k, conv_v, causal=False, key_mask=None, scale=None, local_block=None):
    """Memory-compressed attention.

    q (..., N, d), k (..., M, d), v (..., M, dv); conv_k (k, d, d) and conv_v (k,) the
    compression parameters (k = compression factor, shared by all heads); key_mask
    (..., M) bool; causal needs M == N. ``local_block = b`` (optional, self-attention
    only; not in the paper, which alternates local and compressed *layers*): each query
    also attends to the raw keys of its own block of b positions (causal: those <= it),
    in the same softmax as the compressed slots. Returns out (..., N, dv) and a
    :class:`MemoryCompressedCache`.
    """
    n, m, d, dv, ks, causal, scale, local_block = _check(q, k, v, conv_k, conv_v, causal, key_mask, scale,
                                                         local_block)
    xp = get_namespace(q, k, v)
    lead = q.shape[:-2]
    n_slots = -(-m // ks)
    kr, vr, kc, vc, keep = _compress(k, v, conv_k, conv_v, key_mask)
    allowed = slot_visibility(n, m, ks, causal, xp)                            # (N, M_c) or None
    if key_mask is not None:
        real = pad_axis(key_mask, n_slots * ks, axis=-1, value=False)
        real = real.reshape(key_mask.shape[:-1] + (n_slots, ks)).any(axis=-1)  # (..., M_c): slot has a real key
        allowed = real[..., None, :] if allowed is None else allowed & real[..., None, :]
    if local_block is None:
        out, _, acache = attend_forward(q, kc, vc, allowed, scale)             # (..., N, dv)
        return out, MemoryCompressedCache(acache, kr, vr, conv_k, conv_v, keep, m, allowed, None)
    # one softmax per query block over [its own b raw keys | all M_c slots]
    b = local_block
    g = -(-n // b)
    qb = pad_axis(q, g * b).reshape(lead + (g, b, d))                          # (..., G, b, d)
    kb = pad_axis(k, g * b).reshape(lead + (g, b, d))                          # (..., G, b, d)
    vb = pad_axis(v, g * b).reshape(lead + (g, b, dv))                         # (..., G, b, dv)
    kb = xp.concatenate([kb, xp.broadcast_to(kc[..., None, :, :], lead + (g, n_slots, d))], axis=-2)
    vb = xp.concatenate([vb, xp.broadcast_to(vc[..., None, :, :], lead + (g, n_slots, dv))], axis=-2)
    pos = xp.arange(g * b).reshape(g, b)                                       # (G, b) query = key positions
    allowed_l = group_mask(pos, pos, n, n, causal=causal, key_mask=key_mask)   # (..., G, b, b)
    if allowed is None:
        allowed_c = xp.ones((g, b, n_slots), dtype=bool)
    else:
        allowed_c = xp.broadcast_to(allowed, allowed.shape[:-2] + (n, n_slots))  # (..., N, M_c), rows may have been 1
        allowed_c = pad_axis(allowed_c, g * b, axis=-2, value=False)           # padded query rows see nothing
        allowed_c = allowed_c.reshape(allowed_c.shape[:-2] + (g, b, n_slots))
    both = broadcast_shapes(tuple(allowed_l.shape[:-3]), tuple(allowed_c.shape[:-3]))
    allowed_g = xp.concatenate([xp.broadcast_to(allowed_l, both + (g, b, b)),
                                xp.broadcast_to(allowed_c, both + (g, b, n_slots))], axis=-1)  # (..., G, b, b + M_c)
    out, _, acache = attend_forward(qb, kb, vb, allowed_g, scale)              # (..., G, b, dv)
    out = out.reshape(lead + (g * b, dv))[..., :n, :]
    return out, MemoryCompressedCache(acache, kr, vr, conv_k, conv_v, keep, m, allowed, (b, pos, pos))


@backward_of("memory_compressed")
def backward(dout, cache):
    """Returns {"q", "k", "v", "conv_k", "conv_v"} (derivation in the module docstring)."""
    acache, kr, vr, conv_k, conv_v, keep, m, _, local = cache
    ks, d = conv_k.shape[0], conv_k.shape[-1]
    lead = kr.shape[:-2]
    n_slots, dv = vr.shape[-3], vr.shape[-1]
    if local is None:
        g = attend_backward(dout, acache)
        dq, dkc, dvc = g["q"], g["k"], g["v"]                                  # (..., N, d), (..., M_c, d), (..., M_c, dv)
        dk_local = dv_local = None
    else:
        b = local[0]
        n = dout.shape[-2]
        groups = acache.q.shape[-3]
        doutb = pad_axis(dout, groups * b).reshape(lead + (groups, b, dv))
        g = attend_backward(doutb, acache)
        dq = g["q"].reshape(lead + (groups * b, d))[..., :n, :]
        dk_local = g["k"][..., :b, :].reshape(lead + (groups * b, d))[..., :n, :]
        dv_local = g["v"][..., :b, :].reshape(lead + (groups * b, dv))[..., :n, :]
        dkc = g["k"][..., b:, :].sum(axis=-3)                                  # slots were shared by all blocks
        dvc = g["v"][..., b:, :].sum(axis=-3)
    # dW^K = sum over slots (and batch, heads) of K_slot^T dK^c
    dconv_k = (kr.reshape(-1, ks * d).T @ dkc.reshape(-1, d)).reshape(ks, d, d)
    dk = (dkc @ conv_k.reshape(ks * d, d).T).reshape(lead + (n_slots * ks, d))[..., :m, :]
    # dw^V_o = sum_s V_{sk+o} . dV^c_s
    dconv_v = (vr @ dvc[..., :, :, None]).reshape(-1, ks).sum(axis=0)        # (..., M_c, k, dv) @ (..., M_c, dv, 1)
    dv = (dvc[..., :, None, :] * conv_v[:, None]).reshape(lead + (n_slots * ks, dv))[..., :m, :]
    if dk_local is not None:
        dk, dv = dk + dk_local, dv + dv_local
    if keep is not None:
        dk, dv = dk * keep, dv * keep
    return {"q": dq, "k": dk, "v": dv, "conv_k": dconv_k, "conv_v": dconv_v}


@reads_cache("memory_compressed")
def weights(cache):
    """The (..., N, M) matrix W = P C with C_{s, sk+o} = w^V_o (zero at masked keys), plus the
    local block weights when local_block is used: out == W @ v."""
    p = cache.attend.p
    ks = cache.conv_v.shape[0]
    m = cache.m
    w_local = None
    if cache.local is not None:
        b, q_pos, k_pos = cache.local
        xp = get_namespace(p)
        lead, g = p.shape[:-3], p.shape[-3]
        w_local = dense_from_groups(p[..., :b], xp.clip(q_pos, 0, m - 1), xp.clip(k_pos, 0, m - 1), m, m)
        p = p[..., b:].reshape(lead + (g * b, p.shape[-1] - b))[..., :m, :]    # (..., N, M_c)
    w = (p[..., :, :, None] * cache.conv_v).reshape(p.shape[:-1] + (p.shape[-1] * ks,))[..., :m]
    if cache.keep is not None:
        w = w * cache.keep.swapaxes(-1, -2)                                    # (..., 1, M)
    return w if w_local is None else w + w_local


def reference(q, k, v, *, conv_k, conv_v, causal=False, key_mask=None, scale=None, local_block=None):
    """Dense oracle written from the definitions, one slot and one query at a time:
    compress slot by slot with explicit loops, build the visibility rule pair by pair,
    then dense masked softmax attention (:func:`effattn.nn.sparse.attend_forward` without
    groups, as in ``full``) on the compressed keys with that mask (with ``local_block``: on
    the raw keys followed by the compressed ones, one softmax)."""
    n, m, d, dv, ks, causal, scale, local_block = _check(q, k, v, conv_k, conv_v, causal, key_mask, scale,
                                                         local_block)
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
            last = (s + 1) * ks - 1                                           # causal: only complete slots
            visible[i, s] = (not causal) or last <= i
    mask = visible & real[..., None, :]
    if local_block is None:
        return attend_forward(q, kc, vc, mask, scale)[0]
    near = xp.zeros((n, m), dtype=bool)
    for i in range(n):
        for j in range(m):
            near[i, j] = j // local_block == i // local_block and ((not causal) or j <= i)
    if key_mask is not None:
        near = near & key_mask[..., None, :]
    lead_mask = broadcast_shapes(tuple(near.shape[:-2]), tuple(mask.shape[:-2]))
    mask = xp.concatenate([xp.broadcast_to(near, lead_mask + (n, m)), xp.broadcast_to(mask, lead_mask + (n, n_slots))],
                          axis=-1)
    keys = xp.concatenate([k, kc], axis=-2)                                    # (..., M + M_c, d)
    values = xp.concatenate([v, vc], axis=-2)
    return attend_forward(q, keys, values, mask, scale)[0]


def init_compression(rng, k, d, dtype="float64"):
    """Initial (learnable) parameters drawn on the host: conv_k (k, d, d) ~ N(0, 1 / (k d))
    (keeps K^c at unit scale) and conv_v (k,) = 1/k + N(0, 0.1^2) (close to mean pooling)."""
    conv_k = rng.standard_normal((k, d, d)) / (k * d) ** 0.5
    conv_v = 1.0 / k + 0.1 * rng.standard_normal(k)
    return {"conv_k": asarray(conv_k, dtype=dtype), "conv_v": asarray(conv_v, dtype=dtype)}


def setup(rng, *, n, d, heads, causal=False, dtype="float64", compression=None):
    """Compression factor k = ``compression`` if given, else 3 (the paper's) for short
    sequences, so that padding and partial slots are exercised, and 8 from n = 64 on (the
    N x N/k scores at N = 2048 then stay at 4 MiB in float64). Parameters shared by all heads;
    k is read from their shape, so one set of parameters serves every sequence length."""
    ks = (3 if n < 64 else 8) if compression is None else check_int("compression", compression)
    return init_compression(rng, ks, d, dtype=dtype), {}


# --------------------------------------------------------------------------- decoding
class MemoryCompressedState(NamedTuple):
    """What a decoder carries after t tokens (``t`` the next position): the completed slots and the
    raw rows of the positions [start, t) that a complete slot or the local block still needs."""

    kc: object           # (..., S, d) K^c of the S = floor(t / k) completed slots
    vc: object           # (..., S, dv) V^c of those slots
    slot_real: object    # (..., S) bool: the slot has a real (unmasked) key
    tail_k: object       # (..., L, d) raw keys of positions start .. t - 1
    tail_v: object       # (..., L, dv) raw values
    tail_real: object    # (..., L) bool: a real key
    start: int           # position of the first tail row
    t: int
    conv_k: object       # (k, d, d) configuration: the compression, the scale, the local block
    conv_v: object       # (k,)
    scale: float
    local_block: object  # None or b

    def held(self):
        """Numbers the state holds: S slots and L raw rows of d + dv + 1 numbers, per batch entry and head
        (the configuration conv_k, conv_v is not state)."""
        lead = math.prod(self.kc.shape[:-2])
        rows = self.kc.shape[-2] + self.tail_k.shape[-2]
        return lead * rows * (self.kc.shape[-1] + self.vc.shape[-1] + 1)


def _tail_start(t, ks, local_block):
    """The first position a query from t on needs raw: the start of t's incomplete slot, or of its
    local block if that is earlier."""
    start = (t // ks) * ks
    return start if local_block is None else min(start, (t // local_block) * local_block)


def init_state(*, lead, d, dv, dtype="float64", conv_k, conv_v, scale=None, local_block=None):
    """The empty decoder state (:class:`MemoryCompressedState`).

    After t tokens it holds the floor(t / k) completed slots K^c_s (d), V^c_s (dv) and their
    real-key bits, and the raw keys, values and mask bits of the positions from the start of
    the incomplete slot (or of the local block of b positions, if earlier) to t - 1: fewer
    than max(k, b) rows. Size (floor(t / k) + L) (d + dv + 1) numbers per batch entry and head,
    L < max(k, b): it grows as t / k (not bounded)."""
    xp = get_namespace()
    lead = tuple(int(x) for x in lead)
    d, dv = check_int("d", d), check_int("dv", dv)
    check_param("conv_k", conv_k, (None, d, d), dtype=dtype)
    ks = conv_k.shape[0]
    if ks < 1:
        raise ValueError(f"conv_k must have shape (k, {d}, {d}) with k >= 1, got {tuple(conv_k.shape)}")
    check_param("conv_v", conv_v, (ks,), dtype=dtype)
    if local_block is not None:
        local_block = check_int("local_block", local_block)
    empty = lambda *shape, dt=dtype: xp.zeros(lead + shape, dtype=dt)  # noqa: E731
    return MemoryCompressedState(empty(0, d), empty(0, dv), empty(0, dt=bool), empty(0, d), empty(0, dv),
                                 empty(0, dt=bool), 0, 0, conv_k, conv_v, check_scale(scale, d), local_block)


def _compress_rows(k, v, real, conv_k, conv_v):
    """The slots of whole blocks of raw rows k (..., S k, d), v (..., S k, dv), real (..., S k):
    K^c (..., S, d), V^c (..., S, dv), slot_real (..., S) (the forward's compression)."""
    ks = conv_k.shape[0]
    _, _, kc, vc, _ = _compress(k, v, conv_k, conv_v, real)
    slot_real = real.reshape(real.shape[:-1] + (real.shape[-1] // ks, ks)).any(axis=-1)
    return kc, vc, slot_real


def _finalise(state, t):
    """Compress the slots completed before position t (:func:`_compress_complete`) and drop the raw rows no
    query from t on needs; ``t`` becomes the state's position."""
    state = _compress_complete(state, t)
    start = _tail_start(t, state.conv_k.shape[0], state.local_block)
    cut = start - state.start
    return state._replace(tail_k=state.tail_k[..., cut:, :], tail_v=state.tail_v[..., cut:, :],
                          tail_real=state.tail_real[..., cut:], start=start, t=t)


def _compress_complete(state, t):
    """The state with every slot that ends before position t compressed (computed once, from the tail)."""
    xp = get_namespace(state.tail_k)
    ks = state.conv_k.shape[0]
    done = state.kc.shape[-2]                                                  # slots already compressed
    whole = t // ks                                                            # slots complete before t
    kc, vc, slot_real = state.kc, state.vc, state.slot_real
    if whole > done:
        a, b = done * ks - state.start, whole * ks - state.start               # their rows in the tail
        new = _compress_rows(state.tail_k[..., a:b, :], state.tail_v[..., a:b, :], state.tail_real[..., a:b],
                             state.conv_k, state.conv_v)
        kc = xp.concatenate([kc, new[0]], axis=-2)
        vc = xp.concatenate([vc, new[1]], axis=-2)
        slot_real = xp.concatenate([slot_real, new[2]], axis=-1)
    return state._replace(kc=kc, vc=vc, slot_real=slot_real)


def prefill(q, k, v, state, *, key_mask=None):
    """The first T tokens in one pass: out (..., T, dv), the rows of the causal :func:`forward`, and the
    state after them (the floor(T / k) complete slots compressed at once, the rest kept raw)."""
    state = check_state(state, MemoryCompressedState, "memory_compressed")
    if state.t != 0:
        raise ValueError(f"state must be fresh (from init_state) for prefill, this one is at position {state.t}")
    check_prompt(q, k, v, state.kc.shape[:-2], state.kc.shape[-1], state.vc.shape[-1])
    out, _ = forward(q, k, v, conv_k=state.conv_k, conv_v=state.conv_v, causal=True, key_mask=key_mask,
                     scale=state.scale, local_block=state.local_block)
    xp = get_namespace(q, k, v)
    lead, n = tuple(q.shape[:-2]), q.shape[-2]
    real = xp.ones(lead + (n,), dtype=bool) if key_mask is None else xp.broadcast_to(key_mask, lead + (n,))
    state = state._replace(tail_k=k, tail_v=v, tail_real=real)
    return out, _finalise(state, n)


def step(q_t, k_t, v_t, state, *, key_mask_t=None):
    """One token: out_t (..., dv), equal to row t of the causal :func:`forward`, and the new state.

    (k_t, v_t) join the raw tail; q_t attends, in one softmax, to the real raw keys of its own local
    block up to t (with ``local_block``) and to every completed slot with a real key; a slot that
    completes at t is compressed first (it is visible to t)."""
    state = check_state(state, MemoryCompressedState, "memory_compressed")
    xp = get_namespace(q_t, k_t, v_t)
    lead, d, dv = tuple(state.kc.shape[:-2]), state.kc.shape[-1], state.vc.shape[-1]
    check_step_inputs(q_t, k_t, v_t, key_mask_t, lead, d, dv)
    t = state.t
    real = xp.ones(lead + (1,), dtype=bool) if key_mask_t is None else xp.broadcast_to(key_mask_t, lead)[..., None]
    state = state._replace(tail_k=xp.concatenate([state.tail_k, k_t[..., None, :]], axis=-2),
                           tail_v=xp.concatenate([state.tail_v, v_t[..., None, :]], axis=-2),
                           tail_real=xp.concatenate([state.tail_real, real], axis=-1))
    state = _compress_complete(state, t + 1)                                   # the slot ending at t is visible to t
    keys, values, allowed = state.kc, state.vc, state.slot_real
    b = state.local_block
    if b is not None:                                                          # raw keys of t's block, j <= t
        a = (t // b) * b - state.start
        keys = xp.concatenate([state.tail_k[..., a:, :], keys], axis=-2)
        values = xp.concatenate([state.tail_v[..., a:, :], values], axis=-2)
        allowed = xp.concatenate([state.tail_real[..., a:], allowed], axis=-1)
    state = _finalise(state, t + 1)
    if keys.shape[-2] == 0:                                                    # before the first slot: an empty row
        return xp.zeros(lead + (dv,), dtype=q_t.dtype), state
    out, _, _ = attend_forward(q_t[..., None, :], keys, values, allowed[..., None, :], state.scale)
    return out[..., 0, :], state


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
    init_state=init_state,
    prefill=prefill,
    step=step,
    windows=("local_block",),
    summary="Keys and values shortened k times by a strided convolution; queries attend the N/k slots.",
))
