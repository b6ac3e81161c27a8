"""Attention from synthetic logits: the softmax core the two Synthesizers share, and its backward.

Tay, Bahri, Metzler, Juan, Zhao, Zheng, 2020, *Synthesizer: Rethinking Self-Attention in
Transformer Models*, https://arxiv.org/abs/2005.00743

The Dense Synthesizer (:mod:`effattn.attention.synthesizer_dense`) predicts the logits B from
each token alone, the Random Synthesizer (:mod:`effattn.attention.synthesizer_random`) learns
them as a table; both then mix the values the same way:

    P = softmax(B)  with the masks applied,    Y = P G(X),    G(X) = v here

``causal`` masks j > i, ``key_mask`` masks columns; a fully masked row gives output 0 and zero
gradients. The logits are NOT scaled by 1/sqrt(d) (they are not dot products).

Backward (softmax as in :mod:`effattn.nn.functional`):

    dV = P^T dY,   dP = dY V^T,   dB = P * (dP - rowsum(dY * Y))

and each Synthesizer takes dB back into its own parameters.
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import get_namespace
from .functional import softmax_backward, softmax_forward
from .sparse import combine_masks


class SynthesizerCache(NamedTuple):
    kind: str        # "dense", "dense_factorized", "random", "random_factorized"
    p: object        # (..., N, M) softmax weights
    v: object        # (..., M, dv)
    out: object      # (..., N, dv)
    saved: object    # what the logits' backward needs (dense: the MLP cache)
    params: dict     # the parameters used
    n: int
    m: int
    d: int


def attend_logits(logits, v, *, causal=False, key_mask=None):
    """P = softmax(B) with the masks, Y = P v.

    logits B (..., N, M) (overwritten: the softmax is computed in place), v (..., M, dv),
    key_mask (..., M) bool. Returns P (..., N, M) and Y (..., N, dv)."""
    xp = get_namespace(logits, v)
    n, m = logits.shape[-2:]
    allowed = combine_masks(n, m, xp, causal=causal, key_mask=key_mask)
    p, _, _ = softmax_forward(logits, allowed, inplace=True)            # (..., N, M)
    out = p @ v                                                         # (..., N, M) @ (..., M, dv) -> (..., N, dv)
    return p, out


def attend_logits_backward(dout, cache):
    """The backward of :func:`attend_logits` from a :class:`SynthesizerCache`.

    Returns dB (..., N, M) and the gradients {"q", "k", "v"} as far as the attention goes:
    dV = P^T dY, and zeros for q and k (the attention never reads them; the dense
    synthesizer adds its logits' gradient into q)."""
    xp = get_namespace(dout)
    p, v = cache.p, cache.v
    dv = p.swapaxes(-1, -2) @ dout                                      # dV = P^T dY
    dp = dout @ v.swapaxes(-1, -2)                                      # dP = dY V^T (..., N, M)
    rowdot = (dout * cache.out).sum(axis=-1, keepdims=True)
    db = softmax_backward(dp, (p, -1), rowdot=rowdot, inplace=True)     # dB = P * (dP - rowsum(dY * Y))
    lead = tuple(dout.shape[:-2])
    grads = {"q": xp.zeros(lead + (cache.n, cache.d), dtype=dout.dtype),
             "k": xp.zeros(lead + (cache.m, cache.d), dtype=dout.dtype), "v": dv}
    return db, grads


__all__ = ["SynthesizerCache", "attend_logits", "attend_logits_backward"]
