"""Compressive Transformer: a second, compressed memory behind Transformer-XL's.

Rae, Potapenko, Jayakumar, Hillier, Lillicrap, 2020, *Compressive Transformers for Long-Range
Sequence Modelling*, https://arxiv.org/abs/1911.05507 (peer: lucidrains'
``compressive-transformer-pytorch``).

Intuition. Transformer-XL (``transformer_xl``) keeps the last n_m states and forgets the rest;
a longer memory costs attention linearly. The Compressive Transformer does not discard the
states that fall out of the memory: it compresses them by a rate c (c old states -> one) into
a **compressed memory** of n_cm slots, and attends over [compressed memory; memory; segment].
With c = 3 the same number of slots reaches 3x further back (the survey's recurrence class).

The layer (post-LN, Transformer-XL's relative attention over the concatenation: query i sits at
position L_c + L + i, key j at j, :func:`effattn.nn.relative.xl_layer_forward`)::

    h~  = [cm ; m ; h]                                   (..., M = L_c + L + N, D)
    y   = LayerNorm(h + RelMHA(h, h~) W_o)

The state after the segment (the paper's Algorithm 1): with all = [m; h] (L + N rows),

    m'   = the last n_m rows of all                       (``mem_len``)
    old  = the rows that fall out, all[: L + N - n_m]     (k rows, the oldest)
    C    = f_c(old): k // c groups of c consecutive rows, each -> one row; the oldest k mod c rows
           that fill no group are dropped (with N a multiple of c and a full memory, none)
    cm'  = the last n_cm rows of [cm; C]                  (``cmem_len``)

Compression functions f_c (``compress``): ``"conv"``, a learned 1-D convolution with kernel =
stride = c, C_g = b_c + sum_{t<c} old[g c + t] W_c[t] (W_c (c, D, D): torch's ``Conv1d(D, D, c,
stride=c)`` with ``W_c[t] = weight[:, :, t].T``); ``"max"`` and ``"mean"`` pooling over the real
members of each group (:func:`effattn.nn.pooling.pool_forward`); the paper's most-used and
deconvolution variants are not here. Masks follow the rows: a compressed row is real if any of
its members is (conv: masked members enter as 0).

The attention-reconstruction loss (Section 3.1) trains f_c: the current queries' attention over
the old memories must be reproducible from their compressed form,

    L_attn = w mean_{real rows, heads, d} ( attn(q, old W_k, old W_v) - attn(q, C W_k, C W_v) )^2

with attn(q, K, V) = softmax(q K^T / sqrt(d)) V per head (content only, no mask of time), q = h
W_q. Gradients are stopped everywhere but in f_c (the paper: "we stop the gradient ... so the
loss only trains the compression network"): q, old, W_k and W_v are constants of L_attn, and
L_attn does not move the main attention. ``aux_loss(cache)`` returns it (weight
``recon_weight``); ``backward`` adds its gradient to W_c, b_c (registry ``aux_trains``); the
compressed memory handed on is a constant of the next segment like the memory.

Special cases (tests): c = 1 and an identity f_c (``compress="mean"`` with rate 1) is
Transformer-XL with memory n_m + n_cm; ``cmem_len = 0`` is Transformer-XL.

Backward of the convolution: with the old rows grouped as O (..., G, c D) and W_c flattened to
(c D, D), C = O W + b_c, so dW = O^T dC (summed over the leading axes), db_c = sum dC; dC comes
from the attention core's dK, dV: dC = dK_c W_k^T + dV_c W_v^T.

Shapes: x (..., N, D); memory (..., L, D), compressed (..., L_c, D) (constants); masks (..., L),
(..., L_c), key_mask (..., N); out (..., N, D). Parameters: Transformer-XL's (Wq, Wk, Wv, Wr, Wo
(D, D); u, vb (heads, d); ln_g, ln_b (D,)) and, for ``"conv"``, Wc (c, D, D), bc (D,).
Cost per segment O(N (L_c + L + N) D) + the compression O(k D^2).
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import asarray, get_namespace
from ..nn.functional import merge_heads, split_heads
from ..nn.pooling import pool_forward
from ..nn.relative import (XL_NAMES, check_xl_params, init_xl_params, weights_of, xl_layer_backward, xl_layer_forward,
                           xl_layer_loop)
from ..nn.sparse import attend_backward, attend_forward
from ..registry import Case, Mechanism, backward_of, forward_of, reads_cache, register
from ..validate import (check_bool, check_choice, check_float_array, check_int, check_key_mask, check_param,
                        check_nonnegative_float)

COMPRESS = ("conv", "max", "mean")
CONV_NAMES = ("Wc", "bc")


class CompressiveCache(NamedTuple):
    layer: object          # nn.relative.XLLayerCache over [compressed; memory; x]
    state: tuple           # (memory, memory_mask, compressed, compressed_mask) for the next segment
    recon: object          # None, or (groups (..., G, c D), loss, AttendCache of attn(q, C), diff, rows, denom)
    weight: float
    compress: str
    rate: int


def _named_mask(name, mask, lead, m):
    try:
        return check_key_mask(mask, lead, m)
    except ValueError as e:
        raise ValueError(str(e).replace("key_mask", name, 1)) from None


def _check_state(name, a, mask, lead, D, dtype):
    if a is None:
        if mask is not None:
            raise ValueError(f"{name}_mask was given without a {name}")
        return 0
    check_float_array(name, a, min_ndim=2)
    if a.dtype != dtype or a.shape[-1] != D or tuple(a.shape[:-2]) != lead:
        raise ValueError(f"{name} must be (..., L, {D}) with x's leading shape {lead} and dtype {dtype}, "
                         f"got {tuple(a.shape)} {a.dtype}")
    if mask is not None:
        _named_mask(f"{name}_mask", mask, lead, a.shape[-2])
    return a.shape[-2]


def _check(x, memory, memory_mask, compressed, compressed_mask, key_mask, causal, heads, mem_len, cmem_len, rate,
           compress, recon_weight, params):
    check_float_array("x", x, min_ndim=2)
    causal = check_bool("causal", causal)
    heads = check_int("heads", heads)
    rate = check_int("rate", rate)
    compress = check_choice("compress", compress, COMPRESS)
    recon_weight = check_nonnegative_float("recon_weight", recon_weight)
    n, D = x.shape[-2:]
    if n < 1 or D < 1:
        raise ValueError(f"x must be a non-empty (..., N, D) array, got shape {tuple(x.shape)}")
    if D % heads:
        raise ValueError(f"heads must divide the model width D={D}, got heads={heads}")
    if D % 2:
        raise ValueError(f"x: the model width D must be even (the sinusoid pairs sin and cos), got D={D}")
    lead = tuple(x.shape[:-2])
    L = _check_state("memory", memory, memory_mask, lead, D, x.dtype)
    Lc = _check_state("compressed", compressed, compressed_mask, lead, D, x.dtype)
    check_key_mask(key_mask, lead, n)
    mem_len = n if mem_len is None else check_int("mem_len", mem_len, minimum=0)
    cmem_len = mem_len if cmem_len is None else check_int("cmem_len", cmem_len, minimum=0)
    names = XL_NAMES + (CONV_NAMES if compress == "conv" else ())
    missing, extra = sorted(set(names) - set(params)), sorted(set(params) - set(names))
    if missing or extra:
        raise ValueError(f"compressive parameters (compress={compress!r}): missing {missing}, unexpected {extra} "
                         "(see effattn.layers.compressive: Transformer-XL's, and Wc, bc for 'conv')")
    check_xl_params(params, D, heads, x.dtype)
    if compress == "conv":
        check_param("Wc", params["Wc"], (rate, D, D), x.dtype)
        check_param("bc", params["bc"], (D,), x.dtype)
    return causal, heads, mem_len, cmem_len, rate, compress, recon_weight, L, Lc


def _ones(xp, shape):
    return xp.ones(shape, dtype=bool)


def _masks(xp, lead, parts):
    """The mask over a concatenation of parts [(rows, mask or None), ...], or None if all real."""
    if all(m is None for _, m in parts):
        return None
    return xp.concatenate([_ones(xp, lead + (r,)) if m is None else xp.broadcast_to(m, lead + (r,))
                           for r, m in parts], axis=-1)


def compress_rows(old, old_mask, *, rate, compress, params):
    """f_c of the rows ``old`` (..., k, D): (C (..., k // rate, D), its mask or None, the grouped rows
    (..., G, rate D) that the convolution read (None for pooling))."""
    xp = get_namespace(old)
    k, D = old.shape[-2:]
    g = k // rate
    use = old[..., k - g * rate:, :]
    mask = None if old_mask is None else old_mask[..., k - g * rate:]
    if compress == "conv":
        z = use if mask is None else xp.where(mask[..., None], use, 0.0)
        grouped = z.reshape(z.shape[:-2] + (g, rate * D))
        C = grouped @ params["Wc"].reshape(rate * D, D) + params["bc"]
        cmask = None if mask is None else mask.reshape(mask.shape[:-1] + (g, rate)).any(axis=-1)
        return C, cmask, grouped
    groups = xp.arange(g * rate).reshape(g, rate)
    C, cmask, _ = pool_forward(use, groups, key_mask=mask, mode=compress)
    return C, cmask, None


def _recon_attend(q, rows, mask, params, heads, scale):
    k = split_heads(rows @ params["Wk"], heads)
    v = split_heads(rows @ params["Wv"], heads)
    allowed = None if mask is None else mask[..., None, None, :]
    out, _, cache = attend_forward(q, k, v, allowed, scale)
    return out, cache


@forward_of("compressive")
def forward(x, *, memory=None, memory_mask=None, compressed=None, compressed_mask=None, key_mask=None, causal=False,
            heads=1, mem_len=None, cmem_len=None, rate=2, compress="conv", recon_weight=1.0, **params):
    """y = LN(x + RelMHA(x, [compressed; memory; x])): x (..., N, D) -> (out (..., N, D), CompressiveCache)."""
    causal, heads, mem_len, cmem_len, rate, compress, w, L, Lc = _check(
        x, memory, memory_mask, compressed, compressed_mask, key_mask, causal, heads, mem_len, cmem_len, rate,
        compress, recon_weight, params)
    xp = get_namespace(x)
    lead, (n, D) = tuple(x.shape[:-2]), x.shape[-2:]
    h = xp.concatenate([a for a in (compressed, memory, x) if a is not None], axis=-2)
    mask = _masks(xp, lead, [(Lc, compressed_mask), (L, memory_mask), (n, key_mask)])
    y, layer = xl_layer_forward(x, h, params, heads=heads, mask=mask, causal=causal)

    # the next state: the memory keeps the last mem_len rows of [memory; x], the rest is compressed
    all_ = h[..., Lc:, :]
    all_mask = None if mask is None else mask[..., Lc:]
    keep = min(mem_len, L + n)
    fallen = L + n - keep
    new_mem = all_[..., fallen:, :].copy() if keep else None
    new_mem_mask = None if (all_mask is None or not keep) else all_mask[..., fallen:].copy()
    old = all_[..., :fallen, :]
    old_mask = None if all_mask is None else all_mask[..., :fallen]
    recon = None
    cm, cm_mask = compressed, compressed_mask
    if fallen // rate > 0:
        C, cmask, grouped = compress_rows(old, old_mask, rate=rate, compress=compress, params=params)
        cm = C if compressed is None else xp.concatenate([compressed, C], axis=-2)
        cm_mask = _masks(xp, lead, [(Lc, compressed_mask), (C.shape[-2], cmask)])
        if w > 0:
            d = D // heads
            q = split_heads(x @ params["Wq"], heads)
            a_old, _ = _recon_attend(q, old, old_mask, params, heads, d ** -0.5)
            a_c, ca = _recon_attend(q, C, cmask, params, heads, d ** -0.5)
            rows = _ones(xp, lead + (n,)) if key_mask is None else xp.broadcast_to(key_mask, lead + (n,))
            rows = rows[..., None, :, None]                                  # (..., 1, N, 1)
            denom = max(float(rows.sum()) * heads * d, 1.0)
            diff = (a_old - a_c) * rows
            loss = w * float((diff * diff).sum()) / denom
            recon = (grouped, loss, ca, diff, denom)
    keep_c = min(cmem_len, 0 if cm is None else cm.shape[-2])
    new_cm = cm[..., cm.shape[-2] - keep_c:, :].copy() if keep_c else None
    new_cm_mask = cm_mask[..., cm_mask.shape[-1] - keep_c:].copy() if (keep_c and cm_mask is not None) else None
    state = (new_mem, new_mem_mask, new_cm, new_cm_mask)
    return y, CompressiveCache(layer, state, recon, w, compress, rate)


@backward_of("compressive")
def backward(dout, cache):
    """The layer's gradients (Transformer-XL's), plus the reconstruction loss's (upstream 1) in Wc, bc."""
    g = xl_layer_backward(dout, cache.layer)
    if cache.compress != "conv":
        return g
    p = cache.layer.params
    D = p["Wq"].shape[0]
    xp = get_namespace(dout)
    dW, db = xp.zeros_like(p["Wc"]), xp.zeros_like(p["bc"])
    if cache.recon is not None:
        grouped, _, ca, diff, denom = cache.recon
        da_c = diff * (-2.0 * cache.weight / denom)                          # d L / d attn(q, C)
        ga = attend_backward(da_c, ca)
        dC = merge_heads(ga["k"]) @ p["Wk"].T + merge_heads(ga["v"]) @ p["Wv"].T    # (..., G, D)
        dW = (grouped.reshape(-1, grouped.shape[-1]).T @ dC.reshape(-1, D)).reshape(p["Wc"].shape)
        db = dC.reshape(-1, D).sum(axis=0)
    return {**g, "Wc": dW, "bc": db}


@reads_cache("compressive")
def weights(cache):
    """The attention weights (..., h, N, L_c + L + N) over [compressed; memory; segment]."""
    return weights_of(cache.layer.rel)


@reads_cache("compressive")
def next_memory(cache):
    """(memory, memory_mask, compressed, compressed_mask) for the next segment (copies, no gradient)."""
    return cache.state


@reads_cache("compressive")
def aux_loss(cache):
    """The weighted attention-reconstruction loss of the last call (0.0 when nothing was compressed)."""
    return 0.0 if cache.recon is None else cache.recon[1]


# --------------------------------------------------------------------------- oracles
def loop(x, *, memory=None, memory_mask=None, compressed=None, compressed_mask=None, key_mask=None, causal=False,
         heads=1, mem_len=None, cmem_len=None, rate=2, compress="conv", recon_weight=1.0, **params):
    """The output with every pair's distance written out (no relative shift)."""
    xp = get_namespace(x)
    _check(x, memory, memory_mask, compressed, compressed_mask, key_mask, causal, heads, mem_len, cmem_len, rate,
           compress, recon_weight, params)
    lead, n = tuple(x.shape[:-2]), x.shape[-2]
    h = xp.concatenate([a for a in (compressed, memory, x) if a is not None], axis=-2)
    m = h.shape[-2]
    mask = _masks(xp, lead, [(0 if compressed is None else compressed.shape[-2], compressed_mask),
                             (0 if memory is None else memory.shape[-2], memory_mask), (n, key_mask)])
    allowed = _ones(xp, (n, m))
    if causal:
        allowed = xp.arange(m)[None, :] <= (m - n) + xp.arange(n)[:, None]
    if mask is not None:
        allowed = allowed & mask[..., None, None, :]
    return xl_layer_loop(x, h, params, heads=heads, allowed=allowed)


reference = loop


def one_pass(x, *, segment, key_mask=None, causal=False, heads=1, mem_len=None, cmem_len=None, rate=2,
             compress="conv", recon_weight=1.0, **params):
    """The whole sequence x (..., T, D) as segment by segment computes it, written out position by
    position: for each segment s, the memory is the last mem_len rows before it, the compressed
    memory the last cmem_len groups of c rows before those (each group compressed by f_c, groups
    aligned to the segments' fall-out order), then the layer's loop. O(T^2): the segment test's oracle."""
    xp = get_namespace(x)
    segment = check_int("segment", segment)
    t, D = x.shape[-2:]
    lead = tuple(x.shape[:-2])
    mem_len = segment if mem_len is None else mem_len
    cmem_len = mem_len if cmem_len is None else cmem_len
    km = _ones(xp, lead + (t,)) if key_mask is None else xp.broadcast_to(key_mask, lead + (t,))
    outs, groups = [], []                 # groups: (start, stop) of every compressed group, in order
    fallen_to = 0                         # rows [0, fallen_to) have left the memory
    for s0 in range(0, t, segment):
        s1 = min(s0 + segment, t)
        m0 = max(fallen_to, s0 - mem_len) if s0 else 0
        mem = None if m0 == s0 else x[..., m0:s0, :]
        kept = groups[len(groups) - min(cmem_len, len(groups)):] if cmem_len else []
        cms, cmm = [], []
        for a, b in kept:
            C, cmask, _ = compress_rows(x[..., a:b, :], km[..., a:b], rate=rate, compress=compress, params=params)
            cms.append(C)
            cmm.append(cmask if cmask is not None else _ones(xp, lead + (1,)))
        comp = xp.concatenate(cms, axis=-2) if cms else None
        comp_mask = xp.concatenate(cmm, axis=-1) if cmm else None
        outs.append(loop(x[..., s0:s1, :], memory=mem, memory_mask=None if mem is None else km[..., m0:s0],
                         compressed=comp, compressed_mask=comp_mask, key_mask=km[..., s0:s1], causal=causal,
                         heads=heads, rate=rate, compress=compress, **params))
        # after this segment: [memory; x] = rows [m0, s1); the last mem_len stay, the rest fall out
        new_m0 = max(m0, s1 - mem_len)
        k = new_m0 - m0
        g = k // rate
        groups.extend((new_m0 - (g - i) * rate, new_m0 - (g - i - 1) * rate) for i in range(g))
        fallen_to = new_m0
    return xp.concatenate(outs, axis=-2)


# --------------------------------------------------------------------------- parameters and example
def init_params(rng, D, heads, *, rate=2, compress="conv", dtype="float64", jitter=0.1):
    """Transformer-XL's parameters (:func:`effattn.nn.relative.init_xl_params`) and, for ``"conv"``,
    W_c ~ N(0, 1/(c D)) (c, D, D), b_c ~ jitter N(0, 1)."""
    p = init_xl_params(rng, D, heads, jitter=jitter)
    if compress == "conv":
        p["Wc"] = rng.standard_normal((rate, D, D)) / (rate * D) ** 0.5
        p["bc"] = jitter * rng.standard_normal(D)
    return {k: asarray(v, dtype=dtype) for k, v in p.items()}


def example(rng, batch=2, heads=2, n=64, d=8, causal=False, dtype="float64"):
    """A random case: x (batch, n, heads * d), a memory of min(n, 6) states and a compressed memory
    of 3 (constants: config), mem_len 4, so that n + 2 states fall out and are compressed by a
    learned convolution of rate 2 (the reconstruction loss then has a gradient)."""
    d = d + (heads * d) % 2
    D = heads * d
    x = asarray(rng.standard_normal((batch, n, D)), dtype=dtype)
    L = min(n, 6)
    config = {"heads": heads, "mem_len": 4, "cmem_len": 5, "rate": 2, "compress": "conv", "causal": causal,
              "memory": asarray(rng.standard_normal((batch, L, D)), dtype=dtype),
              "compressed": asarray(rng.standard_normal((batch, 3, D)), dtype=dtype)}
    return Case(inputs={"x": x, **init_params(rng, D, heads, dtype=dtype)}, config=config, seq_inputs=("x",),
                key_inputs=("x",), out_follows_keys=True, n=n, m=n)


MECHANISM = register(Mechanism(
    name="compressive",
    title="Compressive Transformer (compressed memory)",
    citation="Rae et al., 2020",
    url="https://arxiv.org/abs/1911.05507",
    classes=("RC",),
    complexity="O(N·(N + L + L_c)) per segment",
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
    state_keys=("memory", "memory_mask", "compressed", "compressed_mask"),
    one_pass=one_pass,
    aux_loss=aux_loss,
    aux_trains=("Wc", "bc"),
    sizes=("heads", "rate"),
    subquadratic=False,
    summary="states falling out of Transformer-XL's memory are compressed c:1 (a learned convolution, max or mean) "
            "into a second memory; an attention-reconstruction loss trains the compression.",
))
