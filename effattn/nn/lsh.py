"""Locality-sensitive hashing and the sorted chunk layout of LSH attention (Reformer).

Kitaev, Kaiser, Levskaya, 2020, *Reformer: The Efficient Transformer*,
https://arxiv.org/abs/2001.04451 — the hash and the layout are here, the attention
(:mod:`effattn.attention.reformer`) only decides what to do with them.

Angular LSH with random rotations R (d, b/2), one per hash round:

    h(x) = argmax([x R ; -x R])            b buckets; invariant to positive scaling of x

The layout: sort the tokens of every round by (bucket, position) into P *slots*, cut
the slots into G = P / c chunks of c, and give every chunk the window of its
neighbouring chunks (``before`` chunks before it, ``after`` after it; w = (before +
after + 1) c keys). Two layouts (``chunking``):

* ``"sorted"`` (the paper, HF, trax): slot = rank in the stable sort, P = N rounded up to c.
* ``"bucket"``: every bucket starts a new chunk (its run of slots is padded to a
  multiple of c), P <= N + b (c - 1); a token's chunk then depends on earlier tokens only.

Shapes: buckets (..., R, N) ints in [0, b] (b = the padding bucket of masked tokens);
``slot_token`` (..., R, P) the token at each slot (N marks an empty slot, i.e. the
dummy token); ``token_slot`` (..., R, N) the slot of each token (its inverse).
Chunk arrays have the chunk axis G before the chunk-length axis: ids (..., G, c),
rows (..., G, c, d).

Cost: hashing O(R N d b) in row blocks (the (N, b) projections never exist at once),
the sort O(R N log N), windows O(R N w d). All discrete: no gradient flows through
the hash or the sort; :func:`chunk_windows_backward` adds window gradients back onto
the chunks they were copied from.
"""
from __future__ import annotations

import math

from ..backend import get_namespace
from ..validate import check_int
from .sparse import pad_axis, round_up, take_rows


# --------------------------------------------------------------------------- random draws
def draw_rotations(rng, d, n_buckets, n_rounds=1, heads=None):
    """Random rotations for angular LSH, drawn on the host: standard normal
    (n_rounds, d, n_buckets // 2), or (heads, n_rounds, d, n_buckets // 2) for one per head.
    (A Gaussian matrix is what the paper, HF and trax use for "random rotation".)"""
    d = check_int("d", d)
    n_buckets = check_int("n_buckets", n_buckets, minimum=2)
    if n_buckets % 2:
        raise ValueError(f"n_buckets must be even (h(x) = argmax([xR; -xR])), got {n_buckets}")
    n_rounds = check_int("n_rounds", n_rounds)
    shape = (n_rounds, d, n_buckets // 2)
    if heads is not None:
        shape = (check_int("heads", heads),) + shape
    return rng.standard_normal(shape)


# --------------------------------------------------------------------------- hashing
def hash_buckets(x, rotations, block=None):
    """h(x) = argmax([x R ; -x R]) for every round.

    x (..., N, d); rotations (R, d, b/2) or (H, R, d, b/2) with x (..., H, N, d).
    Returns int buckets (..., R, N) in [0, b). Invariant to positive scaling of x.
    Computed ``block`` rows at a time so the (N, b) projections never exist at once.
    """
    xp = get_namespace(x)
    n = x.shape[-2]
    rounds, half = rotations.shape[-3], rotations.shape[-1]
    rot = rotations.astype(x.dtype, copy=False)
    block = block or max(64, (1 << 21) // max(1, rounds * half))
    parts = []
    for s in range(0, n, block):
        xr = x[..., None, s:s + block, :] @ rot                 # (..., 1, n_b, d) @ (R, d, b/2) -> (..., R, n_b, b/2)
        # argmax([xR; -xR]) without building it: the largest projection, or the most negative one
        # (+ b/2); a tie between the two halves goes to the first half, as argmax would
        hi, lo = xr.argmax(axis=-1), xr.argmin(axis=-1)         # (..., R, n_b)
        top = xp.take_along_axis(xr, hi[..., None], axis=-1)[..., 0]
        bottom = xp.take_along_axis(xr, lo[..., None], axis=-1)[..., 0]
        parts.append(xp.where(top >= -bottom, hi, lo + half))
    return parts[0] if len(parts) == 1 else xp.concatenate(parts, axis=-1)


# --------------------------------------------------------------------------- layout
def lsh_layout(buckets, n_buckets, chunk, chunking="sorted"):
    """Where every token goes after the sort.

    buckets (..., R, N) ints in [0, n_buckets] (n_buckets = the padding bucket).
    Returns slot_token (..., R, P) (the token at each slot; N marks an empty slot)
    and token_slot (..., R, N). "sorted": slot = rank in the stable sort by
    (bucket, position), P = N rounded up to c. "bucket": every bucket starts a
    new chunk (its run of slots padded to a multiple of c).
    """
    xp = get_namespace(buckets)
    n = buckets.shape[-1]
    lead = buckets.shape[:-1]
    if chunking == "sorted":
        p = round_up(n, chunk)
        padded = xp.concatenate([buckets, xp.full(lead + (p - n,), n_buckets, dtype=buckets.dtype)], axis=-1)
        order = xp.argsort(padded, axis=-1, kind="stable")               # (..., R, P): token at each slot
        token_slot = xp.argsort(order, axis=-1, kind="stable")[..., :n]  # inverse permutation
        return xp.minimum(order, n), token_slot
    order, sb, rank = _sorted_ranks(buckets, n_buckets)
    s = xp.arange(n)
    is_end = xp.ones(lead + (n,), dtype=bool)
    is_end[..., :-1] = sb[..., 1:] != sb[..., :-1]
    gap = xp.where(is_end, (-(rank + 1)) % chunk, 0)                     # padding after each bucket
    slot_sorted = s + xp.cumsum(gap, axis=-1) - gap
    p = int((n + gap.sum(axis=-1)).max())
    token_slot = xp.take_along_axis(slot_sorted, xp.argsort(order, axis=-1, kind="stable"), axis=-1)
    slot_token = put_slots(order, slot_sorted, p, fill=n)
    return slot_token, token_slot


def _sorted_ranks(buckets, n_buckets):
    """The stable sort by bucket: order (..., N) (the token at each sorted place), the sorted buckets and
    the rank of each sorted token inside its bucket (0 for its earliest token)."""
    xp = get_namespace(buckets)
    n = buckets.shape[-1]
    lead = buckets.shape[:-1]
    order = xp.argsort(buckets, axis=-1, kind="stable")                  # (..., R, N)
    sb = xp.take_along_axis(buckets, order, axis=-1)                     # sorted buckets
    rows = math.prod(lead)
    key = (sb + (xp.arange(rows) * (n_buckets + 1)).reshape(lead + (1,)))  # row-unique, sorted
    first = xp.searchsorted(key.reshape(-1), key.reshape(-1), side="left").reshape(lead + (n,))
    first = first - (xp.arange(rows) * n).reshape(lead + (1,))
    return order, sb, xp.arange(n) - first                               # rank inside the bucket


def bucket_ranks(buckets, n_buckets):
    """rank (..., N): how many earlier tokens share each token's bucket (its place in the bucket's run
    of slots; it depends on earlier tokens only), and count (..., n_buckets + 1): tokens per bucket.
    buckets (..., N) ints in [0, n_buckets]."""
    xp = get_namespace(buckets)
    order, _, rank_sorted = _sorted_ranks(buckets, n_buckets)
    rank = xp.take_along_axis(rank_sorted, xp.argsort(order, axis=-1, kind="stable"), axis=-1)
    rows = math.prod(buckets.shape[:-1])
    count = xp.zeros((rows, n_buckets + 1), dtype=rank.dtype)
    xp.add.at(count, (xp.arange(rows)[:, None], buckets.reshape(rows, -1)), 1)
    return rank, count.reshape(buckets.shape[:-1] + (n_buckets + 1,))


def put_slots(values, slots, p, fill):
    """out (..., P) filled with ``fill``; out[..., slots[..., t]] = values[..., t] (slots unique per row;
    ``values`` broadcast to the shape of ``slots``): per-token values -> slot order."""
    xp = get_namespace(values, slots)
    shape = slots.shape[:-1] + (p,)
    out = xp.full(shape, fill, dtype=values.dtype)
    rows = math.prod(shape[:-1])
    flat = slots.reshape(rows, -1) + (xp.arange(rows) * p)[:, None]
    out.reshape(-1)[flat.reshape(-1)] = xp.broadcast_to(values, slots.shape).reshape(-1)
    return out


def put_slot_rows(x, token_slot, p):
    """x (..., R, N, d) per token -> (..., R, P, d) in slot order (empty slots zero)."""
    xp = get_namespace(x)
    lead = x.shape[:-2]
    out = xp.zeros(lead + (p, x.shape[-1]), dtype=x.dtype)
    rows = math.prod(lead)
    flat = token_slot.reshape(rows, -1) + (xp.arange(rows) * p)[:, None]
    out.reshape(-1, x.shape[-1])[flat.reshape(-1)] = x.reshape(-1, x.shape[-1])
    return out


def take_slot_rows(x, slot_token):
    """x (..., N, d) per token -> (..., R, P, d): the row of the token at every slot of every round
    (an empty slot, token N, gets a row of zeros: the dummy token)."""
    xpad = pad_axis(x, x.shape[-2] + 1)                                  # row N = zeros (the dummy token)
    return take_rows(xpad[..., None, :, :], slot_token)


# --------------------------------------------------------------------------- chunk windows
def shift_chunks(x, o, fill=None):
    """y[..., g, ...] = x[..., g + o, ...] along the chunk axis; outside: ``fill``.

    Row arrays (..., G, c, d) with ``fill=None`` (shifted in zeros; chunk axis -3), or id
    arrays (..., G, c) with a ``fill`` value (chunk axis -2)."""
    xp = get_namespace(x)
    axis = -3 if x.ndim >= 3 and fill is None else -2
    if fill is None:  # row arrays (..., G, c, d): fill with zeros
        y = xp.zeros_like(x)
    else:
        y = xp.full(x.shape, fill, dtype=x.dtype)
    g = x.shape[axis]
    if abs(o) >= g:
        return y
    src = [slice(None)] * x.ndim
    dst = [slice(None)] * x.ndim
    ax = axis % x.ndim
    if o >= 0:
        src[ax], dst[ax] = slice(o, g), slice(0, g - o)
    else:
        src[ax], dst[ax] = slice(0, g + o), slice(-o, g)
    y[tuple(dst)] = x[tuple(src)]
    return y


def chunk_windows(chunks, before, after, fill=None):
    """Chunks g - before .. g + after of (..., G, c[, d]) side by side along the chunk-length axis:
    ids (..., G, c) -> (..., G, w) with ``fill`` outside, rows (..., G, c, d) -> (..., G, w, d) with zeros."""
    xp = get_namespace(chunks)
    axis = -2 if fill is None else -1
    return xp.concatenate([shift_chunks(chunks, o, fill) for o in range(-before, after + 1)], axis=axis)


def chunk_windows_backward(dwin, before, after):
    """Backward of :func:`chunk_windows` for row arrays: (..., G, w, d) -> (..., G, c, d), every part
    of a window added back onto the chunk it was copied from."""
    xp = get_namespace(dwin)
    c = dwin.shape[-2] // (before + after + 1)
    out = xp.zeros(dwin.shape[:-2] + (c, dwin.shape[-1]), dtype=dwin.dtype)
    g = out.shape[-3]
    for t, o in enumerate(range(-before, after + 1)):
        part = dwin[..., t * c:(t + 1) * c, :]          # came from chunk g + o
        if abs(o) >= g:
            continue
        if o >= 0:
            out[..., o:, :, :] += part[..., :g - o, :, :]
        else:
            out[..., :g + o, :, :] += part[..., -o:, :, :]
    return out


__all__ = ["bucket_ranks", "chunk_windows", "chunk_windows_backward", "draw_rotations", "hash_buckets", "lsh_layout",
           "put_slot_rows", "put_slots", "shift_chunks", "take_slot_rows"]
