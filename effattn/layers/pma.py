"""Set Transformer PMA: pooling by multihead attention through k learned seeds.

Lee, Lee, Kim, Kosiorek, Choi, Teh, 2019, *Set Transformer: A Framework for
Attention-based Permutation-Invariant Neural Networks*, https://arxiv.org/abs/1810.00825
(official code: github.com/juho-lee/set_transformer, ``modules.py``, class ``PMA``).

Intuition. PMA pools a set into k vectors by letting k learned *seeds* S
attend over it — a learned, attention-weighted pooling (k = 1 replaces
mean/max). The seeds are a small memory that reads the whole set (the
survey's "neural memory" class, M), O(N k). PMA is permutation invariant: the
seeds' softmax sums over the set.

In the paper's symbols (Section 3.2), with the multihead attention block MAB
of :mod:`effattn.nn.mab` (its equations, its two forms ``"paper"`` /
``"official"``, ``ln=`` and its backward are documented there):

    PMA_k(Z) = MAB(S, rFF(Z)),   S in R^{k x D}                         O(N k)

rFF is the row-wise feed-forward layer ``relu(Z W1 + b1) W2 + b2``
(:func:`effattn.nn.functional.mlp_forward`). The official form is
``MAB(S, Z)``, with no rFF on Z.

Parameters (flat keyword arrays, so a :class:`~effattn.registry.Case` holds
them; :func:`param_names` lists them for a form and ``ln``):

    S (k, D); mab_*;  paper form also rff_W1 (D_in, F), rff_b1 (F,), rff_W2 (F, D), rff_b2 (D,)

Shapes: x = Z (..., N, D_in) with any leading batch axes; key_mask (..., N)
boolean (True = real element). Returns (..., k, D). No output depends on a
masked element: masked elements get exactly zero weight as keys of MAB(S, Z).

The registry's example (``effattn.get("pma").example(...)``) gives x of
shape (batch, 1, N, D) (:func:`effattn.nn.mab.example_set`) and k = 2 seeds.

``causal=True`` raises: a set has no order, so "earlier elements" means
nothing, and every seed reads the whole set.

Cost (h heads, D = h d): O(N k D + N D^2) time, O(N k h) memory for the
attention matrix (h, k, N). Nothing of size N x N is allocated.

Backward: out = MAB(S, Z'), Z' = rFF(Z): dZ' = dY_MAB, dZ = rFF'(dZ') (paper;
official: dZ = dY_MAB), dS = dX_MAB summed over the batch axes (S is broadcast
to every set).

Peer mapping (tests/parity/peer_official.py): the official ``PMA`` of
juho-lee/set_transformer ``modules.py`` (git 73432c6, torch 2.13, float64),
``MAB(S, X)`` with no rFF on X, is ``form="official"``: ``PMA.S[0]`` -> ``S``,
its ``mab`` -> ``mab_*`` with each ``nn.Linear`` weight transposed (``fc_q`` ->
``Wq, bq``, ``fc_k`` -> ``Wk``, its bias cancelling in the softmax, ``fc_v`` ->
``Wv, bv``, ``fc_o`` -> ``W1, b1``, ``ln0``/``ln1`` -> ``ln0_*``, ``ln1_*``),
``num_heads`` -> ``heads``, ``num_seeds`` = k. Measured with ``ln=True``
(2 heads, 2 seeds) and ``ln=False`` (1 head, 1 seed): out within 4.4e-16, every
gradient within 1.8e-15 (tolerance 1e-10). The paper form (rFF on Z, W^O,
residual on X, 1/sqrt(D/h)) has no official peer. No masks in the peer.
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import asarray
from ..nn.functional import mlp_backward, mlp_forward
from ..nn.mab import (WHY_NOT_CAUSAL, MABCache, broadcast_rows, check_heads, check_mab_params, check_param_names,
                      check_set_layer, example_set, init_mab, mab_backward, mab_forward, mab_param_names, sub_params,
                      sum_lead)
from ..registry import Case, Mechanism, backward_of, forward_of, reads_cache, register
from ..validate import check_causal, check_param

RFF_NAMES = ["rff_W1", "rff_b1", "rff_W2", "rff_b2"]


def param_names(form="paper", ln=True):
    """PMA's flat parameter names: S, (paper) rff_*, mab_*."""
    rff = RFF_NAMES if form == "paper" else []
    return ["S"] + rff + [f"mab_{n}" for n in mab_param_names(form, ln)]


class PMACache(NamedTuple):
    rff: object      # mlp cache of the paper's rFF(Z) or None (official)
    mab: MABCache    # MAB(S, rFF(Z)): attention (..., h, k, N)
    S_shape: tuple


@forward_of("pma")
def forward(x, *, S, key_mask=None, causal=False, heads=1, ln=True, form="paper", **params):
    """Pooling by multihead attention PMA_k(Z) = MAB(S, rFF(Z)) (official: MAB(S, Z)).

    x = Z (..., N, D_in); S (k, D) seeds; rff_* (paper) and mab_* parameters;
    key_mask (..., N). Returns (out (..., k, D), PMACache).
    """
    heads, ln, form = check_set_layer(x, key_mask, causal, heads, ln, form)
    check_param_names({"S": S, **params}, param_names(form, ln), "pma")
    check_param("S", S, (None, None), x.dtype)
    k, D = S.shape
    check_heads(D, heads)
    lead = tuple(x.shape[:-2])
    if form == "paper":
        check_param("rff_W1", params["rff_W1"], (x.shape[-1], None), x.dtype)
        F = params["rff_W1"].shape[-1]
        check_param("rff_b1", params["rff_b1"], (F,), x.dtype)
        check_param("rff_W2", params["rff_W2"], (F, D), x.dtype)
        check_param("rff_b2", params["rff_b2"], (D,), x.dtype)
        Z, cr = mlp_forward(x, *(params[n] for n in RFF_NAMES))   # rFF(Z): (..., N, D)
    else:
        Z, cr = x, None
    p = sub_params(params, "mab_")
    check_mab_params(p, "mab_", D, Z.shape[-1], D, form, ln, x.dtype)
    out, cm = mab_forward(broadcast_rows(S, lead), Z, p, heads=heads, ln=ln, form=form, key_mask=key_mask)
    return out, PMACache(cr, cm, tuple(S.shape))      # out (..., k, D)


@backward_of("pma")
def backward(dout, cache):
    """{"x": dx, "S": dS, "rff_*" (paper), "mab_*": ...}."""
    g = mab_backward(dout, cache.mab)
    grads = {"S": sum_lead(g.pop("X"), cache.S_shape)}
    dZ = g.pop("Y")
    if cache.rff is not None:
        gr = mlp_backward(dZ, cache.rff)
        dZ = gr.pop("x")
        grads.update({f"rff_{k}": v for k, v in gr.items()})
    grads["x"] = dZ
    grads.update({f"mab_{k}": v for k, v in g.items()})
    return grads


@reads_cache("pma")
def weights(cache):
    """The seeds' attention over the set, (..., h, k, N)."""
    return cache.mab.attend.p


def init_params(rng, d_in, D, k, *, form="paper", ln=True, hidden=None, dtype="float64"):
    """PMA parameters {S, rff_* (paper), mab_*} on the active backend (drawn on the host from ``rng``):
    S ~ N(0, 1), rFF weights ~ N(0, 1/fan_in) and biases ~ 0.1 N(0, 1), the MAB as
    :func:`effattn.nn.mab.init_mab`."""
    params = {"S": rng.standard_normal((k, D))}
    if form == "paper":
        F = hidden or D
        params.update({"rff_W1": rng.standard_normal((d_in, F)) / d_in ** 0.5, "rff_b1": 0.1 * rng.standard_normal(F),
                       "rff_W2": rng.standard_normal((F, D)) / F ** 0.5, "rff_b2": 0.1 * rng.standard_normal(D)})
    params.update(init_mab(rng, "mab_", D, D if form == "paper" else d_in, D, form=form, ln=ln, hidden=hidden))
    return {k: asarray(v, dtype=dtype) for k, v in params.items()}


def example(rng, batch=2, heads=2, n=64, d=8, causal=False, dtype="float64"):
    """A random PMA case: x (batch, 1, n, heads*d), k = 2 seeds."""
    check_causal(causal, False, WHY_NOT_CAUSAL)
    D = heads * d
    x = example_set(rng, batch, n, D, dtype)
    params = init_params(rng, D, D, 2, dtype=dtype)
    return Case(inputs={"x": x, **params}, config={"heads": heads, "ln": True, "form": "paper"},
                seq_inputs=("x",), key_inputs=("x",), out_follows_keys=False, n=n, m=n)


MECHANISM = register(Mechanism(
    name="pma",
    title="Set Transformer PMA (pooling by attention)",
    citation="Lee et al., 2019",
    url="https://arxiv.org/abs/1810.00825",
    classes=("M",),
    complexity="O(N·k)",
    causal=False,
    exact=False,
    kind="layer",
    notebook="04_neural_memory",
    forward=forward,
    backward=backward,
    weights=weights,
    make_example=example,
    sizes=("heads",),
    summary="k learned seed vectors attend over the set: permutation-invariant pooling, O(N k).",
))
