"""Reformer: LSH attention with shared query-key vectors.

Kitaev, Kaiser, Levskaya, 2020, *Reformer: The Efficient Transformer*,
https://arxiv.org/abs/2001.04451

Intuition: softmax attention is dominated by the few keys nearest to a query.
Hash every vector with a locality-sensitive hash (random rotations: nearby
directions fall into the same bucket with high probability), sort the sequence
by bucket, cut the sorted sequence into chunks of length ``c`` and let every
chunk attend to itself and the previous chunk. Similar vectors end up next to
each other, so each query sees (most of) its nearest keys at O(N c) cost plus
an O(N log N) sort. Several hash rounds reduce the chance of a miss.

Equations (paper's symbols; R is the random rotation of one round):

    h(x) = argmax([x R ; -x R])                   angular LSH, b buckets, R (d, b/2)
    k_j = q_j / ||q_j||                             shared-QK: keys are normalised queries
    s_i = position of token i after a stable sort by (h(k_i), i)
    P~_i = { j : floor(s_i / c) - 1 <= floor(s_j / c) <= floor(s_i / c) }
    o_i^(r) = sum_{j in P~_i^(r)} exp(q_i . k_j - m_ij^(r) - z(i, P_i^(r))) v_j
    m_ij^(r) = inf if j not in P~_i^(r) (or j > i when causal),
               1e5 if i == j  (a token attends to itself only when nothing else is visible),
               log N_ij otherwise, N_ij = |{r' : j in P~_i^(r')}|   (duplicate correction)
    o_i = sum_r exp(z(i, P_i^(r)) - z(i, P_i)) o_i^(r)     (rounds combined by log-sum-exp)

With the duplicate correction the combination is *exactly* softmax attention
over the union of the rounds' windows, each key counted once: given the hashes
this kernel is exact, and :func:`reference` checks it against dense attention
masked by a pattern built independently, with Python loops.

Design of the arguments (the kernel contract has q, k, v):

* ``q`` are the queries; ``k`` is the *shared-QK source*: token j's bucket is
  ``h(k_j)`` (one sort for queries and keys: token i is both query i and key i),
  and with ``shared_qk=True`` (default) the key used in the dot product is the
  normalised ``k_j / ||k_j||``. The paper's shared-QK layer is the special case
  ``k = q``: pass the same projection twice and add ``dq + dk`` for its gradient.
  ``shared_qk=False`` keeps ``k`` as given (separate keys, hashed by ``k``).
* ``rotations`` (n_rounds, d, n_buckets/2) shared by all heads, or
  (H, n_rounds, d, n_buckets/2) one per head; :func:`draw_rotations` makes
  them. HuggingFace's per-head draw of shape (H, d, n_hashes, n_buckets/2)
  is ours after ``.transpose(0, 2, 1, 3)``.
* ``key_mask``: masked tokens go to an extra bucket ``n_buckets`` sorted last
  (HuggingFace does the same), so they never change the layout of real tokens.
* ``chunking="sorted"`` (the paper, HF, trax): chunks of the globally sorted
  sequence. Not strictly causal: whether an early query and key share a chunk
  depends on how many *later* tokens hash to lower buckets. ``chunking="bucket"``:
  each bucket is chunked on its own (padded to a multiple of c) and a chunk sees
  its own and the previous chunk *of the same bucket* only; a token's window then
  depends on earlier tokens only, so incremental decoding gives the same
  outputs. The default is "sorted" when ``causal=False`` and "bucket" when
  ``causal=True``; pass ``chunking="sorted"`` for the paper's (and HF's) causal chunking.

Conventions next to the reference implementations:

* scale: with shared QK the logits are ``q . k_hat`` (no 1/sqrt(d)): HF's
  ``_len_and_dim_norm`` gives ``k * rsqrt(mean(k^2) + eps) / sqrt(d)`` = the unit
  vector, and ``query_key_dots = q @ k^T`` unscaled; we use that exact formula
  (``norm_eps=1e-6``). ``scale`` overrides; with ``shared_qk=False`` it defaults to d^-0.5.
* self mask: the paper *subtracts* 1e5 from q_i . k_i; HF *replaces* the logit by
  ``self_mask_value = -1e5``. Both give the self key weight exactly 0 unless it is
  the only visible key (then weight 1). ``self_penalty=None`` disables it
  (default when ``shared_qk=False``).
* rounds: ``combine="logsumexp"`` (paper, HF, trax) or ``"mean"`` (plain average,
  for comparison). ``dedupe=True`` subtracts log N_ij as in the paper; HF and trax's
  default omit it (``dedupe=False``), so a key seen in two rounds counts twice.
* adjacency: ``chunks_before=1, chunks_after=0`` (HF ``lsh_num_chunks_before/after``).
  HF/trax wrap around (chunk 0 sees the last chunk, across rounds in HF); we do not,
  so the first chunk of each round differs from HF. To compare with HF use
  ``dedupe=False, chunking="sorted"`` and N a multiple of c (HF pads outside the layer);
  this has not been run against HF here (no torch in this environment).
* lengths: N is padded inside to a multiple of c with padding-bucket tokens.

Shapes: q, k (..., N, d), v (..., N, dv); self-attention only (M = N).
R rounds, b buckets, c chunk length, P slots per round (N rounded up to c;
up to N + b (c - 1) with ``chunking="bucket"``), G = P / c chunks, w = (before +
after + 1) c keys per chunk.

Complexity: hashing O(R N d b), sort O(R N log N), attention O(R N w d);
memory O(R N w). Hashing is done in row blocks so its (N, b) scores never
exist at once.

Backward (buckets, sort and windows held fixed — they are discrete):
with w_r = exp(lse_r - L), L = logsumexp_r lse_r, o = sum_r w_r o_r,

    d o_r = w_r d o,        d lse_r = w_r (o_r - o) . d o

then :func:`effattn.nn.sparse.attend_backward` with ``dlse`` inside the
chunks, the window gradients added back onto the chunks they were copied from,
un-sorted by the same permutation, summed over rounds; finally the key
normalisation k_hat = k r / sqrt(d), r = (mean(k^2) + eps)^-1/2:

    dk = r / sqrt(d) * (dk_hat - k r^2 (k . dk_hat) / d)
"""
from __future__ import annotations

import math
from typing import NamedTuple

from ..backend import asarray, get_namespace, to_numpy
from ..validate import check_bool, check_choice, check_float_array, check_int, check_positive_float, check_qkv
from ..nn.sparse import attend_backward, attend_forward, dense_from_groups, group_mask, pad_axis, round_up
from ..registry import Mechanism, register

SELF_PENALTY = 1e5   # the paper's m_ii = 10^5 (HF: self_mask_value_float32 = -1e5)
FAR = 1 << 40        # chunk index of the dummy token: never adjacent to anything


class ReformerCache(NamedTuple):
    attend: object       # AttendCache of the chunks: (..., R*G, c | w, .)
    slot_token: object   # (..., R, P) token at each sorted slot (N = empty / padding)
    token_slot: object   # (..., R, N) slot of each token (the inverse permutation)
    chunk_of: object     # (..., R, N) chunk index of each token in each round
    buckets: object      # (..., R, N) hash bucket of each token (n_buckets = padding bucket)
    q_pos: object        # (..., R*G, c) token positions of the query rows
    k_pos: object        # (..., R*G, w) token positions of the key columns
    weights_r: object    # (..., R, N) round weights w_r (1/R for "mean")
    out_r: object        # (..., R, N, dv) per-round outputs
    out: object          # (..., N, dv)
    k: object            # (..., N, d) raw keys (for the normalisation backward)
    rnorm: object        # (..., N, 1) r = (mean(k^2) + eps)^-1/2, or None (shared_qk=False)
    n: int
    chunk: int
    before: int
    after: int
    chunking: str
    combine: str
    causal: bool
    key_mask: object
    self_rule: bool      # the self penalty is on (i sees itself only when nothing else is visible)


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
def _flat_put(shape, idx, values, fill, xp):
    """out (..., P) filled with ``fill``; out[..., idx[..., t]] = values[..., t] (idx unique per row)."""
    out = xp.full(shape, fill, dtype=values.dtype)
    rows = 1
    for s in shape[:-1]:
        rows *= s
    flat = idx.reshape(rows, -1) + (xp.arange(rows) * shape[-1])[:, None]
    out.reshape(-1)[flat.reshape(-1)] = xp.broadcast_to(values, idx.shape).reshape(-1)
    return out


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
    order = xp.argsort(buckets, axis=-1, kind="stable")                  # (..., R, N)
    sb = xp.take_along_axis(buckets, order, axis=-1)                     # sorted buckets
    s = xp.arange(n)
    rows = 1
    for t in lead:
        rows *= t
    key = (sb + (xp.arange(rows) * (n_buckets + 1)).reshape(lead + (1,)))  # row-unique, sorted
    first = xp.searchsorted(key.reshape(-1), key.reshape(-1), side="left").reshape(lead + (n,))
    first = first - (xp.arange(rows) * n).reshape(lead + (1,))
    rank = s - first                                                     # rank inside the bucket
    is_end = xp.ones(lead + (n,), dtype=bool)
    is_end[..., :-1] = sb[..., 1:] != sb[..., :-1]
    gap = xp.where(is_end, (-(rank + 1)) % chunk, 0)                     # padding after each bucket
    slot_sorted = s + xp.cumsum(gap, axis=-1) - gap
    p = int((n + gap.sum(axis=-1)).max())
    token_slot = xp.take_along_axis(slot_sorted, xp.argsort(order, axis=-1, kind="stable"), axis=-1)
    slot_token = _flat_put(lead + (p,), slot_sorted, order, n, xp)
    return slot_token, token_slot


def _shift_chunks(x, o, fill, xp):
    """y[..., g, :, ...] = x[..., g + o, :, ...] along the chunk axis (-3 for rows, -2 for ids); fill outside."""
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


def _windows(chunks, before, after, fill, xp):
    """Concatenate chunk g - before .. g + after of (..., G, c[, d]) along the chunk-length axis."""
    axis = -2 if fill is None else -1
    return xp.concatenate([_shift_chunks(chunks, o, fill, xp) for o in range(-before, after + 1)], axis=axis)


def _unwindow(dwin, before, after, xp):
    """Backward of :func:`_windows` for row arrays: (..., G, w, d) -> (..., G, c, d)."""
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


def _take_tokens(x, idx):
    """x (..., L) values per token, idx (..., R, A, B) -> (..., R, A, B) (x broadcast over R)."""
    xp = get_namespace(x)
    flat = idx.reshape(idx.shape[:-2] + (-1,))
    xx = xp.broadcast_to(x[..., None, :] if x.ndim == flat.ndim - 1 else x, flat.shape[:-1] + x.shape[-1:])
    return xp.take_along_axis(xx, flat, axis=-1).reshape(idx.shape)


# --------------------------------------------------------------------------- kernel
def _defaults(shared_qk, scale, self_penalty, d, causal, chunking):
    if scale is None:
        scale = 1.0 if shared_qk else d ** -0.5
    if isinstance(self_penalty, str) and self_penalty == "default":
        self_penalty = SELF_PENALTY if shared_qk else None
    if chunking is None:
        chunking = "bucket" if causal else "sorted"
    return scale, self_penalty, chunking


def _normalise_keys(k, eps):
    """k_hat = k * rsqrt(mean(k^2) + eps) / sqrt(d)  (HF's _len_and_dim_norm: a unit vector)."""
    xp = get_namespace(k)
    d = k.shape[-1]
    r = 1.0 / xp.sqrt((k * k).mean(axis=-1, keepdims=True) + eps)       # (..., N, 1)
    return k * (r * d ** -0.5), r


def _check_rotations(rotations, q):
    if rotations is None:
        raise ValueError("rotations is required: draw them with draw_rotations(rng, d, n_buckets, n_rounds[, heads])")
    check_float_array("rotations", rotations, min_ndim=3)
    d = q.shape[-1]
    if rotations.ndim not in (3, 4) or rotations.shape[-2] != d:
        raise ValueError(f"rotations must have shape (n_rounds, d={d}, n_buckets/2) or (H, n_rounds, d, n_buckets/2), "
                         f"got {tuple(rotations.shape)}")
    if rotations.ndim == 4 and (q.ndim < 3 or q.shape[-3] != rotations.shape[0]):
        raise ValueError(f"rotations per head must have H = q.shape[-3] = {q.shape[-3] if q.ndim >= 3 else None} "
                         f"entries, got {tuple(rotations.shape)}")
    return get_namespace(q).asarray(rotations)


def forward(q, k, v, *, causal=False, key_mask=None, rotations=None, chunk_size=64, shared_qk=True,
            scale=None, self_penalty="default", combine="logsumexp", dedupe=True, chunking=None,
            chunks_before=1, chunks_after=0, norm_eps=1e-6):
    """LSH attention. Returns out (..., N, dv) and a :class:`ReformerCache` (see the module docstring)."""
    n, m, d, _ = check_qkv(q, k, v, key_mask=key_mask, self_attention=True)
    causal = check_bool("causal", causal)
    shared_qk = check_bool("shared_qk", shared_qk)
    dedupe = check_bool("dedupe", dedupe)
    c = check_int("chunk_size", chunk_size)
    before = check_int("chunks_before", chunks_before, minimum=0)
    after = check_int("chunks_after", chunks_after, minimum=0)
    if causal and after:
        raise ValueError("chunks_after must be 0 with causal=True (later chunks hold only later tokens in 'bucket' "
                         "chunking, and are masked anyway)")
    check_choice("combine", combine, ("logsumexp", "mean"))
    check_choice("chunking", chunking, (None, "sorted", "bucket"))
    scale, penalty, chunking = _defaults(shared_qk, scale, self_penalty, d, causal, chunking)
    scale = check_positive_float("scale", scale)
    if penalty is not None:
        penalty = check_positive_float("self_penalty", penalty)
    rot = _check_rotations(rotations, q)
    xp = get_namespace(q, k, v)
    n_rounds, n_buckets = rot.shape[-3], 2 * rot.shape[-1]

    # keys: k_hat = k / ||k|| for shared QK
    if shared_qk:
        keys, rnorm = _normalise_keys(k, check_positive_float("norm_eps", norm_eps))
    else:
        keys, rnorm = k, None
    # hash: h(k_j) for every round; masked tokens -> the padding bucket n_buckets
    buckets = hash_buckets(k, rot)                                        # (..., R, N)
    if key_mask is not None:
        buckets = xp.where(key_mask[..., None, :], buckets, n_buckets)
    buckets = xp.broadcast_to(buckets, q.shape[:-2] + (n_rounds, n))
    slot_token, token_slot = lsh_layout(buckets, n_buckets, c, chunking)  # (..., R, P), (..., R, N)
    p = slot_token.shape[-1]
    g = p // c
    lead = q.shape[:-2]

    # sort: rows of q, k_hat, v in slot order, cut into chunks; keys see the adjacent chunks
    def sorted_chunks(x):
        xpad = pad_axis(x, n + 1)                                         # row N = zeros (the dummy token)
        xs = xp.take_along_axis(xpad[..., None, :, :], slot_token[..., None], axis=-2)  # (..., R, P, d)
        return xs.reshape(lead + (n_rounds, g, c, x.shape[-1]))           # (..., R, G, c, d)

    ids = slot_token.reshape(lead + (n_rounds, g, c))                     # (..., R, G, c) token ids
    k_ids = _windows(ids, before, after, n, xp)                           # (..., R, G, w)
    qb = sorted_chunks(q)
    kb = _windows(sorted_chunks(keys), before, after, None, xp)           # (..., R, G, w, d)
    vb = _windows(sorted_chunks(v), before, after, None, xp)              # (..., R, G, w, dv)
    w = k_ids.shape[-1]

    # chunk index of every token per round (FAR for the dummy): defines P~_i
    chunk_of = token_slot // c                                            # (..., R, N)
    chunk_pad = xp.concatenate([chunk_of, xp.full(lead + (n_rounds, 1), FAR, dtype=chunk_of.dtype)], axis=-1)
    bucket_pad = xp.concatenate([buckets, xp.full(lead + (n_rounds, 1), -1, dtype=buckets.dtype)], axis=-1)

    flat = lead + (n_rounds * g,)
    q_pos = ids.reshape(flat + (c,))                                      # (..., R*G, c)
    k_pos = k_ids.reshape(flat + (w,))                                    # (..., R*G, w)
    allowed = group_mask(q_pos, k_pos, n, n, causal=causal, key_mask=key_mask)   # (..., R*G, c, w)
    if chunking == "bucket":  # adjacent chunks of another bucket are not part of P~_i
        same = _take_rounds(bucket_pad, ids)[..., :, None] == _take_rounds(bucket_pad, k_ids)[..., None, :]
        allowed = allowed & same.reshape(flat + (c, w))

    # additive logits: duplicate correction log N_ij and self penalty m_ii (built in place: one (c, w) buffer per chunk)
    bias = None
    if dedupe and combine == "logsumexp" and n_rounds > 1:
        bias = xp.zeros(lead + (n_rounds, g, c, w), dtype=q.dtype)
        for r in range(n_rounds):   # N_ij = number of rounds r' with j in P~_i^(r')
            ci = _take_tokens(chunk_pad[..., r, :], ids)[..., :, None]       # (..., R, G, c, 1)
            cj = _take_tokens(chunk_pad[..., r, :], k_ids)[..., None, :]     # (..., R, G, 1, w)
            seen = (cj >= ci - before) & (cj <= ci + after)
            if chunking == "bucket":
                seen &= (_take_tokens(bucket_pad[..., r, :], ids)[..., :, None]
                         == _take_tokens(bucket_pad[..., r, :], k_ids)[..., None, :])
            bias += seen
        bias = bias.reshape(flat + (c, w))
        xp.maximum(bias, 1.0, out=bias)
        xp.log(bias, out=bias)
        bias *= -1.0                                                     # - log N_ij
    if penalty is not None:
        is_self = q_pos[..., :, None] == k_pos[..., None, :]             # (..., R*G, c, w)
        if bias is None:
            bias = xp.zeros(is_self.shape, dtype=q.dtype)
        bias[is_self] -= penalty                                          # - m_ii

    shape = lambda x: x.reshape(flat + x.shape[-2:])  # noqa: E731  (..., R, G, a, b) -> (..., R*G, a, b)
    ob, lse, acache = attend_forward(shape(qb), shape(kb), shape(vb), allowed, scale, bias)
    # un-sort: every token has exactly one slot per round
    ob = ob.reshape(lead + (n_rounds, p, ob.shape[-1]))
    lse = lse.reshape(lead + (n_rounds, p))
    out_r = xp.take_along_axis(ob, token_slot[..., None], axis=-2)       # (..., R, N, dv)
    lse_r = xp.take_along_axis(lse, token_slot, axis=-1)                 # (..., R, N)
    if combine == "logsumexp":
        mx = lse_r.max(axis=-2, keepdims=True)
        mx = xp.where(xp.isfinite(mx), mx, 0.0)
        e = xp.exp(lse_r - mx)                                            # exp(-inf) = 0 for empty rounds
        z = e.sum(axis=-2, keepdims=True)
        wr = (e / xp.where(z > 0, z, 1.0)).astype(q.dtype)               # w_r = exp(lse_r - L)
    else:
        wr = xp.full(lse_r.shape, 1.0 / n_rounds, dtype=q.dtype)
    out = (wr[..., None] * out_r).sum(axis=-3)                            # o = sum_r w_r o_r
    cache = ReformerCache(acache, slot_token, token_slot, chunk_of, buckets, q_pos, k_pos, wr, out_r, out,
                          k, rnorm, n, c, before, after, chunking, combine, causal, key_mask, penalty is not None)
    return out, cache


def _take_rounds(x_pad, ids):
    """x_pad (..., R, N+1) per-round token values, ids (..., R, G, a) -> (..., R, G, a)."""
    xp = get_namespace(x_pad)
    flat = ids.reshape(ids.shape[:-2] + (-1,))
    return xp.take_along_axis(x_pad, flat, axis=-1).reshape(ids.shape)


def backward(dout, cache):
    """Gradients {"q", "k", "v"}; buckets and the sort are constants (see the module docstring)."""
    xp = get_namespace(dout)
    a = cache.attend
    lead = dout.shape[:-2]
    n, c, before, after = cache.n, cache.chunk, cache.before, cache.after
    n_rounds, p = cache.slot_token.shape[-2:]
    g = p // c
    wr = cache.weights_r
    dout_r = wr[..., None] * dout[..., None, :, :]                        # d o_r = w_r d o
    dlse = None
    if cache.combine == "logsumexp":
        dlse_r = wr * ((cache.out_r - cache.out[..., None, :, :]) * dout[..., None, :, :]).sum(axis=-1)
        dlse = _flat_put(lead + (n_rounds, p), cache.token_slot, dlse_r, 0.0, xp).reshape(lead + (n_rounds * g, c))
    dv_dim = dout.shape[-1]
    dob = _sort_rows(dout_r, cache.token_slot, p, xp).reshape(lead + (n_rounds * g, c, dv_dim))
    gr = attend_backward(dob, a, dlse)

    def to_tokens(x_chunks):   # (..., R, G, c, d) in slot order -> (..., N, d) summed over rounds
        xs = x_chunks.reshape(lead + (n_rounds, p, x_chunks.shape[-1]))
        return xp.take_along_axis(xs, cache.token_slot[..., None], axis=-2).sum(axis=-3)

    rg = lead + (n_rounds, g)
    dq = to_tokens(gr["q"].reshape(rg + gr["q"].shape[-2:]))
    dkey = to_tokens(_unwindow(gr["k"].reshape(rg + gr["k"].shape[-2:]), before, after, xp))
    dv = to_tokens(_unwindow(gr["v"].reshape(rg + gr["v"].shape[-2:]), before, after, xp))
    if cache.rnorm is not None:   # k_hat = k r / sqrt(d)
        k, r = cache.k, cache.rnorm
        d = k.shape[-1]
        dk = (r * d ** -0.5) * (dkey - k * (r * r) * (k * dkey).sum(axis=-1, keepdims=True) / d)
    else:
        dk = dkey
    return {"q": dq, "k": dk, "v": dv}


def _sort_rows(x, token_slot, p, xp):
    """x (..., R, N, d) per token -> (..., R, P, d) in slot order (empty slots zero)."""
    lead = x.shape[:-2]
    out = xp.zeros(lead + (p, x.shape[-1]), dtype=x.dtype)
    rows = 1
    for s in lead:
        rows *= s
    flat = token_slot.reshape(rows, -1) + (xp.arange(rows) * p)[:, None]
    out.reshape(-1, x.shape[-1])[flat.reshape(-1)] = x.reshape(-1, x.shape[-1])
    return out


def weights(cache):
    """W (..., N, N) with out == W @ v: sum over rounds of w_r(i) times that round's chunk softmax."""
    xp = get_namespace(cache.out)
    lead = cache.out.shape[:-2]
    n, c = cache.n, cache.chunk
    n_rounds, p = cache.slot_token.shape[-2:]
    pb = cache.attend.p                                                    # (..., R*G, c, w)
    w_slots = _flat_put(lead + (n_rounds, p), cache.token_slot, cache.weights_r, 0.0, xp)
    pw = pb * w_slots.reshape(pb.shape[:-1])[..., None]
    W = dense_from_groups(pw, xp.minimum(cache.q_pos, n), xp.minimum(cache.k_pos, n), n + 1, n + 1)
    return W[..., :n, :n]


def pattern(cache):
    """The union over rounds of the windows P~_i (chunk of j within [chunk(i) - before, chunk(i) + after],
    same bucket for "bucket" chunking), causal and key masks, and the self rule
    (i sees itself only when nothing else is visible; when the self penalty is on).
    Built densely from the per-token chunk indices (teaching sizes only: N x N)."""
    xp = get_namespace(cache.out)
    co = cache.chunk_of                                                    # (..., R, N)
    delta = co[..., None, :] - co[..., :, None]                            # (..., R, N, N): chunk(j) - chunk(i)
    vis = (delta >= -cache.before) & (delta <= cache.after)
    if cache.chunking == "bucket":
        vis &= cache.buckets[..., None, :] == cache.buckets[..., :, None]
    vis = vis.any(axis=-3)                                                 # (..., N, N)
    n = cache.n
    if cache.causal:
        vis &= xp.tril(xp.ones((n, n), dtype=bool))
    if cache.key_mask is not None:
        vis &= cache.key_mask[..., None, :]
    if not cache.self_rule:
        return vis
    eye = xp.eye(n, dtype=bool)
    other = vis & ~eye
    lonely = ~other.any(axis=-1, keepdims=True)
    return other | (vis & eye & lonely)


def reference(q, k, v, *, causal=False, key_mask=None, rotations=None, chunk_size=64, shared_qk=True,
              scale=None, self_penalty="default", combine="logsumexp", dedupe=True, chunking=None,
              chunks_before=1, chunks_after=0, norm_eps=1e-6):
    """Dense oracle: full attention with keys k_hat, masked by the union of the LSH windows,
    the windows built with plain Python loops (sorted() by (bucket, position), chunk = rank // c).

    Valid where the kernel is exact: ``combine="logsumexp"`` with ``dedupe=True`` (or one round).
    """
    from .full import forward as full_forward

    d = q.shape[-1]
    scale, penalty, chunking = _defaults(shared_qk, scale, self_penalty, d, causal, chunking)
    rot = _check_rotations(rotations, q)
    n_rounds, half = rot.shape[-3], rot.shape[-1]
    if n_rounds > 1 and not (combine == "logsumexp" and dedupe):
        raise ValueError("reference is only exact for combine='logsumexp' with dedupe=True")
    xp = get_namespace(q, k, v)
    n, c = q.shape[-2], chunk_size
    keys = _normalise_keys(k, norm_eps)[0] if shared_qk else k
    proj = to_numpy(k[..., None, :, :] @ rot.astype(k.dtype))              # (..., R, N, b/2)
    km = None if key_mask is None else to_numpy(xp.broadcast_to(key_mask, q.shape[:-1]))
    lead = q.shape[:-2]
    vis = [[False] * (n * n) for _ in range(_size(lead))]
    for idx in range(_size(lead)):
        li = _unravel(idx, lead)
        for r in range(n_rounds):
            bucket = {}
            for t in range(n):
                row = [float(x) for x in proj[li + (r, t)]]
                row = row + [-x for x in row]
                bucket[t] = row.index(max(row))                     # argmax([xR; -xR]), first maximum
                if km is not None and not km[li + (t,)]:
                    bucket[t] = 2 * half                              # the padding bucket
            order = sorted(range(n), key=lambda t: (bucket[t], t))
            chunk_id = {}
            if chunking == "sorted":
                for rank, t in enumerate(order):
                    chunk_id[t] = rank // c
            else:
                seen = {}
                for t in order:
                    chunk_id[t] = seen.setdefault(bucket[t], 0) // c
                    seen[bucket[t]] += 1
            for i in range(n):
                for j in range(n):
                    near = -chunks_before <= chunk_id[j] - chunk_id[i] <= chunks_after
                    if chunking == "bucket":
                        near = near and bucket[i] == bucket[j]
                    if near and (not causal or j <= i) and (km is None or km[li + (j,)]):
                        vis[idx][i * n + j] = True
        if penalty is not None:   # self rule: i sees itself only when nothing else is visible
            for i in range(n):
                others = any(vis[idx][i * n + j] for j in range(n) if j != i)
                if others:
                    vis[idx][i * n + i] = False
    mask = xp.asarray(vis, dtype=bool).reshape(lead + (n, n))
    out, _ = full_forward(q, keys, v, mask=mask, scale=scale)
    return out


def _size(shape):
    s = 1
    for t in shape:
        s *= t
    return s


def _unravel(idx, shape):
    out = []
    for s in reversed(shape):
        out.append(idx % s)
        idx //= s
    return tuple(reversed(out))


def loop_forward(q, k, v, *, rotations, chunk_size, causal=False, scale=1.0, n_buckets=None):
    """A readable loop form of one round, chunk by chunk (2-D inputs q, k, v (N, d); shared QK,
    self penalty, "sorted" chunking, one hash round): hash, sort, for each chunk attend to itself
    and the previous chunk, un-sort. Tested equal to :func:`forward`."""
    xp = get_namespace(q, k, v)
    n, d = q.shape
    khat = k / xp.sqrt((k * k).mean(axis=-1, keepdims=True) + 1e-6) / math.sqrt(d)
    proj = k @ rotations[0].astype(k.dtype)
    bucket = [int(b) for b in xp.concatenate([proj, -proj], axis=-1).argmax(axis=-1)]
    order = sorted(range(n), key=lambda t: (bucket[t], t))
    out = xp.zeros((n, v.shape[-1]), dtype=q.dtype)
    chunks = [order[s:s + chunk_size] for s in range(0, n, chunk_size)]
    for ci, chunk in enumerate(chunks):
        keys_here = (chunks[ci - 1] if ci > 0 else []) + chunk
        for i in chunk:
            js = [j for j in keys_here if (not causal or j <= i)]
            others = [j for j in js if j != i]
            js = others if others else js
            if not js:
                continue
            logits = xp.stack([scale * (q[i] @ khat[j]) for j in js])
            p = xp.exp(logits - logits.max())
            p = p / p.sum()
            out[i] = sum(p[t] * v[j] for t, j in enumerate(js))
    return out


# --------------------------------------------------------------------------- registry
def default_sizes(n):
    """Chunk length c ~ sqrt(N) capped at 32 (HF's default is 64), and about N / c buckets (even; the paper / HF
    recommend n_buckets ~ 2 N / c with their larger c)."""
    c = max(2, min(32, 2 ** (max(n, 1).bit_length() // 2)))
    n_buckets = max(2, 2 * -(-n // (2 * c)))
    return c, n_buckets


def setup(rng, *, n, d, heads, causal=False, dtype="float64", n_rounds=2):
    """No learnable parameters; config: per-head rotations for ``n_rounds`` rounds
    (default 2, so the duplicate correction is exercised) and the chunk length."""
    c, n_buckets = default_sizes(n)
    rot = asarray(draw_rotations(rng, d, n_buckets, n_rounds, heads=heads), dtype=dtype)
    return {}, {"rotations": rot, "chunk_size": c}


def _figures(out_dir, rng):
    import os

    from .. import viz

    n, d, c = 48, 8, 6
    # clustered tokens so that buckets mean something
    centres = rng.standard_normal((4, d)) * 2
    x = centres[rng.integers(0, 4, n)] + 0.5 * rng.standard_normal((n, d))
    q = asarray(x[None])
    v = asarray(rng.standard_normal((1, n, d)))
    rot = asarray(draw_rotations(rng, d, 8, 3))
    out, cache = forward(q, q, v, rotations=rot, chunk_size=c)
    paths = []
    b = to_numpy(cache.buckets)[0]                                        # (R, N)
    fig, ax = viz.plt.subplots(figsize=(8, 2.2))
    im = ax.imshow(b, aspect="auto", cmap="tab10", interpolation="nearest")
    ax.set_xlabel("token position")
    ax.set_ylabel("hash round")
    ax.set_title("Reformer: every token's bucket in each of 3 rounds (8 buckets)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    paths.append(viz.save(fig, os.path.join(out_dir, "reformer_buckets.png")))
    out1, c1 = forward(q, q, v, rotations=rot[:1], chunk_size=c)
    W = to_numpy(weights(c1))[0]
    order = to_numpy(c1.slot_token)[0, 0]
    order = order[order < n]
    fig = viz.plot_patterns([W[order][:, order] > 0, W > 0],
                            ["sorted by bucket: chunk + previous chunk", "un-sorted (original positions)"],
                            suptitle="Reformer, one round: the same attention before and after un-sorting",
                            grid=None)
    fig.axes[0].set_xlabel("sorted key slot")
    fig.axes[0].set_ylabel("sorted query slot")
    paths.append(viz.save(fig, os.path.join(out_dir, "reformer_sorted.png")))
    return paths


MECHANISM = register(Mechanism(
    name="reformer",
    title="Reformer (LSH attention)",
    citation="Kitaev et al., 2020",
    url="https://arxiv.org/abs/2001.04451",
    classes=("LP",),
    complexity="O(N log N)",
    causal=True,
    exact=True,
    kind="kernel",
    notebook="03_learned_patterns",
    forward=forward,
    backward=backward,
    weights=weights,
    setup=setup,
    pattern=pattern,
    reference=reference,
    sizes=("chunk_size",),
    figures=_figures,
    summary="Shared-QK angular LSH: sort by bucket, attend within a chunk and the previous one; "
            "rounds combined by log-sum-exp with the duplicate correction (exact given the hashes).",
))
