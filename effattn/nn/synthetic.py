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

Decoding (the protocol of :mod:`effattn.nn.decode`): row t of the causal logits covers the keys
j <= t only, and neither Synthesizer reads k, so the state (:class:`SyntheticState`) keeps the
values v_j and whether each token is a real key: t (dv + 1) numbers per head, growing with t
(the logits themselves come from the parameters: an O(N_max) row per step). Each mechanism gives
``logits_row(q_t, t)`` (..., t + 1); :func:`synthetic_step` appends v_t, takes the masked softmax
of that row and mixes the held values, O(t dv + the row); :func:`synthetic_prefill` runs the
causal parallel forward over the prompt and keeps its values.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

from ..backend import get_namespace
from .decode import MIN_CAPACITY, check_state, check_step_inputs
from .functional import softmax_backward, softmax_forward
from .decode import check_prompt
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


# --------------------------------------------------------------------------- decoding
class SyntheticState(NamedTuple):
    """The decoder state of a Synthesizer after ``t`` tokens: rows [0, t) of the buffers are held
    (they double when full)."""

    v: object              # (..., cap, dv) the values of every token so far
    real: object           # (..., cap) bool: a real (unmasked) key
    t: int
    d: int                 # the query size q_t must have
    name: str              # the mechanism that made it
    logits_row: Callable   # (q_t (..., d), t) -> (..., t + 1): the logits of row t over the keys j <= t
    forward: Callable      # (q, k, v, key_mask) -> out: the causal parallel forward, for prefill

    def held(self):
        """Numbers the state needs: t (dv + 1) per (batch, head) -- values and mask bits."""
        return math.prod(self.v.shape[:-2]) * self.t * (self.v.shape[-1] + 1)


def synthetic_init_state(*, lead, d, dv, dtype, name, logits_row, forward, xp=None):
    """An empty :class:`SyntheticState` for inputs with leading axes ``lead`` (batch, heads)."""
    xp = get_namespace() if xp is None else xp
    lead = tuple(int(x) for x in lead)
    v = xp.zeros(lead + (MIN_CAPACITY, dv), dtype=dtype)
    return SyntheticState(v, xp.zeros(lead + (MIN_CAPACITY,), dtype=bool), 0, int(d), name, logits_row, forward)


def _append(state, v, real):
    """Rows v (..., T, dv), real (..., T) after the held ones (buffers doubled until they fit)."""
    xp = get_namespace(state.v)
    t, n_new = state.t, v.shape[-2]
    vb, rb = state.v, state.real
    cap = vb.shape[-2]
    if t + n_new > cap:
        while cap < t + n_new:
            cap *= 2
        lead = vb.shape[:-2]
        vb = xp.concatenate([vb[..., :t, :], xp.zeros(lead + (cap - t, vb.shape[-1]), dtype=vb.dtype)], axis=-2)
        rb = xp.concatenate([rb[..., :t], xp.zeros(lead + (cap - t,), dtype=bool)], axis=-1)
    vb[..., t:t + n_new, :] = v
    rb[..., t:t + n_new] = real
    return state._replace(v=vb, real=rb, t=t + n_new)


def _check(state, name):
    check_state(state, SyntheticState, name)
    if state.name != name:
        raise TypeError(f"state must come from {name}.init_state (or a previous step), got one of {state.name}")
    return state


def synthetic_prefill(q, k, v, state, *, key_mask=None, name):
    """The prompt (..., T, .) in one pass: its rows from the causal parallel forward, and its
    values and mask bits into the state (which must be fresh). Returns (out (..., T, dv), state)."""
    _check(state, name)
    if state.t != 0:
        raise ValueError(f"prefill needs a fresh state (from init_state), this one is at position {state.t}")
    lead, dv = tuple(state.v.shape[:-2]), state.v.shape[-1]
    check_prompt(q, k, v, lead, state.d, dv)
    out = state.forward(q, k, v, key_mask)
    xp = get_namespace(v)
    n = v.shape[-2]
    real = xp.ones(lead + (n,), dtype=bool) if key_mask is None else xp.broadcast_to(key_mask, lead + (n,))
    return out, _append(state, v, real)


def synthetic_step(q_t, k_t, v_t, state, *, key_mask_t=None, name):
    """One token: append v_t, then out_t = softmax(logits_row(q_t, t) over the real keys j <= t) V.
    Returns (out_t (..., dv), state)."""
    _check(state, name)
    lead, dv = tuple(state.v.shape[:-2]), state.v.shape[-1]
    check_step_inputs(q_t, k_t, v_t, key_mask_t, lead, state.d, dv)
    if v_t.dtype != state.v.dtype:
        raise ValueError(f"v_t must have the state's dtype {state.v.dtype}, got {v_t.dtype}")
    xp = get_namespace(q_t, k_t, v_t)
    t = state.t
    logits = state.logits_row(q_t, t)                                    # (..., t + 1)
    real = xp.ones(lead + (1,), dtype=bool) if key_mask_t is None else xp.broadcast_to(key_mask_t, lead)[..., None]
    state = _append(state, v_t[..., None, :], real)
    allowed = state.real[..., :t + 1]
    p, _, _ = softmax_forward(xp.broadcast_to(logits, lead + (t + 1,)).copy(), allowed, inplace=True)
    out = (p[..., None, :] @ state.v[..., :t + 1, :])[..., 0, :]        # (..., 1, t+1) @ (..., t+1, dv)
    return out, state


__all__ = ["SynthesizerCache", "SyntheticState", "attend_logits", "attend_logits_backward", "synthetic_init_state",
           "synthetic_prefill", "synthetic_step"]
