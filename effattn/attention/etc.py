"""ETC: Extended Transformer Construction — global-local attention with relative positions.

Ainslie, Ontanon, Alberti, Cvicek, Fisher, Pham, Ravula, Sanghai, Wang, Yang, 2020,
*ETC: Encoding Long and Structured Inputs in Transformers*, https://arxiv.org/abs/2004.08483

Intuition: the input is split in two. A short *global* input of n_g tokens
(one per sentence or paragraph, say) and the *long* input of N_l tokens.
Attention is cut into four pieces:

    g2g  global -> global   full            (n_g x n_g)
    g2l  global -> long     full            (n_g x N_l)   [optionally hard-masked to its segment]
    l2g  long   -> global   full            (N_l x n_g)
    l2l  long   -> long     local, radius r (N_l x (2r+1))

so the long tokens talk to each other only locally but can exchange
information through the global tokens in two hops, at cost
O(n_g^2 + n_g N_l + N_l r) instead of O(N_l^2).

Relative positions (Shaw et al., 2018, as ETC uses them): the logit between
i and j gets a learned vector a_{l(i,j)} added to the *key*,

    e_ij = q_i . (k_j + a_{l(i,j)}) / sqrt(d),     l(i,j) = clip(j - i, -k, k)

with ``rel_emb`` (2k + 1, d) holding a_{-k}, ..., a_{k} (row l + k), shared
by all heads. ETC labels the l2l piece by relative distance and the g2g
piece by distance between global tokens; both use ``rel_emb`` here. The g2l
and l2g pieces carry no distance label (ETC's released code gives them two
segment labels, "own segment / other"; not modelled here — the hard masks
below express the segment structure instead).

Segments (``segment_ids`` (N_l,) int, -1 = none): long token j belongs to
global token segment_ids[j]. With segment_ids given, g2l is *hard-masked*
(ETC's "hard g2l masking"): global token s reads only the long tokens of its
segment; ``hard_l2g=True`` also restricts l2g (long token j reads only its
own global token).

Layout (a choice of this implementation, keeping the kernel contract
``q, k, v -> out``): one sequence of length N = n_g + N_l whose first
``n_global`` positions are the global tokens. q, k (..., N, d),
v (..., N, dv), key_mask (..., N), out (..., N, dv); out == weights @ v.

causal=True raises ValueError: the global tokens summarise the whole input
(g2l reads every long token and every long token reads the globals), so no
position's output can be computed before the whole input is known. ETC is an
encoder.

Implementation (never N x N): the long part is cut into blocks of b = r
queries whose keys are the n_g global keys followed by the previous, own and
next long blocks (``neighbour_blocks``); :func:`effattn.nn.sparse.attend_forward`
with an additive ``bias`` does the masked softmax per block. The relative
bias q_i . a_{l(i,j)} is computed as qa = Q A^T ((..., N, 2k+1), one matmul)
followed by a fixed one-hot selection O[s, t, c] = [l(s, t) = c] (inside a
block, l depends only on the slots s, t), done as a batched matmul. The
global rows are dense (n_g x N) with the g2g bias (the global keys and rows:
:mod:`effattn.nn.global_tokens`, shared with Longformer and BigBird).

Complexity: O((n_g^2 + N n_g + 3 N r)(d + 2k + 1)) time and O(N (n_g + 3r))
memory: O(N_g^2 + N N_g) for a fixed radius, as the survey states.

Backward (per block, :func:`effattn.nn.sparse.attend_backward`): dS as for
softmax attention; dbias = dS; with bias = scale * select(Q A^T):

    dQA = scale * select^T(dS)        (the one-hot matmul transposed)
    dQ += dQA A,     dA = dQA^T Q     (summed over batch, heads and rows)

plus the usual dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO.
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import asarray, get_namespace
from ..validate import broadcast_shapes, check_bool, check_causal, check_int, check_param, check_qkv, check_scale
from ..nn.functional import softmax_forward
from ..nn.blockwise import neighbour_blocks, neighbour_blocks_backward
from ..nn.global_tokens import global_keys, global_keys_backward, global_rows_forward
from ..nn.sparse import attend_backward, attend_forward, dense_from_groups, group_mask, pad_axis, round_up
from ..registry import Mechanism, backward_of, forward_of, reads_cache, register

WHY_NOT_CAUSAL = ("ETC's global tokens summarise the whole input (g2l attention reads every long token "
                  "and every long token reads the globals), so outputs depend on the future; ETC is an encoder")


# --------------------------------------------------------------------------- relative-position bias
def relative_labels(s_pos, t_pos, max_distance, xp):
    """l(i, j) + k = clip(j - i, -k, k) + k for positions s_pos (S,) and t_pos (T,): int (S, T)."""
    return xp.clip(t_pos[None, :] - s_pos[:, None], -max_distance, max_distance) + max_distance


def _onehot(labels, c, dtype, xp):
    """O[s, t, c] = [labels[s, t] == c]: (S, T, C) of the inputs' dtype."""
    return (labels[..., None] == xp.arange(c)).astype(dtype)


def select_forward(qa, onehot):
    """bias[..., s, t] = qa[..., s, l(s, t)]:  qa (..., S, C), onehot (S, T, C) -> (..., S, T).

    As one batched matmul over the slot s: (S, X, C) @ (S, C, T) -> (S, X, T)."""
    xp = get_namespace(qa)
    s, c = qa.shape[-2:]
    x = xp.moveaxis(qa, -2, 0)                              # (S, ..., C)
    lead = x.shape[1:-1]
    y = x.reshape(s, -1, c) @ onehot.swapaxes(-1, -2)      # (S, X, C) @ (S, C, T) -> (S, X, T)
    return xp.moveaxis(y.reshape((s,) + lead + (onehot.shape[1],)), 0, -2)


def select_backward(dbias, onehot):
    """Adjoint of :func:`select_forward`: dbias (..., S, T) -> (..., S, C)."""
    xp = get_namespace(dbias)
    s, t = dbias.shape[-2:]
    x = xp.moveaxis(dbias, -2, 0)                           # (S, ..., T)
    lead = x.shape[1:-1]
    y = x.reshape(s, -1, t) @ onehot                       # (S, X, T) @ (S, T, C) -> (S, X, C)
    return xp.moveaxis(y.reshape((s,) + lead + (onehot.shape[2],)), 0, -2)


def _cat_last(a, b):
    """Concatenate two boolean masks on the last axis after broadcasting their other axes."""
    xp = get_namespace(a, b)
    lead = broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return xp.concatenate([xp.broadcast_to(a, lead + a.shape[-1:]), xp.broadcast_to(b, lead + b.shape[-1:])], axis=-1)


# --------------------------------------------------------------------------- validation
def _check_config(q, n, n_global, radius, max_distance, rel_emb, segment_ids, hard_l2g, causal):
    check_causal(causal, False, WHY_NOT_CAUSAL)
    ng = check_int("n_global", n_global)
    if ng >= n:
        raise ValueError(f"n_global must be smaller than the sequence length N={n} (global tokens come first), got {ng}")
    r = min(check_int("radius", radius), n)                             # a radius beyond N reaches every token
    kmax = check_int("max_distance", max_distance)
    check_param("rel_emb", rel_emb, (2 * kmax + 1, q.shape[-1]), dtype=q.dtype)
    hard_l2g = check_bool("hard_l2g", hard_l2g)
    if segment_ids is not None:
        if getattr(segment_ids, "dtype", None) is None or segment_ids.dtype.kind not in "iu":
            raise ValueError(f"segment_ids must be an integer array (N_l,) of global-token indices, got {type(segment_ids).__name__}")
        if tuple(segment_ids.shape) != (n - ng,):
            raise ValueError(f"segment_ids must have shape (N_l,) = ({n - ng},), got {tuple(segment_ids.shape)}")
        if segment_ids.size and (int(segment_ids.min()) < -1 or int(segment_ids.max()) >= ng):
            raise ValueError(f"segment_ids must lie in [-1, n_global={ng}), got values in "
                             f"[{int(segment_ids.min())}, {int(segment_ids.max())}]")
    elif hard_l2g:
        raise ValueError("hard_l2g=True needs segment_ids")
    return ng, r, kmax, hard_l2g


# --------------------------------------------------------------------------- forward / backward
class ETCCache(NamedTuple):
    glob: object     # AttendCache of the global rows (..., n_g, N) (g2g + g2l), with bias
    long: object     # AttendCache of the long blocks (..., G, r, n_g + 3r) (l2g + l2l), with bias
    onehot_g: object  # (n_g, n_g, C) g2g label selection
    onehot_l: object  # (r, 3r, C) l2l label selection
    q: object        # (..., N, d) for dA
    rel_emb: object  # (C, d)
    qpos: object     # (G, r) long positions of the block queries
    kpos: object     # (G, 3r) long positions of the block window keys
    n: int
    ng: int
    scale: float
    segment_ids: object  # (N_l,) or None
    hard_l2g: bool


@forward_of("etc")
def forward(q, k, v, *, n_global, radius, max_distance, rel_emb, segment_ids=None, hard_l2g=False,
            causal=False, key_mask=None, scale=None):
    """ETC global-local attention on the sequence [n_global global tokens, N_l long tokens].

    q, k (..., N, d), v (..., N, dv); rel_emb (2 max_distance + 1, d) learned relative
    embeddings; segment_ids optional (N_l,) ints in [-1, n_global); key_mask (..., N) bool.
    Returns out (..., N, dv), cache.
    """
    n, _, d, dv = check_qkv(q, k, v, key_mask=key_mask, self_attention=True)
    ng, r, kmax, hard_l2g = _check_config(q, n, n_global, radius, max_distance, rel_emb, segment_ids, hard_l2g, causal)
    scale = check_scale(scale, d)
    xp = get_namespace(q, k, v)
    if segment_ids is not None:
        segment_ids = xp.asarray(segment_ids)              # host ids with device inputs: move them
    lead = tuple(q.shape[:-2])
    nl = n - ng
    c = 2 * kmax + 1
    gl = -(-nl // r)                                        # number of long blocks
    npad = round_up(nl, r)

    qa = q @ rel_emb.T                                      # (..., N, d) @ (d, C) -> (..., N, C): q_i . a_l for every label

    # ---- global rows: g2g (relative bias) + g2l (full, or hard-masked to the segment)
    gpos = xp.arange(ng)
    onehot_g = _onehot(relative_labels(gpos, gpos, kmax, xp), c, q.dtype, xp)       # (n_g, n_g, C)
    bias_g = xp.zeros(lead + (ng, n), dtype=q.dtype)                                # g2l / l2g: no distance label
    bias_g[..., :ng] = select_forward(qa[..., :ng, :], onehot_g) * scale            # q_i . a_{l(i,j)} / sqrt(d)
    allowed_g = None
    if segment_ids is not None:                                                     # hard g2l: s reads its segment
        allowed_g = xp.concatenate([xp.ones((ng, ng), dtype=bool), segment_ids[None, :] == gpos[:, None]], axis=-1)
    og, _, glob_cache = global_rows_forward(q[..., :ng, :], k, v, allowed_g, key_mask=key_mask, scale=scale,
                                            bias=bias_g)                            # (..., n_g, dv)

    # ---- long rows: blocks of r queries; keys = n_g globals (l2g) + previous/own/next block (l2l)
    def blocks(x):                                                                  # (..., N, f) -> (..., G, r, f)
        return pad_axis(x[..., ng:, :], npad).reshape(lead + (gl, r, x.shape[-1]))

    qb = blocks(q)                                                                  # (..., G, r, d)
    kb = xp.concatenate([global_keys(k[..., :ng, :], gl), neighbour_blocks(blocks(k), 1, 1)], axis=-2)   # (..., G, n_g + 3r, d)
    vb = xp.concatenate([global_keys(v[..., :ng, :], gl), neighbour_blocks(blocks(v), 1, 1)], axis=-2)   # (..., G, n_g + 3r, dv)
    qpos = xp.arange(npad).reshape(gl, r)                                           # (G, r) long positions
    kpos = qpos[:, :1] - r + xp.arange(3 * r)[None, :]                              # (G, 3r): blocks c-1, c, c+1
    # l2l: |i - j| <= r, both real, key_mask (in long coordinates)
    allowed_w = group_mask(qpos, kpos, nl, nl, key_mask=None if key_mask is None else key_mask[..., ng:])
    allowed_w = allowed_w & (abs(kpos[:, None, :] - qpos[:, :, None]) <= r)         # (.., G, r, 3r)
    # l2g: every global (or only its own with hard_l2g), real query, key_mask
    allowed_l2g = xp.broadcast_to((qpos < nl)[..., None], (gl, r, ng))             # (G, r, n_g)
    if hard_l2g:
        seg = pad_axis(segment_ids[:, None], npad, axis=0, value=-1)[:, 0].reshape(gl, r)
        allowed_l2g = allowed_l2g & (seg[..., None] == gpos)
    if key_mask is not None:
        allowed_l2g = allowed_l2g & key_mask[..., None, None, :ng]
    allowed_l = _cat_last(allowed_l2g, allowed_w)                                   # (.., G, r, n_g + 3r)
    onehot_l = _onehot(relative_labels(xp.arange(r), xp.arange(3 * r) - r, kmax, xp), c, q.dtype, xp)   # (r, 3r, C)
    bias_l = xp.zeros(lead + (gl, r, ng + 3 * r), dtype=q.dtype)
    bias_l[..., ng:] = select_forward(blocks(qa), onehot_l) * scale                # (..., G, r, 3r)
    ol, _, long_cache = attend_forward(qb, kb, vb, allowed_l, scale, bias=bias_l)  # (..., G, r, dv)

    out = xp.concatenate([og, ol.reshape(lead + (npad, dv))[..., :nl, :]], axis=-2)   # (..., N, dv)
    return out, ETCCache(glob_cache, long_cache, onehot_g, onehot_l, q, rel_emb, qpos, kpos, n, ng, scale,
                      segment_ids, hard_l2g)


@backward_of("etc")
def backward(dout, cache):
    """Gradients {"q", "k", "v", "rel_emb"}."""
    glob, long, onehot_g, onehot_l, q, rel_emb, qpos, kpos, n, ng, scale, *_ = cache
    xp = get_namespace(dout)
    lead = tuple(dout.shape[:-2])
    d, dv = q.shape[-1], dout.shape[-1]
    gl, r = qpos.shape
    nl, npad = n - ng, gl * r
    # global rows
    gg = attend_backward(dout[..., :ng, :], glob)
    dk = gg["k"]                                                                   # (..., N, d), a new array
    dvv = gg["v"]
    dqa = xp.zeros(lead + (n, rel_emb.shape[0]), dtype=dout.dtype)                 # (..., N, C)
    dqa[..., :ng, :] = select_backward(gg["bias"][..., :ng], onehot_g) * scale
    dq = xp.zeros_like(q)
    dq[..., :ng, :] = gg["q"]
    # long blocks
    dob = pad_axis(dout[..., ng:, :], npad).reshape(lead + (gl, r, dv))
    gb = attend_backward(dob, long)
    dq[..., ng:, :] += gb["q"].reshape(lead + (npad, d))[..., :nl, :]
    dk[..., :ng, :] += global_keys_backward(gb["k"][..., :ng, :])                  # l2g keys: sum over blocks
    dvv[..., :ng, :] += global_keys_backward(gb["v"][..., :ng, :])
    dk[..., ng:, :] += neighbour_blocks_backward(gb["k"][..., ng:, :], 1, 1).reshape(lead + (npad, d))[..., :nl, :]
    dvv[..., ng:, :] += neighbour_blocks_backward(gb["v"][..., ng:, :], 1, 1).reshape(lead + (npad, dv))[..., :nl, :]
    dqa_l = select_backward(gb["bias"][..., ng:], onehot_l) * scale                # (..., G, r, C)
    dqa[..., ng:, :] = dqa_l.reshape(lead + (npad, -1))[..., :nl, :]
    # qa = Q A^T:  dQ += dQA A,  dA = dQA^T Q
    dq += dqa @ rel_emb
    drel = dqa.reshape(-1, dqa.shape[-1]).T @ q.reshape(-1, d)                     # (C, X) @ (X, d) -> (C, d)
    return {"q": dq, "k": dk, "v": dvv, "rel_emb": drel}


@reads_cache("etc")
def weights(cache):
    """The (..., N, N) attention matrix: out == W @ v."""
    glob, long, *_ = cache
    qpos, kpos, n, ng = cache.qpos, cache.kpos, cache.n, cache.ng
    xp = get_namespace(long.p)
    nl = n - ng
    q_idx = xp.where(qpos < nl, qpos + ng, n)                                          # invalid -> n (cropped)
    k_win = xp.where((kpos >= 0) & (kpos < nl), kpos + ng, n)
    k_idx = xp.concatenate([xp.broadcast_to(xp.arange(ng), (qpos.shape[0], ng)), k_win], axis=-1)
    wm = dense_from_groups(long.p, q_idx, k_idx, n + 1, n + 1)[..., :n, :n]
    wm[..., :ng, :] = glob.p
    return wm


def build_pattern(n, *, n_global, radius, segment_ids=None, hard_l2g=False, causal=False, xp=None):
    """The four pieces as one boolean (N, N) matrix (the rule, without key_mask); causal=True raises
    (:data:`WHY_NOT_CAUSAL`)."""
    check_causal(causal, False, WHY_NOT_CAUSAL)
    xp = get_namespace() if xp is None else xp
    ng = n_global
    i = xp.arange(n)[:, None]
    j = xp.arange(n)[None, :]
    gi, gj = i < ng, j < ng
    allowed = (gi & gj) | (gi & ~gj) | (~gi & gj) | (~gi & ~gj & (abs(i - j) <= radius))
    if segment_ids is not None:
        seg = xp.concatenate([xp.full(ng, -2), xp.asarray(segment_ids)])             # segment of each position
        allowed = allowed & ~(gi & ~gj & (seg[None, :] != i))                        # hard g2l
        if hard_l2g:
            allowed = allowed & ~(~gi & gj & (seg[:, None] != j))
    return allowed


@reads_cache("etc")
def pattern(cache):
    """Support of W from the rule: g2g, g2l (hard-masked by segment), l2g, long band of radius r."""
    xp = get_namespace(cache.long.p)
    return build_pattern(cache.n, n_global=cache.ng, radius=cache.qpos.shape[1], segment_ids=cache.segment_ids,
                         hard_l2g=cache.hard_l2g, xp=xp)


def reference(q, k, v, *, n_global, radius, max_distance, rel_emb, segment_ids=None, hard_l2g=False,
              causal=False, key_mask=None, scale=None):
    """Dense O(N^2 d) oracle: e_ij = q_i . (k_j + a_{l(i,j)}) / sqrt(d) on g2g and l2l,
    q_i . k_j / sqrt(d) on g2l and l2g, masked by the ETC rule."""
    n, _, d, _ = check_qkv(q, k, v, key_mask=key_mask, self_attention=True)
    ng, r, kmax, hard_l2g = _check_config(q, n, n_global, radius, max_distance, rel_emb, segment_ids, hard_l2g, causal)
    xp = get_namespace(q, k, v)
    scale = check_scale(scale, d)
    pos = xp.arange(n)
    labels = relative_labels(pos, pos, kmax, xp)                                    # (N, N)
    a = rel_emb[labels]                                                             # (N, N, d): a_{l(i,j)}
    gi = (pos < ng)[:, None]
    gj = (pos < ng)[None, :]
    has_label = (gi & gj) | (~gi & ~gj)                                             # g2g and l2l
    a = a * has_label[..., None]
    # e_ij = q_i . (k_j + a_ij) / sqrt(d)
    e = ((q[..., :, None, :] * (k[..., None, :, :] + a)).sum(axis=-1)) * scale      # (..., N, N)
    allowed = build_pattern(n, n_global=ng, radius=r, segment_ids=segment_ids, hard_l2g=hard_l2g, xp=xp)
    if key_mask is not None:
        allowed = allowed & key_mask[..., None, :]
    p, _, _ = softmax_forward(e, xp.broadcast_to(allowed, e.shape))
    return p @ v


# --------------------------------------------------------------------------- setup
def default_config(n):
    """n_g = 2, r = 3, k = 2 below N = 64 (clipping at k < r, padding at small N);
    n_g = 4, r = 16, k = 8 below 1024; n_g = 16, r = 64, k = 16 from N = 1024."""
    if n < 64:
        ng, r, kmax = max(1, min(2, n - 1)), 3, 2
    elif n < 1024:
        ng, r, kmax = 4, 16, 8
    else:
        ng, r, kmax = 16, 64, 16
    return {"n_global": ng, "radius": r, "max_distance": kmax}


def init_rel_emb(rng, max_distance, d):
    """Initial relative position embeddings a_{-k}, ..., a_{k}: (2 max_distance + 1, d), standard
    normal x 0.5, a host NumPy array (shared by all heads)."""
    return rng.standard_normal((2 * max_distance + 1, d)) * 0.5


def setup(rng, *, n, d, heads, causal=False, dtype="float64"):
    """params: rel_emb (2k + 1, d), shared by all heads (:func:`init_rel_emb`)."""
    check_causal(causal, False, WHY_NOT_CAUSAL)
    config = default_config(n)
    rel_emb = asarray(init_rel_emb(rng, config["max_distance"], d), dtype=dtype)
    return {"rel_emb": rel_emb}, config


def contiguous_segments(n_long, n_global, xp=None):
    """segment_ids giving each global token one contiguous run of long tokens (sentences)."""
    xp = get_namespace() if xp is None else xp
    return (xp.arange(n_long) * n_global) // n_long


MECHANISM = register(Mechanism(
    name="etc",
    title="ETC (Extended Transformer Construction)",
    citation="Ainslie et al., 2020",
    url="https://arxiv.org/abs/2004.08483",
    classes=("FP", "M"),
    complexity="O(N_g^2 + N N_g)",
    causal=False,
    exact=True,
    kind="kernel",
    notebook="02_combination_of_patterns",
    forward=forward,
    backward=backward,
    weights=weights,
    setup=setup,
    pattern=pattern,
    reference=reference,
    sizes=("n_global", "radius", "max_distance"),
    min_n=2,                               # one global token and at least one long token
    windows=("radius",),
    summary="Global-local attention: n_g global tokens (g2g, g2l, l2g full) + local long-to-long window, "
            "learned relative position embeddings, optional hard segment masks.",
))
