"""Sparse Sinkhorn attention: learn to *sort* blocks, then attend locally.

Tay, Bahri, Yang, Metzler, Juan, 2020, *Sparse Sinkhorn Attention*,
https://arxiv.org/abs/2002.11296

Intuition. Local (blockwise) attention is cheap but myopic. Sinkhorn attention
keeps the cheap block-local computation and adds one more block per query
block: a block chosen by a small learned *sorting network* (SortNet) from the
whole sequence. The choice is made differentiable by relaxing a permutation
matrix into a doubly stochastic one with Sinkhorn normalisation, so every
query block sees its own block plus a *soft mixture* of other blocks.

Notation (paper -> code). The sequence of length N (``n``) is split into
N_B (``nb``) blocks of b (``block``) tokens; the last block is padded and the
padding masked.

    psi_P(X)_i = sum_{t in block i} X_t          block summary: SUM pooling, as the paper
                                                 (X = keys here; masked/padded keys excluded)
    R = W2^T ReLU(W1^T psi_P(X) + b1) + b2       SortNet, a 2-layer MLP: (N_B, N_B)
    log_alpha = (R + epsilon) / tau              epsilon: Gumbel noise (config ``gumbel``),
                                                 tau: temperature (config ``tau``)
    S^0 = log_alpha
    S^k = F_c(F_r(S^{k-1})),  k = 1..n_iters     log-space Sinkhorn balancing:
        F_r(X) = X - logsumexp_j X   (rows),  F_c(X) = X - logsumexp_i X   (columns)
    P = exp(S^{n_iters})                         soft permutation, rows and columns sum to ~1
    K_s = P K_blocks,  V_s = P V_blocks          sorted blocks: (N_B, N_B) @ (N_B, b*d)
    O_i = softmax(Q_i [K_s,i ; K_i]^T / sqrt(d)) [V_s,i ; V_i]
                                                 ONE softmax over the 2b concatenated keys

Parameters (learnable, SHARED by every batch element and head):

    W1 (d, d_h), b1 (d_h,)         first SortNet layer (d_h = hidden width, free)
    W2 (d_h, L),  b2 (L,)          second layer; L >= N_B (an input with fewer blocks
                                   uses the first N_B columns, like a max-length table)

Config: ``block`` b (int), ``n_iters`` (int), ``tau`` (float), ``gumbel`` (array
broadcastable to (..., G, G) with G >= N_B, top-left N_B x N_B used; None = no
noise, i.e. evaluation mode), ``sortcut`` (int or None), ``hard`` (bool),
``perm`` (int array (..., N_B) or None), ``scale``.

Causal mode (the paper's *causal Sinkhorn balancing*). Three things must not
look at the future, and the contract test checks it bit for bit:

1. The sort logits of row i. Row i of R is SortNet(psi(block i-1)) — the
   summary of the *previous*, complete block (row 0 gets the zero summary).
   Block i's own summary would contain keys after a query early in block i.
2. The support: block i may draw only from strictly earlier blocks j < i
   (log_alpha = -inf elsewhere), which are entirely in the past of every query
   of block i. Block 0 has no sorted part.
3. The balancing: the row step only touches row i; the column step
   normalises entry (i, j) by the log-sum-exp over rows i' <= i of column j
   (a cumulative, causally masked column normalisation), so row i never sees
   rows below it. Cost O(N_B^3) per iteration instead of O(N_B^2).

The local block is causally masked inside (key t' <= query t).

Decoding (:mod:`effattn.nn.decode`). Because of 1-3, a query t of block g = t // b depends only
on the blocks before g, all complete when block g begins, and on the tokens of its own block up
to t; so it steps exactly. The state (:class:`SinkhornState`) keeps the masked keys, values and
mask bits of every token so far (a later block may draw from any earlier one: t (d + dv + 1)
numbers per head, growing with t, not bounded), and, per Sinkhorn iteration k, the running
causal column log-sum-exp C_k[j] over the rows balanced so far (n_iters per block). At a block's
first token, :func:`step` completes the previous block, computes its summary and the sort
logits of row g, balances row g alone with the C_k (O(n_iters g): the row step needs only row g,
the causal column step only the rows above) and mixes block g's sorted block once; then each
token attends in one softmax to that sorted block and its own block so far, O(b (d + dv)).
:func:`prefill` runs the causal forward over the prompt and reads the state off it (its P and
its balancing). Hard choices and ``perm`` decode the same way.

SortCut (``sortcut=n_k``, encoder only): sort, then keep only the first n_k
sorted blocks; *every* query attends to the same n_k * b sorted keys (no local
block). O(N n_k b d). ``n_k`` larger than N_B is clipped to N_B.

Hard permutations. ``perm`` (ints, -1 = no block) replaces P by the one-hot
matrix of the given block choices; ``hard=True`` takes perm = row-wise argmax
of the balanced P (a permutation when P is close to one, as tau -> 0; in
general a many-to-one block map). A query block whose hard choice is its own
block gets no sorted part (its keys would otherwise appear twice; not with
SortCut, which has no local part). Then the
result equals ``full`` masked by :func:`induced_pattern`. Hard choices are
constants for the backward (SortNet gets zero gradient).
:func:`sorted_keys` gives the sorted key sequence P K_blocks, for pictures.

Padding and key_mask: masked or padded keys and values are zeroed before the
mixing and excluded from the summaries. Sorted slot s of block i has the
real-token mass mu[i,s] = sum_j P[i,j] m[j,s] (m = 1 for a real, unmasked key);
a slot with mu = 0 (only padding mixed in) is masked, and the slot's logit gets
the bias log(mu[i,s] / sum_j P[i,j]), the log of the *real fraction* of what was
mixed into it. Without padding or masks that fraction is exactly 1 and the bias
exactly 0, so the result is the paper's formula (and the peer's)
out_i = softmax(Q_i [psi_S(K)_i; K_i]^T / sqrt(d)) [psi_S(V)_i; V_i]; with padding,
padding mixed in softly gets proportionally less weight, and with a hard P the
result is exactly dense attention over the chosen real keys. ``padding_bias=False``
drops the bias (zero-mass slots still masked): padding mixed in softly then
counts as a zero key. (An earlier version biased by log mu itself; a soft P's
rows sum to 1 only up to the Sinkhorn tolerance, 0.978-1.014 after 8 iterations,
so that moved unpadded outputs off the paper's formula by ~1e-2.) Backward of the
bias: with t_i = sum_j P[i,j], dmu = dS / mu and dP[i, j] += sum_s dmu[i,s] m[j,s] - sum_s dS[i,s] / t_i.

Peer mapping (lucidrains ``sinkhorn_transformer.SinkhornAttention`` 0.11.4 with
``use_simple_sort_net=True, non_permutative=False``, fixtures
``sinkhorn__lucidrains_sinkhorn_transformer__*``): bucket_size = ``block`` (kv_bucket_size with
SortCut; query buckets must differ from kv buckets, or the peer adds the own bucket to SortCut),
sinkhorn_iter = ``n_iters``, temperature = ``tau``, n_sortcut = ``sortcut``, its
``sample_gumbel`` draw = ``gumbel``. Its SimpleSortNet ReLU([sum q; sum k] W) with a zero query
half and a key half shared by the heads is W1 = key half, b1 = 0, W2 = I, b2 = 0. Two peer
deviations are patched for the fixtures: logits log(R + 1e-6) instead of the paper's R (moves
out by ~1), and sorted keys used as sorted values in the non-SortCut path (``b_v_r = b_k_r``,
~1.7). With them patched, out and gradients (q, k, v, W1) agree within 3.1e-15 without padding,
for the sorted + own bucket and for SortCut. Its causal variant (cumulative means,
differentiable top-k, null keys) has no counterpart here.

Backward (all by hand). Local attention: :func:`effattn.nn.sparse.attend_backward`.
Mixing: dP = dK_s K_blocks^T + dV_s V_blocks^T, dK_blocks += P^T dK_s (same for V).
Through P = exp(S): dS = P * dP. Through the Sinkhorn iterations, in reverse
(:func:`effattn.nn.sinkhorn.sinkhorn_backward`; the balancing itself is in
:mod:`effattn.nn.sinkhorn`), each normalisation Y = X - lse(X) has

    dX = dY - softmax(X) * sum(dY)        (sum and softmax along the normalised axis)

and the causal column step Y[i,j] = X[i,j] - log sum_{i'<=i} exp X[i',j] has

    dX[i',j] = dY[i',j] - sum_{i>=i'} dY[i,j] exp(X[i',j] - C[i,j]).

Then dR = dlog_alpha / tau, and the MLP and the sum pooling back to the keys.

Cost (non-causal): O(N b d) for the block-local attention, O(N_B^2 b d) =
O(N N_B d) for the mixing, O(n_iters N_B^2) for the balancing. With b fixed
the mixing is O(N^2 d / b); :func:`default_block` therefore picks
b = sqrt(N / 2), so N_B ~ sqrt(2 N) and everything is O(N^1.5 d)
time and O(N sqrt(N)) memory (the survey's table quotes O(B^2): the
per-block score matrix, with the mixing not counted). No N x N array is allocated.

Conventions next to the known implementations: lucidrains'
``sinkhorn-transformer`` counts ``bucket_size`` in tokens, as our ``block``;
concatenates the reordered and the local bucket in one softmax, as here; and
its ``n_sortcut`` gives every query the first n sorted buckets, as our
``sortcut``. Its default sort net (``AttentionSortNet``) differs from the
paper: R_ij = ReLU(mean(q bucket i) . mean(k bucket j) / sqrt(d)); its
``SimpleSortNet`` (one linear layer + ReLU on summed q and k buckets) is
closer to the paper's MLP used here. Its causal variant uses cumulative means,
the first token of each bucket, a differentiable top-k instead of Sinkhorn
balancing, and learned null keys for the first bucket; here block 0 simply
has no sorted part. Defaults there: temperature 0.75, 5-8 iterations (ours:
0.75, 8).
"""
from __future__ import annotations

import math
from typing import NamedTuple

from ..backend import asarray, get_namespace
from ..validate import (check_bool, check_float_array, check_int, check_leading, check_mlp_params, check_positive_float,
                        check_qkv, check_scale)
from ..nn.decode import check_prompt, check_state, check_step_inputs
from ..nn.functional import NEG_INF, init_mlp, mlp_backward, mlp_forward
from ..nn.sinkhorn import sinkhorn_backward, sinkhorn_forward
from ..nn.sparse import attend_backward, attend_forward, group_mask, pad_axis
from ..registry import Mechanism, backward_of, forward_of, reads_cache, register


class SinkhornCache(NamedTuple):
    attend: object       # AttendCache of the block attention
    balancing: object    # nn.sinkhorn.BalancingCache of the Sinkhorn run (soft or hard), or None (perm)
    p: object            # (..., N_B, N_B) the mixing matrix used (soft P or one-hot)
    kz: object           # (..., N_B, b*d) masked key blocks (flattened)
    vz: object           # (..., N_B, b*dv)
    mk: object           # (..., N_B, b, 1) float: real, unmasked key
    realf: object        # (..., N_B, b) the same, 2-d per block
    mass: object         # (..., N_B, b) real-token mass P @ realf of each sorted slot
    mlp: object          # cache of the SortNet (nn.functional.mlp_forward) on the block summaries
    params: tuple        # W1, b1, W2, b2
    n: int
    b: int
    nb: int
    tau: float
    causal: bool
    soft: bool
    sortcut: object      # n_k or None
    lead: tuple
    padding_bias: bool   # whether log(mass / total) was added to the sorted slots' logits
    total: object        # (..., N_B) row sums of P


# --------------------------------------------------------------------------- draws, parameters, sizes
def draw_gumbel(rng, shape):
    """Standard Gumbel noise epsilon = -log(-log U), drawn on the host from a numpy Generator.

    shape (..., N_B, N_B); the same draws give the same result on any backend."""
    return rng.gumbel(0.0, 1.0, size=tuple(shape))


def init_sortnet(rng, *, d, width, hidden=None, dtype="float64"):
    """SortNet parameters, drawn on the host: W1 (d, d_h), b1, W2 (d_h, width), b2 of
    :func:`effattn.nn.functional.init_mlp` (d_h = ``hidden``, default max(d, 2)).
    ``width`` >= N_B of the longest input (shorter ones use the first N_B columns)."""
    return init_mlp(rng, d=d, width=width, hidden=hidden, dtype=dtype)


def default_block(n):
    """The default block size for length n: b = round(sqrt(n / 2)), at least 2.

    Forward + backward cost ~ 6 N d (2 b + N_B): six (N x 2b x d) matmuls of the
    block-local attention and six (N x N_B x d) of the mixing P K_blocks, P V_blocks.
    With N_B = N / b this is minimal at b = sqrt(N / 2), where the total is
    O(N^1.5 d): the mixing makes sub-N^1.5 growth impossible at the optimum (a
    fixed b gives O(N^2 d / b); b ~ N^0.3 gives a measured ~N^1.3 only by being
    slower at every N up to 16K). Smaller than n for n >= 5 (padding is exercised)."""
    n = check_int("n", n)
    return max(2, int(round(math.sqrt(n / 2))))


# --------------------------------------------------------------------------- checks
def _check_sortcut(sortcut, nb, causal):
    if sortcut is None:
        return None
    sortcut = min(check_int("sortcut", sortcut), nb)
    if causal:
        raise ValueError("causal=True is not supported with sortcut: SortCut lets every query see the "
                         "first sorted blocks, which mix the whole sequence (the paper uses it for encoding)")
    return sortcut


def _check_gumbel(gumbel, nb, lead, dtype):
    if gumbel is None:
        return None
    check_float_array("gumbel", gumbel, min_ndim=2)
    check_leading("gumbel", gumbel, lead, 2, "(..., N_B, N_B)")
    if gumbel.shape[-1] < nb or gumbel.shape[-2] < nb:
        raise ValueError(f"gumbel must have at least N_B={nb} rows and columns in its last two axes, got {tuple(gumbel.shape)}")
    return gumbel[..., :nb, :nb].astype(dtype, copy=False)


def _check_perm(perm, nb, causal):
    xp = get_namespace(perm)
    if getattr(perm, "dtype", None) is None or perm.dtype.kind not in "iu":
        raise ValueError(f"perm must be an integer array (..., N_B={nb}), got {getattr(perm, 'dtype', type(perm).__name__)}")
    if perm.shape[-1] != nb or bool(((perm < -1) | (perm >= nb)).any()):
        raise ValueError(f"perm must have shape (..., {nb}) with entries in [-1, {nb}), got shape {tuple(perm.shape)}")
    if causal and bool(((perm >= xp.arange(nb)) & (perm >= 0)).any()):
        raise ValueError("perm: with causal=True block i may only draw from a block j < i")
    return perm


# --------------------------------------------------------------------------- the steps of forward
def _blocks(q, k, v, key_mask, nb, b):
    """q, k, v cut into N_B blocks of b (padded): (..., N_B, b, .), the original position of every
    slot (N_B, b), and which keys are real and unmasked (..., N_B, b)."""
    xp = get_namespace(q, k, v)
    n, lead = q.shape[-2], q.shape[:-2]
    npad = nb * b
    pos = xp.arange(npad).reshape(nb, b)                                 # (N_B, b) original positions
    qb = pad_axis(q, npad).reshape(lead + (nb, b, q.shape[-1]))          # (..., N_B, b, d)
    kb = pad_axis(k, npad).reshape(lead + (nb, b, k.shape[-1]))
    vb = pad_axis(v, npad).reshape(lead + (nb, b, v.shape[-1]))
    real = pos < n                                                      # (N_B, b)
    if key_mask is not None:
        real = real & pad_axis(key_mask[..., None], npad, value=False)[..., 0].reshape(key_mask.shape[:-1] + (nb, b))
    return pos, qb, kb, vb, xp.broadcast_to(real, lead + (nb, b))


def _sortnet(kz, W1, b1, W2, b2, causal):
    """R = W2^T ReLU(W1^T psi(X) + b1) + b2 on the sum-pooled key blocks psi (causal: row i from
    the previous, complete block i - 1; row 0 from zeros). Returns R (..., N_B, N_B) and the MLP cache."""
    xp = get_namespace(kz)
    summ = kz.sum(axis=-2)                                               # psi: sum pooling (..., N_B, d)
    if causal:                                                           # row i from block i-1 (complete)
        summ = xp.concatenate([xp.zeros_like(summ[..., :1, :]), summ[..., :-1, :]], axis=-2)
    return mlp_forward(summ, W1, b1, W2, b2, width=kz.shape[-3])         # (..., N_B, d) -> (..., N_B, N_B)


def _mixing(r, *, gumbel, tau, n_iters, causal, hard, perm, sortcut, dtype):
    """The mixing matrix P (..., N_B, N_B) and the BalancingCache of its Sinkhorn run (soft or hard;
    None with ``perm``).

    Soft: P = exp(Sinkhorn((R + epsilon) / tau)) on the support (causal: j < i). Hard: the
    one-hot matrix of the block choices, ``perm`` or the row-wise argmax of the balanced P
    (without SortCut a block that chooses itself gets no sorted part)."""
    xp = get_namespace(r)
    lead, nb = r.shape[:-2], r.shape[-1]
    if causal:
        support = xp.arange(nb)[None, :] < xp.arange(nb)[:, None]        # block i draws from j < i
    else:
        support = xp.ones((nb, nb), dtype=bool)
    if perm is None:
        la = r if gumbel is None else r + gumbel                         # R + epsilon
        la = xp.where(support, la * (1.0 / tau), NEG_INF).astype(dtype, copy=False)
        logp, balancing = sinkhorn_forward(la, n_iters, causal=causal)   # (..., N_B, N_B)
        if not hard:
            return xp.exp(logp), balancing
        choice = xp.where(support.any(axis=-1), xp.argmax(logp, axis=-1), -1)   # hard: argmax of balanced P
    else:
        choice, balancing = _check_perm(perm, nb, causal), None
    return _one_hot(xp.broadcast_to(choice, lead + (nb,)), nb, xp.arange(nb), sortcut is None, dtype), balancing


def _one_hot(choice, width, rows, exclude_own, dtype):
    """The one-hot mixing rows of the block choices (..., R) over ``width`` blocks (-1: no block);
    ``rows`` (R,) are the rows' own blocks, excluded when ``exclude_own`` (no duplicate keys)."""
    xp = get_namespace(choice)
    onehot = choice[..., :, None] == xp.arange(width)                    # (..., R, width)
    if exclude_own:
        onehot = onehot & (choice[..., :, None] != rows[:, None])
    return onehot.astype(dtype)


def _sorted_blocks(p, kzf, vzf, realf, padding_bias, d):
    """The sorted blocks K_s = P K_blocks, V_s = P V_blocks of the rows of P (..., R, G) over the
    blocks kzf (..., G, b*d), vzf (..., G, b*dv) (masked keys zero), and per sorted slot its
    real-token mass P realf, the row totals, which slots hold a real key, and their logit bias
    log(mass / total) (0 without padding or masks). Returns (K_s (..., R, b, d), V_s (..., R, b, dv),
    mass (..., R, b), total (..., R), slot_ok (..., R, b), slot_bias (..., R, b))."""
    xp = get_namespace(p, kzf, vzf)
    b = realf.shape[-1]
    shape = p.shape[:-1] + (b,)
    ks = (p @ kzf).reshape(shape + (d,))                                 # (..., R, G) @ (..., G, b d)
    vs = (p @ vzf).reshape(shape + (vzf.shape[-1] // b,))
    mass = p @ realf                                                     # (..., R, b): real-token mass of a sorted slot
    slot_ok = mass > 0                                                   # a slot of padding only is masked
    total = p.sum(axis=-1)                                               # (..., R): what each sorted block mixed
    if padding_bias:                                                     # log real fraction: 0 without padding
        frac = mass / xp.where(total > 0, total, 1.0)[..., None]
        slot_bias = xp.log(xp.where(slot_ok, frac, 1.0))
    else:
        slot_bias = xp.zeros_like(mass)
    return ks, vs, mass, total, slot_ok, slot_bias


def _attend_sorted_and_own(qb, ks, vs, kb, vb, slot_ok, slot_bias, pos, n, causal, key_mask, scale):
    """Every query block: ONE softmax over its sorted block and its own block (2b keys)."""
    xp = get_namespace(qb)
    lead, (nb, b) = qb.shape[:-3], pos.shape
    local = group_mask(pos, pos, n, n, causal=causal, key_mask=key_mask)       # (.., N_B, b, b)
    sorted_ok = (pos < n)[:, :, None] & slot_ok[..., :, None, :]               # (..., N_B, b, b)
    allowed = xp.concatenate([sorted_ok, xp.broadcast_to(local, lead + (nb, b, b))], axis=-1)
    kcat = xp.concatenate([ks, kb], axis=-2)                             # (..., N_B, 2b, d)
    vcat = xp.concatenate([vs, vb], axis=-2)
    bias = xp.concatenate([slot_bias, xp.zeros_like(slot_bias)], axis=-1)[..., :, None, :]   # (..., N_B, 1, 2b)
    out, _, acache = attend_forward(qb, kcat, vcat, allowed, scale, bias=bias)
    return out, acache


def _attend_sortcut(qb, ks, vs, slot_ok, slot_bias, pos, n, nk, scale):
    """SortCut: every query attends to the same n_k * b keys of the first n_k sorted blocks."""
    lead, (nb, b) = qb.shape[:-3], pos.shape
    d, dv = ks.shape[-1], vs.shape[-1]
    npad = nb * b
    kc = ks[..., :nk, :, :].reshape(lead + (1, nk * b, d))               # first n_k sorted blocks
    vc = vs[..., :nk, :, :].reshape(lead + (1, nk * b, dv))
    allowed = (pos < n).reshape(npad)[:, None] & slot_ok[..., :nk, :].reshape(lead + (1, 1, nk * b))
    bias = slot_bias[..., :nk, :].reshape(lead + (1, 1, nk * b))
    out, _, acache = attend_forward(qb.reshape(lead + (1, npad, d)), kc, vc, allowed, scale, bias=bias)
    return out, acache


# --------------------------------------------------------------------------- kernel
@forward_of("sinkhorn")
def forward(q, k, v, *, W1, b1, W2, b2, block, causal=False, key_mask=None, n_iters=8, tau=0.75,
            gumbel=None, sortcut=None, hard=False, perm=None, scale=None, padding_bias=True):
    """Sparse Sinkhorn attention (self-attention: M == N).

    q, k (..., N, d), v (..., N, dv); params W1 (d, d_h), b1 (d_h,), W2 (d_h, L>=N_B),
    b2 (L,), shared across batch and heads. Returns out (..., N, dv) and a :class:`SinkhornCache`.

    Cut into blocks; SortNet logits R from the block summaries; the mixing matrix P; the sorted
    blocks P K, P V; attention over each block's sorted and own block (SortCut: the first n_k sorted).
    """
    n, _, d, dv = check_qkv(q, k, v, key_mask=key_mask, self_attention=True)
    causal = check_bool("causal", causal)
    b = min(check_int("block", block), n)                               # one block of N holds the sequence
    n_iters = check_int("n_iters", n_iters)
    tau = check_positive_float("tau", tau)
    hard = check_bool("hard", hard)
    padding_bias = check_bool("padding_bias", padding_bias)
    scale = check_scale(scale, d)
    nb = -(-n // b)
    sortcut = _check_sortcut(sortcut, nb, causal)
    check_mlp_params(W1, b1, W2, b2, d, nb, q.dtype, "N_B (one per block)")
    gumbel = _check_gumbel(gumbel, nb, q.shape[:-2], q.dtype)
    lead = tuple(q.shape[:-2])

    pos, qb, kb, vb, real = _blocks(q, k, v, key_mask, nb, b)
    mk = real[..., None].astype(q.dtype)                                 # (..., N_B, b, 1)
    kz = kb * mk                                                         # masked keys -> 0
    vz = vb * mk
    r, mlp = _sortnet(kz, W1, b1, W2, b2, causal)                        # R (..., N_B, N_B)
    p, balancing = _mixing(r, gumbel=gumbel, tau=tau, n_iters=n_iters, causal=causal, hard=hard, perm=perm,
                           sortcut=sortcut, dtype=q.dtype)

    kzf = kz.reshape(lead + (nb, b * d))
    vzf = vz.reshape(lead + (nb, b * dv))
    realf = real.astype(q.dtype)
    ks, vs, mass, total, slot_ok, slot_bias = _sorted_blocks(p, kzf, vzf, realf, padding_bias, d)

    if sortcut is None:
        out, acache = _attend_sorted_and_own(qb, ks, vs, kb, vb, slot_ok, slot_bias, pos, n, causal, key_mask, scale)
    else:
        out, acache = _attend_sortcut(qb, ks, vs, slot_ok, slot_bias, pos, n, sortcut, scale)
    out = out.reshape(lead + (nb * b, dv))[..., :n, :]
    cache = SinkhornCache(acache, balancing, p, kzf, vzf, mk, realf, mass, mlp, (W1, b1, W2, b2), n, b, nb, tau,
                          causal, perm is None and not hard, sortcut, lead, padding_bias, total)
    return out, cache


def _attention_backward(dout_p, c):
    """Through the block attention: dq blocks, d sorted blocks (K_s, V_s), d own blocks and d log-mass."""
    xp = get_namespace(dout_p)
    lead, b, nb = c.lead, c.b, c.nb
    d, dv = c.attend.q.shape[-1], dout_p.shape[-1]
    if c.sortcut is None:
        g = attend_backward(dout_p.reshape(lead + (nb, b, dv)), c.attend)
        dks, dkb = g["k"][..., :b, :], g["k"][..., b:, :]
        dvs, dvb = g["v"][..., :b, :], g["v"][..., b:, :]
        dbias = g["bias"][..., :b].sum(axis=-2)                          # (..., N_B, b) sorted-slot log-mass
        return g["q"], dks, dvs, dkb, dvb, dbias
    nk = c.sortcut
    g = attend_backward(dout_p.reshape(lead + (1, nb * b, dv)), c.attend)
    dks = xp.zeros(lead + (nb, b, d), dtype=dout_p.dtype)
    dvs = xp.zeros(lead + (nb, b, dv), dtype=dout_p.dtype)
    dks[..., :nk, :, :] = g["k"].reshape(lead + (nk, b, d))
    dvs[..., :nk, :, :] = g["v"].reshape(lead + (nk, b, dv))
    dbias = xp.zeros(lead + (nb, b), dtype=dout_p.dtype)
    dbias[..., :nk, :] = g["bias"].sum(axis=-2).reshape(lead + (nk, b))
    return g["q"], dks, dvs, 0.0, 0.0, dbias


def _soft_mixing_backward(dksf, dvsf, dbias, c):
    """Through P = Sinkhorn((SortNet(psi(K)) + epsilon) / tau): the SortNet gradients and d psi,
    the gradient of every block summary (..., N_B, d)."""
    xp = get_namespace(dksf)
    dp = dksf @ c.kz.swapaxes(-1, -2) + dvsf @ c.vz.swapaxes(-1, -2)      # dP = dK_s K^T + dV_s V^T (..., N_B, N_B)
    if c.padding_bias:                                                  # bias = log(mass) - log(total)
        ok = c.mass > 0
        dbias = xp.where(ok, dbias, 0.0)
        dmass = xp.where(ok, dbias / xp.where(ok, c.mass, 1.0), 0.0)
        dp += dmass @ c.realf.swapaxes(-1, -2)                          # mass = P real: (..., N_B, b) @ (..., b, N_B)
        dtotal = -dbias.sum(axis=-1) / xp.where(c.total > 0, c.total, 1.0)         # (..., N_B)
        dp += dtotal[..., :, None]                                      # total = P 1
    dla = sinkhorn_backward(dp * c.p, c.balancing)                      # d log P = P * dP
    dr = dla * (1.0 / c.tau)                                            # log_alpha = (R + eps) / tau
    gm = mlp_backward(dr, c.mlp)                                        # SortNet backward
    ds_in = gm["x"]                                                     # (..., N_B, d)
    if c.causal:                                                        # s_in[i] = summ[i-1]
        dsumm = xp.concatenate([ds_in[..., 1:, :], xp.zeros_like(ds_in[..., :1, :])], axis=-2)
    else:
        dsumm = ds_in
    return dsumm, {name: gm[name] for name in ("W1", "b1", "W2", "b2")}


@backward_of("sinkhorn")
def backward(dout, cache):
    """Returns {"q", "k", "v", "W1", "b1", "W2", "b2"} (module docstring for the derivation)."""
    xp = get_namespace(dout)
    c = cache
    lead, n, b, nb = c.lead, c.n, c.b, c.nb
    npad = nb * b
    d, dv = c.attend.q.shape[-1], dout.shape[-1]
    dqb, dks, dvs, dkb, dvb, dbias = _attention_backward(pad_axis(dout, npad), c)
    dksf = dks.reshape(lead + (nb, b * d))
    dvsf = dvs.reshape(lead + (nb, b * dv))
    pt = c.p.swapaxes(-1, -2)
    dkz = (pt @ dksf).reshape(lead + (nb, b, d))                          # dK_blocks = P^T dK_s
    dvz = (pt @ dvsf).reshape(lead + (nb, b, dv))
    dparams = {name: xp.zeros_like(a) for name, a in zip(("W1", "b1", "W2", "b2"), c.params)}
    if c.soft:
        dsumm, dparams = _soft_mixing_backward(dksf, dvsf, dbias, c)
        dkz = dkz + dsumm[..., :, None, :]                                # sum pooling: each key of the block
    dk_blocks = dkb + dkz * c.mk
    dv_blocks = dvb + dvz * c.mk
    return {
        "q": dqb.reshape(lead + (npad, d))[..., :n, :],
        "k": dk_blocks.reshape(lead + (npad, d))[..., :n, :],
        "v": dv_blocks.reshape(lead + (npad, dv))[..., :n, :],
        **dparams,
    }


@reads_cache("sinkhorn")
def weights(cache):
    """The effective (..., N, N) matrix W with out == W @ v.

    Softmax weights over the concatenated keys, the sorted part mapped back to
    the original positions through P: W[(i,r), (j,s)] = A_sorted[i,r,s] P[i,j] m[j,s]
    + [j == i] A_local[i,r,s]. Teaching sizes only (allocates N x N)."""
    xp = get_namespace(cache.p)
    lead, n, b, nb = cache.lead, cache.n, cache.b, cache.nb
    npad = nb * b
    a = cache.attend.p
    m = cache.mk[..., 0]                                                  # (..., N_B, b)
    if cache.sortcut is None:
        a_s, a_l = a[..., :b], a[..., b:]                                 # (..., N_B, b, b) each
        w = a_s[..., :, :, None, :] * cache.p[..., :, None, :, None] * m[..., None, None, :, :]
        eye = xp.eye(nb, dtype=a.dtype)[:, None, :, None]                 # (N_B, 1, N_B, 1)
        w = w + eye * a_l[..., :, :, None, :]                             # (..., N_B, b, N_B, b)
        w = w.reshape(lead + (npad, npad))
    else:
        nk = cache.sortcut
        a4 = a.reshape(lead + (npad, nk, b)).swapaxes(-1, -2).swapaxes(-2, -3)   # (..., b, npad, n_k)
        w = a4 @ cache.p[..., None, :nk, :]                               # (..., b, npad, N_B)
        w = w.swapaxes(-2, -3).swapaxes(-1, -2) * m[..., None, :, :]      # (..., npad, N_B, b)
        w = w.reshape(lead + (npad, npad))
    return w[..., :n, :n]


@reads_cache("sinkhorn")
def sorted_keys(cache):
    """The sorted key sequence K_s = P K_blocks as (..., N_B * b, d) (padding included), for pictures:
    block i of the result is what query block i sees besides its own block."""
    lead, b, nb = cache.lead, cache.b, cache.nb
    d = cache.kz.shape[-1] // b
    return (cache.p @ cache.kz).reshape(lead + (nb * b, d))


@reads_cache("sinkhorn")
def induced_pattern(cache):
    """Hard mode: the boolean (..., N, N) support of W — own block (causal inside) plus the
    chosen block; SortCut: the blocks chosen by the first n_k rows, for every query."""
    xp = get_namespace(cache.p)
    n, b, nb = cache.n, cache.b, cache.nb
    npad = nb * b
    blk = xp.arange(npad) // b
    if cache.sortcut is not None:                                         # every query: blocks of rows < n_k
        cols = cache.p[..., :cache.sortcut, :].sum(axis=-2) > 0           # (..., N_B)
        pat = xp.broadcast_to(cols[..., None, blk], cache.p.shape[:-2] + (npad, npad))
        return pat[..., :n, :n]
    own = blk[:, None] == blk[None, :]                                    # (npad, npad)
    if cache.causal:
        own = own & (xp.arange(npad)[None, :] <= xp.arange(npad)[:, None])
    chosen = cache.p[..., blk[:, None], blk[None, :]] > 0                 # (..., npad, npad)
    pat = own | chosen
    return pat[..., :n, :n]


def setup(rng, *, n, d, heads, causal=False, dtype="float64"):
    """Default config for length n: b = :func:`default_block`, 8 Sinkhorn iterations,
    tau = 0.75, Gumbel noise of shape (heads, N_B, N_B); SortNet with d_h = d and
    W2 with as many columns as any length <= n needs (models reuse the params for
    shorter inputs; the config is re-made per length)."""
    b = default_block(n)
    nb = -(-n // b)
    nb_max = max(-(-m // default_block(m)) for m in range(1, n + 1))   # W2 serves every length <= n
    params = init_sortnet(rng, d=d, width=nb_max, dtype=dtype)
    config = {"block": b, "n_iters": 8, "tau": 0.75, "gumbel": asarray(draw_gumbel(rng, (heads, nb, nb)), dtype=dtype)}
    return params, config


# --------------------------------------------------------------------------- decoding
class DecodeConfig(NamedTuple):
    """What a decoder needs besides its state: :func:`forward`'s configuration and parameters."""
    W1: object
    b1: object
    W2: object
    b2: object
    block: int
    n_iters: int
    tau: float
    gumbel: object       # (..., G, G) or None
    hard: bool
    perm: object         # (..., G) ints or None
    scale: float
    padding_bias: bool
    lead: tuple
    d: int
    dv: int
    dtype: object


class SinkhornState(NamedTuple):
    """The decoder state after ``t`` tokens, the current block g = (t - 1) // b holding the last one.
    Rows of the own-block buffers past the tokens of block g are not yet written."""

    kz: object           # (..., g, b*d) the masked keys of the completed blocks 0..g-1 (flattened per block)
    vz: object           # (..., g, b*dv) their masked values
    realf: object        # (..., g, b) 1.0 for a real, unmasked key
    own_k: object        # (..., b, d) the keys of block g so far
    own_v: object        # (..., b, dv)
    own_real: object     # (..., b) bool
    col_lse: object      # (..., n_iters, g) log sum_{i <= g} exp X_k[i, j] per Sinkhorn iteration k, or None (perm)
    ks: object           # (..., b, d) block g's sorted block P[g] K_blocks
    vs: object           # (..., b, dv) P[g] V_blocks
    slot_ok: object      # (..., b) bool: the sorted slot holds real-token mass
    slot_bias: object    # (..., b) its logit bias log(mass / total)
    t: int
    cfg: DecodeConfig

    def held(self):
        """Numbers the state needs: every completed block (b (d + dv + 1) per block and head), the
        tokens of the current block (d + dv + 1 each), the running column sums (n_iters per earlier
        block) and the current sorted block (b (d + dv + 2)); grows with t."""
        lead = math.prod(self.cfg.lead)
        own = self.t - (self.t - 1) // self.cfg.block * self.cfg.block if self.t else 0
        arrays = (self.kz, self.vz, self.realf, self.col_lse, self.ks, self.vs, self.slot_ok, self.slot_bias)
        return sum(int(a.size) for a in arrays if a is not None) + lead * own * (self.cfg.d + self.cfg.dv + 1)


def init_state(*, lead, d, dv, dtype="float64", W1, b1, W2, b2, block, n_iters=8, tau=0.75, gumbel=None,
               sortcut=None, hard=False, perm=None, scale=None, padding_bias=True):
    """The empty decoder state (:class:`SinkhornState`) with :func:`forward`'s configuration and
    parameters (``sortcut`` must be None: SortCut is not causal). With b = ``block`` and
    g = ceil(t / b) blocks begun, it holds the masked keys, values and mask bits of the completed
    blocks and of the current one, t (d + dv + 1) numbers per head; the running causal column
    log-sum-exp of every Sinkhorn iteration over the rows so far, n_iters (g - 1); and the current
    block's sorted block, b (d + dv + 2). It grows with t (not bounded): a later block may draw
    from any earlier one."""
    lead = tuple(check_int("lead", x) for x in lead)
    d, dv = check_int("d", d), check_int("dv", dv)
    block, n_iters = check_int("block", block), check_int("n_iters", n_iters)
    tau, scale = check_positive_float("tau", tau), check_scale(scale, d)
    hard, padding_bias = check_bool("hard", hard), check_bool("padding_bias", padding_bias)
    _check_sortcut(sortcut, 1, True)
    check_mlp_params(W1, b1, W2, b2, d, 1, dtype, "N_B (one per block)")
    if gumbel is not None:
        check_float_array("gumbel", gumbel, min_ndim=2)
        gumbel = _check_gumbel(gumbel, min(gumbel.shape[-2:]), lead, dtype)       # all of its square corner
    if perm is not None:
        perm = _check_perm(perm, getattr(perm, "shape", (0,))[-1], True)
    xp = get_namespace(W1)
    cfg = DecodeConfig(W1, b1, W2, b2, block, n_iters, tau, gumbel, hard, perm, scale, padding_bias, lead, d, dv,
                       W1.dtype)
    zeros = lambda *shape, dt=W1.dtype: xp.zeros(lead + shape, dtype=dt)  # noqa: E731
    return SinkhornState(zeros(0, block * d), zeros(0, block * dv), zeros(0, block), zeros(block, d), zeros(block, dv),
                         zeros(block, dt=bool), None if perm is not None else zeros(n_iters, 0), zeros(block, d),
                         zeros(block, dv), zeros(block, dt=bool), zeros(block), 0, cfg)


def _check_reach(cfg, g):
    """Block g needs what the parallel forward over g + 1 blocks needs."""
    if cfg.W2.shape[1] < g + 1:
        raise ValueError(f"W2 must have at least N_B={g + 1} columns (one per block): decoding reached block {g}, "
                         f"got shape {tuple(cfg.W2.shape)}")
    if cfg.gumbel is not None and min(cfg.gumbel.shape[-2:]) < g + 1:
        raise ValueError(f"gumbel must have at least N_B={g + 1} rows and columns: decoding reached block {g}, "
                         f"got shape {tuple(cfg.gumbel.shape)}")
    if cfg.perm is not None and cfg.perm.shape[-1] < g + 1:
        raise ValueError(f"perm must have at least N_B={g + 1} entries: decoding reached block {g}, "
                         f"got shape {tuple(cfg.perm.shape)}")


def _mixing_row(kz, col_lse, g, cfg):
    """Row g of the mixing matrix P (..., g) over the completed blocks 0..g-1, and the running column
    log-sum-exps after it. Its sort logits come from psi(block g - 1), the last completed block; the
    causal balancing of row g needs only its own row and, per iteration k, C_k[j] = log sum_{i <= g}
    exp X_k[i, j] (X_k: after the row step), kept as a running log-sum-exp: O(n_iters g)."""
    xp = get_namespace(kz)
    lead, dtype = cfg.lead, cfg.dtype
    _check_reach(cfg, g)
    rows = xp.asarray([g])
    if cfg.perm is not None:
        choice = xp.broadcast_to(cfg.perm[..., g], lead)[..., None]            # (..., 1)
        return _one_hot(choice, g, rows, True, dtype)[..., 0, :], None
    if g == 0:                                                                 # block 0 draws from nothing
        return xp.zeros(lead + (0,), dtype=dtype), col_lse
    b, d = cfg.block, cfg.d
    summ = kz[..., g - 1, :].reshape(lead + (b, d)).sum(axis=-2)               # psi(block g - 1) (..., d)
    r, _ = mlp_forward(summ, cfg.W1, cfg.b1, cfg.W2, cfg.b2, width=g)          # R[g, :g] (..., g)
    la = r if cfg.gumbel is None else r + cfg.gumbel[..., g, :g]
    x = la * (1.0 / cfg.tau)                                                   # log_alpha[g, j < g]
    cols = xp.concatenate([col_lse, xp.full(lead + (cfg.n_iters, 1), NEG_INF, dtype=dtype)], axis=-1)
    for it in range(cfg.n_iters):
        top = x.max(axis=-1, keepdims=True)
        x = x - (xp.log(xp.exp(x - top).sum(axis=-1, keepdims=True)) + top)   # F_r: the row sums to one
        cols[..., it, :] = xp.logaddexp(cols[..., it, :], x)                   # C_k over the rows i <= g
        x = x - cols[..., it, :]                                               # F_c, causal
    if cfg.hard:
        return _one_hot(xp.argmax(x, axis=-1)[..., None], g, rows, True, dtype)[..., 0, :], cols
    return xp.exp(x), cols


def _with_sorted_block(state, p_row):
    """The state with block g's sorted block from its mixing row p_row (..., g)."""
    ks, vs, _, _, slot_ok, slot_bias = _sorted_blocks(p_row[..., None, :], state.kz, state.vz, state.realf,
                                                      state.cfg.padding_bias, state.cfg.d)
    return state._replace(ks=ks[..., 0, :, :], vs=vs[..., 0, :, :], slot_ok=slot_ok[..., 0, :],
                          slot_bias=slot_bias[..., 0, :])


def _start_block(state, g):
    """Token t = g b begins block g: block g - 1 joins the completed blocks, row g of P is balanced
    and block g's sorted block mixed. O(g (n_iters + b (d + dv))), once per b tokens."""
    cfg = state.cfg
    xp = get_namespace(state.kz)
    lead, b = cfg.lead, cfg.block
    kz, vz, realf = state.kz, state.vz, state.realf
    if g > 0:
        mk = state.own_real.astype(cfg.dtype)                                  # (..., b)
        kz = xp.concatenate([kz, (state.own_k * mk[..., None]).reshape(lead + (1, b * cfg.d))], axis=-2)
        vz = xp.concatenate([vz, (state.own_v * mk[..., None]).reshape(lead + (1, b * cfg.dv))], axis=-2)
        realf = xp.concatenate([realf, mk[..., None, :]], axis=-2)
    p_row, col_lse = _mixing_row(kz, state.col_lse, g, cfg)
    state = state._replace(kz=kz, vz=vz, realf=realf, col_lse=col_lse, own_k=xp.zeros_like(state.own_k),
                           own_v=xp.zeros_like(state.own_v), own_real=xp.zeros_like(state.own_real))
    return _with_sorted_block(state, p_row)


def prefill(q, k, v, state, *, key_mask=None):
    """The prompt q, k (..., T, d), v (..., T, dv) in one pass: its rows from the causal
    :func:`forward`, and from that forward's mixing matrix and balancing the state after it (the
    last begun block's row of P and every iteration's column log-sum-exps at that row). ``state``
    must be fresh. Returns (out (..., T, dv), state)."""
    check_state(state, SinkhornState, "sinkhorn")
    if state.t != 0:
        raise ValueError(f"prefill needs a fresh state (from init_state), this one is at position {state.t}")
    cfg = state.cfg
    lead, b, d, dv = cfg.lead, cfg.block, cfg.d, cfg.dv
    check_prompt(q, k, v, lead, d, dv)
    n = q.shape[-2]
    g = -(-n // b) - 1                                                         # the block of the last token
    _check_reach(cfg, g)
    perm = None if cfg.perm is None else cfg.perm[..., :g + 1]                 # the prompt's blocks
    out, cache = forward(q, k, v, W1=cfg.W1, b1=cfg.b1, W2=cfg.W2, b2=cfg.b2, block=b, causal=True, key_mask=key_mask,
                         n_iters=cfg.n_iters, tau=cfg.tau, gumbel=cfg.gumbel, hard=cfg.hard, perm=perm,
                         scale=cfg.scale, padding_bias=cfg.padding_bias)
    xp = get_namespace(q, k, v)
    real = xp.ones(lead + (n,), dtype=bool) if key_mask is None else xp.broadcast_to(key_mask, lead + (n,))
    mk = real.astype(cfg.dtype)
    done, own = g * b, n - g * b
    own_k, own_v, own_real = xp.zeros_like(state.own_k), xp.zeros_like(state.own_v), xp.zeros_like(state.own_real)
    own_k[..., :own, :], own_v[..., :own, :], own_real[..., :own] = k[..., done:, :], v[..., done:, :], real[..., done:]
    col_lse = None
    if cfg.perm is None:                                     # causal balancing steps: ("row", X), ("ccol", X, C), ...
        steps = cache.balancing.steps
        col_lse = xp.stack([xp.broadcast_to(steps[2 * it + 1][2], lead + steps[2 * it + 1][2].shape[-2:])[..., g, :g]
                            for it in range(cfg.n_iters)], axis=-2)            # (..., n_iters, g)
    state = state._replace(kz=(k[..., :done, :] * mk[..., :done, None]).reshape(lead + (g, b * d)),
                           vz=(v[..., :done, :] * mk[..., :done, None]).reshape(lead + (g, b * dv)),
                           realf=mk[..., :done].reshape(lead + (g, b)), own_k=own_k, own_v=own_v, own_real=own_real,
                           col_lse=col_lse, t=n)
    return out, _with_sorted_block(state, xp.broadcast_to(cache.p, lead + cache.p.shape[-2:])[..., g, :g])


def step(q_t, k_t, v_t, state, *, key_mask_t=None):
    """One token t (block g = t // b): at a block's first token the previous block is completed and
    row g of P balanced (:func:`_start_block`); then q_t attends, in ONE softmax, to block g's sorted
    block and to the tokens of its own block up to t. Returns (out_t (..., dv), state), equal to row t
    of the causal parallel :func:`forward`; O(b (d + dv)) per token, plus the block start."""
    check_state(state, SinkhornState, "sinkhorn")
    cfg = state.cfg
    check_step_inputs(q_t, k_t, v_t, key_mask_t, cfg.lead, cfg.d, cfg.dv)
    if q_t.dtype != cfg.dtype:
        raise ValueError(f"q_t must have the state's dtype {cfg.dtype}, got {q_t.dtype}")
    xp = get_namespace(q_t, k_t, v_t)
    t, b = state.t, cfg.block
    if t % b == 0:
        state = _start_block(state, t // b)
    o = t % b
    state.own_k[..., o, :], state.own_v[..., o, :] = k_t, v_t
    state.own_real[..., o] = True if key_mask_t is None else xp.broadcast_to(key_mask_t, cfg.lead)
    kcat = xp.concatenate([state.ks, state.own_k[..., :o + 1, :]], axis=-2)    # (..., b + o + 1, d)
    vcat = xp.concatenate([state.vs, state.own_v[..., :o + 1, :]], axis=-2)
    allowed = xp.concatenate([state.slot_ok, state.own_real[..., :o + 1]], axis=-1)[..., None, :]
    bias = xp.concatenate([state.slot_bias, xp.zeros(cfg.lead + (o + 1,), dtype=cfg.dtype)], axis=-1)[..., None, :]
    out, _, _ = attend_forward(q_t[..., None, :], kcat, vcat, allowed, cfg.scale, bias=bias)
    return out[..., 0, :], state._replace(t=t + 1)


MECHANISM = register(Mechanism(
    name="sinkhorn",
    title="Sparse Sinkhorn attention",
    citation="Tay et al., 2020",
    url="https://arxiv.org/abs/2002.11296",
    classes=("LP",),
    complexity="O(B^2)",
    causal=True,
    exact=False,
    kind="kernel",
    notebook="03_learned_patterns",
    forward=forward,
    backward=backward,
    weights=weights,
    setup=setup,
    init_state=init_state,
    prefill=prefill,
    step=step,
    sizes=("block", "n_iters", "sortcut"),
    windows=("block",),
    summary="SortNet + Sinkhorn balancing softly permutes blocks; each block attends to its own and a sorted block.",
))
