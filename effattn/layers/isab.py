"""Set Transformer ISAB: induced set attention through m learned inducing points.

Lee, Lee, Kim, Kosiorek, Choi, Teh, 2019, *Set Transformer: A Framework for
Attention-based Permutation-Invariant Neural Networks*, https://arxiv.org/abs/1810.00825
(official code: github.com/juho-lee/set_transformer, ``modules.py``, class ``ISAB``).

Intuition. Self-attention over a set is permutation equivariant but costs
O(N^2). ISAB routes every interaction through m learned *inducing points* I:
first the m points read the whole set (an m x N attention), then every
element reads the m summaries (an N x m attention). The inducing points are a
small global *memory* (the survey's "neural memory" class, M): cost O(N m)
instead of O(N^2). ISAB is equivariant: I is the same whatever the order, and
MAB(X, H) treats each row of X alone.

In the paper's symbols (Section 3.2), with the multihead attention block MAB
of :mod:`effattn.nn.mab` (its equations, its two forms ``"paper"`` /
``"official"``, ``ln=`` and its backward are documented there):

    ISAB_m(X) = MAB(X, H),   H = MAB(I, X),   I in R^{m x D}          O(N m)

Parameters (flat keyword arrays, so a :class:`~effattn.registry.Case` holds
them; :func:`param_names` lists them for a form and ``ln``):

    I (m, D); mab0_* (the MAB(I, X) that writes the memory), mab1_* (MAB(X, H))

The paper form needs an input width D_in == D (residual X + ...); the
official form allows any D_in (``mab1_Wq`` is (D_in, D), ``mab0_Wk``,
``mab0_Wv`` are (D_in, D)).

Shapes: x (..., N, D_in) with any leading batch axes; key_mask (..., N)
boolean (True = real element). Returns (..., N, D). Rows of the output at
masked positions are computed (they are padding) and must be ignored; rows at
real positions do not depend on masked elements at all, because masked
elements get exactly zero weight as keys of MAB(I, X); the second MAB has the
m inducing summaries as keys, which are never masked.

The registry's example (``effattn.get("isab").example(...)``) gives x of
shape (batch, 1, N, D) (:func:`effattn.nn.mab.example_set`) and m =
:func:`default_inducing` (n) inducing points.

``causal=True`` raises: a set has no order, so "earlier elements" means
nothing, and every inducing point reads the whole set.

Cost (h heads, D = h d): O(N m D + N D^2) time, O(N m h) memory for the two
attention matrices (h, m, N) and (h, N, m). Nothing of size N x N is allocated.

Backward: out = MAB1(X, H), H = MAB0(I, X): dX = dX_MAB1 + dY_MAB0, dH = dY_MAB1
feeds MAB0's backward, dI = dX_MAB0 summed over the batch axes (I is
broadcast to every set).

Peer mapping (tests/parity/peer_official.py): the official ``ISAB`` of
juho-lee/set_transformer ``modules.py`` (git 73432c6, torch 2.13, float64) is
``form="official"``: ``ISAB.I[0]`` -> ``I``; ``mab0`` (MAB(I, X)) -> ``mab0_*``,
``mab1`` (MAB(X, H)) -> ``mab1_*``, with each ``nn.Linear`` weight transposed:
``fc_q`` -> ``Wq, bq``, ``fc_k`` -> ``Wk`` (its bias cancels in the softmax; the
peer's gradient of it is ~6e-17), ``fc_v`` -> ``Wv, bv``, ``fc_o`` -> ``W1, b1``,
``ln0``/``ln1`` -> ``ln0_g, ln0_b, ln1_g, ln1_b``; ``num_heads`` -> ``heads``.
Measured, with ``ln=True`` (D_in = 3, D = 4) and the official default
``ln=False``: out within 4e-16, every parameter gradient and dx within 2.2e-15
(tolerance 1e-10). The official code has no masks, so key_mask is not compared.
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import asarray
from ..nn.mab import (WHY_NOT_CAUSAL, MABCache, broadcast_rows, check_heads, check_mab_params, check_param_names,
                      check_set_layer, example_set, init_mab, mab_backward, mab_forward, mab_param_names, sub_params,
                      sum_lead)
from ..registry import Case, Mechanism, backward_of, forward_of, reads_cache, register
from ..validate import check_causal, check_param


def param_names(form="paper", ln=True):
    """ISAB's flat parameter names: I, mab0_*, mab1_*."""
    return ["I"] + [f"mab{i}_{n}" for i in (0, 1) for n in mab_param_names(form, ln)]


class ISABCache(NamedTuple):
    mab0: MABCache   # H = MAB(I, X): the m inducing points read the set (attention (..., h, m, N))
    mab1: MABCache   # out = MAB(X, H): every element reads the m summaries (attention (..., h, N, m))
    I_shape: tuple


@forward_of("isab")
def forward(x, *, I, key_mask=None, causal=False, heads=1, ln=True, form="paper", **params):
    """Induced set attention block ISAB_m(X) = MAB(X, MAB(I, X)).

    x (..., N, D_in); I (m, D) inducing points; mab0_*/mab1_* parameters (see
    the module docstring); key_mask (..., N). Returns (out (..., N, D), ISABCache).
    """
    heads, ln, form = check_set_layer(x, key_mask, causal, heads, ln, form)
    check_param_names({"I": I, **params}, param_names(form, ln), "isab")
    check_param("I", I, (None, None), x.dtype)
    m, D = I.shape
    check_heads(D, heads)
    if form == "paper" and x.shape[-1] != D:
        raise ValueError(f"x must have width D={D} (the width of I) in the paper form (residual X + ...), "
                         f"got shape {tuple(x.shape)}; use form='official' for a different input width")
    p0, p1 = sub_params(params, "mab0_"), sub_params(params, "mab1_")
    check_mab_params(p0, "mab0_", D, x.shape[-1], D, form, ln, x.dtype)
    check_mab_params(p1, "mab1_", x.shape[-1], D, D, form, ln, x.dtype)
    lead = tuple(x.shape[:-2])
    Ib = broadcast_rows(I, lead)                                                # (..., m, D)
    H, c0 = mab_forward(Ib, x, p0, heads=heads, ln=ln, form=form, key_mask=key_mask)   # (..., m, D)
    out, c1 = mab_forward(x, H, p1, heads=heads, ln=ln, form=form)                     # (..., N, D)
    return out, ISABCache(c0, c1, tuple(I.shape))


@backward_of("isab")
def backward(dout, cache):
    """{"x": dx, "I": dI, "mab0_*": ..., "mab1_*": ...}."""
    g1 = mab_backward(dout, cache.mab1)
    g0 = mab_backward(g1.pop("Y"), cache.mab0)         # dH flows into MAB(I, X)
    grads = {"x": g1.pop("X") + g0.pop("Y"), "I": sum_lead(g0.pop("X"), cache.I_shape)}
    grads.update({f"mab1_{k}": v for k, v in g1.items()})
    grads.update({f"mab0_{k}": v for k, v in g0.items()})
    return grads


@reads_cache("isab")
def weights(cache):
    """The inducing points' attention over the set, (..., h, m, N): row i is how inducing
    point i spreads its read over the elements (0 on masked elements)."""
    return cache.mab0.attend.p


def init_params(rng, d_in, D, m, *, form="paper", ln=True, hidden=None, dtype="float64"):
    """ISAB parameters {I, mab0_*, mab1_*} on the active backend (drawn on the host from ``rng``):
    I ~ N(0, 1), each MAB as :func:`effattn.nn.mab.init_mab`."""
    params = {"I": rng.standard_normal((m, D))}
    params.update(init_mab(rng, "mab0_", D, d_in, D, form=form, ln=ln, hidden=hidden))
    params.update(init_mab(rng, "mab1_", d_in, D, D, form=form, ln=ln, hidden=hidden))
    return {k: asarray(v, dtype=dtype) for k, v in params.items()}


def default_inducing(n):
    """Default number of inducing points m for a set of n: small (16 at most), below n."""
    return max(2, min(16, n // 2))


def example(rng, batch=2, heads=2, n=64, d=8, causal=False, dtype="float64"):
    """A random ISAB case: x (batch, 1, n, heads*d), m = default_inducing(n) inducing points."""
    check_causal(causal, False, WHY_NOT_CAUSAL)
    D = heads * d
    x = example_set(rng, batch, n, D, dtype)
    params = init_params(rng, D, D, default_inducing(n), dtype=dtype)
    return Case(inputs={"x": x, **params}, config={"heads": heads, "ln": True, "form": "paper"},
                seq_inputs=("x",), key_inputs=("x",), out_follows_keys=True, n=n, m=n)


MECHANISM = register(Mechanism(
    name="isab",
    title="Set Transformer ISAB (inducing points)",
    citation="Lee et al., 2019",
    url="https://arxiv.org/abs/1810.00825",
    classes=("M",),
    complexity="O(N·m)",
    causal=False,
    exact=False,
    kind="layer",
    notebook="04_neural_memory",
    forward=forward,
    backward=backward,
    weights=weights,
    make_example=example,
    sizes=("heads",),
    summary="m learned inducing points read the set, then every element reads them: a global memory, O(N m).",
))
