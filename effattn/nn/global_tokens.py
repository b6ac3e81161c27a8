"""Global tokens: the few positions that see, and are seen by, every token.

Shared by the combination-of-patterns mechanisms (survey classes FP + M), which put a cheap
local pattern next to a few *global* positions: Longformer's task-chosen global positions
(:mod:`effattn.attention.longformer`), ETC's global input (:mod:`effattn.attention.etc`) and
BigBird's global blocks (:mod:`effattn.attention.bigbird`). Each of them

- validates a set of global indices (positions or blocks): :func:`index_set`, and marks them in
  a boolean vector: :func:`membership`;
- appends the g global keys to the keys of every query group (block) of the banded part:
  :func:`global_keys`, whose adjoint :func:`global_keys_backward` sums the group gradients back;
- computes the g global *rows* densely, a (g x M) masked softmax attention over every key:
  :func:`global_rows_forward` (its backward is :func:`effattn.nn.sparse.attend_backward`).

Shapes: ``x (..., g, f)`` the global rows of keys or values; ``G`` query groups; ``key_mask
(..., M)`` bool. Cost: the global keys are a broadcast view (no copy until concatenated), the
global rows O(g M d) time and O(g M) memory.
"""
from __future__ import annotations

from ..backend import get_namespace
from .sparse import attend_forward


def index_set(name, value, size, *, expected, bound):
    """Sorted unique indices in [0, size) as a tuple of ints, from a sequence (or an array).

    ``expected`` says what ``name`` should be and ``bound`` names ``size`` in the error
    messages ("global_positions must lie in [0, N=16), got [16]")."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    try:
        idx = sorted({int(x) for x in value})
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {expected}, got {value!r}") from None
    bad = [x for x in idx if not 0 <= x < size]
    if bad:
        raise ValueError(f"{name} must lie in [0, {bound}={size}), got {bad}")
    return tuple(idx)


def membership(idx, size, xp):
    """Boolean (size,) vector, True at the indices ``idx`` (a sequence of ints in [0, size))."""
    is_in = xp.zeros(size, dtype=bool)
    is_in[xp.asarray(idx, dtype=xp.int64)] = True
    return is_in


def global_keys(x, groups):
    """The global rows ``x (..., g, f)`` repeated for each of ``groups`` query groups:
    (..., G, g, f), a broadcast view (concatenate it with the group's own keys)."""
    xp = get_namespace(x)
    return xp.broadcast_to(x[..., None, :, :], tuple(x.shape[:-2]) + (groups,) + tuple(x.shape[-2:]))


def global_keys_backward(dg):
    """Adjoint of :func:`global_keys`: dg (..., G, g, f) -> (..., g, f), the sum over the groups."""
    return dg.sum(axis=-3)


def global_rows_forward(q_rows, k, v, allowed=None, *, key_mask=None, scale, bias=None):
    """Dense attention of the g global query rows over every key.

    q_rows (..., g, d), k (..., M, d), v (..., M, dv); allowed bool broadcastable to (..., g, M)
    (None = all), ANDed with key_mask (..., M); bias optional additive logits (..., g, M).
    Returns out (..., g, dv), lse, and the :class:`effattn.nn.sparse.AttendCache`."""
    if key_mask is not None:
        km = key_mask[..., None, :]                                   # (..., 1, M)
        allowed = km if allowed is None else allowed & km
    return attend_forward(q_rows, k, v, allowed, scale, bias=bias)
