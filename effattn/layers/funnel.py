"""Funnel Transformer: pooled-query attention, the step that halves the sequence.

Dai, Lai, Yang, Le, 2020, *Funnel-Transformer: Filtering out Sequential Redundancy for Efficient
Language Processing*, https://arxiv.org/abs/2006.03236 (official code:
github.com/laiguokun/Funnel-Transformer; HF ``transformers``: ``FunnelModel``).

Intuition. A full-length encoder keeps N hidden vectors through every layer, although
neighbouring tokens carry much the same information after a few layers. The Funnel encoder
works in **stages**; between two stages it pools the sequence by a stride (2: N -> N/2) and runs
the next stage's blocks on the shorter sequence, so each later layer costs 4x less attention
and 2x less feed-forward. The pooling step itself is an attention layer in which only the
*queries* are pooled: the pooled queries read the whole unpooled sequence, so the compression
is learned instead of a plain average (the survey's "downsampling" class, DS).

The layer (Section 2.2, "pool-query-only"), in the paper's symbols::

    h' = LayerNorm(pool(h) + MHA(Q = pool(h), K = h, V = h))        (..., N, D) -> (..., N', D)

pool is stride-s mean (or max, which the paper compares) pooling over consecutive positions,
[CLS] (position 0) kept out of it with ``separate_cls=True`` (:mod:`effattn.nn.pooling`:
the groups, N' = 1 + ceil((N - 1) / s)), and MHA the multihead attention of
:mod:`effattn.nn.mha` (Q = pool(h) W^Q + b^Q, K = h W^K, V = h W^V + b^V, output W^O + b^O,
scale 1/sqrt(d), d = D / heads). A stage's other blocks are ordinary self-attention blocks at
length N' (:class:`effattn.models.downsampling.FunnelEncoder`); the decoder that brings a
token-level output back to N repeats each pooled row over its group and adds the first stage's
output (the residual of the paper's Figure 1).

Key masks. ``key_mask`` (..., N) marks real tokens; the pooled queries average (or max) over the
real members of their group only, and a pooled position is real when any member is
(:func:`effattn.nn.pooling.pool_forward`); masked positions are masked keys of the attention. So
no real output depends on a masked input. ``pooled_mask(cache)`` returns the mask the next stage
uses. A pooled row with no real member is 0 before the attention.

Positions: a documented simplification. The paper keeps Transformer-XL's relative positional
attention (and HF its "factorized" form with token-type terms) in every layer; here the
attention has content terms only, and the models add absolute (sinusoidal or learned) positions
to the embeddings. HF's ``FunnelRelMultiheadAttention`` with ``r_w_bias = r_r_bias = r_kernel =
r_s_bias = seg_embed = 0`` is exactly this layer (tests/parity/peer_hf_funnel.py).

Causal: refused. A pooled query summarises positions 2i and 2i + 1 at once, so its row already
holds the later token; the Funnel Transformer is an encoder (the paper pretrains it as ELECTRA's
discriminator and fine-tunes it for classification). Decode with Perceiver AR (``perceiver``).

Shapes: x (..., N, D), any leading batch axes; key_mask (..., N); out (..., N', D). Parameters:
Wq, bq, Wk, Wv, bv, Wo, bo (:data:`effattn.nn.mha.MHA_NAMES`, (D, D) and (D,)), ln_g, ln_b (D,).

Backward (hand-derived, composed of the functional pairs): with R = pool(x) + A, out = LN(R),

    dR = LN'(dout);   dpool = dR + dX_MHA;   dx = pool'(dpool) + dY_MHA

Cost: O(N' N D) attention (half of a full layer's for s = 2) + O(N D^2) projections; memory
O(h N' N). ``reference`` writes the pooled positions out by a loop and the attention per row.
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import asarray, get_namespace
from ..nn.functional import layer_norm_backward, layer_norm_forward
from ..nn.mha import MHA_NAMES, check_mha, init_mha, mha_backward, mha_forward, mha_weights, sub
from ..nn.pooling import MODES, pool_backward, pool_forward, pool_groups, pooled_length
from ..registry import Case, Mechanism, backward_of, forward_of, reads_cache, register
from ..validate import check_bool, check_causal, check_choice, check_float_array, check_int, check_key_mask, check_param

WHY_NOT_CAUSAL = ("a pooled query summarises positions s i, ..., s i + s - 1 at once, so its row already holds the "
                  "later tokens; the Funnel Transformer is an encoder (decode with 'perceiver', Perceiver AR)")
PARAM_NAMES = MHA_NAMES + ("ln_g", "ln_b")


class FunnelCache(NamedTuple):
    pool: object     # PoolCache of the queries
    mask: object     # the pooled key mask (..., N') or None
    mha: object      # MHACache: MHA(pool(x), x, x)
    ln: object       # layer-norm cache
    groups: object   # (N', s) the pooled groups


def _check(x, key_mask, causal, heads, stride, pool, separate_cls, params):
    check_float_array("x", x, min_ndim=2)
    check_causal(causal, False, WHY_NOT_CAUSAL)
    heads, stride = check_int("heads", heads), check_int("stride", stride)
    pool = check_choice("pool", pool, MODES)
    separate_cls = check_bool("separate_cls", separate_cls)
    n, D = x.shape[-2:]
    if n < 1 or D < 1:
        raise ValueError(f"x must be a non-empty (..., N, D) array, got shape {tuple(x.shape)}")
    check_key_mask(key_mask, tuple(x.shape[:-2]), n)
    missing = sorted(set(PARAM_NAMES) - set(params))
    extra = sorted(set(params) - set(PARAM_NAMES))
    if missing or extra:
        raise ValueError(f"funnel parameters: missing {missing}, unexpected {extra} (see effattn.layers.funnel.PARAM_NAMES)")
    if D % heads:
        raise ValueError(f"heads must divide the model width D={D}, got heads={heads}")
    check_mha(params, "", D, D, D, D, x.dtype)
    check_param("ln_g", params["ln_g"], (D,), x.dtype)
    check_param("ln_b", params["ln_b"], (D,), x.dtype)
    return heads, stride, pool, separate_cls


@forward_of("funnel")
def forward(x, *, key_mask=None, causal=False, heads=1, stride=2, pool="mean", separate_cls=True, **params):
    """h' = LN(pool(x) + MHA(pool(x), x, x)): x (..., N, D) -> (out (..., N', D), FunnelCache)."""
    heads, stride, pool, separate_cls = _check(x, key_mask, causal, heads, stride, pool, separate_cls, params)
    groups = pool_groups(x.shape[-2], stride, separate_cls, xp=get_namespace(x))
    q, mask, cp = pool_forward(x, groups, key_mask=key_mask, mode=pool)       # (..., N', D)
    a, cm = mha_forward(q, x, params, heads=heads, key_mask=key_mask)
    out, cl = layer_norm_forward(q + a, params["ln_g"], params["ln_b"])
    return out, FunnelCache(cp, mask, cm, cl, groups)


@backward_of("funnel")
def backward(dout, cache):
    """{"x": dx, "Wq", ..., "ln_g", "ln_b"}."""
    gl = layer_norm_backward(dout, cache.ln)
    dr = gl["x"]
    g = mha_backward(dr, cache.mha)
    dq = dr + g.pop("X")
    dx = pool_backward(dq, cache.pool) + g.pop("Y")
    return {"x": dx, **g, "ln_g": gl["gamma"], "ln_b": gl["beta"]}


@reads_cache("funnel")
def weights(cache):
    """The pooled queries' attention over the input, (..., h, N', N)."""
    return mha_weights(cache.mha)


@reads_cache("funnel")
def pooled_mask(cache):
    """The key mask of the pooled sequence (..., N') (None without a key mask): real if any member is."""
    return cache.mask


@reads_cache("funnel")
def groups(cache):
    """The (N', s) input positions each output row pools (-1: none)."""
    return cache.groups


def reference(x, *, key_mask=None, causal=False, heads=1, stride=2, pool="mean", separate_cls=True, **params):
    """The layer written out position by position: each pooled query from its group's real
    members by a loop, each query row's softmax over the real keys, then the residual and the
    LayerNorm. O(N' N D) with Python loops: tests and small inputs only."""
    xp = get_namespace(x)
    n, D = x.shape[-2:]
    d = D // heads
    lead = tuple(x.shape[:-2])
    km = xp.ones(lead + (n,), dtype=bool) if key_mask is None else xp.broadcast_to(key_mask, lead + (n,))
    first = 1 if (separate_cls and n > 1) else 0
    starts = list(range(first)) + list(range(first, n, stride))
    rows = []
    for r, s0 in enumerate(starts):
        members = [0] if (first and r == 0) else list(range(s0, min(s0 + stride, n)))
        real = km[..., members]                                            # (..., g)
        xs = x[..., members, :]
        if pool == "mean":
            cnt = xp.maximum(real.sum(axis=-1, keepdims=True), 1)
            q = (xs * real[..., None]).sum(axis=-2) / cnt
        else:
            q = xp.where(real[..., None], xs, -xp.inf).max(axis=-2)
            q = xp.where(real.any(axis=-1, keepdims=True), q, 0.0)
        rows.append(q)
    assert len(rows) == pooled_length(n, stride, separate_cls)
    Q0 = xp.stack(rows, axis=-2)                                           # (..., N', D)
    Q = Q0 @ params["Wq"] + params["bq"]
    K = x @ params["Wk"]
    V = x @ params["Wv"] + params["bv"]
    heads_out = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        out_rows = []
        for r in range(Q.shape[-2]):
            logits = (K[..., :, sl] @ Q[..., r, sl][..., None])[..., 0] * d ** -0.5   # (..., N)
            logits = xp.where(km, logits, -xp.inf)
            mx = logits.max(axis=-1, keepdims=True)
            p = xp.exp(logits - mx)
            p = p / p.sum(axis=-1, keepdims=True)
            out_rows.append((p[..., None] * V[..., :, sl]).sum(axis=-2))
        heads_out.append(xp.stack(out_rows, axis=-2))
    A = xp.concatenate(heads_out, axis=-1) @ params["Wo"] + params["bo"]
    out, _ = layer_norm_forward(Q0 + A, params["ln_g"], params["ln_b"])
    return out


def init_params(rng, D, *, dtype="float64", jitter=0.1):
    """Wq, bq, Wk, Wv, bv, Wo, bo ~ :func:`effattn.nn.mha.init_mha`; ln_g = 1 + jitter N(0, 1), ln_b = jitter N(0, 1)."""
    p = init_mha(rng, "", D, D, D, jitter=jitter)
    p["ln_g"] = 1.0 + jitter * rng.standard_normal(D)
    p["ln_b"] = jitter * rng.standard_normal(D)
    return {k: asarray(v, dtype=dtype) for k, v in p.items()}


def _real_rows(stride, separate_cls):
    def real_rows(key_mask):
        xp = get_namespace(key_mask)
        g = pool_groups(key_mask.shape[-1], stride, separate_cls, xp=xp)
        idx = xp.where(g >= 0, g, 0)
        return (key_mask[..., idx] & (g >= 0)).any(axis=-1)
    return real_rows


def example(rng, batch=2, heads=2, n=64, d=8, causal=False, dtype="float64"):
    """A random case: x (batch, n, heads * d), stride 2 mean pooling with a separate [CLS]."""
    check_causal(causal, False, WHY_NOT_CAUSAL)
    D = heads * d
    x = asarray(rng.standard_normal((batch, n, D)), dtype=dtype)
    config = {"heads": heads, "stride": 2, "pool": "mean", "separate_cls": True}
    return Case(inputs={"x": x, **init_params(rng, D, dtype=dtype)}, config=config, seq_inputs=("x",),
                key_inputs=("x",), real_rows=_real_rows(2, True), n=pooled_length(n, 2, True), m=n)


MECHANISM = register(Mechanism(
    name="funnel",
    title="Funnel Transformer (pooled-query attention)",
    citation="Dai, Lai, Yang, Le, 2020",
    url="https://arxiv.org/abs/2006.03236",
    classes=("DS",),
    complexity="O(N'·N), N' = N/s",
    causal=False,
    exact=False,
    kind="layer",
    notebook="08_downsampling",
    forward=forward,
    backward=backward,
    weights=weights,
    make_example=example,
    reference=reference,
    sizes=("heads", "stride"),
    subquadratic=False,          # O(N' N) = O(N^2 / s): the saving is in the later stages, not here
    summary="stride-s pooled queries attend over the full sequence: N -> N/s between stages, later layers 4x cheaper.",
))
