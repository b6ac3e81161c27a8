"""Set Transformer: induced set attention (ISAB) and pooling by multihead attention (PMA).

Lee, Lee, Kim, Kosiorek, Choi, Teh, 2019, *Set Transformer: A Framework for
Attention-based Permutation-Invariant Neural Networks*, https://arxiv.org/abs/1810.00825
(official code: github.com/juho-lee/set_transformer, ``modules.py``).

Intuition. A set has no order, so a layer over a set must give the same
answer for any ordering of its elements: permutation *equivariant* for
set -> set layers, *invariant* for set -> vector poolings. Self-attention
without position encodings is equivariant, but costs O(N^2). ISAB routes
every interaction through m learned *inducing points* I: first the m points
read the whole set (an m x N attention), then every element reads the m
summaries (an N x m attention). The inducing points are a small global
*memory* (the survey's "neural memory" class, M): cost O(N m) instead of
O(N^2). PMA pools a set into k vectors by letting k learned *seeds* S attend
over it — a learned, attention-weighted pooling (k = 1 replaces mean/max).

The blocks, in the paper's symbols (Section 3.1-3.2):

    Att(Q, K, V)        = softmax(Q K^T / sqrt(d)) V
    Multihead(Q, K, V)  = concat(O_1, ..., O_h) W^O,  O_j = Att(Q W_j^Q, K W_j^K, V W_j^V)
    MAB(X, Y)           = LayerNorm(H + rFF(H)),      H = LayerNorm(X + Multihead(X, Y, Y))
    SAB(X)              = MAB(X, X)                                      O(N^2)
    ISAB_m(X)           = MAB(X, H),  H = MAB(I, X),  I in R^{m x D}     O(N m)
    PMA_k(Z)            = MAB(S, rFF(Z)),             S in R^{k x D}     O(N k)

rFF is a row-wise feed-forward layer, here ``relu(x W1 + b1) W2 + b2``.

Two forms (``form=``):

* ``"paper"`` (default) — the equations above: residual on the input X,
  output projection W^O, scale 1/sqrt(d) with d = D / h the head size, rFF =
  Linear-ReLU-Linear, and PMA's extra rFF on Z before pooling.
* ``"official"`` — juho-lee/set_transformer ``modules.py``, line for line:
  ``Q = fc_q(X)``, residual on the *projected* queries ``O = Q + A V`` (per
  head, no W^O), scale ``1/sqrt(dim_V)`` (the full width D, not the head
  size), rFF ``O + relu(fc_o(O))`` (one Linear + ReLU, so ``W2, b2`` and
  ``Wo, bo`` do not exist), and PMA = ``MAB(S, X)`` with no rFF on Z. Because
  the residual is on Q, not X, the official form also allows an input width
  different from D (``Wq`` is (D_in, D)); the paper form needs D_in == D.

LayerNorms: ``ln=True`` (default, the paper's post-LN MAB) or ``ln=False``
(no LayerNorms, which is the *official code's default* ``ln=False``).
Every projection has a bias (as ``nn.Linear`` in the official code) except
the key projection: a key bias b_k adds the same q . b_k to every logit of a
query's row, which the softmax cancels, so its gradient is exactly zero; the
official ``fc_k.bias`` can be dropped when porting weights (outputs are equal).

Heads are contiguous column blocks of the D projected features, as the
official ``torch.cat(Q.split(dim_split, 2), 0)``. The official code draws I
and S with ``xavier_uniform_``; :func:`init_isab` / :func:`init_pma` draw
N(0, 1) (initialisation is the caller's choice: pass any arrays).

Parameters (flat keyword arrays, so a :class:`~effattn.registry.Case` holds
them; one set shared by all heads, heads are slices of the D columns):

    ISAB:  I (m, D); mab0_* (the MAB(I, X) that writes the memory), mab1_* (MAB(X, H))
    PMA:   S (k, D); mab_*;  paper form also rff_W1 (D, F), rff_b1 (F,), rff_W2 (F, D), rff_b2 (D,)
    each MAB <p>_:  Wq (D_q, D) bq (D,)  Wk (D_k, D)  Wv (D_k, D) bv (D,)
                    paper only: Wo (D, D) bo (D,)  W2 (F, D) b2 (D,)
                    W1 (D, F) b1 (F,)     [official: F == D, fc_o]
                    ln=True only: ln0_g, ln0_b, ln1_g, ln1_b (D,)

Shapes: x (..., N, D_in) with any leading batch axes; key_mask (..., N)
boolean (True = real element). ISAB returns (..., N, D); PMA (..., k, D).
Rows of the ISAB output at masked positions are computed (they are padding)
and must be ignored; rows at real positions and every PMA output do not
depend on masked elements at all, because masked elements get exactly zero
weight as keys (MAB(I, X) and PMA's MAB(S, Z)); the second MAB of ISAB has
the m inducing summaries as keys, which are never masked.

The registry's examples (``effattn.get("isab").example(...)``) give x of
shape (batch, 1, N, D): the axis of size 1 is one more batch axis, so the
contract tests' (batch, 1, N) key masks and rank-4 indexing apply to these
layers as to the (batch, heads, N, d) kernels.

``causal=True`` raises: a set has no order, so "earlier elements" means
nothing, and every inducing point / seed reads the whole set.

Cost per layer (h heads, D = h d): ISAB O(N m D + N D^2) time, O(N m h)
memory for its two attention matrices (h, m, N) and (h, N, m); PMA O(N k D +
N D^2) time, O(N k h) memory. Nothing of size N x N is allocated.

Backward (hand-derived, composed of the functional pairs): for one MAB, with
R0 = X + A W^O + b^O (paper) or Q + A (official), H = LN0(R0), F = rFF(H),
out = LN1(H + F):

    dR1 = LN1'(dout);   dH = dR1 + rFF'(dR1);   dR0 = LN0'(dH)
    paper:    dX = dR0 (residual),  dA = dR0 W^O^T,  dW^O = A^T dR0
    official: dQ += dR0 (residual), dA = dR0
    dq, dk, dv per head from the attention backward (nn.sparse.attend_backward:
    dV = P^T dO, dS = P * (dP - rowsum(dO * O)), dQ = scale dS K, dK = scale dS^T Q)
    dX += dQ Wq^T,  dY = dK Wk^T + dV Wv^T,  dW = input^T d(output) for each Linear.

ISAB: out = MAB1(X, H), H = MAB0(I, X): dX = dX_MAB1 + dY_MAB0, dH = dY_MAB1
feeds MAB0's backward, dI = dX_MAB0 summed over the batch axes (I is
broadcast to every set). PMA: dZ = rFF'(dY_MAB), dS = dX_MAB summed over batch.
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import asarray, get_namespace
from ..validate import check_bool, check_causal, check_choice, check_float_array, check_int, check_key_mask, check_param
from ..nn.functional import (layer_norm_backward, layer_norm_forward, linear_backward, linear_forward,
                             relu_backward, relu_forward)
from ..nn.sparse import attend_backward, attend_forward
from ..registry import Case, Mechanism, register

FORMS = ("paper", "official")
_WHY_NOT_CAUSAL = ("a set has no order, so there is no 'past'; every inducing point / seed reads the whole set "
                   "(Set Transformer layers are permutation-equivariant/invariant by design)")


# --------------------------------------------------------------------------- parameter names
def mab_param_names(form="paper", ln=True):
    """Names of one MAB's parameters (without prefix), in a fixed order."""
    names = ["Wq", "bq", "Wk", "Wv", "bv"]           # no bk: see the module docstring
    if form == "paper":
        names += ["Wo", "bo", "W1", "b1", "W2", "b2"]
    else:
        names += ["W1", "b1"]          # the official fc_o inside O + relu(fc_o(O))
    if ln:
        names += ["ln0_g", "ln0_b", "ln1_g", "ln1_b"]
    return names


def isab_param_names(form="paper", ln=True):
    """ISAB's flat parameter names: I, mab0_*, mab1_*."""
    return ["I"] + [f"mab{i}_{n}" for i in (0, 1) for n in mab_param_names(form, ln)]


def pma_param_names(form="paper", ln=True):
    """PMA's flat parameter names: S, (paper) rff_*, mab_*."""
    rff = ["rff_W1", "rff_b1", "rff_W2", "rff_b2"] if form == "paper" else []
    return ["S"] + rff + [f"mab_{n}" for n in mab_param_names(form, ln)]


def _sub(params, prefix):
    """{name without prefix: array} for the names that start with ``prefix``."""
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------- validation
def _check_common(x, key_mask, causal, heads, ln, form):
    check_float_array("x", x, min_ndim=2)
    check_causal(causal, False, _WHY_NOT_CAUSAL)
    heads = check_int("heads", heads)
    ln = check_bool("ln", ln)
    form = check_choice("form", form, FORMS)
    check_key_mask(key_mask, tuple(x.shape[:-2]), x.shape[-2])
    if x.shape[-2] < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must be a non-empty (..., N, D) array, got shape {tuple(x.shape)}")
    return heads, ln, form


def _check_names(params, expected, layer):
    got, want = set(params), set(expected)
    if got != want:
        missing, extra = sorted(want - got), sorted(got - want)
        raise ValueError(f"{layer} parameters do not match the configuration: missing {missing}, unexpected {extra} "
                         "(the set depends on form= and ln=; see isab_param_names / pma_param_names)")


def _check_mab_params(p, prefix, d_q, d_k, D, form, ln, dtype):
    """Validate one MAB's parameter shapes: queries of width d_q, keys of width d_k, model width D."""
    F = p["W1"].shape[-1] if hasattr(p.get("W1"), "shape") and p["W1"].ndim == 2 else None
    shapes = {"Wq": (d_q, D), "bq": (D,), "Wk": (d_k, D), "Wv": (d_k, D), "bv": (D,),
              "W1": (D, D if form == "official" else F), "b1": (D if form == "official" else F,)}
    if form == "paper":
        shapes.update({"Wo": (D, D), "bo": (D,), "W2": (F, D), "b2": (D,)})
    if ln:
        shapes.update({n: (D,) for n in ("ln0_g", "ln0_b", "ln1_g", "ln1_b")})
    for name, shape in shapes.items():
        check_param(prefix + name, p[name], shape, dtype)


def _check_heads(D, heads):
    if D % heads:
        raise ValueError(f"heads must divide the model width D={D}, got heads={heads}")


# --------------------------------------------------------------------------- heads
def split_heads(t, heads):
    """(..., N, D) -> (..., h, N, D/h): head j is columns j*d:(j+1)*d (as torch's split(dim_split, 2))."""
    *lead, n, D = t.shape
    return t.reshape(*lead, n, heads, D // heads).swapaxes(-2, -3)


def merge_heads(t):
    """(..., h, N, d) -> (..., N, h d), the inverse of :func:`split_heads` (concat over heads)."""
    *lead, h, n, d = t.shape
    return t.swapaxes(-2, -3).reshape(*lead, n, h * d)


# --------------------------------------------------------------------------- rFF
def rff_forward(x, W1, b1, W2=None, b2=None):
    """Row-wise feed-forward: relu(x W1 + b1) [W2 + b2]. Returns (out, cache)."""
    z, c1 = linear_forward(x, W1, b1)                 # (..., N, F)
    r, cr = relu_forward(z)
    if W2 is None:
        return r, (c1, cr, None)
    out, c2 = linear_forward(r, W2, b2)               # (..., N, D)
    return out, (c1, cr, c2)


def rff_backward(dout, cache):
    """{"x", "W1", "b1"[, "W2", "b2"]}."""
    c1, cr, c2 = cache
    grads = {}
    if c2 is not None:
        g2 = linear_backward(dout, c2)
        grads["W2"], grads["b2"] = g2["W"], g2["b"]
        dout = g2["x"]
    g1 = linear_backward(relu_backward(dout, cr), c1)
    grads["W1"], grads["b1"], grads["x"] = g1["W"], g1["b"], g1["x"]
    return grads


# --------------------------------------------------------------------------- MAB
class MABCache(NamedTuple):
    """Everything :func:`mab_backward` needs."""

    q: object        # linear cache of Q = X Wq + bq
    k: object        # linear cache of K = Y Wk (no bias)
    v: object        # linear cache of V = Y Wv + bv
    attend: object   # AttendCache: per-head q, k, v (..., h, ., d), P (..., h, Nq, Nk), out
    o: object        # linear cache of A W^O + b^O (paper) or None
    ln0: object      # layer-norm cache or None
    rff: object      # rff cache
    ln1: object      # layer-norm cache or None
    form: str
    ln: bool


def mab_forward(X, Y, p, *, heads, ln=True, form="paper", key_mask=None):
    """Multihead attention block MAB(X, Y) (see the module docstring for both forms).

    X (..., Nq, D_q) queries, Y (..., Nk, D_k) keys/values, p: dict of this
    block's parameters without prefix (mab_param_names). key_mask (..., Nk)
    masks elements of Y. Returns (out (..., Nq, D), MABCache). No validation
    here: the public layers validate.
    """
    Q, cq = linear_forward(X, p["Wq"], p["bq"])       # (..., Nq, D)
    K, ck = linear_forward(Y, p["Wk"])                # (..., Nk, D); no key bias (cancels in softmax)
    V, cv = linear_forward(Y, p["Wv"], p["bv"])       # (..., Nk, D)
    D = Q.shape[-1]
    # paper: softmax(Q K^T / sqrt(d)), d = D / h;  official: / sqrt(dim_V) = sqrt(D)
    scale = (D // heads) ** -0.5 if form == "paper" else D ** -0.5
    allowed = None if key_mask is None else key_mask[..., None, None, :]   # (..., 1, 1, Nk)
    a, _, ca = attend_forward(split_heads(Q, heads), split_heads(K, heads), split_heads(V, heads),
                              allowed, scale)          # (..., h, Nq, d)
    A = merge_heads(a)                                 # (..., Nq, D): concat(O_1, ..., O_h)
    if form == "paper":
        M, co = linear_forward(A, p["Wo"], p["bo"])    # Multihead(X, Y, Y) = concat(O_j) W^O
        R0 = X + M                                     # X + Multihead(X, Y, Y)
    else:
        co = None
        R0 = Q + A                                     # official: O = Q_ + A V_ (per head, concatenated)
    if ln:
        H, cln0 = layer_norm_forward(R0, p["ln0_g"], p["ln0_b"])   # H = LN(X + Multihead)
    else:
        H, cln0 = R0, None
    if form == "paper":
        F, cr = rff_forward(H, p["W1"], p["b1"], p["W2"], p["b2"])  # rFF(H)
    else:
        F, cr = rff_forward(H, p["W1"], p["b1"])                    # relu(fc_o(O))
    R1 = H + F                                         # H + rFF(H)
    if ln:
        out, cln1 = layer_norm_forward(R1, p["ln1_g"], p["ln1_b"])
    else:
        out, cln1 = R1, None
    return out, MABCache(cq, ck, cv, ca, co, cln0, cr, cln1, form, ln)


def mab_backward(dout, cache):
    """Gradients of one MAB: {"X": dX, "Y": dY, <param>: grad} (param names without prefix)."""
    c = cache
    g = {}
    if c.ln:
        gl = layer_norm_backward(dout, c.ln1)
        dR1, g["ln1_g"], g["ln1_b"] = gl["x"], gl["gamma"], gl["beta"]
    else:
        dR1 = dout
    gr = rff_backward(dR1, c.rff)                      # through F = rFF(H)
    dH = dR1 + gr.pop("x")                             # R1 = H + F
    g.update(gr)
    if c.ln:
        gl = layer_norm_backward(dH, c.ln0)
        dR0, g["ln0_g"], g["ln0_b"] = gl["x"], gl["gamma"], gl["beta"]
    else:
        dR0 = dH
    if c.form == "paper":
        go = linear_backward(dR0, c.o)
        dA, g["Wo"], g["bo"] = go["x"], go["W"], go["b"]
        dX = dR0                                       # residual X + ...
        dQ_res = None
    else:
        dA = dR0
        dX = None
        dQ_res = dR0                                   # residual Q + A
    heads = c.attend.q.shape[-3]
    ga = attend_backward(split_heads(dA, heads), c.attend)
    dQ = merge_heads(ga["q"])                          # (..., Nq, D)
    if dQ_res is not None:
        dQ = dQ + dQ_res
    gq = linear_backward(dQ, c.q)
    gk = linear_backward(merge_heads(ga["k"]), c.k)
    gv = linear_backward(merge_heads(ga["v"]), c.v)
    g["Wq"], g["bq"] = gq["W"], gq["b"]
    g["Wk"] = gk["W"]
    g["Wv"], g["bv"] = gv["W"], gv["b"]
    g["X"] = gq["x"] if dX is None else dX + gq["x"]
    g["Y"] = gk["x"] + gv["x"]
    return g


def _broadcast_rows(P, lead):
    """A learned (r, D) array as a batch of sets: (..., r, D) view."""
    xp = get_namespace(P)
    return xp.broadcast_to(P, tuple(lead) + tuple(P.shape))


def _sum_lead(g, shape):
    """Gradient of a broadcast (r, D) array: sum over the leading batch axes."""
    return g.reshape((-1,) + tuple(shape)).sum(axis=0)


# --------------------------------------------------------------------------- ISAB
class ISABCache(NamedTuple):
    mab0: MABCache   # H = MAB(I, X): the m inducing points read the set (attention (..., h, m, N))
    mab1: MABCache   # out = MAB(X, H): every element reads the m summaries (attention (..., h, N, m))
    I_shape: tuple
    prefixes: tuple


def isab_forward(x, *, I, key_mask=None, causal=False, heads=1, ln=True, form="paper", **params):
    """Induced set attention block ISAB_m(X) = MAB(X, MAB(I, X)).

    x (..., N, D_in); I (m, D) inducing points; mab0_*/mab1_* parameters (see
    the module docstring); key_mask (..., N). Returns (out (..., N, D), ISABCache).
    """
    heads, ln, form = _check_common(x, key_mask, causal, heads, ln, form)
    _check_names({"I": I, **params}, isab_param_names(form, ln), "isab")
    check_param("I", I, (None, None), x.dtype)
    m, D = I.shape
    _check_heads(D, heads)
    if form == "paper" and x.shape[-1] != D:
        raise ValueError(f"x must have width D={D} (the width of I) in the paper form (residual X + ...), "
                         f"got shape {tuple(x.shape)}; use form='official' for a different input width")
    p0, p1 = _sub(params, "mab0_"), _sub(params, "mab1_")
    _check_mab_params(p0, "mab0_", D, x.shape[-1], D, form, ln, x.dtype)
    _check_mab_params(p1, "mab1_", x.shape[-1], D, D, form, ln, x.dtype)
    lead = tuple(x.shape[:-2])
    Ib = _broadcast_rows(I, lead)                                               # (..., m, D)
    H, c0 = mab_forward(Ib, x, p0, heads=heads, ln=ln, form=form, key_mask=key_mask)   # (..., m, D)
    out, c1 = mab_forward(x, H, p1, heads=heads, ln=ln, form=form)                     # (..., N, D)
    return out, ISABCache(c0, c1, tuple(I.shape), ("mab0_", "mab1_"))


def isab_backward(dout, cache):
    """{"x": dx, "I": dI, "mab0_*": ..., "mab1_*": ...}."""
    g1 = mab_backward(dout, cache.mab1)
    g0 = mab_backward(g1.pop("Y"), cache.mab0)         # dH flows into MAB(I, X)
    grads = {"x": g1.pop("X") + g0.pop("Y"), "I": _sum_lead(g0.pop("X"), cache.I_shape)}
    grads.update({f"mab1_{k}": v for k, v in g1.items()})
    grads.update({f"mab0_{k}": v for k, v in g0.items()})
    return grads


def isab_weights(cache):
    """The inducing points' attention over the set, (..., h, m, N): row i is how inducing
    point i spreads its read over the elements (0 on masked elements)."""
    return cache.mab0.attend.p


# --------------------------------------------------------------------------- PMA
class PMACache(NamedTuple):
    rff: object      # cache of the paper's rFF(Z) or None (official)
    mab: MABCache    # MAB(S, rFF(Z)): attention (..., h, k, N)
    S_shape: tuple


def pma_forward(x, *, S, key_mask=None, causal=False, heads=1, ln=True, form="paper", **params):
    """Pooling by multihead attention PMA_k(Z) = MAB(S, rFF(Z)) (official: MAB(S, Z)).

    x = Z (..., N, D_in); S (k, D) seeds; rff_* (paper) and mab_* parameters;
    key_mask (..., N). Returns (out (..., k, D), PMACache).
    """
    heads, ln, form = _check_common(x, key_mask, causal, heads, ln, form)
    _check_names({"S": S, **params}, pma_param_names(form, ln), "pma")
    check_param("S", S, (None, None), x.dtype)
    k, D = S.shape
    _check_heads(D, heads)
    lead = tuple(x.shape[:-2])
    if form == "paper":
        F = params["rff_W1"].shape[-1] if params["rff_W1"].ndim == 2 else None
        check_param("rff_W1", params["rff_W1"], (x.shape[-1], F), x.dtype)
        check_param("rff_b1", params["rff_b1"], (F,), x.dtype)
        check_param("rff_W2", params["rff_W2"], (F, D), x.dtype)
        check_param("rff_b2", params["rff_b2"], (D,), x.dtype)
        Z, cr = rff_forward(x, params["rff_W1"], params["rff_b1"], params["rff_W2"], params["rff_b2"])  # (..., N, D)
    else:
        Z, cr = x, None
    p = _sub(params, "mab_")
    _check_mab_params(p, "mab_", D, Z.shape[-1], D, form, ln, x.dtype)
    out, cm = mab_forward(_broadcast_rows(S, lead), Z, p, heads=heads, ln=ln, form=form, key_mask=key_mask)
    return out, PMACache(cr, cm, tuple(S.shape))      # out (..., k, D)


def pma_backward(dout, cache):
    """{"x": dx, "S": dS, "rff_*" (paper), "mab_*": ...}."""
    g = mab_backward(dout, cache.mab)
    grads = {"S": _sum_lead(g.pop("X"), cache.S_shape)}
    dZ = g.pop("Y")
    if cache.rff is not None:
        gr = rff_backward(dZ, cache.rff)
        dZ = gr.pop("x")
        grads.update({f"rff_{k}": v for k, v in gr.items()})
    grads["x"] = dZ
    grads.update({f"mab_{k}": v for k, v in g.items()})
    return grads


def pma_weights(cache):
    """The seeds' attention over the set, (..., h, k, N)."""
    return cache.mab.attend.p


# --------------------------------------------------------------------------- SAB (O(N^2), for comparison)
def sab_forward(x, *, key_mask=None, heads=1, ln=True, form="paper", **params):
    """SAB(X) = MAB(X, X): full self-attention over the set, O(N^2) — the baseline ISAB replaces.
    Parameters mab_* as for one MAB. Not registered (it is ``full`` attention inside a block)."""
    heads, ln, form = _check_common(x, key_mask, False, heads, ln, form)
    p = _sub(params, "mab_")
    _check_names(p, mab_param_names(form, ln), "sab")
    D = p["Wq"].shape[-1]
    _check_heads(D, heads)
    _check_mab_params(p, "mab_", x.shape[-1], x.shape[-1], D, form, ln, x.dtype)
    return mab_forward(x, x, p, heads=heads, ln=ln, form=form, key_mask=key_mask)


def sab_backward(dout, cache):
    g = mab_backward(dout, cache)
    grads = {"x": g.pop("X") + g.pop("Y")}
    grads.update({f"mab_{k}": v for k, v in g.items()})
    return grads


# --------------------------------------------------------------------------- parameters and examples
def init_mab(rng, prefix, d_q, d_k, D, *, form="paper", ln=True, hidden=None, jitter=0.1):
    """Host draws (numpy) of one MAB's parameters: weights ~ N(0, 1/fan_in), biases and
    LayerNorm offsets ~ jitter * N(0, 1), LayerNorm gains 1 + jitter * N(0, 1)
    (jitter makes the gradient check see every parameter)."""
    F = D if (form == "official" or hidden is None) else hidden
    shapes = {"Wq": (d_q, D), "bq": (D,), "Wk": (d_k, D), "Wv": (d_k, D), "bv": (D,),
              "Wo": (D, D), "bo": (D,), "W1": (D, F), "b1": (F,), "W2": (F, D), "b2": (D,)}
    out = {}
    for name in mab_param_names(form, ln):
        if name.startswith("ln"):
            base = 1.0 if name.endswith("_g") else 0.0
            out[prefix + name] = base + jitter * rng.standard_normal(D)
        elif name.startswith("W"):
            shape = shapes[name]
            out[prefix + name] = rng.standard_normal(shape) / shape[0] ** 0.5
        else:
            out[prefix + name] = jitter * rng.standard_normal(shapes[name])
    return out


def init_isab(rng, d_in, D, m, *, form="paper", ln=True, hidden=None, dtype="float64"):
    """ISAB parameters {I, mab0_*, mab1_*} on the active backend (drawn on the host from ``rng``)."""
    params = {"I": rng.standard_normal((m, D))}
    params.update(init_mab(rng, "mab0_", D, d_in, D, form=form, ln=ln, hidden=hidden))
    params.update(init_mab(rng, "mab1_", d_in, D, D, form=form, ln=ln, hidden=hidden))
    return {k: asarray(v, dtype=dtype) for k, v in params.items()}


def init_pma(rng, d_in, D, k, *, form="paper", ln=True, hidden=None, dtype="float64"):
    """PMA parameters {S, rff_* (paper), mab_*} on the active backend."""
    params = {"S": rng.standard_normal((k, D))}
    if form == "paper":
        F = hidden or D
        params.update({"rff_W1": rng.standard_normal((d_in, F)) / d_in ** 0.5, "rff_b1": 0.1 * rng.standard_normal(F),
                       "rff_W2": rng.standard_normal((F, D)) / F ** 0.5, "rff_b2": 0.1 * rng.standard_normal(D)})
    params.update(init_mab(rng, "mab_", D, D if form == "paper" else d_in, D, form=form, ln=ln, hidden=hidden))
    return {k: asarray(v, dtype=dtype) for k, v in params.items()}


def default_inducing(n):
    """Default number of inducing points m for a set of n: small (16 at most), below n."""
    return max(2, min(16, n // 2))


def _x(rng, batch, n, D, dtype):
    # (batch, 1, N, D): the axis of size 1 is an extra leading batch axis, so the contract
    # tests' (batch, 1, N) key masks and rank-4 indexing apply to layers as to kernels.
    return asarray(rng.standard_normal((batch, 1, n, D)), dtype=dtype)


def isab_example(rng, batch=2, heads=2, n=64, d=8, causal=False, dtype="float64"):
    """A random ISAB case: x (batch, 1, n, heads*d), m = default_inducing(n) inducing points."""
    check_causal(causal, False, _WHY_NOT_CAUSAL)
    D = heads * d
    x = _x(rng, batch, n, D, dtype)
    params = init_isab(rng, D, D, default_inducing(n), dtype=dtype)
    return Case(inputs={"x": x, **params}, config={"heads": heads, "ln": True, "form": "paper"},
                seq_inputs=("x",), key_inputs=("x",), out_follows_keys=True, n=n, m=n)


def pma_example(rng, batch=2, heads=2, n=64, d=8, causal=False, dtype="float64"):
    """A random PMA case: x (batch, 1, n, heads*d), k = 2 seeds."""
    check_causal(causal, False, _WHY_NOT_CAUSAL)
    D = heads * d
    x = _x(rng, batch, n, D, dtype)
    params = init_pma(rng, D, D, 2, dtype=dtype)
    return Case(inputs={"x": x, **params}, config={"heads": heads, "ln": True, "form": "paper"},
                seq_inputs=("x",), key_inputs=("x",), out_follows_keys=False, n=n, m=n)


# --------------------------------------------------------------------------- figures
def _figure_set(rng, n=64, D=8):
    """A 2-D point cloud sorted along its first coordinate (so columns read left to right),
    lifted to D features: x (1, n, D) on the active backend."""
    pts = rng.standard_normal((n, 2)) * [2.0, 1.0]            # host (numpy) arrays from the Generator
    hp = get_namespace(pts)                                     # the host array module, not imported here
    pts = pts[hp.argsort(pts[:, 0], kind="stable")]
    return asarray(hp.concatenate([pts, hp.sin(pts @ rng.standard_normal((2, D - 2)))], axis=1)[None])


def _stacked(viz, w, title, ylabel):
    """One wide panel per head of an (h, r, N) weight array."""
    h = w.shape[0]
    fig, axes = viz.plt.subplots(h, 1, figsize=(9, 1.0 + 0.3 * w.shape[1] * h), squeeze=False)
    for j, ax in enumerate(axes[:, 0]):
        im = ax.imshow(w[j], cmap=viz.WEIGHT_CMAP, interpolation="nearest", aspect="auto")   # (r, N): wide
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
        ax.set_title(f"head {j}", fontsize=10)
        ax.set_ylabel(ylabel)
    axes[-1, 0].set_xlabel("set element j (sorted by its first coordinate)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _isab_figures(out_dir, rng):
    """The inducing points' attention over a set, per head (untrained parameters)."""
    import os

    from .. import viz
    from ..backend import to_numpy

    heads, m = 2, 8
    x = _figure_set(rng)
    _, c = isab_forward(x, heads=heads, **init_isab(rng, x.shape[-1], x.shape[-1], m))
    w = to_numpy(isab_weights(c))[0]                   # (h, m, N)
    fig = _stacked(viz, w, f"ISAB: how the m={m} inducing points read a set of N={x.shape[-2]} (MAB(I, X), untrained)",
                   "inducing point i")
    return [viz.save(fig, os.path.join(out_dir, "isab_inducing_attention.png"))]


def _pma_figures(out_dir, rng):
    """The seeds' attention over a set, per head (untrained parameters)."""
    import os

    from .. import viz
    from ..backend import to_numpy

    heads, k = 2, 4
    x = _figure_set(rng)
    _, c = pma_forward(x, heads=heads, **init_pma(rng, x.shape[-1], x.shape[-1], k))
    w = to_numpy(pma_weights(c))[0]                    # (h, k, N)
    fig = _stacked(viz, w, f"PMA: how the k={k} seeds pool a set of N={x.shape[-2]} (MAB(S, rFF(Z)), untrained)",
                   "seed i")
    return [viz.save(fig, os.path.join(out_dir, "pma_seed_attention.png"))]


_COMMON = dict(
    citation="Lee et al., 2019",
    url="https://arxiv.org/abs/1810.00825",
    classes=("M",),
    causal=False,
    exact=False,
    kind="layer",
    notebook="04_neural_memory",
    sizes=("heads",),

)

ISAB = register(Mechanism(
    name="isab",
    title="Set Transformer ISAB (inducing points)",
    complexity="O(N·m)",
    forward=isab_forward,
    backward=isab_backward,
    weights=isab_weights,
    make_example=isab_example,
    figures=_isab_figures,
    summary="m learned inducing points read the set, then every element reads them: a global memory, O(N m).",
    **_COMMON,
))

PMA = register(Mechanism(
    name="pma",
    title="Set Transformer PMA (pooling by attention)",
    complexity="O(N·k)",
    forward=pma_forward,
    backward=pma_backward,
    weights=pma_weights,
    make_example=pma_example,
    figures=_pma_figures,
    summary="k learned seed vectors attend over the set: permutation-invariant pooling, O(N k).",
    **_COMMON,
))
