"""Pooling along the sequence and its inverse, the upsampling: the Funnel Transformer's resolution steps.

Dai, Lai, Yang, Le, 2020, *Funnel-Transformer: Filtering out Sequential Redundancy for Efficient
Language Processing*, https://arxiv.org/abs/2006.03236, Section 2.2.

A pooling is a partition of the N positions into N' consecutive **groups**
(:func:`pool_groups`): stride s, so group r holds positions r s, ..., r s + s - 1 (the last
group may be shorter). With ``separate_cls=True`` position 0 (the [CLS] token) is a group of its
own and positions 1, ..., N - 1 are grouped by s, as the paper does ("we exclude the [CLS] from
the pooling operation"), so [CLS] keeps its resolution through every stage::

    N' = ceil(N / s)                 (separate_cls=False)
    N' = 1 + ceil((N - 1) / s)       (separate_cls=True)

The groups are an (N', s) integer array, -1 where a (shorter) group has no member. HF's
``FunnelModel`` pools the same groups when ``truncate_seq=False`` (with ``truncate_seq=True``,
its default, it drops the last position first so that N' = N / 2).

Masked pooling. With a key mask (True = real), a group pools over its **real** members only,
and a pooled position is real when any member is::

    mean:  y_r = sum_{i in G_r, real} x_i / |{i in G_r, real}|
    max:   y_r = max_{i in G_r, real} x_i       (per feature)
    mask'_r = any_{i in G_r} mask_i;            a group with no real member gives y_r = 0

so changing a masked input changes no pooled row (HF instead averages the padding in and pools
the mask with ``min``: a pooled position is real only if all its members are).

Backward: mean spreads dy_r / count over the real members; max sends dy_r (per feature) to the
first member holding the maximum (ties: the lower position). Upsampling (the decoder) repeats
each pooled row over its group, ``up(h)_i = h_{group(i)}``; its backward sums a group's rows.
Cost O(N D) time and memory; everything is a gather with the (N', s) index array.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from ..backend import get_namespace
from ..validate import check_choice, check_int

MODES = ("mean", "max")


def pooled_length(n, stride=2, separate_cls=False):
    """N' for N positions (see the module docstring)."""
    if separate_cls:
        return 1 + math.ceil((n - 1) / stride)
    return math.ceil(n / stride)


def pool_groups(n, stride=2, separate_cls=False, xp=None):
    """The groups of a pooling of n positions: int (N', stride), -1 where a group is short."""
    xp = get_namespace() if xp is None else xp
    n = check_int("n", n)
    stride = check_int("stride", stride)
    first = 1 if (separate_cls and n > 1) else 0
    rest = n - first
    g = -(-rest // stride)
    pos = first + xp.arange(g * stride).reshape(g, stride)
    groups = xp.where(pos < n, pos, -1)
    if first:
        cls = xp.full((1, stride), -1)
        cls[0, 0] = 0
        groups = xp.concatenate([cls, groups], axis=0)
    return groups.astype("int64")


def group_of(groups, n):
    """For each of the n positions, the index of its group: int (n,)."""
    xp = get_namespace(groups)
    out = xp.zeros(n, dtype="int64")
    valid = groups >= 0
    rows = xp.broadcast_to(xp.arange(groups.shape[0])[:, None], groups.shape)
    out[groups[valid]] = rows[valid]
    return out


class PoolCache(NamedTuple):
    idx: object      # (N', s) member positions, -1 clipped to 0
    valid: object    # bool (N', s): the slot holds a member
    w: object        # bool (..., N', s): real members
    count: object    # (..., N', 1) real members per group, >= 1
    arg: object      # max: (..., N', D) which member holds the maximum; mean: None
    n: int
    mode: str


def pool_forward(x, groups, *, key_mask=None, mode="mean"):
    """Pool x (..., N, D) by ``groups`` (N', s): (y (..., N', D), mask' (..., N') or None, PoolCache)."""
    xp = get_namespace(x)
    mode = check_choice("pool", mode, MODES)
    n = x.shape[-2]
    valid = groups >= 0
    idx = xp.where(valid, groups, 0)
    xg = x[..., idx, :]                                       # (..., N', s, D)
    w = valid if key_mask is None else valid & key_mask[..., idx]
    w = xp.broadcast_to(w, xg.shape[:-1])
    cnt = w.sum(axis=-1, keepdims=True)                       # (..., N', 1)
    mask = None if key_mask is None else cnt[..., 0] > 0
    if mode == "mean":
        c = xp.maximum(cnt, 1).astype(x.dtype)
        y = (xg * w[..., None]).sum(axis=-2) / c
        return y, mask, PoolCache(idx, valid, w, c, None, n, mode)
    xm = xp.where(w[..., None], xg, -xp.inf)
    arg = xm.argmax(axis=-2)                                  # (..., N', D)
    y = xp.take_along_axis(xg, arg[..., None, :], axis=-2)[..., 0, :]
    y = xp.where(cnt > 0, y, 0.0).astype(x.dtype, copy=False)
    return y, mask, PoolCache(idx, valid, w, cnt, arg, n, mode)


def pool_backward(dy, cache):
    """dx (..., N, D) of :func:`pool_forward`."""
    xp = get_namespace(dy)
    idx, valid, w, cnt, arg, n, mode = cache
    s = idx.shape[-1]
    if mode == "mean":
        dxg = dy[..., None, :] * (w / cnt)[..., None]         # (..., N', s, D)
    else:
        hit = (xp.arange(s)[:, None] == arg[..., None, :]) & (cnt > 0)[..., None]
        dxg = dy[..., None, :] * hit
    return _ungroup(dxg, idx, valid, n)


def _ungroup(dxg, idx, valid, n):
    """Put the rows of dxg (..., N', s, D) back at their positions: the groups partition the
    positions, so this is a plain assignment (no repeated index); the empty slots are dropped."""
    xp = get_namespace(dxg)
    lead = dxg.shape[:-3]
    sel = valid.reshape(-1)
    dx = xp.zeros(lead + (n, dxg.shape[-1]), dtype=dxg.dtype)
    dx[..., idx.reshape(-1)[sel], :] = dxg.reshape(lead + (-1, dxg.shape[-1]))[..., sel, :]
    return dx


def upsample_forward(h, groups, n):
    """up(h)_i = h_{group(i)}: h (..., N', D) -> (..., n, D); returns (y, cache)."""
    g = group_of(groups, n)
    return h[..., g, :], (groups, h.shape[-2])


def upsample_backward(dy, cache):
    """dh_r = sum over the members i of group r of dy_i."""
    xp = get_namespace(dy)
    groups, _ = cache
    valid = groups >= 0
    idx = xp.where(valid, groups, 0)
    return (dy[..., idx, :] * valid[..., None]).sum(axis=-2)
