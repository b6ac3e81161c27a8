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

Memory: the forward keeps one N x M matrix (P, computed in place from S);
the backward adds one more (dP, overwritten by dS): peak two N x M arrays
per head plus the boolean mask if one is given.
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import get_namespace
from ..nn.decode import window_prefill, window_state, window_step
from ..nn.sparse import attend_backward, attend_forward, combine_masks
from ..validate import check_bool, check_qkv, check_scale
from ..registry import Mechanism, backward_of, forward_of, reads_cache, register


class FullCache(NamedTuple):
    attend: object   # AttendCache: q, k, v, P (..., N, M), out, scale
    allowed: object  # bool (..., N, M) or None: the combined mask


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
    allowed = combine_masks(n, m, xp, causal=causal, key_mask=key_mask, mask=mask, lead=q.shape[:-2])
    out, _, cache = attend_forward(q, k, v, allowed, scale)
    return out, FullCache(cache, allowed)


@backward_of("full")
def backward(dout, cache):
    """Returns {"q": dq, "k": dk, "v": dv}."""
    g = attend_backward(dout, cache.attend)
    return {"q": g["q"], "k": g["k"], "v": g["v"]}


@reads_cache("full")
def weights(cache):
    """The attention matrix P (..., N, M): out == P @ v."""
    return cache.attend.p


@reads_cache("full")
def pattern(cache):
    """Full attention's support: everything the masks allow."""
    p = cache.attend.p
    xp = get_namespace(p)
    if cache.allowed is None:
        return xp.ones(p.shape, dtype=bool)
    return xp.broadcast_to(cache.allowed, p.shape)


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
