"""Full (dense) scaled dot-product attention — the reference every exact mechanism is compared with.

Vaswani et al., 2017, *Attention Is All You Need*, https://arxiv.org/abs/1706.03762

Intuition: every query compares itself with every key; the softmax of the
scaled similarities weighs the values. Cost O(N M d) time and O(N M) memory —
the quadratic bottleneck the whole survey is about.

    S = Q K^T / sqrt(d)                     (..., N, M)
    P = softmax(S + log mask)               masked entries get exactly zero weight
    O = P V                                 (..., N, dv)

Backward (derived in :mod:`effattn.nn.sparse`):

    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),
    dQ = dS K / sqrt(d),  dK = dS^T Q / sqrt(d)

Masks: ``causal`` (query i sees keys j <= i), ``key_mask`` (..., M) (True =
real token), and ``mask``, any boolean array broadcastable to (..., N, M)
(True = may attend). They combine with AND. A query with no allowed key gets
an output of zeros and zero gradients (never NaN).

Peer mapping (PyTorch 2.13 ``torch.nn.functional.scaled_dot_product_attention``, fixtures
``full__torch_sdpa__*``): q, k, v as they are, ``is_causal`` = ``causal``, a boolean
``attn_mask`` (B, 1, 1, M) = ``key_mask`` (B, 1, M) (or ``mask``), the same default scale; out and
gradients agree to 2e-15 (a row with no allowed key gives zeros in both, in that version).

Causal attention by row blocks: with ``causal=True`` and no general ``mask``, the queries are
taken ``CAUSAL_BLOCK`` rows at a time, and the block of rows [i0, i1) is multiplied only against
the keys [0, i1) it can see (the tiles above the diagonal are never computed); the causal mask
touches only the block's diagonal square (``attend_forward(..., diagonal=i0)``). The work is
(1 + 1/nb) / 2 of the non-causal one for nb blocks, and the results are those of the dense masked
formula (each row's softmax sees the same keys; the skipped keys had weight exactly zero).

Memory: the forward keeps one N x M matrix (P, computed in place from S; about half of it when
causal); the backward adds one more (dP, overwritten by dS) one row block at a time when causal:
peak two N x M arrays per head plus the boolean mask if one is given.
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import get_namespace
from ..nn.decode import window_prefill, window_state, window_step
from ..nn.sparse import attend_backward, attend_forward, combine_masks
from ..validate import check_bool, check_qkv, check_scale
from ..registry import Mechanism, backward_of, forward_of, reads_cache, register


CAUSAL_BLOCK = 256  # query rows per block of the causal path (a constant: the result does not depend on it)


class FullCache(NamedTuple):
    parts: tuple     # ((i0, AttendCache), ...): rows [i0, i0 + bq) against keys [0, bk) of each part
    allowed: object  # bool (..., N, M) or None: the combined mask of the dense path
    causal: bool     # True for the row-block path (causal, no general mask)
    key_mask: object  # (..., M) bool or None, as given (the row-block path's pattern)
    n: int
    m: int

    @property
    def attend(self):
        """The dense path's AttendCache (q, k, v, e, rz, out, scale; ``.p`` the weights); for the
        row-block path with several blocks, a view whose ``.p`` assembles the (..., N, M) weights."""
        if len(self.parts) == 1 and self.parts[0][1].e.shape[-1] == self.m:
            return self.parts[0][1]
        return _BlockWeights(self)


class _BlockWeights(NamedTuple):
    cache: FullCache

    @property
    def p(self):
        """P (..., N, M) of the row blocks, zeros above the diagonal (allocated on each access)."""
        c = self.cache
        first = c.parts[0][1]
        xp = get_namespace(first.e)
        p = xp.zeros(first.e.shape[:-2] + (c.n, c.m), dtype=first.e.dtype)
        for i0, part in c.parts:
            bq, bk = part.e.shape[-2:]
            p[..., i0:i0 + bq, :bk] = part.p
        return p


@forward_of("full")
def forward(q, k, v, *, causal=False, key_mask=None, mask=None, scale=None):
    """Dense softmax attention.

    q (..., N, d), k (..., M, d), v (..., M, dv); key_mask (..., M) bool;
    mask bool broadcastable to (..., N, M); scale defaults to d ** -0.5.
    Returns out (..., N, dv) in the dtype of q, and a :class:`FullCache`.
    """
    n, m, d, _ = check_qkv(q, k, v, key_mask=key_mask)
    causal = check_bool("causal", causal)
    scale = check_scale(scale, d)
    xp = get_namespace(q, k, v)
    if causal and mask is None:
        return _causal_forward(q, k, v, key_mask, scale, xp)
    allowed = combine_masks(n, m, xp, causal=causal, key_mask=key_mask, mask=mask, lead=q.shape[:-2])
    out, _, cache = attend_forward(q, k, v, allowed, scale)
    return out, FullCache(((0, cache),), allowed, False, key_mask, n, m)


def _causal_forward(q, k, v, key_mask, scale, xp):
    """Causal attention, CAUSAL_BLOCK query rows at a time: rows [i0, i1) see keys [0, min(i1, M))."""
    n, m = q.shape[-2], k.shape[-2]
    outs, parts = [], []
    for i0 in range(0, n, CAUSAL_BLOCK):
        i1 = min(i0 + CAUSAL_BLOCK, n)
        kend = min(i1, m)                                       # the last key any row of the block sees
        allowed = None if key_mask is None else key_mask[..., None, :kend]   # (..., 1, kend)
        out, _, cache = attend_forward(q[..., i0:i1, :], k[..., :kend, :], v[..., :kend, :], allowed, scale,
                                       diagonal=i0)
        outs.append(out)
        parts.append((i0, cache))
    out = outs[0] if len(outs) == 1 else xp.concatenate(outs, axis=-2)
    return out, FullCache(tuple(parts), None, True, key_mask, n, m)


@backward_of("full")
def backward(dout, cache):
    """Returns {"q": dq, "k": dk, "v": dv}; the row-block path adds each block's dK, dV into the
    keys it saw."""
    if len(cache.parts) == 1 and not cache.causal:
        g = attend_backward(dout, cache.parts[0][1])
        return {"q": g["q"], "k": g["k"], "v": g["v"]}
    xp = get_namespace(dout)
    first = cache.parts[0][1]
    lead = dout.shape[:-2]
    dk = xp.zeros(lead + (cache.m, first.k.shape[-1]), dtype=dout.dtype)
    dv = xp.zeros(lead + (cache.m, first.v.shape[-1]), dtype=dout.dtype)
    dqs = []
    for i0, part in cache.parts:
        bq, bk = part.e.shape[-2:]
        g = attend_backward(dout[..., i0:i0 + bq, :], part)
        dqs.append(g["q"])
        dk[..., :bk, :] += g["k"]
        dv[..., :bk, :] += g["v"]
    dq = dqs[0] if len(dqs) == 1 else xp.concatenate(dqs, axis=-2)
    return {"q": dq, "k": dk, "v": dv}


@reads_cache("full")
def weights(cache):
    """The attention matrix P (..., N, M): out == P @ v."""
    return cache.attend.p


@reads_cache("full")
def pattern(cache):
    """Full attention's support: everything the masks allow."""
    first = cache.parts[0][1]
    xp = get_namespace(first.e)
    shape = first.e.shape[:-2] + (cache.n, cache.m)
    allowed = cache.allowed
    if cache.causal:
        allowed = combine_masks(cache.n, cache.m, xp, causal=True, key_mask=cache.key_mask)
    if allowed is None:
        return xp.ones(shape, dtype=bool)
    return xp.broadcast_to(allowed, shape)


def setup(rng, *, n, d, heads, causal=False, dtype="float64"):
    """Full attention has no parameters and no configuration."""
    return {}, {}


# --------------------------------------------------------------------------- decoding
def init_state(*, lead, d, dv, dtype="float64", scale=None):
    """The KV cache (:class:`effattn.nn.decode.WindowState`): every key is kept, so the state
    grows by d + dv numbers per token and head -- the cost the efficient mechanisms avoid."""
    scale = check_scale(scale, d)
    return window_state(lead=lead, d=d, dv=dv, dtype=dtype, scale=scale,
                        reach=lambda i, pos: pos <= i, keep=lambda t, pos: pos >= 0,
                        forward=lambda q, k, v, km: forward(q, k, v, causal=True, key_mask=km, scale=scale)[0])


prefill = window_prefill
step = window_step


MECHANISM = register(Mechanism(
    name="full",
    title="Full attention (Transformer)",
    citation="Vaswani et al., 2017",
    url="https://arxiv.org/abs/1706.03762",
    classes=("TR",),
    complexity="O(N^2)",
    causal=True,
    exact=True,
    kind="kernel",
    notebook="00_background",
    forward=forward,
    backward=backward,
    weights=weights,
    setup=setup,
    pattern=pattern,
    init_state=init_state,
    prefill=prefill,
    step=step,
    subquadratic=False,
    summary="Dense scaled dot-product attention: the reference for every exact mechanism.",
))
