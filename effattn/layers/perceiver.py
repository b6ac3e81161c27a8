"""Perceiver (a latent array reads the input) and Perceiver AR (its causal form).

Jaegle, Gimeno, Brock, Zisserman, Vinyals, Carreira, 2021, *Perceiver: General Perception with
Iterative Attention*, https://arxiv.org/abs/2103.03206; Hawthorne, Jaegle, Cangea, Borgeaud, Nash,
Malinowski, Dieleman, Vinyals, Botvinick, Simon, Sheahan, Zeghidour, Alayrac, Carreira, Engel,
2022, *General-purpose, long-context autoregressive modeling with Perceiver AR*,
https://arxiv.org/abs/2202.07765 (peers: lucidrains' ``perceiver-pytorch`` and
``perceiver-ar-pytorch``; HF ``PerceiverModel``).

Intuition. Self-attention over N inputs costs O(N^2). The Perceiver keeps a small **latent
array** of m vectors; the latents cross-attend to the inputs once (O(m N): the only place the
input length enters), then all the deep processing is self-attention among the latents
(O(m^2) per layer, independent of N). The input is *downsampled* to m learned summaries (the
survey's DS class). A classifier reads the latents (mean, LayerNorm, linear); outputs per
position come from a decoder query array that cross-attends to the latents (Perceiver IO;
:class:`effattn.models.downsampling.PerceiverEncoder` ``decode``).

Perceiver AR makes it causal: the latents are **the last m positions** of the input
themselves (their own vectors as the initial latents), the cross-attention is causal (latent r,
which stands for position t_r = N - m + r, reads the inputs j <= t_r: the whole prefix and the
latents before it), and the latent self-attention is causal too. Every output row r is then a
function of the inputs up to t_r only, so the layer predicts positions N - m, ..., N - 1 with
a context of all N (the paper's long context at the price of m query rows).

The layer, pre-LayerNorm as both peers (Z^0: the learned latents (m, D), or x[N - m:] if causal)::

    Z   = Z^0 + MHA(LN_q(Z^0), LN_x(x))                 cross-attention    O(m N D)
    Z   = Z + FF(LN(Z))
    repeat latent_layers times:
        Z = Z + MHA(LN(Z), LN(Z))                       latent self-attention  O(m^2 D)
        Z = Z + FF(LN(Z))
    out = Z                                              (..., m, D)

MHA and FF (GELU, tanh form) are :mod:`effattn.nn.mha`'s. Parameters (flat, prefixed):
``latents`` (m, D) (non-causal only); ``cross_qln_`` and ``cross_xln_`` (g, b), ``cross_att_``
(:data:`~effattn.nn.mha.MHA_NAMES`), ``cross_ffln_``, ``cross_ff_`` (W1, b1, W2, b2); for each latent
layer i, ``lat{i}_ln_``, ``lat{i}_att_``, ``lat{i}_ffln_``, ``lat{i}_ff_``. ``param_names``
lists them.

Key masks. ``key_mask`` (..., N): masked inputs are masked keys of the cross-attention. Causal:
the latents are inputs too, so a masked latent is also a masked key of the latent
self-attention and its own row is not real (``Case.real_rows`` = key_mask[..., N - m:]).
Non-causal: every latent is real.

Configuration: ``heads``; ``latent_layers`` (>= 0); causal: ``n_latents`` m (clipped to N: with
m >= N every position is a latent and the layer is a causal Transformer layer with a cross
layer in front).

Backward (hand-derived): each residual sub-layer Z + f(LN(Z)) passes dZ + LN'(f'(dZ)); the
cross-attention's gradient reaches x through K and V (and, causal, through Z^0 = x[N - m:]);
the learned latents' gradient sums over the batch axes.

Peers (tests/parity/peer_lucidrains_perceiver.py, float64, outputs and gradients within 1e-14):
perceiver-ar-pytorch 0.0.10 for ``causal=True`` (its exact-erf GELU swapped for the tanh form;
its query norm also normalises the latents' own keys, effattn's input norm does, so the two norms
are set equal there; its missing biases set to 0), perceiver-pytorch 0.11.0 for the non-causal
layer (its GEGLU feed-forward has no counterpart: both feed-forwards are zeroed, so the
cross-attention, its two norms, the latents' gradient and the latent self-attention are compared).

Cost: O(m N D + L m^2 D + (N + m) D^2) time; memory O(h m N) for the cross-attention weights,
linear in N (nothing N x N).
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import asarray, get_namespace
from ..nn.mha import (check_ff, check_ln, check_mha, ff_backward, ff_forward, init_ff, init_ln, init_mha, ln_backward,
                      ln_forward, mha_backward, mha_forward, mha_weights, prefixed, sub, FF_NAMES, LN_NAMES, MHA_NAMES)
from ..registry import Case, Mechanism, backward_of, forward_of, reads_cache, register
from ..validate import check_bool, check_float_array, check_int, check_key_mask, check_param


def param_names(latent_layers=1, causal=False):
    """The layer's parameter names for ``latent_layers`` latent blocks (``latents`` unless causal)."""
    names = [] if causal else ["latents"]
    names += [f"cross_qln_{n}" for n in LN_NAMES] + [f"cross_xln_{n}" for n in LN_NAMES]
    names += [f"cross_att_{n}" for n in MHA_NAMES] + [f"cross_ffln_{n}" for n in LN_NAMES]
    names += [f"cross_ff_{n}" for n in FF_NAMES]
    for i in range(latent_layers):
        names += [f"lat{i}_ln_{n}" for n in LN_NAMES] + [f"lat{i}_att_{n}" for n in MHA_NAMES]
        names += [f"lat{i}_ffln_{n}" for n in LN_NAMES] + [f"lat{i}_ff_{n}" for n in FF_NAMES]
    return names


class PerceiverCache(NamedTuple):
    causal: bool
    m: int
    n: int
    lead: tuple
    cross: tuple          # (qln, xln, mha, ffln, ff) caches
    latent: tuple         # per latent layer (ln, mha, ffln, ff)


def _check(x, key_mask, causal, heads, latent_layers, n_latents, params):
    check_float_array("x", x, min_ndim=2)
    causal = check_bool("causal", causal)
    heads = check_int("heads", heads)
    latent_layers = check_int("latent_layers", latent_layers, minimum=0)
    n, D = x.shape[-2:]
    if n < 1 or D < 1:
        raise ValueError(f"x must be a non-empty (..., N, D) array, got shape {tuple(x.shape)}")
    check_key_mask(key_mask, tuple(x.shape[:-2]), n)
    want = set(param_names(latent_layers, causal))
    missing, extra = sorted(want - set(params)), sorted(set(params) - want)
    if missing or extra:
        hint = " (a causal Perceiver AR takes its latents from the input: no 'latents')" if causal and "latents" in extra \
            else ""
        raise ValueError(f"perceiver parameters do not match latent_layers={latent_layers}, causal={causal}: "
                         f"missing {missing[:4]}, unexpected {extra[:4]}{hint} (see effattn.layers.perceiver.param_names)")
    if D % heads:
        raise ValueError(f"heads must divide the model width D={D}, got heads={heads}")
    if causal:
        if n_latents is None:
            raise ValueError("n_latents must be given with causal=True (Perceiver AR: the last n_latents positions "
                             "are the latents)")
        m = min(check_int("n_latents", n_latents), n)
    else:
        check_param("latents", params["latents"], (None, D), x.dtype)
        m = params["latents"].shape[0]
        if m < 1:
            raise ValueError("latents must have at least one row")
        if n_latents is not None and check_int("n_latents", n_latents) != m:
            raise ValueError(f"n_latents={n_latents} disagrees with latents of {m} rows (non-causal: the latents decide)")
    for pre in ["cross_qln_", "cross_xln_", "cross_ffln_"] + [f"lat{i}_{s}" for i in range(latent_layers)
                                                                for s in ("ln_", "ffln_")]:
        check_ln(sub(params, pre), pre, D, x.dtype)
    for pre in ["cross_att_"] + [f"lat{i}_att_" for i in range(latent_layers)]:
        check_mha(sub(params, pre), pre, D, D, D, D, x.dtype)
    for pre in ["cross_ff_"] + [f"lat{i}_ff_" for i in range(latent_layers)]:
        check_ff(sub(params, pre), pre, D, x.dtype)
    return causal, heads, latent_layers, m


def _residual_ff(Z, params, pre_ln, pre_ff):
    h, cl = ln_forward(Z, sub(params, pre_ln))
    f, cf = ff_forward(h, sub(params, pre_ff))
    return Z + f, (cl, cf)


def _residual_ff_backward(dZ, cache):
    cl, cf = cache
    gf = ff_backward(dZ, cf)
    gl = ln_backward(gf.pop("x"), cl)
    return dZ + gl.pop("x"), gl, gf


@forward_of("perceiver")
def forward(x, *, key_mask=None, causal=False, heads=1, latent_layers=1, n_latents=None, **params):
    """x (..., N, D) -> (out (..., m, D), PerceiverCache): the latents after the cross-attention and
    ``latent_layers`` latent blocks (causal: Perceiver AR, the latents are positions N - m ... N - 1)."""
    causal, heads, latent_layers, m = _check(x, key_mask, causal, heads, latent_layers, n_latents, params)
    xp = get_namespace(x)
    n = x.shape[-2]
    lead = tuple(x.shape[:-2])
    if causal:
        Z0 = x[..., n - m:, :]
        lat_mask = None if key_mask is None else xp.broadcast_to(key_mask, lead + (n,))[..., n - m:]
    else:
        Z0 = xp.broadcast_to(params["latents"], lead + tuple(params["latents"].shape))
        lat_mask = None
    hq, cq = ln_forward(Z0, sub(params, "cross_qln_"))
    hx, cx = ln_forward(x, sub(params, "cross_xln_"))
    a, cm = mha_forward(hq, hx, sub(params, "cross_att_"), heads=heads, key_mask=key_mask,
                        diagonal=(n - m) if causal else None)
    Z = Z0 + a
    Z, cff = _residual_ff(Z, params, "cross_ffln_", "cross_ff_")
    latent = []
    for i in range(latent_layers):
        h, cl = ln_forward(Z, sub(params, f"lat{i}_ln_"))
        a, cmi = mha_forward(h, h, sub(params, f"lat{i}_att_"), heads=heads, key_mask=lat_mask,
                             diagonal=0 if causal else None)
        Z = Z + a
        Z, cffi = _residual_ff(Z, params, f"lat{i}_ffln_", f"lat{i}_ff_")
        latent.append((cl, cmi, cffi))
    return Z, PerceiverCache(causal, m, n, lead, (cq, cx, cm, cff), tuple(latent))


@backward_of("perceiver")
def backward(dout, cache):
    """{"x": dx, "latents" (non-causal), every prefixed parameter}."""
    xp = get_namespace(dout)
    grads = {}
    dZ = dout
    for i in reversed(range(len(cache.latent))):
        cl, cm, cff = cache.latent[i]
        dZ, gl, gf = _residual_ff_backward(dZ, cff)
        grads.update(prefixed(gl, f"lat{i}_ffln_"))
        grads.update(prefixed(gf, f"lat{i}_ff_"))
        g = mha_backward(dZ, cm)
        gln = ln_backward(g.pop("X") + g.pop("Y"), cl)
        dZ = dZ + gln.pop("x")
        grads.update(prefixed(g, f"lat{i}_att_"))
        grads.update(prefixed(gln, f"lat{i}_ln_"))
    cq, cx, cm, cff = cache.cross
    dZ, gl, gf = _residual_ff_backward(dZ, cff)
    grads.update(prefixed(gl, "cross_ffln_"))
    grads.update(prefixed(gf, "cross_ff_"))
    g = mha_backward(dZ, cm)
    gq = ln_backward(g.pop("X"), cq)
    gx = ln_backward(g.pop("Y"), cx)
    grads.update(prefixed(g, "cross_att_"))
    grads.update(prefixed({k: v for k, v in gq.items() if k != "x"}, "cross_qln_"))
    grads.update(prefixed({k: v for k, v in gx.items() if k != "x"}, "cross_xln_"))
    dZ0 = dZ + gq["x"]
    dx = gx["x"]
    if cache.causal:
        dx[..., cache.n - cache.m:, :] += dZ0
    else:
        grads["latents"] = dZ0.reshape((-1,) + tuple(dZ0.shape[-2:])).sum(axis=0)
    grads["x"] = dx
    return grads


@reads_cache("perceiver")
def weights(cache):
    """The latents' cross-attention over the inputs, (..., h, m, N)."""
    return mha_weights(cache.cross[2])


def init_params(rng, D, *, n_latents=8, latent_layers=1, causal=False, ff_mult=2, dtype="float64", jitter=0.1):
    """Host draws: latents ~ N(0, 1) (non-causal), attentions :func:`effattn.nn.mha.init_mha`,
    feed-forwards of width ff_mult D, LayerNorms 1 + jitter N(0, 1) and jitter N(0, 1)."""
    p = {} if causal else {"latents": rng.standard_normal((n_latents, D))}
    F = ff_mult * D
    p.update(init_ln(rng, "cross_qln_", D, jitter))
    p.update(init_ln(rng, "cross_xln_", D, jitter))
    p.update(init_mha(rng, "cross_att_", D, D, D, jitter=jitter))
    p.update(init_ln(rng, "cross_ffln_", D, jitter))
    p.update(init_ff(rng, "cross_ff_", D, F, jitter))
    for i in range(latent_layers):
        p.update(init_ln(rng, f"lat{i}_ln_", D, jitter))
        p.update(init_mha(rng, f"lat{i}_att_", D, D, D, jitter=jitter))
        p.update(init_ln(rng, f"lat{i}_ffln_", D, jitter))
        p.update(init_ff(rng, f"lat{i}_ff_", D, F, jitter))
    return {k: asarray(v, dtype=dtype) for k, v in p.items()}


def reference(x, *, key_mask=None, causal=False, heads=1, latent_layers=1, n_latents=None, **params):
    """The layer written out with an explicit (m, N) mask per call (built from the rule: latent r at
    position t_r = N - m + r reads j <= t_r) and a dense masked softmax per head: no ``diagonal``
    shortcut, no shared attention core. Small inputs only."""
    xp = get_namespace(x)
    n, D = x.shape[-2:]
    lead = tuple(x.shape[:-2])
    d = D // heads
    km = xp.ones(lead + (n,), dtype=bool) if key_mask is None else xp.broadcast_to(key_mask, lead + (n,))
    m = min(n_latents, n) if causal else params["latents"].shape[0]

    def ln(z, pre):
        mu = z.mean(axis=-1, keepdims=True)
        var = ((z - mu) ** 2).mean(axis=-1, keepdims=True)
        return (z - mu) / xp.sqrt(var + 1e-5) * params[pre + "g"] + params[pre + "b"]

    def ff(z, pre):
        h = z @ params[pre + "W1"] + params[pre + "b1"]
        h = 0.5 * h * (1.0 + xp.tanh((2.0 / xp.pi) ** 0.5 * (h + 0.044715 * h ** 3)))
        return h @ params[pre + "W2"] + params[pre + "b2"]

    def att(X, Y, pre, allowed):                     # allowed (..., Nq, Nk)
        Q, K = X @ params[pre + "Wq"] + params[pre + "bq"], Y @ params[pre + "Wk"]
        V = Y @ params[pre + "Wv"] + params[pre + "bv"]
        outs = []
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            s = Q[..., sl] @ K[..., sl].swapaxes(-1, -2) / d ** 0.5
            s = xp.where(allowed, s, -xp.inf)
            mx = xp.max(s, axis=-1, keepdims=True)
            e = xp.where(allowed, xp.exp(s - xp.where(xp.isfinite(mx), mx, 0.0)), 0.0)
            z = e.sum(axis=-1, keepdims=True)
            outs.append((e / xp.where(z > 0, z, 1.0)) @ V[..., sl])
        return xp.concatenate(outs, axis=-1) @ params[pre + "Wo"] + params[pre + "bo"]

    pos = xp.arange(n)
    if causal:
        t = n - m + xp.arange(m)
        Z = x[..., n - m:, :]
        cross_allowed = (pos[None, :] <= t[:, None]) & km[..., None, :]
        lat_allowed = (t[None, :] <= t[:, None]) & km[..., None, n - m:]
    else:
        Z = xp.broadcast_to(params["latents"], lead + (m, D))
        cross_allowed = xp.broadcast_to(km[..., None, :], lead + (m, n))
        lat_allowed = xp.ones(lead + (m, m), dtype=bool)
    Z = Z + att(ln(Z, "cross_qln_"), ln(x, "cross_xln_"), "cross_att_", cross_allowed)
    Z = Z + ff(ln(Z, "cross_ffln_"), "cross_ff_")
    for i in range(latent_layers):
        h = ln(Z, f"lat{i}_ln_")
        Z = Z + att(h, h, f"lat{i}_att_", lat_allowed)
        Z = Z + ff(ln(Z, f"lat{i}_ffln_"), f"lat{i}_ff_")
    return Z


def example(rng, batch=2, heads=2, n=64, d=8, causal=False, dtype="float64"):
    """A random case: x (batch, n, heads * d), one latent layer; m = 5 learned latents, or (causal,
    Perceiver AR) the last min(5, n) positions."""
    D = heads * d
    x = asarray(rng.standard_normal((batch, n, D)), dtype=dtype)
    m = 5
    params = init_params(rng, D, n_latents=m, latent_layers=1, causal=causal, dtype=dtype)
    config = {"causal": causal, "heads": heads, "latent_layers": 1}
    if causal:
        config["n_latents"] = m
        mm = min(m, n)
        return Case(inputs={"x": x, **params}, config=config, seq_inputs=("x",), key_inputs=("x",),
                    out_positions=tuple(range(n - mm, n)), real_rows=lambda km: km[..., n - mm:], n=mm, m=n)
    return Case(inputs={"x": x, **params}, config=config, seq_inputs=("x",), key_inputs=("x",), n=m, m=n)


MECHANISM = register(Mechanism(
    name="perceiver",
    title="Perceiver / Perceiver AR (latent array)",
    citation="Jaegle et al., 2021; Hawthorne et al., 2022",
    url="https://arxiv.org/abs/2103.03206",
    classes=("DS", "M"),
    complexity="O(m·N + L·m^2)",
    causal=True,
    exact=False,
    kind="layer",
    notebook="08_downsampling",
    forward=forward,
    backward=backward,
    weights=weights,
    make_example=example,
    reference=reference,
    sizes=("heads",),
    windows=("n_latents",),
    summary="m latents cross-attend to the N inputs once, then self-attend (O(m N + m^2)); causal: Perceiver AR.",
))
