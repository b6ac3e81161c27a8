"""Transformer-XL: segment-level recurrence with relative positional attention.

Dai, Yang, Yang, Carbonell, Le, Salakhutdinov, 2019, *Transformer-XL: Attentive Language Models
Beyond a Fixed-Length Context*, https://arxiv.org/abs/1901.02860 (official code:
github.com/kimiyoung/transformer-xl, ``pytorch/mem_transformer.py``,
``RelPartialLearnableMultiHeadAttn``; HF removed ``TransfoXL`` in transformers 5).

Intuition. A decoder trained on segments of N tokens sees nothing before its segment: context
is cut at the segment boundary, and at evaluation every new token would need the whole window
recomputed. Transformer-XL keeps the hidden states of the previous segment (the **memory**, L
states per layer) and lets the current segment attend over [memory; segment]. The memory is a
constant of the current step -- no gradient flows into it (the paper's stop-gradient SG) -- so
training costs one segment's backward, yet the receptive field grows by about L per layer:
O(N L) with depth L layers (the survey's "recurrence" class, RC). Absolute positions would
collide (position 3 of this segment and of the last); so positions are **relative**: the score
of query i and key j depends on i - j only, through a sinusoid R_{i-j} and two learned global
biases.

The layer, in the paper's symbols (Section 3.3; h the layer's input, memory m = SG(h_prev))::

    h~    = [m ; h]                                   (..., M = L + N, D)
    q = h W_q,  k = h~ W_k,  v = h~ W_v,  r_t = R_t W_R          heads: contiguous column blocks
    A_ij  = (q_i + u) . k_j + (q_i + v) . r_{L+i-j}   (terms (a) + (c), (b) + (d)), per head
    y     = LayerNorm(h + softmax(A / sqrt(d) + mask) v W_o)     (post-LN: the official default)

Query i sits at position L + i of the extended context, key j at j: the distance is L + i - j.
``causal=True`` (the language model) lets query i see keys j <= L + i; ``causal=False`` all of
[memory; segment] (distances down to -(N - 1), which the sinusoid covers). The positional term
is computed with the relative shift (:mod:`effattn.nn.relative`: one (N, M + N - 1) product and
a view, O(N M d), no (N, M, d) tensor); ``loop`` writes every pair's distance out instead.

State. ``memory`` (..., L, D) -- the previous segment's *inputs* of this layer -- and
``memory_mask`` (..., L) (True = real) are keywords; ``next_memory(cache)`` returns the pair the
next segment takes: the last ``mem_len`` rows of [memory; x] and their mask (the official
``_update_mems``). The memory gets no gradient (backward returns none for it); W_k and W_v do get
the gradient of the memory's keys and values. ``one_pass`` computes a whole sequence at once with
the pattern the segments produce (query p in segment s sees keys from s N - mem_len on), and the
contract checks that segment by segment equals it.

Peer mapping (the official ``RelPartialLearnableMultiHeadAttn``, time-major (N, B, D) there):
``qkv_net.weight = cat(W_q^T, W_k^T, W_v^T)``, ``r_net.weight = W_R^T``, ``o_net.weight =
W_o^T`` (no biases), ``r_w_bias = u``, ``r_r_bias = vb``, ``layer_norm = (ln_g, ln_b)``, r the
``PositionalEmbedding(D)`` of ``pos_seq = klen - 1, ..., 0`` (tests/parity/peer_official_transformer_xl.py).

Shapes: x (..., N, D), any leading batch axes, D even and divisible by heads; memory (..., L, D)
(L >= 0); key_mask (..., N); out (..., N, D). Parameters: Wq, Wk, Wv, Wr, Wo (D, D); u, vb
(heads, d); ln_g, ln_b (D,).

Backward (hand-derived, composed of the functional pairs): dR = LN'(dout); dx = dR + (dA W_o^T
through the attention: :func:`effattn.nn.relative.rel_attend_backward`) -- dq W_q^T and the
segment rows of dk W_k^T + dv W_v^T; dW_k = h~^T dk (memory rows included), dW_R = R^T dr.

Cost per segment: O(N (L + N) D) time and O(h N (L + N)) memory: linear in the memory length.
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import asarray, get_namespace
from ..nn.relative import (XL_NAMES, check_xl_params, init_xl_params, weights_of, xl_layer_backward, xl_layer_forward,
                           xl_layer_loop)
from ..registry import Case, Mechanism, backward_of, forward_of, reads_cache, register
from ..validate import check_bool, check_float_array, check_int, check_key_mask

PARAM_NAMES = XL_NAMES


class XLCache(NamedTuple):
    layer: object      # nn.relative.XLLayerCache (x, h = [memory; x], R, the heads' RelCache, ...)
    mask: object       # the key mask over [memory; x] (..., M), or None
    mem_len: int


def _check(x, memory, memory_mask, key_mask, causal, heads, mem_len, params):
    check_float_array("x", x, min_ndim=2)
    causal = check_bool("causal", causal)
    heads = check_int("heads", heads)
    n, D = x.shape[-2:]
    if n < 1 or D < 1:
        raise ValueError(f"x must be a non-empty (..., N, D) array, got shape {tuple(x.shape)}")
    if D % heads or (D // heads) < 1:
        raise ValueError(f"heads must divide the model width D={D}, got heads={heads}")
    if D % 2:
        raise ValueError(f"x: the model width D must be even (the sinusoid pairs sin and cos), got D={D}")
    lead = tuple(x.shape[:-2])
    L = 0
    if memory is not None:
        check_float_array("memory", memory, min_ndim=2)
        if memory.dtype != x.dtype or memory.shape[-1] != D or tuple(memory.shape[:-2]) != lead:
            raise ValueError(f"memory must be (..., L, {D}) with x's leading shape {lead} and dtype {x.dtype}, "
                             f"got {tuple(memory.shape)} {memory.dtype}")
        L = memory.shape[-2]
    if memory_mask is not None and memory is None:
        raise ValueError("memory_mask was given without a memory")
    check_key_mask(memory_mask, lead, L) if memory_mask is None else _named_mask("memory_mask", memory_mask, lead, L)
    check_key_mask(key_mask, lead, n)
    mem_len = n if mem_len is None else check_int("mem_len", mem_len, minimum=0)
    missing = sorted(set(PARAM_NAMES) - set(params))
    extra = sorted(set(params) - set(PARAM_NAMES))
    if missing or extra:
        raise ValueError(f"transformer_xl parameters: missing {missing}, unexpected {extra} "
                         "(see effattn.layers.transformer_xl.PARAM_NAMES)")
    check_xl_params(params, D, heads, x.dtype)
    return causal, heads, mem_len, L


def _named_mask(name, mask, lead, m):
    try:
        return check_key_mask(mask, lead, m)
    except ValueError as e:
        raise ValueError(str(e).replace("key_mask", name, 1)) from None


def _key_mask(xp, memory_mask, key_mask, lead, L, n):
    """The mask over [memory; x] (..., M), or None when everything is real."""
    if memory_mask is None and key_mask is None:
        return None
    mm = xp.ones(lead + (L,), dtype=bool) if memory_mask is None else xp.broadcast_to(memory_mask, lead + (L,))
    km = xp.ones(lead + (n,), dtype=bool) if key_mask is None else xp.broadcast_to(key_mask, lead + (n,))
    return xp.concatenate([mm, km], axis=-1)


@forward_of("transformer_xl")
def forward(x, *, memory=None, memory_mask=None, key_mask=None, causal=False, heads=1, mem_len=None, **params):
    """y = LN(x + RelMHA(x, [memory; x])): x (..., N, D) -> (out (..., N, D), XLCache)."""
    causal, heads, mem_len, L = _check(x, memory, memory_mask, key_mask, causal, heads, mem_len, params)
    xp = get_namespace(x)
    lead, n = tuple(x.shape[:-2]), x.shape[-2]
    h = x if L == 0 else xp.concatenate([memory, x], axis=-2)
    mask = _key_mask(xp, memory_mask, key_mask, lead, L, n)
    y, layer = xl_layer_forward(x, h, params, heads=heads, mask=mask, causal=causal)
    return y, XLCache(layer, mask, mem_len)


@backward_of("transformer_xl")
def backward(dout, cache):
    """{"x": dx, "Wq", "Wk", "Wv", "Wr", "u", "vb", "Wo", "ln_g", "ln_b"} (the memory has none: SG)."""
    return xl_layer_backward(dout, cache.layer)


@reads_cache("transformer_xl")
def weights(cache):
    """The attention weights (..., h, N, L + N) over [memory; segment]."""
    return weights_of(cache.layer.rel)


@reads_cache("transformer_xl")
def next_memory(cache):
    """(memory, memory_mask) for the next segment: the last mem_len rows of [memory; x] (copies,
    no gradient) and their mask (None when every row is real). mem_len 0 gives (None, None)."""
    h = cache.layer.h
    keep = min(cache.mem_len, h.shape[-2])
    if keep == 0:
        return None, None
    mem = h[..., h.shape[-2] - keep:, :].copy()
    mask = None if cache.mask is None else cache.mask[..., cache.mask.shape[-1] - keep:].copy()
    return mem, mask


# --------------------------------------------------------------------------- oracles
def loop(x, *, memory=None, memory_mask=None, key_mask=None, causal=False, heads=1, mem_len=None, **params):
    """The layer with every pair's distance written out (no relative shift): the readable form."""
    xp = get_namespace(x)
    _check(x, memory, memory_mask, key_mask, causal, heads, mem_len, params)
    n = x.shape[-2]
    L = 0 if memory is None else memory.shape[-2]
    lead = tuple(x.shape[:-2])
    h = x if L == 0 else xp.concatenate([memory, x], axis=-2)
    mask = _key_mask(xp, memory_mask, key_mask, lead, L, n)
    allowed = xp.ones((n, L + n), dtype=bool)
    if causal:
        allowed = (xp.arange(L + n)[None, :] <= L + xp.arange(n)[:, None])
    if mask is not None:
        allowed = allowed & mask[..., None, None, :]
    return xl_layer_loop(x, h, params, heads=heads, allowed=allowed)


reference = loop


def segment_pattern(t, segment, mem_len, causal, xp):
    """bool (T, T): key j is visible to query p when processed segment by segment (segment length
    ``segment``, memory ``mem_len``): from max(0, s N - mem_len) on, s = p // N, up to p (causal) or
    to the end of p's segment."""
    p = xp.arange(t)[:, None]
    j = xp.arange(t)[None, :]
    start = (p // segment) * segment
    last = p if causal else xp.minimum(start + segment - 1, t - 1)
    return (j >= start - mem_len) & (j <= last)


def one_pass(x, *, segment, key_mask=None, causal=False, heads=1, mem_len=None, **params):
    """The whole sequence x (..., T, D) in one pass, as segment by segment computes it: dense
    attention over T with :func:`segment_pattern` and relative distances p - j. ``mem_len``
    defaults to ``segment`` (as the forward's default). O(T^2): the oracle of the segment test."""
    xp = get_namespace(x)
    segment = check_int("segment", segment)
    t = x.shape[-2]
    mem_len = segment if mem_len is None else mem_len
    allowed = segment_pattern(t, segment, mem_len, causal, xp)
    if key_mask is not None:
        allowed = allowed & xp.broadcast_to(key_mask, tuple(x.shape[:-2]) + (t,))[..., None, None, :]
    return xl_layer_loop(x, x, params, heads=heads, allowed=allowed)


# --------------------------------------------------------------------------- parameters and example
def init_params(rng, D, heads, *, dtype="float64", jitter=0.1):
    """W_q, W_k, W_v, W_R, W_o ~ N(0, 1/D); u, vb ~ jitter N(0, 1) (heads, d); ln_g = 1 + jitter N(0, 1), ln_b = jitter N(0, 1)."""
    return {k: asarray(v, dtype=dtype) for k, v in init_xl_params(rng, D, heads, jitter=jitter).items()}


def example(rng, batch=2, heads=2, n=64, d=8, causal=False, dtype="float64"):
    """A random case: x (batch, n, heads * d) and a memory of L = min(n, 7) earlier states (a
    constant: config), mem_len n."""
    d = d + (heads * d) % 2                      # the sinusoid needs an even width
    D = heads * d
    x = asarray(rng.standard_normal((batch, n, D)), dtype=dtype)
    L = min(n, 7)
    memory = asarray(rng.standard_normal((batch, L, D)), dtype=dtype)
    config = {"heads": heads, "mem_len": n, "memory": memory, "causal": causal}
    return Case(inputs={"x": x, **init_params(rng, D, heads, dtype=dtype)}, config=config, seq_inputs=("x",),
                key_inputs=("x",), out_follows_keys=True, n=n, m=n)


MECHANISM = register(Mechanism(
    name="transformer_xl",
    title="Transformer-XL (segment recurrence, relative positions)",
    citation="Dai et al., 2019",
    url="https://arxiv.org/abs/1901.02860",
    classes=("RC",),
    complexity="O(N·(N + L)) per segment",
    causal=True,
    exact=False,
    kind="layer",
    notebook="07_recurrence",
    forward=forward,
    backward=backward,
    weights=weights,
    make_example=example,
    reference=reference,
    next_memory=next_memory,
    state_keys=("memory", "memory_mask"),
    one_pass=one_pass,
    sizes=("heads",),
    subquadratic=False,     # within a segment it is full attention; the saving is the constant memory
    summary="a segment attends over [memory; segment] with relative positions; the memory of L earlier states carries no gradient.",
))
