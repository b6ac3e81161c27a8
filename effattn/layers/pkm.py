"""Product Key Memory (PKM): a key-value memory with K = sqrtK^2 slots searched in O(sqrtK).

Lample, Sablayrolles, Ranzato, Denoyer, Jegou, 2019, *Large Memory Layers with Product Keys*,
https://arxiv.org/abs/1907.05242.

Intuition. A feed-forward layer can be read as a soft key-value memory (keys W1, values W2).
Making it huge makes every token pay for every slot. The Product Key Memory keeps K values
(K = 65536 and more) but lets each token read only k of them, chosen by a nearest-key search
whose keys have a product structure: key (a, b) is the concatenation [c_a ; c'_b] of two
sub-keys from two codebooks of sqrtK each. Its score with a query q = [q1 ; q2] splits,

    <q, [c_a ; c'_b]> = <q1, c_a> + <q2, c'_b>,

so the k best of the K product keys are among the k x k pairs of the k best sub-keys of each
half: a pair (a, b) in the overall top-k has at most k - 1 pairs above it, hence at most k - 1
a' with s1[a'] > s1[a] (each a' gives (a', b) above (a, b)), so a is in the top-k of s1, and b
likewise. The search costs O(sqrtK dq + k^2) per query instead of O(K dq). The survey's class
"sparse models / conditional computation" (SP): a token touches k of K value rows.

Equations (per token x (D,), per head h = 1..H; dq the query size per head, dq/2 per half):

    q = x Wq + bq,  q_h = [q1_h ; q2_h]                    (H dq,) -> H heads, two halves each
    s1_h = keys1_h q1_h,   s2_h = keys2_h q2_h             (sqrtK,) sub-key scores
    A_h = top-k(s1_h),     B_h = top-k(s2_h)               the k best sub-keys of each half
    C_h = {s1_h[a] + s2_h[b] : a in A_h, b in B_h}         k^2 candidates
    I_h = top-k(C_h), index (a, b) -> a * sqrtK + b        the k chosen memory slots
    w_h = softmax(scores of I_h)                           (k,), no scale (as the paper)
    y = sum_h sum_{i in I_h} w_h,i values[i]               an embedding bag (values shared by heads)

``y`` is the layer's output only, not including the residual (a block computes x + y).

Shapes: x (..., N, D) with any leading axes; Wq (D, H dq); bq (H dq,); keys1, keys2
(H, sqrtK, dq/2); values (K, D) with K = sqrtK^2; key_mask (..., N). Returns y (..., N, D).
Head h's query is columns h dq : (h + 1) dq of q, its first half q1, its second half q2.

Cost per token: D H dq (the query net) + H sqrtK dq (sub-key scores) + H (k^2 + k D)
(candidates, the bag), against D K for a dense read of all K values; the parameters are
K D + D H dq + H sqrtK dq.

Backward (the top-k choices A, B, I are constants; dy (D,) per token, i = (a_i, b_i)):

    dvalues[i] += w_h,i dy                       only the chosen rows (``nn.sparse.index_add_weighted``)
    dw_h,i = <dy, values[i]>,   dz_h = w_h * (dw_h - <w_h, dw_h>)          (softmax)
    ds1_h[a_i] += dz_h,i,  ds2_h[b_i] += dz_h,i  only the chosen sub-keys get gradient
    dq1_h = ds1_h keys1_h,  dkeys1_h += ds1_h^T q1_h   (and the same for the second half)
    dWq = x^T dq,  dbq = sum dq,  dx = dq Wq^T

Padding (``key_mask`` False): the layer is per token, so a padding token simply reads nothing:
output 0, gradient 0, and it changes no other token. ``causal`` is accepted for the contract:
a token's output depends on that token alone, so the layer is causal either way.

Ties. The top-k's keep equal values lower index first (:func:`effattn.nn.experts.top_k`); a tie
among candidates is broken by the candidate's place (rank in A, then rank in B), the exhaustive
:func:`loop` by the product index a sqrtK + b. The two pick the same slots whenever the k-th
and (k+1)-th product scores differ (always, for real-valued inputs in general position).

Not here (the paper's extras): the query network's batch normalisation (the paper puts a
BatchNorm on the query; it mixes the tokens of a batch, which is not per-token and breaks
causality in a decoder -- a LayerNorm before the layer does the same job and is the caller's),
and the paper's speed tricks (the memory as a replacement of the FFN of some layers, the
sparse Adam update of the values).

Peer: lucidrains/product-key-memory (``product_key_memory.PKM``, commit cee87da). Its
convention: ``to_queries = Linear(dim, 2 * heads * dim_head, bias=False)`` with the output laid
out as ``(p h d)`` (half p outermost, then head, then dim_head); a LayerNorm(dim_head) on each
half query per head by default (``use_layernorm=True``; else a masked BatchNorm1d, the paper's);
``keys (heads, num_keys, 2, dim_head)``; scores ``einsum('pbthd,hnpd->bthpn')``, torch topk of each
half, candidates ``scores_x[:, None] + scores_y[None, :]`` with index ``ix * num_keys + iy``, a
second topk, softmax (no scale), and ``EmbeddingBag(num_keys ** 2, dim, mode='sum')`` with the
softmax as ``per_sample_weights`` over all heads' (h k) indices -- the same sum over heads. The
mapping (dh = dim_head, dq = 2 dh, num_keys = sqrtK):

    Wq[:, h dq + p dh + j] = to_queries.weight.T[:, p H dh + h dh + j],   bq = 0
    keys1[h] = keys[h, :, 0, :],   keys2[h] = keys[h, :, 1, :],   values = values.weight

and their query norm must be the identity for the two to agree (it is not optional there; a
parity check replaces ``pkm.norm`` by ``nn.Identity()``).
"""
from __future__ import annotations

import math
from typing import NamedTuple

from ..backend import asarray, get_namespace
from ..nn.experts import check_tokens, flat_tokens, top_k
from ..nn.sparse import index_add, index_add_weighted
from ..registry import Case, Mechanism, backward_of, forward_of, reads_cache, register
from ..validate import check_bool, check_int, check_param


class PKMCache(NamedTuple):
    lead: tuple          # leading axes of x and N
    real: object         # (T,) bool: real tokens
    xf: object           # (T, D) the tokens
    Wq: object           # (D, H dq)
    keys1: object        # (H, sqrtK, dq/2)
    keys2: object        # (H, sqrtK, dq/2)
    values: object       # (K, D)
    q1: object           # (H, T, dq/2) first query halves
    q2: object           # (H, T, dq/2) second query halves
    a: object            # (H, T, k) the chosen slots' first sub-key
    b: object            # (H, T, k) the chosen slots' second sub-key
    w: object            # (H, T, k) the softmax weights (0 for padding tokens)
    topk: int


def _check(x, Wq, bq, keys1, keys2, values, key_mask, causal, heads, topk):
    check_tokens(x, key_mask)
    check_bool("causal", causal)
    D = x.shape[-1]
    check_param("keys1", keys1, (None, None, None), x.dtype)
    H, sqrtK, half = keys1.shape
    if heads is not None:
        heads = check_int("heads", heads)
        if heads != H:
            raise ValueError(f"heads={heads} must equal keys1.shape[0]={H} (one sub-key set per head)")
    check_int("keys1.shape[1] (sqrtK)", sqrtK)
    check_int("keys1.shape[2] (dq/2)", half)
    dq = 2 * half
    check_param("keys2", keys2, (H, sqrtK, half), x.dtype)
    check_param("Wq", Wq, (D, None), x.dtype)
    if Wq.shape[1] != H * dq:
        raise ValueError(f"Wq must have shape ({D}, heads * dq) = ({D}, {H * dq}) for heads={H} and the "
                         f"sub-keys' dq/2={half}, got {tuple(Wq.shape)}; dq must be even (two halves)")
    check_param("bq", bq, (H * dq,), x.dtype)
    check_param("values", values, (None, D), x.dtype)
    K = values.shape[0]
    if K != sqrtK * sqrtK:
        raise ValueError(f"values must have K = sqrtK^2 = {sqrtK * sqrtK} rows (sqrtK={sqrtK} sub-keys per "
                         f"half, keys1.shape[1]), got K={K}; K must be a square")
    topk = check_int("topk", topk)
    if topk > sqrtK:
        raise ValueError(f"topk must be at most sqrtK={sqrtK} (the sub-keys of each half), got {topk}")
    return H, sqrtK, half, topk


def _queries(xf, Wq, bq, H, half):
    """q = x Wq + bq (T, H dq) -> (q1, q2), each (H, T, dq/2)."""
    T = xf.shape[0]
    q = (xf @ Wq + bq).reshape(T, H, 2, half).transpose(2, 1, 0, 3)      # (2, H, T, half)
    return q[0], q[1]


def _search(q1, q2, keys1, keys2, topk):
    """The product-key search: (scores (H, T, k) best first, a, b (H, T, k) sub-key indices)."""
    xp = get_namespace(q1)
    s1 = q1 @ keys1.transpose(0, 2, 1)                                    # (H, T, sqrtK)
    s2 = q2 @ keys2.transpose(0, 2, 1)
    v1, i1 = top_k(s1, topk)                                             # (H, T, k)
    v2, i2 = top_k(s2, topk)
    H, T, k = v1.shape
    cand = (v1[..., :, None] + v2[..., None, :]).reshape(H, T, k * k)     # rank in A major
    sc, pos = top_k(cand, topk)
    a = xp.take_along_axis(i1, pos // k, axis=-1)
    b = xp.take_along_axis(i2, pos % k, axis=-1)
    return sc, a, b


def _softmax(sc):
    xp = get_namespace(sc)
    e = xp.exp(sc - sc[..., :1])                                          # sc is sorted: max first
    return e / e.sum(axis=-1, keepdims=True)


@forward_of("pkm")
def forward(x, *, Wq, bq, keys1, keys2, values, key_mask=None, causal=False, heads=None, topk=32):
    """Product-key memory read y (..., N, D) (no residual) and a :class:`PKMCache`.

    x (..., N, D); Wq (D, heads dq); bq (heads dq,); keys1, keys2 (heads, sqrtK, dq/2);
    values (K, D), K = sqrtK^2; heads: None (from keys1) or keys1.shape[0]; topk: the k of
    each search, at most sqrtK (the paper: 32); key_mask (..., N): padding reads nothing.
    """
    H, sqrtK, half, topk = _check(x, Wq, bq, keys1, keys2, values, key_mask, causal, heads, topk)
    xp = get_namespace(x)
    xf, real = flat_tokens(x, key_mask)
    T, D = xf.shape
    q1, q2 = _queries(xf, Wq, bq, H, half)
    sc, a, b = _search(q1, q2, keys1, keys2, topk)
    w = _softmax(sc) * real.astype(x.dtype)[None, :, None]                # (H, T, k)
    idx = (a * sqrtK + b).transpose(1, 0, 2).reshape(T, H * topk)         # (T, H k): the bag
    wt = w.transpose(1, 0, 2).reshape(T, 1, H * topk)
    y = (wt @ values[idx])[:, 0]                                          # (T, D)
    cache = PKMCache(tuple(x.shape[:-1]), real, xf, Wq, keys1, keys2, values, q1, q2, a, b, w, topk)
    return y.reshape(x.shape), cache


@backward_of("pkm")
def backward(dout, cache):
    """Gradients of sum(dout * y): {"x", "Wq", "bq", "keys1", "keys2", "values"}; "values" is
    nonzero only on the rows some real token chose (see the module docstring)."""
    c = cache
    xp = get_namespace(dout)
    H, T, k = c.w.shape
    sqrtK, half = c.keys1.shape[1], c.keys1.shape[2]
    D = c.xf.shape[1]
    dy = dout.reshape(T, D)
    idx = c.a * sqrtK + c.b                                               # (H, T, k)
    it = idx.transpose(1, 0, 2).reshape(T, H * k)
    # the embedding bag: values and the weights
    dvalues = xp.zeros_like(c.values)
    index_add_weighted(dvalues, it, c.w.transpose(1, 0, 2).reshape(T, H * k), dy)
    dw = (c.values[it] @ dy[:, :, None])[..., 0].reshape(T, H, k).transpose(1, 0, 2)
    dz = c.w * (dw - (c.w * dw).sum(axis=-1, keepdims=True))              # softmax (w = 0: 0)
    # the sub-key scores: only the chosen sub-keys
    rows = (xp.arange(H * T) * sqrtK).reshape(H, T, 1)
    ds1 = xp.zeros(H * T * sqrtK, dtype=dout.dtype)
    ds2 = xp.zeros(H * T * sqrtK, dtype=dout.dtype)
    index_add(ds1, rows + c.a, dz.reshape(-1))
    index_add(ds2, rows + c.b, dz.reshape(-1))
    ds1, ds2 = ds1.reshape(H, T, sqrtK), ds2.reshape(H, T, sqrtK)
    dq1, dq2 = ds1 @ c.keys1, ds2 @ c.keys2                               # (H, T, half)
    dkeys1 = ds1.transpose(0, 2, 1) @ c.q1                                # (H, sqrtK, half)
    dkeys2 = ds2.transpose(0, 2, 1) @ c.q2
    dq = xp.stack([dq1, dq2]).transpose(2, 1, 0, 3).reshape(T, H * 2 * half)
    dx = dq @ c.Wq.T
    return {"x": dx.reshape(c.lead + (D,)), "Wq": c.xf.T @ dq, "bq": dq.sum(axis=0),
            "keys1": dkeys1, "keys2": dkeys2, "values": dvalues}


@reads_cache("pkm")
def weights(cache):
    """The memory weights (..., N, K): W[t, a sqrtK + b] = the sum over heads of the softmax weight
    of slot (a, b) (0 where no head chose it), so y = W @ values. Dense in K: for small memories
    (figures, tests) only."""
    c = cache
    xp = get_namespace(c.w)
    H, T, k = c.w.shape
    sqrtK = c.keys1.shape[1]
    W = xp.zeros(T * sqrtK * sqrtK, dtype=c.w.dtype)
    flat = xp.arange(T).reshape(1, T, 1) * (sqrtK * sqrtK) + c.a * sqrtK + c.b
    index_add(W, flat, c.w.reshape(-1))
    return W.reshape(c.lead + (sqrtK * sqrtK,))


@reads_cache("pkm")
def search(cache):
    """The product-key search of every token, for figures: {"s1", "s2": (H, T, sqrtK) sub-key
    scores, "top1", "top2": (H, T, k) the k best sub-keys of each half (best first),
    "a", "b": (H, T, k) the chosen slots (best first), "w": (H, T, k) their weights}; tokens in
    row-major order (batch, then position)."""
    c = cache
    s1 = c.q1 @ c.keys1.transpose(0, 2, 1)
    s2 = c.q2 @ c.keys2.transpose(0, 2, 1)
    return {"s1": s1, "s2": s2, "top1": top_k(s1, c.topk)[1], "top2": top_k(s2, c.topk)[1],
            "a": c.a, "b": c.b, "w": c.w}


@reads_cache("pkm")
def statistics(cache):
    """{"usage": the share of the K memory slots that some real token of the call read} (the
    paper's "memory usage"; a memory whose queries collapse onto a few keys wastes the rest)."""
    c = cache
    xp = get_namespace(c.w)
    sqrtK = c.keys1.shape[1]
    used = xp.zeros(sqrtK * sqrtK, dtype=bool)
    chosen = (c.a * sqrtK + c.b)[:, c.real]
    used[chosen.reshape(-1)] = True
    return {"usage": float(used.mean())}


def loop(x, *, Wq, bq, keys1, keys2, values, key_mask=None, causal=False, heads=None, topk=32):
    """The readable per-token form of :func:`forward`'s y with the exhaustive search: score all
    K = sqrtK^2 product keys [keys1[a] ; keys2[b]] against the whole query of each head, take
    the top-k of the K (ties: lower product index), softmax, and sum the chosen value rows."""
    H, sqrtK, half, topk = _check(x, Wq, bq, keys1, keys2, values, key_mask, causal, heads, topk)
    xp = get_namespace(x)
    xf, real = flat_tokens(x, key_mask)
    T, D = xf.shape
    K = sqrtK * sqrtK
    # the K product keys of head h: row a sqrtK + b is [keys1[h, a] ; keys2[h, b]]
    product = xp.concatenate([xp.repeat(keys1, sqrtK, axis=1), xp.tile(keys2, (1, sqrtK, 1))], axis=-1)
    y = xp.zeros((T, D), dtype=x.dtype)
    for t in range(T):
        if not bool(real[t]):
            continue
        q = xf[t] @ Wq + bq
        for h in range(H):
            scores = product[h] @ q[h * 2 * half:(h + 1) * 2 * half]          # (K,) all keys
            chosen = sorted(range(K), key=lambda i: (-float(scores[i]), i))[:topk]
            s = scores[chosen]
            e = xp.exp(s - s.max())
            for wi, i in zip(e / e.sum(), chosen):
                y[t] += wi * values[i]
    return y.reshape(x.shape)


reference = loop


def init_params(rng, D, *, sqrtK, dq, heads=1, dtype="float64"):
    """{Wq (D, heads dq), bq (heads dq,), keys1, keys2 (heads, sqrtK, dq/2), values (K, D)} drawn
    on the host: Wq ~ N(0, 1/D), bq ~ 0.1 N(0, 1), sub-keys ~ N(0, 2/dq) (unit scores for unit
    queries), values ~ N(0, 1/D) (lucidrains' init)."""
    sqrtK, dq, heads = check_int("sqrtK", sqrtK), check_int("dq", dq), check_int("heads", heads)
    if dq % 2:
        raise ValueError(f"dq must be even (two halves of dq/2), got {dq}")
    half = dq // 2
    p = {"Wq": rng.standard_normal((D, heads * dq)) * D ** -0.5,
         "bq": 0.1 * rng.standard_normal(heads * dq),
         "keys1": rng.standard_normal((heads, sqrtK, half)) * half ** -0.5,
         "keys2": rng.standard_normal((heads, sqrtK, half)) * half ** -0.5,
         "values": rng.standard_normal((sqrtK * sqrtK, D)) * D ** -0.5}
    return {name: asarray(a, dtype=dtype) for name, a in p.items()}


def example(rng, batch=2, heads=2, n=64, d=8, causal=False, dtype="float64"):
    """A random case: x (batch, n, heads * d), ``heads`` memory heads with dq = 2 d (halves of d),
    sqrtK = 5 (K = 25 values), topk = 3 (9 candidates per head out of 25 keys)."""
    D = heads * d
    x = asarray(rng.standard_normal((batch, n, D)), dtype=dtype)
    params = init_params(rng, D, sqrtK=5, dq=2 * d, heads=heads, dtype=dtype)
    return Case(inputs={"x": x, **params}, config={"causal": causal, "heads": heads, "topk": 3},
                seq_inputs=("x",), key_inputs=("x",), out_follows_keys=True, n=n, m=n)


MECHANISM = register(Mechanism(
    name="pkm",
    title="Product Key Memory",
    citation="Lample, Sablayrolles, Ranzato, Denoyer, Jegou, 2019",
    url="https://arxiv.org/abs/1907.05242",
    classes=("SP",),
    complexity="O(N·(sqrt(K)·d + k^2))",
    causal=True,
    exact=False,
    kind="layer",
    notebook="09_sparse_models",
    forward=forward,
    backward=backward,
    weights=weights,
    make_example=example,
    reference=reference,
    sizes=("heads", "topk"),
    summary="each token reads k of K = sqrtK^2 value rows, found by a product-key search in O(sqrtK) instead of O(K).",
))
