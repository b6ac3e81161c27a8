"""Tiled exact attention with the online softmax (FlashAttention's algorithm, in NumPy).

Milakov and Gimelshein, 2018, *Online normalizer calculation for softmax*,
https://arxiv.org/abs/1805.02867; Rabe and Staats, 2021, *Self-attention Does Not Need O(n^2)
Memory*, https://arxiv.org/abs/2112.05682; Dao et al., 2022, *FlashAttention: Fast and
Memory-Efficient Exact Attention with IO-Awareness*, https://arxiv.org/abs/2205.14135.

Intuition: the result of full attention does not need the N x M score matrix, only, per query
row, the softmax-weighted sum of the values. That sum can be built key tile by key tile if one
keeps, per row, the largest logit seen so far (m), the sum of the exponentials relative to it
(l) and the unnormalised output (acc): when a later tile raises the maximum, the old sums are
rescaled by exp(m_old - m_new). The forward then keeps only the output and one log-sum-exp per
row; the backward recomputes each tile's weights from q, k and that log-sum-exp. Same result as
:mod:`effattn.attention.full` (to rounding), O(N d + b_q b_k) memory instead of O(N M).

Notation (that of :mod:`effattn.attention.full` and :mod:`effattn.nn.sparse`): q (..., N, d),
k (..., M, d), v (..., M, dv); scale c (default d ** -0.5); queries in tiles I of ``block_q``
rows, keys in tiles J of ``block_k`` columns; S_IJ = c Q_I K_J^T (b_q, b_k), masked entries -inf.

Forward, for each query tile I (m = -inf, l = 0, acc = 0 per row), over its key tiles J:

    m_new = max(m, rowmax S_IJ)
    P~    = exp(S_IJ - m_new)                               (b_q, b_k), 0 where masked
    l     = l exp(m - m_new) + rowsum P~
    acc   = acc exp(m - m_new) + P~ V_J                     (b_q, dv)
    m     = m_new
then O_I = acc / l and lse_I = m + log l (the log-sum-exp of the row's logits). By induction
acc = sum_j exp(S_ij - m) v_j and l = sum_j exp(S_ij - m) over the tiles seen, whatever the
order, so O_I = sum_j softmax(S_I)_j v_j: the dense result, exactly in exact arithmetic.

As in :func:`effattn.nn.sparse.attend_forward` the exponent is base 2 (S is computed as
log2(e) S, exp2 is about twice as fast as exp in float32; lse is stored in natural log) and the
row sum rides on the value product: P~ [V_J, 1] = [P~ V_J, rowsum P~].

Backward: with the saved lse, P_IJ = exp(S_IJ - lse_I) is the tile of the dense softmax (the
recomputed tile equals the forward's P~ / l exactly in exact arithmetic), and the derivation of
:mod:`effattn.nn.sparse` (dS = P * (dP - rowsum(P * dP)), the softmax Jacobian) applies tile by
tile once its one row term is known. That term needs no tile: sum_j P_ij dP_ij =
sum_j P_ij (dO_i . v_j) = dO_i . O_i, so, per query tile,

    D_i  = rowsum(dO_i * O_i)                                (..., b_q)
    dV_J += P_IJ^T dO_I
    dP_IJ = dO_I V_J^T
    dS_IJ = P_IJ * (dP_IJ - D_I)
    dQ_I += c dS_IJ K_J,      dK_J += c dS_IJ^T Q_I
(dP - D is one product, [dO_I, -D_I] [V_J, 1]^T, as in attend_backward, and so is the
recomputed exponent, log2(e) (S_IJ - lse_I) = [log2(e) c Q_I, -log2(e) lse_I] [K_J, 1]^T: no pass
over the tile to subtract the row term.)

Masks: ``causal`` (query i sees keys j <= i, as in full, also for N != M) and ``key_mask``
(..., M) (True = real key). Causal tiles entirely above the diagonal (j0 > i1 - 1) are skipped
in both passes, and only the tiles that straddle the diagonal are masked; the work is about
(1 + 1/nb) / 2 of the non-causal one for nb query tiles. Masked keys get exactly zero weight
(exp(-inf) = 0); a row with no allowed key (l = 0) gets zeros and zero gradients, as in full.

Cost: O(N M d) time like full (the backward's recomputed S_IJ makes 7 tile products per tile
against full's 6); memory O(N (d + dv)): the cache (q, k, v, out, lse), in the backward the three
gradients and the copies [K, 1], [V, 1], plus one (..., b_q, b_k) tile (two in the backward). ``block_q``, ``block_k`` longer than the sequence
are clipped to it. Python loops run over tiles only; each tile is a batched ``@`` over the
leading (batch, head) axes.

Decoding: the KV cache of full attention (:func:`effattn.nn.decode.window_state`, every key
kept); the prompt goes through the tiled causal forward.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from ..backend import get_namespace
from ..nn.decode import window_prefill, window_state, window_step
from ..nn.functional import NEG_INF, _ignore_divide
from ..nn.sparse import LN2, LOG2E, combine_masks
from ..registry import Mechanism, backward_of, forward_of, reads_cache, register
from ..validate import check_bool, check_int, check_qkv, check_scale

# Tile sizes: 512 x 512 was the fastest of 256..1024 (forward + backward, float32, d = 64, one BLAS
# thread, N = 4096 causal and not); a 512 x 512 float32 tile is 1 MiB, about an L2 cache.
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512


class FlashCache(NamedTuple):
    q: object          # (..., N, d)
    k: object          # (..., M, d)
    v: object          # (..., M, dv)
    out: object        # (..., N, dv)
    lse: object        # (..., N) natural log-sum-exp of each row's allowed logits; -inf for an empty row
    key_mask: object   # (..., M) bool or None
    causal: bool
    scale: float
    block_q: int       # the tile sizes used (already clipped to N, M)
    block_k: int


def _check_config(block_q, block_k, causal):
    block_q = check_int("block_q", block_q, minimum=1)
    block_k = check_int("block_k", block_k, minimum=1)
    causal = check_bool("causal", causal)
    return block_q, block_k, causal


def _tiles(n, m, bq, bk, causal):
    """The (i0, i1, key tiles) of the computation: query tile [i0, i1) against key tiles
    [(j0, j1, diagonal), ...]; causal drops the tiles with j0 > i1 - 1 (all keys after all
    queries) and marks those that straddle the diagonal (j1 - 1 > i0) for masking."""
    for i0 in range(0, n, bq):
        i1 = min(i0 + bq, n)
        kend = min(i1, m) if causal else m
        yield i0, i1, [(j0, min(j0 + bk, kend), causal and min(j0 + bk, kend) - 1 > i0)
                       for j0 in range(0, kend, bk)]


def _scores(qs, kt):
    """One tile of logits, base 2: qs (..., b_q, d') @ kt (..., d', b_k) -> (..., b_q, b_k), with
    qs = log2(e) c Q_I (d' = d; the backward appends the -lse column, d' = d + 1, and kt a row of ones).
    Every tile product of both passes goes through here (the tests count them)."""
    return qs @ kt


def _mask_tile(s, i0, j0, diagonal, key_mask, j1, xp):
    """Set the masked entries of the logit tile s (..., b_q, b_k) (rows i0.., keys j0..j1) to -inf."""
    if key_mask is not None:
        km = key_mask[..., None, j0:j1]
        if not bool(km.all()):
            xp.copyto(s, NEG_INF, where=~km)
    if diagonal:
        r = xp.arange(i0, i0 + s.shape[-2])[:, None]
        c = xp.arange(j0, j1)[None, :]
        xp.copyto(s, NEG_INF, where=c > r)               # key j after query i


def _with_ones(x, xp):
    """[x, 1]: x (..., L, c) with a column of ones appended -> (..., L, c + 1) (one O(L c) copy)."""
    return xp.concatenate([x, xp.ones(x.shape[:-1] + (1,), dtype=x.dtype)], axis=-1)


@forward_of("flash")
def forward(q, k, v, *, causal=False, key_mask=None, scale=None, block_q=DEFAULT_BLOCK_Q,
            block_k=DEFAULT_BLOCK_K):
    """Exact softmax attention by tiles with the online softmax.

    q (..., N, d), k (..., M, d), v (..., M, dv); key_mask (..., M) bool (True = real key);
    scale defaults to d ** -0.5; block_q, block_k >= 1 the tile sizes (clipped to N, M).
    Returns out (..., N, dv) and a :class:`FlashCache` (q, k, v, out, lse (..., N), key_mask).
    """
    n, m, d, dv = check_qkv(q, k, v, key_mask=key_mask)
    block_q, block_k, causal = _check_config(block_q, block_k, causal)
    scale = check_scale(scale, d)
    bq, bk = min(block_q, n), min(block_k, m)
    xp = get_namespace(q, k, v)
    lead = q.shape[:-2]
    dtype = q.dtype
    kt = k.swapaxes(-1, -2)                                              # (..., d, M)
    v1 = _with_ones(v, xp)                                               # [V, 1] (..., M, dv + 1)
    out = xp.empty(lead + (n, dv), dtype=dtype)
    lse = xp.empty(lead + (n,), dtype=dtype)
    for i0, i1, keys in _tiles(n, m, bq, bk, causal):
        qs = q[..., i0:i1, :] * (scale * LOG2E)                          # log2(e) c Q_I
        mx = xp.full(lead + (i1 - i0, 1), NEG_INF, dtype=dtype)          # running max (base 2)
        acc = None                                                       # [acc, l] (..., b_q, dv + 1)
        for j0, j1, diagonal in keys:
            s = _scores(qs, kt[..., j0:j1])                              # log2(e) S_IJ
            _mask_tile(s, i0, j0, diagonal, key_mask, j1, xp)
            m_new = xp.maximum(mx, s.max(axis=-1, keepdims=True))
            m_ref = xp.where(xp.isfinite(m_new), m_new, 0.0).astype(dtype, copy=False)  # 0 while all masked
            s -= m_ref
            p = xp.exp2(s, out=s)                                        # P~ = exp(S - m_new), 0 where masked
            pv = p @ v1[..., j0:j1, :]                                   # [P~ V_J, rowsum P~]
            if acc is None:
                acc = pv
            else:
                acc *= xp.exp2(mx - m_ref)                               # exp(m - m_new); 0 while m = -inf
                acc += pv
            mx = m_new
        l = acc[..., -1:]
        rl = xp.where(l > 0, 1.0 / xp.where(l > 0, l, 1.0), 0.0).astype(dtype, copy=False)
        out[..., i0:i1, :] = acc[..., :-1] * rl                          # O_I = acc / l (0 for an empty row)
        with _ignore_divide(xp):
            lse[..., i0:i1] = (xp.log(l) + mx * LN2)[..., 0]             # lse = m + log l; -inf for an empty row
    return out, FlashCache(q, k, v, out, lse, key_mask, causal, scale, bq, bk)


@backward_of("flash")
def backward(dout, cache):
    """Returns {"q": dq, "k": dk, "v": dv}: each tile's P recomputed from q, k and the saved lse."""
    q, k, v, out, lse, key_mask, causal, scale, bq, bk = cache
    xp = get_namespace(dout, q)
    n, m = q.shape[-2], k.shape[-2]
    dtype = q.dtype
    lse2 = xp.where(xp.isfinite(lse), lse * LOG2E, 0.0).astype(dtype, copy=False)[..., None]  # (..., N, 1)
    kt1 = _with_ones(k, xp).swapaxes(-1, -2)                             # [K, 1]^T (..., d + 1, M)
    v1t = _with_ones(v, xp).swapaxes(-1, -2)                             # [V, 1]^T (..., dv + 1, M)
    dq = xp.empty(q.shape, dtype=dtype)
    dk = xp.zeros(k.shape, dtype=dtype)
    dv = xp.zeros(v.shape, dtype=dtype)
    for i0, i1, keys in _tiles(n, m, bq, bk, causal):
        qi = q[..., i0:i1, :]
        qs1 = xp.concatenate([qi * (scale * LOG2E), -lse2[..., i0:i1, :]], axis=-1)   # [log2(e) c Q_I, -lse_I]
        doi = dout[..., i0:i1, :]
        rowdot = (doi * out[..., i0:i1, :]).sum(axis=-1, keepdims=True)   # D_I = rowsum(dO_I * O_I)
        do1 = xp.concatenate([doi, -rowdot], axis=-1)                    # [dO_I, -D_I]
        dqi = None
        for j0, j1, diagonal in keys:
            s = _scores(qs1, kt1[..., j0:j1])                            # log2(e) (S_IJ - lse_I)
            _mask_tile(s, i0, j0, diagonal, key_mask, j1, xp)
            p = xp.exp2(s, out=s)                                        # P_IJ = exp(S_IJ - lse_I)
            dv[..., j0:j1, :] += p.swapaxes(-1, -2) @ doi                # dV_J += P^T dO_I
            ds = do1 @ v1t[..., j0:j1]                                   # dP - D = [dO, -D] [V, 1]^T
            ds *= p                                                      # dS = P * (dP - D)
            g = ds @ k[..., j0:j1, :]
            dqi = g if dqi is None else dqi + g
            dk[..., j0:j1, :] += ds.swapaxes(-1, -2) @ qi
        dq[..., i0:i1, :] = dqi * scale                                  # dQ = c dS K
    dk *= scale                                                          # dK = c dS^T Q
    return {"q": dq, "k": dk, "v": dv}


class TileTrace(NamedTuple):
    """The online-softmax state of some query rows after each key tile (:func:`online_softmax_trace`)."""
    bounds: list     # [(j0, j1), ...] the key tiles, in the order visited
    m: object        # (T, ..., N) running max of the logits (natural log)
    l: object        # (T, ..., N) running sum of exp(S - m)
    out: object      # (T, ..., N, dv) acc / l: attention over the keys seen so far


def online_softmax_trace(q, k, v, *, block_k, scale=None):
    """The recurrence of :func:`forward`'s inner loop, step by step, for teaching and figures:
    m, l and the partial output acc / l after each key tile (no causal or key mask; natural log).

    q (..., N, d), k (..., M, d), v (..., M, dv). After the last tile ``out[-1]`` is full attention
    and ``m[-1] + log(l[-1])`` its log-sum-exp. Keeps all T states: for small examples only."""
    n, m_len, d, dv = check_qkv(q, k, v)
    bk = min(check_int("block_k", block_k), m_len)
    scale = check_scale(scale, d)
    xp = get_namespace(q, k, v)
    mx = xp.full(q.shape[:-1], NEG_INF, dtype=q.dtype)
    l = xp.zeros(q.shape[:-1], dtype=q.dtype)
    acc = xp.zeros(q.shape[:-1] + (dv,), dtype=q.dtype)
    bounds, ms, ls, outs = [], [], [], []
    for j0 in range(0, m_len, bk):
        j1 = min(j0 + bk, m_len)
        s = scale * (q @ k[..., j0:j1, :].swapaxes(-1, -2))             # S_IJ (..., N, b_k)
        m_new = xp.maximum(mx, s.max(axis=-1))                           # m' = max(m, rowmax S_IJ)
        p = xp.exp(s - m_new[..., None])                                 # P~ = exp(S_IJ - m')
        l = l * xp.exp(mx - m_new) + p.sum(axis=-1)                      # l' = l e^(m - m') + rowsum P~
        acc = acc * xp.exp(mx - m_new)[..., None] + p @ v[..., j0:j1, :]  # acc' = acc e^(m - m') + P~ V_J
        mx = m_new
        bounds.append((j0, j1))
        ms.append(mx)
        ls.append(l)
        outs.append(acc / l[..., None])
    return TileTrace(bounds, xp.stack(ms), xp.stack(ls), xp.stack(outs))


@reads_cache("flash")
def weights(cache):
    """The dense (..., N, M) matrix P = exp(S - lse), recomputed from q, k and the saved
    log-sum-exp (figures and tests only: it allocates N x M); out == P @ v."""
    xp = get_namespace(cache.q)
    n, m = cache.q.shape[-2], cache.k.shape[-2]
    s = (cache.q * (cache.scale * LOG2E)) @ cache.k.swapaxes(-1, -2)
    allowed = combine_masks(n, m, xp, causal=cache.causal, key_mask=cache.key_mask)
    if allowed is not None:
        s = xp.where(allowed, s, NEG_INF)
    lse2 = xp.where(xp.isfinite(cache.lse), cache.lse * LOG2E, 0.0).astype(s.dtype, copy=False)
    return xp.exp2(s - lse2[..., None])


def build_pattern(n, *, m=None, causal=False, xp=None):
    """What flash attention may attend from sizes alone: everything (N x M), or j <= i when causal."""
    n = check_int("n", n, minimum=1)
    m = n if m is None else check_int("m", m, minimum=1)
    causal = check_bool("causal", causal)
    xp = get_namespace() if xp is None else xp
    if not causal:
        return xp.ones((n, m), dtype=bool)
    return xp.arange(m)[None, :] <= xp.arange(n)[:, None]


@reads_cache("flash")
def pattern(cache):
    """The support of this call: everything the masks allow (as full), whatever the tiles."""
    xp = get_namespace(cache.q)
    n, m = cache.q.shape[-2], cache.k.shape[-2]
    shape = cache.q.shape[:-2] + (n, m)
    allowed = combine_masks(n, m, xp, causal=cache.causal, key_mask=cache.key_mask)
    if allowed is None:
        return xp.ones(shape, dtype=bool)
    return xp.broadcast_to(allowed, shape)


def setup(rng, *, n, d, heads, causal=False, dtype="float64"):
    """No parameters. The tuned tiles for long sequences; for short (test) sequences tiles of
    about n / 3 (at least 2), so that there are several, with a ragged last one."""
    if n >= 1024:
        return {}, {"block_q": DEFAULT_BLOCK_Q, "block_k": DEFAULT_BLOCK_K}
    b = max(2, math.ceil(n / 3))
    return {}, {"block_q": b, "block_k": max(2, b - 1)}


# --------------------------------------------------------------------------- decoding
def init_state(*, lead, d, dv, dtype="float64", scale=None, block_q=DEFAULT_BLOCK_Q, block_k=DEFAULT_BLOCK_K):
    """The KV cache, as full attention's (every key kept); the prompt runs the tiled causal forward."""
    block_q, block_k, _ = _check_config(block_q, block_k, True)
    scale = check_scale(scale, d)
    return window_state(lead=lead, d=d, dv=dv, dtype=dtype, scale=scale,
                        reach=lambda i, pos: pos <= i, keep=lambda t, pos: pos >= 0,
                        forward=lambda q, k, v, km: forward(q, k, v, causal=True, key_mask=km, scale=scale,
                                                            block_q=block_q, block_k=block_k)[0])


prefill = window_prefill
step = window_step


MECHANISM = register(Mechanism(
    name="flash",
    title="Tiled exact attention with the online softmax (FlashAttention)",
    citation="Milakov & Gimelshein, 2018; Rabe & Staats, 2021; Dao et al., 2022",
    url="https://arxiv.org/abs/2205.14135",
    classes=("TR",),
    complexity="O(N^2) time, O(N) memory",
    causal=True,
    exact=True,
    kind="kernel",
    notebook="10_techniques",
    forward=forward,
    backward=backward,
    weights=weights,
    setup=setup,
    pattern=pattern,
    init_state=init_state,
    prefill=prefill,
    step=step,
    subquadratic=True,
    sizes=("block_q", "block_k"),
    windows=("block_q", "block_k"),
    summary="Exact attention by tiles with the online softmax: only out and one log-sum-exp per row are kept.",
))
