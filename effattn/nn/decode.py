"""Decoding one token at a time: the state a causal mechanism carries, and the KV-window state
shared by the exact mechanisms.

The protocol (DESIGN.md, "Decode steps") that every causal mechanism offers::

    state = init_state(lead=(B, H), d=d, dv=dv, dtype="float64", **config)
    out, state = prefill(q, k, v, state, key_mask=None)      # the first T tokens, in one pass
    out_t, state = step(q_t, k_t, v_t, state, key_mask_t=None)  # then one token at a time

``config`` is what the mechanism's ``forward`` takes besides q, k, v, ``causal`` and
``key_mask`` (sizes, random draws, learned parameters). ``prefill`` on a fresh state returns the
rows of the causal parallel forward over the prompt; each ``step`` returns the next row
(q_t, k_t (..., d), v_t (..., dv); ``key_mask_t`` (...) says whether token t is a real key).
Stepping equals the causal parallel forward (``tests/test_contract.py``,
``test_stepping_equals_the_causal_forward``). A state is consumed by the call that is given it:
use the returned one (buffers may be reused in place).

**The KV window** (:class:`WindowState`): an exact mechanism decodes by keeping the keys and
values of the positions its pattern can still reach, and attending from token t to those its
rule allows. It supplies two functions of positions:

    reach(i, pos) -> bool, broadcastable to lead + (L,):  may query i attend key pos[l]?
    keep(t, pos)  -> bool (L,):  may some query i >= t still attend key pos[l]?

Full attention keeps every key (the KV cache, growing with t); a local window keeps a bounded
band; a strided pattern keeps every l-th key. Rows are appended to buffers that double when
full, and rows no future query can reach are dropped once they are half of what is held, so a
step costs O(L (d + dv)) amortised, L the rows held.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

from ..backend import get_namespace
from ..validate import check_float_array
from .functional import softmax_forward

MIN_CAPACITY = 16


class WindowState(NamedTuple):
    """The KV window of an exact mechanism (see the module docstring). Rows [0, count) of the
    buffers are held; ``t`` is the position of the next token."""

    k: object            # (..., cap, d) keys
    v: object            # (..., cap, dv) values
    real: object         # (..., cap) bool: a real (unmasked) key
    pos: object          # (cap,) int positions of the rows
    count: int
    t: int
    reach: Callable
    keep: Callable
    scale: float
    forward: Callable    # (q, k, v, key_mask) -> out: the causal parallel forward, for prefill
    capacity: object = None   # the most positions the rule is defined for (a grid's cells), or None

    def held(self):
        """Numbers the state needs: keys, values and mask bits of the rows a later query can still
        reach (the buffers hold at most twice that, plus MIN_CAPACITY rows, before they are compacted)."""
        lead = math.prod(self.k.shape[:-2])
        rows = int(self.keep(self.t, self.pos[:self.count]).sum())
        return rows * lead * (self.k.shape[-1] + self.v.shape[-1] + 1)


def state_size(state):
    """How many numbers a decoder state holds (its ``held()`` if it has one, else the sizes of
    every array in it, found through tuples, lists and dicts)."""
    if hasattr(state, "held"):
        return int(state.held())
    if hasattr(state, "shape") and hasattr(state, "dtype"):
        return int(math.prod(state.shape))
    if isinstance(state, dict):
        return sum(state_size(x) for x in state.values())
    if isinstance(state, (tuple, list)):
        return sum(state_size(x) for x in state)
    return 0


def window_state(*, lead, d, dv, dtype, reach, keep, scale, forward, capacity=None, xp=None):
    """An empty :class:`WindowState` for inputs with leading axes ``lead`` (batch, heads);
    ``capacity``: the most positions the rule is defined for (e.g. an image's H W cells)."""
    xp = get_namespace() if xp is None else xp
    lead = tuple(int(x) for x in lead)
    cap = MIN_CAPACITY
    return WindowState(xp.zeros(lead + (cap, d), dtype=dtype), xp.zeros(lead + (cap, dv), dtype=dtype),
                       xp.zeros(lead + (cap,), dtype=bool), xp.zeros(cap, dtype=xp.int64), 0, 0,
                       reach, keep, float(scale), forward, capacity)


def check_step_inputs(q_t, k_t, v_t, key_mask_t, lead, d, dv):
    """q_t, k_t (*lead, d), v_t (*lead, dv), key_mask_t None or bool broadcastable to lead."""
    for name, x, last in (("q_t", q_t, d), ("k_t", k_t, d), ("v_t", v_t, dv)):
        check_float_array(name, x)
        if tuple(x.shape) != tuple(lead) + (last,):
            raise ValueError(f"{name} must have shape {tuple(lead) + (last,)} (the state's), got {tuple(x.shape)}")
    if key_mask_t is not None:
        if not hasattr(key_mask_t, "dtype") or key_mask_t.dtype.kind != "b":
            raise ValueError(f"key_mask_t must be a boolean array (True = real token), got "
                             f"{getattr(key_mask_t, 'dtype', type(key_mask_t).__name__)}")
        get_namespace(key_mask_t).broadcast_to(key_mask_t, tuple(lead))


def check_prompt(q, k, v, lead, d, dv):
    """A prompt for ``prefill``: q, k (*lead, T, d), v (*lead, T, dv) with the state's sizes
    (the arrays themselves are checked by the mechanism's forward)."""
    for name, x, last in (("q", q, d), ("k", k, d), ("v", v, dv)):
        if not hasattr(x, "shape"):
            raise TypeError(f"{name} must be an array (numpy or cupy), got {type(x).__name__}")
        if x.ndim < 2 or tuple(x.shape[:-2]) != tuple(lead) or x.shape[-1] != last:
            raise ValueError(f"{name} must have shape {tuple(lead) + ('T', last)} (the state's), got {tuple(x.shape)}")


def _check_room(state, n_new, name):
    if state.capacity is not None and state.t + n_new > state.capacity:
        raise ValueError(f"{name} brings {n_new} token(s) at position {state.t}, beyond the {state.capacity} "
                         f"positions the mechanism's rule is defined for")


def check_state(state, kind, name):
    if not isinstance(state, kind):
        raise TypeError(f"state must come from {name}.init_state (or a previous step), got {type(state).__name__}")
    return state


def _append(state, k, v, real, pos):
    """Rows k (..., T, d), v (..., T, dv), real (..., T), pos (T,) added after the held ones."""
    xp = get_namespace(state.k)
    n_new = pos.shape[0]
    cap = state.k.shape[-2]
    need = state.count + n_new
    kb, vb, rb, pb = state.k, state.v, state.real, state.pos
    if need > cap:                                                   # double until it fits
        new_cap = max(cap, MIN_CAPACITY)
        while new_cap < need:
            new_cap *= 2
        lead = kb.shape[:-2]
        grow = lambda a, shape: xp.concatenate([a, xp.zeros(shape, dtype=a.dtype)], axis=-2 if a.ndim > 1 else 0)  # noqa: E731
        kb = grow(kb, lead + (new_cap - cap, kb.shape[-1]))
        vb = grow(vb, lead + (new_cap - cap, vb.shape[-1]))
        rb = xp.concatenate([rb, xp.zeros(lead + (new_cap - cap,), dtype=bool)], axis=-1)
        pb = xp.concatenate([pb, xp.zeros(new_cap - cap, dtype=pb.dtype)])
    c = state.count
    kb[..., c:need, :] = k
    vb[..., c:need, :] = v
    rb[..., c:need] = real
    pb[c:need] = pos
    return state._replace(k=kb, v=vb, real=rb, pos=pb, count=need)


def _evict(state):
    """Drop the rows no query from ``state.t`` on can reach, once they are half of those held."""
    held = state.count
    alive = state.keep(state.t, state.pos[:held])
    dead = held - int(alive.sum())
    if dead <= max(MIN_CAPACITY, held // 2):
        return state
    xp = get_namespace(state.k)
    idx = xp.nonzero(alive)[0]
    m = idx.shape[0]
    k, v, real, pos = state.k, state.v, state.real, state.pos
    k[..., :m, :] = k[..., idx, :]
    v[..., :m, :] = v[..., idx, :]
    real[..., :m] = real[..., idx]
    pos[:m] = pos[idx]
    return state._replace(count=m)


def window_prefill(q, k, v, state, *, key_mask=None):
    """The first T tokens: out (..., T, dv) from the causal parallel forward; every key a later
    query can reach goes into the window."""
    check_state(state, WindowState, "the mechanism")
    if state.t != 0:
        raise ValueError(f"prefill needs a fresh state (from init_state), this one is at position {state.t}")
    check_prompt(q, k, v, state.k.shape[:-2], state.k.shape[-1], state.v.shape[-1])
    _check_room(state, q.shape[-2], "q")
    out = state.forward(q, k, v, key_mask)
    xp = get_namespace(q, k, v)
    n = q.shape[-2]
    lead = state.k.shape[:-2]
    real = xp.ones(lead + (n,), dtype=bool) if key_mask is None else xp.broadcast_to(key_mask, lead + (n,))
    pos = xp.arange(n)
    alive = state.keep(n, pos)
    idx = xp.nonzero(alive)[0]
    state = _append(state, k[..., idx, :], v[..., idx, :], real[..., idx], pos[idx])
    return out, state._replace(t=n)


def window_step(q_t, k_t, v_t, state, *, key_mask_t=None):
    """One token: append (k_t, v_t), attend from q_t to the held keys its rule allows, drop what
    no later query can reach. Returns out_t (..., dv) and the state."""
    check_state(state, WindowState, "the mechanism")
    lead = tuple(state.k.shape[:-2])
    d, dv = state.k.shape[-1], state.v.shape[-1]
    check_step_inputs(q_t, k_t, v_t, key_mask_t, lead, d, dv)
    _check_room(state, 1, "q_t")
    xp = get_namespace(q_t, k_t, v_t)
    t = state.t
    real = xp.ones(lead + (1,), dtype=bool) if key_mask_t is None else xp.broadcast_to(key_mask_t, lead)[..., None]
    state = _append(state, k_t[..., None, :], v_t[..., None, :], real, xp.asarray([t]))
    held = state.count
    kk, vv = state.k[..., :held, :], state.v[..., :held, :]
    allowed = state.reach(t, state.pos[:held]) & state.real[..., :held]          # (..., L)
    s = (kk @ q_t[..., :, None])[..., 0] * state.scale                           # (..., L)
    p, _, _ = softmax_forward(s, xp.broadcast_to(allowed, s.shape), inplace=True)
    out = (p[..., None, :] @ vv)[..., 0, :]                                      # (..., dv)
    return out, _evict(state._replace(t=t + 1))


__all__ = ["WindowState", "check_prompt", "check_state", "check_step_inputs", "state_size", "window_prefill",
           "window_state", "window_step"]
