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
masked by a pattern built independently, with Python loops; :func:`loop` is the
readable chunk-by-chunk form of one round.

The hash, the sort into slots and the chunk windows are :mod:`effattn.nn.lsh`
(:func:`draw_rotations`, :func:`~effattn.nn.lsh.hash_buckets`,
:func:`~effattn.nn.lsh.lsh_layout`); this module masks, biases and attends.

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
  see "Peer mapping" below for the measured result.
* lengths: N is padded inside to a multiple of c with padding-bucket tokens.

Peer mapping (HuggingFace transformers 5.24.0,
``transformers.models.reformer.modeling_reformer.LSHSelfAttention``; fixtures
``tests/parity/fixtures/reformer__hf_reformer__*``): q = k = its ``query_key`` projection and
v its ``value`` projection, per head. ``rotations`` is its ``torch.randn`` draw (H, d, R, b/2)
after ``.transpose(0, 2, 1, 3)`` (the buckets agree). ``chunk_size = lsh_attn_chunk_length``,
``chunks_before/after = lsh_num_chunks_before/after``, ``causal = is_decoder``, with
``dedupe=False, chunking="sorted"`` and the other defaults: its ``_len_and_dim_norm`` is our key
normalisation (``norm_eps=1e-6``), its unscaled logits are ``scale=1``, and its self logit set to
-1e5 acts as our self penalty. Its gradient of the shared projection equals our dq + dk. Out and
gradients agree to 4.2e-13 (1 and 3 rounds, causal and not, with key masks) wherever its
wrap-around cannot matter: no neighbouring chunk (``chunks_before=0``), or exactly one chunk of
padding per sequence (then its last chunk of every round is the padding bucket). Two
differences: (1) the wrap-around. With HF's defaults and no padding, rows that fall in chunk 0 of
some round differ (up to 1.38 with 3 causal rounds, 0.40 with 1 round, non-causal). (2) A masked
query that sees no real key (causal, early in the sequence) gets its own value from HF, whose
self logit -1e5 beats its mask -1e9; here it gets 0.

Decoding (:func:`init_state`, :func:`prefill`, :func:`step`; causal ``chunking="bucket"``): in
round r query t sees the earlier keys of its own bucket whose rank in the bucket is in the same
chunk of c or in the ``chunks_before`` = n_b chunks before, so only the last S = (n_b + 1) c keys
of each bucket can still be reached. The state keeps, per round and bucket, a ring of S slots
(the key of rank r in slot r mod S) with the key, value, position and the key's bucket and chunk
in every round (for the duplicate correction N_tj): R b S (d + dv + 1 + 2R) + R b numbers per
batch entry and head, bounded (note b ~ N / c buckets in :func:`setup`). A step hashes k_t in
every round, puts a real token into its rings, attends from q_t to each round's ring with the
same biases as the forward (self penalty, -log N_tj) and combines the rounds like it:
O(R S (d + dv + R) + R d b). ``chunking="sorted"`` is refused (``WHY_SORTED_CANNOT_DECODE``: its
chunk boundaries depend on later tokens). A masked token is no key and, like the forward's
padding bucket, sees nothing (out_t = 0).

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

import itertools
import math
from typing import NamedTuple

from ..backend import asarray, get_namespace, to_numpy
from ..validate import (check_bool, check_choice, check_float_array, check_int, check_positive_float, check_qkv,
                        check_scale)
from ..nn.decode import check_state, check_step_inputs
from ..nn.lsh import (bucket_ranks, chunk_windows, chunk_windows_backward, draw_rotations, hash_buckets, lsh_layout,
                      put_slot_rows, put_slots, take_slot_rows)
from ..nn.sparse import attend_backward, attend_forward, dense_from_groups, group_mask, take_rows
from ..registry import Mechanism, backward_of, forward_of, reads_cache, register

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


class _Options(NamedTuple):
    causal: bool
    shared_qk: bool
    dedupe: bool
    chunk: int           # c
    before: int          # chunks before a query's own chunk in its window
    after: int           # chunks after it
    combine: str
    chunking: str
    scale: float
    penalty: object      # the self penalty m_ii, or None


# --------------------------------------------------------------------------- options and keys
def _defaults(shared_qk, scale, self_penalty, d, causal, chunking):
    """The defaults that depend on other options: scale 1 for the unit keys of shared QK (else d^-0.5),
    the self penalty with shared QK only, "bucket" chunking when causal."""
    if scale is None and shared_qk:
        scale = 1.0
    scale = check_scale(scale, d)
    if isinstance(self_penalty, str) and self_penalty == "default":
        self_penalty = SELF_PENALTY if shared_qk else None
    if chunking is None:
        chunking = "bucket" if causal else "sorted"
    return scale, self_penalty, chunking


def _check_options(d, *, causal, shared_qk, dedupe, chunk_size, chunks_before, chunks_after, combine, chunking,
                   scale, self_penalty):
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
    if penalty is not None:
        penalty = check_positive_float("self_penalty", penalty)
    return _Options(causal, shared_qk, dedupe, c, before, after, combine, chunking, scale, penalty)


def _check_rotations(rotations, d, lead, xp):
    """rotations (R, d, b/2), or (H, R, d, b/2) for inputs with leading axes lead = (..., H): as an ``xp`` array."""
    if rotations is None:
        raise ValueError("rotations is required: draw them with draw_rotations(rng, d, n_buckets, n_rounds[, heads])")
    check_float_array("rotations", rotations, min_ndim=3)
    if rotations.ndim not in (3, 4) or rotations.shape[-2] != d:
        raise ValueError(f"rotations must have shape (n_rounds, d={d}, n_buckets/2) or (H, n_rounds, d, n_buckets/2), "
                         f"got {tuple(rotations.shape)}")
    if rotations.ndim == 4 and (len(lead) < 1 or lead[-1] != rotations.shape[0]):
        raise ValueError(f"rotations per head {tuple(rotations.shape)} need inputs with a head axis of H = "
                         f"{rotations.shape[0]} entries (..., H, N, d), got leading axes {tuple(lead)}")
    return xp.asarray(rotations)


def _normalise_keys(k, eps):
    """k_hat = k * rsqrt(mean(k^2) + eps) / sqrt(d)  (HF's _len_and_dim_norm: a unit vector)."""
    xp = get_namespace(k)
    d = k.shape[-1]
    r = 1.0 / xp.sqrt((k * k).mean(axis=-1, keepdims=True) + eps)       # (..., N, 1)
    return k * (r * d ** -0.5), r


def _normalise_keys_backward(dkey, k, r):
    """dk = r / sqrt(d) * (dk_hat - k r^2 (k . dk_hat) / d)."""
    d = k.shape[-1]
    return (r * d ** -0.5) * (dkey - k * (r * r) * (k * dkey).sum(axis=-1, keepdims=True) / d)


# --------------------------------------------------------------------------- the steps of forward
def _hash(k, rot, key_mask, lead):
    """h(k_j) for every round, (..., R, N); masked tokens go to the padding bucket n_buckets."""
    xp = get_namespace(k)
    n_rounds, n_buckets = rot.shape[-3], 2 * rot.shape[-1]
    buckets = hash_buckets(k, rot)                                        # (..., R, N)
    if key_mask is not None:
        buckets = xp.where(key_mask[..., None, :], buckets, n_buckets)
    return xp.broadcast_to(buckets, lead + (n_rounds, k.shape[-2]))


def _sorted_chunks(x, slot_token, c):
    """Rows of x (..., N, d) in slot order, cut into chunks: (..., R, G, c, d)."""
    xs = take_slot_rows(x, slot_token)                                    # (..., R, P, d)
    return xs.reshape(xs.shape[:-2] + (xs.shape[-2] // c, c, x.shape[-1]))


def _with_dummy(x, value):
    """Per-token values (..., R, N) with the dummy token N appended: (..., R, N + 1)."""
    xp = get_namespace(x)
    return xp.concatenate([x, xp.full(x.shape[:-1] + (1,), value, dtype=x.dtype)], axis=-1)


def _at_tokens(x, ids):
    """Per-token values x (..., [R,] N + 1) read at token ids (..., R, A, B) -> (..., R, A, B)
    (x without the round axis is the same for every round)."""
    xp = get_namespace(x)
    flat = ids.reshape(ids.shape[:-2] + (-1,))
    xx = xp.broadcast_to(x[..., None, :] if x.ndim == flat.ndim - 1 else x, flat.shape[:-1] + x.shape[-1:])
    return xp.take_along_axis(xx, flat, axis=-1).reshape(ids.shape)


def _window_mask(q_pos, k_pos, ids, k_ids, bucket_pad, n, o, key_mask):
    """allowed (..., R*G, c, w): j in P~_i (real, causal, key mask; "bucket" chunking: same bucket)."""
    allowed = group_mask(q_pos, k_pos, n, n, causal=o.causal, key_mask=key_mask)
    if o.chunking == "bucket":  # adjacent chunks of another bucket are not part of P~_i
        same = _at_tokens(bucket_pad, ids)[..., :, None] == _at_tokens(bucket_pad, k_ids)[..., None, :]
        allowed = allowed & same.reshape(q_pos.shape + k_pos.shape[-1:])
    return allowed


def _duplicate_correction(ids, k_ids, chunk_pad, bucket_pad, o, dtype):
    """-log N_ij (..., R*G, c, w), N_ij = the number of rounds r' with j in P~_i^(r') (one (c, w)
    buffer per chunk, built in place)."""
    xp = get_namespace(ids)
    n_rounds, g, c = ids.shape[-3:]
    w = k_ids.shape[-1]
    bias = xp.zeros(ids.shape[:-3] + (n_rounds, g, c, w), dtype=dtype)
    for r in range(n_rounds):
        ci = _at_tokens(chunk_pad[..., r, :], ids)[..., :, None]           # (..., R, G, c, 1)
        cj = _at_tokens(chunk_pad[..., r, :], k_ids)[..., None, :]         # (..., R, G, 1, w)
        seen = (cj >= ci - o.before) & (cj <= ci + o.after)
        if o.chunking == "bucket":
            seen &= (_at_tokens(bucket_pad[..., r, :], ids)[..., :, None]
                     == _at_tokens(bucket_pad[..., r, :], k_ids)[..., None, :])
        bias += seen
    bias = bias.reshape(ids.shape[:-3] + (n_rounds * g, c, w))
    xp.maximum(bias, 1.0, out=bias)
    xp.log(bias, out=bias)
    bias *= -1.0
    return bias


def _self_penalty(q_pos, k_pos, penalty, bias, dtype):
    """bias - m_ii: a token's logit on itself lowered by the penalty."""
    xp = get_namespace(q_pos)
    is_self = q_pos[..., :, None] == k_pos[..., None, :]                  # (..., R*G, c, w)
    if bias is None:
        bias = xp.zeros(is_self.shape, dtype=dtype)
    bias[is_self] -= penalty
    return bias


def _unsort_rows(xs, token_slot):
    """Rows in slot order (..., R, P, d) -> per token (..., R, N, d)."""
    return take_rows(xs, token_slot)


def _round_weights(lse_r, combine, dtype):
    """w_r = exp(lse_r - logsumexp_r lse_r) (0 for a round where the query sees nothing), or 1/R."""
    xp = get_namespace(lse_r)
    if combine == "mean":
        return xp.full(lse_r.shape, 1.0 / lse_r.shape[-2], dtype=dtype)
    mx = lse_r.max(axis=-2, keepdims=True)
    mx = xp.where(xp.isfinite(mx), mx, 0.0)
    e = xp.exp(lse_r - mx)                                                # exp(-inf) = 0 for empty rounds
    z = e.sum(axis=-2, keepdims=True)
    return (e / xp.where(z > 0, z, 1.0)).astype(dtype)


# --------------------------------------------------------------------------- kernel
@forward_of("reformer")
def forward(q, k, v, *, causal=False, key_mask=None, rotations=None, chunk_size=64, shared_qk=True,
            scale=None, self_penalty="default", combine="logsumexp", dedupe=True, chunking=None,
            chunks_before=1, chunks_after=0, norm_eps=1e-6):
    """LSH attention. Returns out (..., N, dv) and a :class:`ReformerCache` (see the module docstring).

    Hash, sort into chunks, mask and bias each chunk's window, attend, un-sort, combine the rounds."""
    n, _, d, _ = check_qkv(q, k, v, key_mask=key_mask, self_attention=True)
    o = _check_options(d, causal=causal, shared_qk=shared_qk, dedupe=dedupe, chunk_size=chunk_size,
                       chunks_before=chunks_before, chunks_after=chunks_after, combine=combine, chunking=chunking,
                       scale=scale, self_penalty=self_penalty)
    rot = _check_rotations(rotations, q.shape[-1], q.shape[:-2], get_namespace(q))
    o = o._replace(chunk=min(o.chunk, n))                                 # a chunk longer than N holds all of N
    lead, c = q.shape[:-2], o.chunk
    n_rounds, n_buckets = rot.shape[-3], 2 * rot.shape[-1]

    # keys: k_hat = k / ||k|| for shared QK
    keys, rnorm = _normalise_keys(k, check_positive_float("norm_eps", norm_eps)) if o.shared_qk else (k, None)
    # hash and sort: the slot of every token in every round
    buckets = _hash(k, rot, key_mask, lead)                               # (..., R, N)
    slot_token, token_slot = lsh_layout(buckets, n_buckets, c, o.chunking)  # (..., R, P), (..., R, N)
    g = slot_token.shape[-1] // c
    o = o._replace(before=min(o.before, g - 1), after=min(o.after, g - 1))  # farther chunks do not exist
    # chunks of the sorted q, k_hat, v; every chunk's keys are its window of neighbouring chunks
    ids = slot_token.reshape(lead + (n_rounds, g, c))                     # (..., R, G, c) token ids
    k_ids = chunk_windows(ids, o.before, o.after, fill=n)                 # (..., R, G, w)
    qb = _sorted_chunks(q, slot_token, c)                                 # (..., R, G, c, d)
    kb = chunk_windows(_sorted_chunks(keys, slot_token, c), o.before, o.after)   # (..., R, G, w, d)
    vb = chunk_windows(_sorted_chunks(v, slot_token, c), o.before, o.after)      # (..., R, G, w, dv)
    w = k_ids.shape[-1]
    flat = lead + (n_rounds * g,)
    q_pos = ids.reshape(flat + (c,))                                      # (..., R*G, c)
    k_pos = k_ids.reshape(flat + (w,))                                    # (..., R*G, w)

    # P~_i: the mask of every window, and the additive logits (duplicate correction, self penalty)
    chunk_of = token_slot // c                                            # (..., R, N) chunk of every token
    bucket_pad = _with_dummy(buckets, -1)                                 # the dummy token has no bucket
    allowed = _window_mask(q_pos, k_pos, ids, k_ids, bucket_pad, n, o, key_mask)   # (..., R*G, c, w)
    bias = None
    if o.dedupe and o.combine == "logsumexp" and n_rounds > 1:
        bias = _duplicate_correction(ids, k_ids, _with_dummy(chunk_of, FAR), bucket_pad, o, q.dtype)  # - log N_ij
    if o.penalty is not None:
        bias = _self_penalty(q_pos, k_pos, o.penalty, bias, q.dtype)                                   # - m_ii

    # attend inside every chunk; un-sort (every token has exactly one slot per round); combine the rounds
    rows = lambda x: x.reshape(flat + x.shape[-2:])  # noqa: E731  (..., R, G, a, b) -> (..., R*G, a, b)
    ob, lse, acache = attend_forward(rows(qb), rows(kb), rows(vb), allowed, o.scale, bias)
    xp, p = get_namespace(q, k, v), slot_token.shape[-1]
    out_r = _unsort_rows(ob.reshape(lead + (n_rounds, p, ob.shape[-1])), token_slot)   # (..., R, N, dv)
    lse_r = xp.take_along_axis(lse.reshape(lead + (n_rounds, p)), token_slot, axis=-1)  # (..., R, N)
    wr = _round_weights(lse_r, o.combine, q.dtype)
    out = (wr[..., None] * out_r).sum(axis=-3)                            # o = sum_r w_r o_r
    cache = ReformerCache(acache, slot_token, token_slot, chunk_of, buckets, q_pos, k_pos, wr, out_r, out,
                          k, rnorm, n, c, o.before, o.after, o.chunking, o.combine, o.causal, key_mask,
                          o.penalty is not None)
    return out, cache


@backward_of("reformer")
def backward(dout, cache):
    """Gradients {"q", "k", "v"}; buckets and the sort are constants (see the module docstring)."""
    lead = dout.shape[:-2]
    c, before, after = cache.chunk, cache.before, cache.after
    n_rounds, p = cache.slot_token.shape[-2:]
    g = p // c
    wr = cache.weights_r
    dout_r = wr[..., None] * dout[..., None, :, :]                        # d o_r = w_r d o
    dlse = None
    if cache.combine == "logsumexp":                                      # d lse_r = w_r (o_r - o) . d o
        dlse_r = wr * ((cache.out_r - cache.out[..., None, :, :]) * dout[..., None, :, :]).sum(axis=-1)
        dlse = put_slots(dlse_r, cache.token_slot, p, fill=0.0).reshape(lead + (n_rounds * g, c))
    dob = put_slot_rows(dout_r, cache.token_slot, p).reshape(lead + (n_rounds * g, c, dout.shape[-1]))
    gr = attend_backward(dob, cache.attend, dlse)

    def to_tokens(x_chunks):   # (..., R, G, c, d) in slot order -> (..., N, d) summed over rounds
        return _unsort_rows(x_chunks.reshape(lead + (n_rounds, p, x_chunks.shape[-1])), cache.token_slot).sum(axis=-3)

    def chunks(x):             # (..., R*G, a, d) -> (..., R, G, a, d)
        return x.reshape(lead + (n_rounds, g) + x.shape[-2:])

    dq = to_tokens(chunks(gr["q"]))
    dkey = to_tokens(chunk_windows_backward(chunks(gr["k"]), before, after))
    dv = to_tokens(chunk_windows_backward(chunks(gr["v"]), before, after))
    dk = dkey if cache.rnorm is None else _normalise_keys_backward(dkey, cache.k, cache.rnorm)   # k_hat = k r / sqrt(d)
    return {"q": dq, "k": dk, "v": dv}


@reads_cache("reformer")
def weights(cache):
    """W (..., N, N) with out == W @ v: sum over rounds of w_r(i) times that round's chunk softmax."""
    xp = get_namespace(cache.out)
    n = cache.n
    p = cache.slot_token.shape[-1]
    pb = cache.attend.p                                                    # (..., R*G, c, w)
    w_slots = put_slots(cache.weights_r, cache.token_slot, p, fill=0.0)
    pw = pb * w_slots.reshape(pb.shape[:-1])[..., None]
    W = dense_from_groups(pw, xp.minimum(cache.q_pos, n), xp.minimum(cache.k_pos, n), n + 1, n + 1)
    return W[..., :n, :n]


@reads_cache("reformer")
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


# --------------------------------------------------------------------------- oracles
def reference(q, k, v, *, causal=False, key_mask=None, rotations=None, chunk_size=64, shared_qk=True,
              scale=None, self_penalty="default", combine="logsumexp", dedupe=True, chunking=None,
              chunks_before=1, chunks_after=0, norm_eps=1e-6):
    """Dense oracle: full attention with keys k_hat, masked by the union of the LSH windows,
    the windows built with plain Python loops (sorted() by (bucket, position), chunk = rank // c).

    Valid where the kernel is exact: ``combine="logsumexp"`` with ``dedupe=True`` (or one round).
    """
    d = q.shape[-1]
    scale, penalty, chunking = _defaults(shared_qk, scale, self_penalty, d, causal, chunking)
    rot = _check_rotations(rotations, q.shape[-1], q.shape[:-2], get_namespace(q))
    n_rounds, half = rot.shape[-3], rot.shape[-1]
    if n_rounds > 1 and not (combine == "logsumexp" and dedupe):
        raise ValueError("reference is only exact for combine='logsumexp' with dedupe=True")
    xp = get_namespace(q, k, v)
    n, c = q.shape[-2], chunk_size
    keys = _normalise_keys(k, norm_eps)[0] if shared_qk else k
    proj = to_numpy(k[..., None, :, :] @ rot.astype(k.dtype))              # (..., R, N, b/2)
    km = None if key_mask is None else to_numpy(xp.broadcast_to(key_mask, q.shape[:-1]))
    lead = q.shape[:-2]
    vis = [[False] * (n * n) for _ in range(math.prod(lead))]
    for idx, li in enumerate(itertools.product(*map(range, lead))):
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
    out, _, _ = attend_forward(q, keys, v, mask, scale)                    # dense softmax attention, masked
    return out


def loop(q, k, v, *, rotations, chunk_size, causal=False, scale=1.0):
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


# --------------------------------------------------------------------------- decoding
WHY_SORTED_CANNOT_DECODE = ("chunking='sorted' cannot decode: with causal=True its chunk boundaries depend on how many "
                            "later tokens hash to lower buckets, so row t of the parallel forward is not a function of "
                            "tokens <= t; decode with chunking='bucket' (the causal default)")


class ReformerState(NamedTuple):
    """Per batch entry, head, round and bucket, a ring of S = (chunks_before + 1) c slots: the key of rank r
    in its bucket sits in slot r mod S (a query of rank r' reaches ranks from (floor(r' / c) - before) c on,
    never more than S back). Every slot also records its key's bucket and chunk in *every* round, for the
    duplicate correction N_tj."""

    k: object            # (..., R, b, S, d) keys as attended (k_hat for shared QK)
    v: object            # (..., R, b, S, dv)
    pos: object          # (..., R, b, S) int position of the key (-1: empty slot)
    key_bucket: object   # (..., R, b, S, R) int h^(r')(k_j) of the key, every round r'
    key_chunk: object    # (..., R, b, S, R) int its chunk rank // c in its bucket, every round r'
    count: object        # (..., R, b) int real tokens hashed to each bucket so far
    t: int
    rotations: object    # configuration
    options: object      # _Options (causal, chunking "bucket", c, before, scale, penalty, ...)
    norm_eps: float

    def held(self):
        """Numbers held: R b S (d + dv + 1 + 2R) + R b per batch entry and head, from the first token on."""
        rounds = self.count.shape[-2]
        slots = math.prod(self.pos.shape)
        return int(slots * (self.k.shape[-1] + self.v.shape[-1] + 1 + 2 * rounds) + self.count.size)


def init_state(*, lead, d, dv, dtype="float64", rotations=None, chunk_size=64, shared_qk=True, scale=None,
               self_penalty="default", combine="logsumexp", dedupe=True, chunking=None, chunks_before=1,
               chunks_after=0, norm_eps=1e-6):
    """The empty decoder state (:class:`ReformerState`) of causal ``chunking="bucket"`` LSH attention.

    In round r query t sees the keys j <= t of its own bucket whose chunk (rank in the bucket // c) is
    at most ``chunks_before`` before its own. So per round and bucket only the last
    S = (chunks_before + 1) c keys can still be reached: the state holds, for each of the R rounds and
    b buckets, S keys, values and positions, with each key's bucket and chunk in every round (for the
    duplicate correction): R b S (d + dv + 1 + 2R) + R b numbers per batch entry and head, allocated
    at once and constant in t (bounded). ``chunking="sorted"`` is refused
    (:data:`WHY_SORTED_CANNOT_DECODE`)."""
    xp = get_namespace()
    lead = tuple(int(x) for x in lead)
    d, dv = check_int("d", d), check_int("dv", dv)
    o = _check_options(d, causal=True, shared_qk=shared_qk, dedupe=dedupe, chunk_size=chunk_size,
                       chunks_before=chunks_before, chunks_after=chunks_after, combine=combine, chunking=chunking,
                       scale=scale, self_penalty=self_penalty)
    if o.chunking != "bucket":
        raise ValueError(WHY_SORTED_CANNOT_DECODE)
    rot = _check_rotations(rotations, d, lead, xp)
    norm_eps = check_positive_float("norm_eps", norm_eps)
    n_rounds, n_buckets = rot.shape[-3], 2 * rot.shape[-1]
    ring = lead + (n_rounds, n_buckets, (o.before + 1) * o.chunk)
    return ReformerState(xp.zeros(ring + (d,), dtype=dtype), xp.zeros(ring + (dv,), dtype=dtype),
                         xp.full(ring, -1, dtype=xp.int64), xp.zeros(ring + (n_rounds,), dtype=xp.int64),
                         xp.zeros(ring + (n_rounds,), dtype=xp.int64),
                         xp.zeros(lead + (n_rounds, n_buckets), dtype=xp.int64), 0, rot, o, norm_eps)


def _rings(state):
    """The state's buffers with the lead axes flattened (L, R, b, S, ...) (views: writing them writes the state)."""
    rounds, buckets, slots = state.pos.shape[-3:]
    flat = lambda x, extra: x.reshape((-1, rounds, buckets, slots) + extra)  # noqa: E731
    return (flat(state.k, state.k.shape[-1:]), flat(state.v, state.v.shape[-1:]), flat(state.pos, ()),
            flat(state.key_bucket, (rounds,)), flat(state.key_chunk, (rounds,)))


def _insert(state, keys, v, pos, bucket, rank, where):
    """Tokens of the flattened lead rows into the rings: keys (L, T, d), v (L, T, dv), pos (T,), their bucket
    and rank (L, R, T) in every round; token j goes into ring (r, bucket) at slot rank mod S where ``where``
    (L, R, T) is True (ranks distinct mod S per ring)."""
    xp = get_namespace(keys)
    kk, vv, pp, kb, kc = _rings(state)
    rows, rounds, cols = xp.nonzero(where)
    at = (rows, rounds, bucket[rows, rounds, cols], rank[rows, rounds, cols] % kk.shape[-2])
    kk[at] = keys[rows, cols]
    vv[at] = v[rows, cols]
    pp[at] = pos[cols]
    kb[at] = bucket[rows, :, cols]
    kc[at] = rank[rows, :, cols] // state.options.chunk


def _check_prompt(q, k, v, state):
    lead, d, dv = tuple(state.count.shape[:-2]), state.k.shape[-1], state.v.shape[-1]
    for name, x, last in (("q", q, d), ("k", k, d), ("v", v, dv)):
        check_float_array(name, x, min_ndim=2)
        if tuple(x.shape[:-2]) != lead or x.shape[-1] != last:
            raise ValueError(f"{name} must have shape {lead + ('T', last)} (the state's), got {tuple(x.shape)}")


def _config(state):
    o = state.options
    return dict(rotations=state.rotations, chunk_size=o.chunk, shared_qk=o.shared_qk, scale=o.scale,
                self_penalty=o.penalty, combine=o.combine, dedupe=o.dedupe, chunking=o.chunking,
                chunks_before=o.before, chunks_after=0, norm_eps=state.norm_eps)


def prefill(q, k, v, state, *, key_mask=None):
    """The first T tokens in one pass: out (..., T, dv), the rows of the causal :func:`forward`, and the
    state: in every round, the last S real tokens of every bucket, with their ranks."""
    state = check_state(state, ReformerState, "reformer")
    if state.t != 0:
        raise ValueError(f"state must be fresh (from init_state) for prefill, this one is at position {state.t}")
    _check_prompt(q, k, v, state)
    out, _ = forward(q, k, v, causal=True, key_mask=key_mask, **_config(state))
    xp = get_namespace(q, k, v)
    lead, n = tuple(q.shape[:-2]), q.shape[-2]
    n_buckets = state.count.shape[-1]
    keys = _normalise_keys(k, state.norm_eps)[0] if state.options.shared_qk else k
    buckets = _hash(k, state.rotations, key_mask, lead)                      # (..., R, T); masked: bucket b
    rank, count = bucket_ranks(buckets, n_buckets)                           # (..., R, T), (..., R, b + 1)
    slots = state.pos.shape[-1]
    last = (rank >= xp.take_along_axis(count, buckets, axis=-1) - slots) & (buckets < n_buckets)
    flat = lambda x: x.reshape((-1,) + x.shape[len(lead):])  # noqa: E731
    _insert(state, flat(keys), flat(v), xp.arange(n), flat(buckets), flat(rank), flat(last))
    state.count[...] = count[..., :n_buckets]
    return out, state._replace(t=n)


def step(q_t, k_t, v_t, state, *, key_mask_t=None):
    """One token: out_t (..., dv), equal to row t of the causal :func:`forward`, and the state.

    A real token is hashed in every round and joins its bucket's ring; in each round q_t attends to the
    keys of its bucket's ring within ``chunks_before`` chunks of its own (itself with the self penalty,
    every key with the duplicate correction -log N_tj), and the rounds are combined as in the forward.
    A masked token joins nothing and, in the padding bucket of the forward, sees nothing: out_t = 0."""
    state = check_state(state, ReformerState, "reformer")
    xp = get_namespace(q_t, k_t, v_t)
    o = state.options
    lead = tuple(state.count.shape[:-2])
    check_step_inputs(q_t, k_t, v_t, key_mask_t, lead, state.k.shape[-1], state.v.shape[-1])
    t = state.t
    real = (xp.ones(lead, dtype=bool) if key_mask_t is None else xp.broadcast_to(key_mask_t, lead)).reshape(-1)
    n_rounds = state.count.shape[-2]
    keys = _normalise_keys(k_t, state.norm_eps)[0] if o.shared_qk else k_t
    bucket = hash_buckets(k_t[..., None, :], state.rotations).reshape(-1, n_rounds)     # (L, R)
    count = state.count.reshape((-1,) + state.count.shape[-2:])                         # (L, R, b)
    rank = xp.take_along_axis(count, bucket[..., None], axis=-1)[..., 0]                # (L, R)
    flat = lambda x: x.reshape(-1, 1, x.shape[-1])  # noqa: E731
    _insert(state, flat(keys), flat(v_t), xp.asarray([t]), bucket[..., None], rank[..., None],
            xp.broadcast_to(real[:, None, None], rank.shape + (1,)))
    rows, rounds = xp.arange(rank.shape[0])[:, None], xp.arange(n_rounds)[None, :]
    count[rows, rounds, bucket] += real[:, None]
    # each round's ring of t's bucket: (L, R, S, ...)
    kk, vv, pp, kb, kc = (x[rows, rounds, bucket] for x in _rings(state))
    chunk = rank // o.chunk                                                             # (L, R) t's chunks
    reach = (kb == bucket[:, None, None, :]) & (kc >= (chunk - o.before)[:, None, None, :])   # (L, R, S, R')
    own = xp.diagonal(reach, axis1=1, axis2=3).swapaxes(-1, -2)                         # (L, R, S): in round r
    allowed = own & (pp >= 0) & real[:, None, None]
    bias = None
    if o.dedupe and o.combine == "logsumexp" and n_rounds > 1:
        bias = -xp.log(xp.maximum(reach.sum(axis=-1), 1).astype(q_t.dtype))           # - log N_tj
    if o.penalty is not None:
        penalty = xp.where(pp == t, o.penalty, 0.0).astype(q_t.dtype)
        bias = -penalty if bias is None else bias - penalty                             # - m_tt
    qq = xp.broadcast_to(q_t.reshape(-1, 1, 1, q_t.shape[-1]), (kk.shape[0], n_rounds, 1, q_t.shape[-1]))
    bias = None if bias is None else bias[..., None, :]
    out_r, lse, _ = attend_forward(qq, kk, vv, allowed[..., None, :], o.scale, bias)     # (L, R, 1, dv), (L, R, 1)
    wr = _round_weights(lse, o.combine, q_t.dtype)                                      # (L, R, 1)
    out = (wr[..., None] * out_r).sum(axis=-3)[..., 0, :]                               # (L, dv)
    return out.reshape(lead + (out.shape[-1],)), state._replace(t=t + 1)


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
    init_state=init_state,
    prefill=prefill,
    step=step,
    bounded_state=True,
    sizes=("chunk_size",),
    windows=("chunk_size", "chunks_before", "chunks_after"),
    summary="Shared-QK angular LSH: sort by bucket, attend within a chunk and the previous one; "
            "rounds combined by log-sum-exp with the duplicate correction (exact given the hashes).",
))
