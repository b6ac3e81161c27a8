"""Neighbouring blocks by slicing: the window gather (and its scatter) of Longformer, ETC and BigBird.

An array already cut into blocks, ``xb (..., G, b, f)``, is padded with
``before`` blocks in front and ``after`` blocks behind (filled with ``fill``)
and the ``C = before + 1 + after`` shifted views ``xp[..., s:s+G, :, :]`` are
concatenated along the row axis:

    neighbour_blocks(xb, before, after)          -> (..., G, C b, f)
        row block s of group c is block c - before + s (``fill`` outside 0..G-1)
    neighbour_blocks_backward(g, before, after)  -> (..., G, b, f)
        the adjoint: every piece is added back into the same shifted slice,
        so overlapping windows accumulate without ``add.at``.

The backward of a gather is a scatter-add; because each of the ``C`` pieces
is one basic slice, the scatter is ``C`` slice additions (O(G b f) each).
"""
from __future__ import annotations

from ..backend import get_namespace


def neighbour_blocks(xb, before, after, fill=0):
    """xb (..., G, b, f) -> (..., G, (before + 1 + after) b, f): blocks c-before .. c+after of each c."""
    xp = get_namespace(xb)
    g = xb.shape[-3]
    pad = [(0, 0)] * xb.ndim
    pad[-3] = (before, after)
    padded = xp.pad(xb, pad, constant_values=fill)                              # (..., G + before + after, b, f)
    pieces = [padded[..., s:s + g, :, :] for s in range(before + 1 + after)]     # C x (..., G, b, f)
    return xp.concatenate(pieces, axis=-2)                                      # (..., G, C b, f)


def neighbour_blocks_backward(gw, before, after):
    """Adjoint of :func:`neighbour_blocks`: gw (..., G, C b, f) -> (..., G, b, f)."""
    xp = get_namespace(gw)
    c = before + 1 + after
    g, cb, f = gw.shape[-3:]
    b = cb // c
    lead = gw.shape[:-3]
    acc = xp.zeros(lead + (g + before + after, b, f), dtype=gw.dtype)           # (..., G + before + after, b, f)
    for s in range(c):
        acc[..., s:s + g, :, :] += gw[..., :, s * b:(s + 1) * b, :]
    return acc[..., before:before + g, :, :]
