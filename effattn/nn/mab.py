"""The Set Transformer's multihead attention block (MAB), shared by ISAB and PMA.

Lee, Lee, Kim, Kosiorek, Choi, Teh, 2019, *Set Transformer: A Framework for
Attention-based Permutation-Invariant Neural Networks*, https://arxiv.org/abs/1810.00825
(official code: github.com/juho-lee/set_transformer, ``modules.py``).

Intuition. A set has no order, so a layer over a set must give the same
answer for any ordering of its elements: permutation *equivariant* for
set -> set layers, *invariant* for set -> vector poolings. Self-attention
without position encodings is equivariant, but costs O(N^2). The paper builds
every layer from one block, MAB(X, Y): the rows of X attend over the set Y,
then a residual, a LayerNorm, a row-wise feed-forward layer and another
LayerNorm. The two efficient layers differ only in what X and Y are:
:mod:`effattn.layers.isab` (m learned inducing points read the set, then the
set reads them back, O(N m)) and :mod:`effattn.layers.pma` (k learned seeds
pool the set, O(N k)). SAB(X) = MAB(X, X), the O(N^2) block they replace, is
here too (not registered: it is full attention inside a block).

The block, in the paper's symbols (Section 3.1):

    Att(Q, K, V)        = softmax(Q K^T / sqrt(d)) V
    Multihead(Q, K, V)  = concat(O_1, ..., O_h) W^O,  O_j = Att(Q W_j^Q, K W_j^K, V W_j^V)
    MAB(X, Y)           = LayerNorm(H + rFF(H)),      H = LayerNorm(X + Multihead(X, Y, Y))
    SAB(X)              = MAB(X, X)                                      O(N^2)

rFF is a row-wise feed-forward layer, here ``relu(x W1 + b1) W2 + b2``
(:func:`effattn.nn.functional.mlp_forward`).

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
official ``torch.cat(Q.split(dim_split, 2), 0)``
(:func:`effattn.nn.functional.split_heads`); the per-head attention is the
shared softmax core :func:`effattn.nn.sparse.attend_forward`. The official
code draws I and S with ``xavier_uniform_``; the layers' ``init_params`` draw
N(0, 1) (initialisation is the caller's choice: pass any arrays).

Parameters of one MAB (flat keyword arrays with a prefix, ``mab_``, ``mab0_``,
``mab1_``, so a :class:`~effattn.registry.Case` holds them; one set shared by
all heads, heads are slices of the D columns):

    Wq (D_q, D) bq (D,)  Wk (D_k, D)  Wv (D_k, D) bv (D,)
    paper only: Wo (D, D) bo (D,)  W2 (F, D) b2 (D,)
    W1 (D, F) b1 (F,)     [official: F == D, fc_o]
    ln=True only: ln0_g, ln0_b, ln1_g, ln1_b (D,)

Shapes: X (..., Nq, D_q) queries, Y (..., Nk, D_k) keys/values with any
leading batch axes; key_mask (..., Nk) boolean (True = real element): masked
elements of Y get exactly zero weight. Out (..., Nq, D).

Backward (hand-derived, composed of the functional pairs): for one MAB, with
R0 = X + A W^O + b^O (paper) or Q + A (official), H = LN0(R0), F = rFF(H),
out = LN1(H + F):

    dR1 = LN1'(dout);   dH = dR1 + rFF'(dR1);   dR0 = LN0'(dH)
    paper:    dX = dR0 (residual),  dA = dR0 W^O^T,  dW^O = A^T dR0
    official: dQ += dR0 (residual), dA = dR0
    dq, dk, dv per head from the attention backward (nn.sparse.attend_backward:
    dV = P^T dO, dS = P * (dP - rowsum(dO * O)), dQ = scale dS K, dK = scale dS^T Q)
    dX += dQ Wq^T,  dY = dK Wk^T + dV Wv^T,  dW = input^T d(output) for each Linear.

A learned (r, D) array (inducing points I, seeds S) is broadcast to every set
of the batch (:func:`broadcast_rows`); its gradient sums over the batch axes
(:func:`sum_lead`).
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import asarray, get_namespace
from ..validate import check_bool, check_causal, check_choice, check_float_array, check_int, check_key_mask, check_param
from .functional import (layer_norm_backward, layer_norm_forward, linear_backward, linear_forward, merge_heads,
                         mlp_backward, mlp_forward, relu_backward, relu_forward, split_heads)
from .sparse import attend_backward, attend_forward

FORMS = ("paper", "official")
WHY_NOT_CAUSAL = ("a set has no order, so there is no 'past'; every inducing point / seed reads the whole set "
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


def sub_params(params, prefix):
    """{name without prefix: array} for the names that start with ``prefix``."""
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------- validation
def check_set_layer(x, key_mask, causal, heads, ln, form):
    """Validate the input set and the options every Set Transformer layer shares; returns (heads, ln, form)."""
    check_float_array("x", x, min_ndim=2)
    check_causal(causal, False, WHY_NOT_CAUSAL)
    heads = check_int("heads", heads)
    ln = check_bool("ln", ln)
    form = check_choice("form", form, FORMS)
    check_key_mask(key_mask, tuple(x.shape[:-2]), x.shape[-2])
    if x.shape[-2] < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must be a non-empty (..., N, D) array, got shape {tuple(x.shape)}")
    return heads, ln, form


def check_param_names(params, expected, layer):
    """The parameter dict must hold exactly the names ``expected`` (they depend on form= and ln=)."""
    got, want = set(params), set(expected)
    if got != want:
        missing, extra = sorted(want - got), sorted(got - want)
        raise ValueError(f"{layer} parameters do not match the configuration: missing {missing}, unexpected {extra} "
                         "(the set depends on form= and ln=; see effattn.layers.isab.param_names, "
                         "effattn.layers.pma.param_names or effattn.nn.mab.mab_param_names)")


def check_mab_params(p, prefix, d_q, d_k, D, form, ln, dtype):
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


def check_heads(D, heads):
    """The heads cut the model width D into equal column blocks."""
    if D % heads:
        raise ValueError(f"heads must divide the model width D={D}, got heads={heads}")


# --------------------------------------------------------------------------- MAB
class MABCache(NamedTuple):
    """Everything :func:`mab_backward` needs."""

    q: object        # linear cache of Q = X Wq + bq
    k: object        # linear cache of K = Y Wk (no bias)
    v: object        # linear cache of V = Y Wv + bv
    attend: object   # AttendCache: per-head q, k, v (..., h, ., d), P (..., h, Nq, Nk), out
    o: object        # linear cache of A W^O + b^O (paper) or None
    ln0: object      # layer-norm cache or None
    rff: object      # rFF cache: mlp cache (paper) or (linear cache, relu cache) (official)
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
        F, cr = mlp_forward(H, p["W1"], p["b1"], p["W2"], p["b2"])  # rFF(H) = relu(H W1 + b1) W2 + b2
    else:
        Z1, c1 = linear_forward(H, p["W1"], p["b1"])                # fc_o(O)
        F, c2 = relu_forward(Z1)                                    # relu(fc_o(O))
        cr = (c1, c2)
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
    if c.form == "paper":                              # through F = rFF(H)
        gr = mlp_backward(dR1, c.rff)
    else:
        c1, c2 = c.rff
        g1 = linear_backward(relu_backward(dR1, c2), c1)
        gr = {"W1": g1["W"], "b1": g1["b"], "x": g1["x"]}
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


def broadcast_rows(P, lead):
    """A learned (r, D) array (inducing points, seeds) as a batch of sets: (..., r, D) view."""
    xp = get_namespace(P)
    return xp.broadcast_to(P, tuple(lead) + tuple(P.shape))


def sum_lead(g, shape):
    """Gradient of a broadcast (r, D) array: sum over the leading batch axes."""
    return g.reshape((-1,) + tuple(shape)).sum(axis=0)


# --------------------------------------------------------------------------- SAB (O(N^2), for comparison)
def sab_forward(x, *, key_mask=None, heads=1, ln=True, form="paper", **params):
    """SAB(X) = MAB(X, X): full self-attention over the set, O(N^2) — the baseline ISAB replaces.
    Parameters mab_* as for one MAB (:func:`init_mab` with prefix ``"mab_"``). Not registered
    (it is ``full`` attention inside a block). Returns (out (..., N, D), MABCache)."""
    heads, ln, form = check_set_layer(x, key_mask, False, heads, ln, form)
    p = sub_params(params, "mab_")
    check_param_names(p, mab_param_names(form, ln), "sab")
    D = p["Wq"].shape[-1]
    check_heads(D, heads)
    check_mab_params(p, "mab_", x.shape[-1], x.shape[-1], D, form, ln, x.dtype)
    return mab_forward(x, x, p, heads=heads, ln=ln, form=form, key_mask=key_mask)


def sab_backward(dout, cache):
    """{"x": dx, "mab_*": ...}: X and Y of MAB(X, X) are the same set, so their gradients add."""
    g = mab_backward(dout, cache)
    grads = {"x": g.pop("X") + g.pop("Y")}
    grads.update({f"mab_{k}": v for k, v in g.items()})
    return grads


# --------------------------------------------------------------------------- parameters
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


def example_set(rng, batch, n, D, dtype="float64"):
    """The input of the layers' registry examples: x (batch, 1, n, D) ~ N(0, 1) on the active backend.
    The axis of size 1 is one more batch axis, so the contract tests' (batch, 1, N) key masks and
    rank-4 indexing apply to these layers as to the (batch, heads, N, d) kernels."""
    return asarray(rng.standard_normal((batch, 1, n, D)), dtype=dtype)
