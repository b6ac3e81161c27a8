"""Switch Transformer / mixture-of-experts feed-forward layer (top-1 Switch, top-2 GShard).

Fedus, Zoph, Shazeer, 2021, *Switch Transformers: Scaling to Trillion Parameter Models with
Simple and Efficient Sparsity*, https://arxiv.org/abs/2101.03961; Lepikhin et al., 2020,
*GShard*, https://arxiv.org/abs/2006.16668 (top-2 gating, Algorithm 1); Zoph et al., 2022,
*ST-MoE*, https://arxiv.org/abs/2202.08906 (the router z-loss).

Intuition. A Transformer block's feed-forward layer holds most of its parameters. A mixture
of experts replaces it by E feed-forward "experts" and a router that sends each token to only
k of them (k = 1: Switch; k = 2: GShard): E times the parameters for about the FLOPs of one
expert per token (the survey's class "sparse models / conditional computation", SP). The
router is learned through the gate values that scale the chosen experts' outputs, and kept
balanced by an auxiliary loss.

Equations (T tokens x_t, router W_r (D, E), experts h_e(x) = relu(x W1_e + b1_e) W2_e + b2_e):

    l_t = (x_t * jitter_t) W_r,   p_t = softmax(l_t)                  router logits, probabilities
    e_t1, ..., e_tk = top-k of p_t                                    the chosen experts (constant)
    k = 1 (Switch):  g_t1 = p_t,e_t1
    k = 2 (GShard):  g_tj = p_t,e_tj / (p_t,e_t1 + p_t,e_t2)          the two gates normalised
    y_t = sum_j keep_tj g_tj h_e_tj(x_t)                              (dropped choices add 0)

    capacity    C = ceil(capacity_factor * T_real / E)                tokens an expert can take
    load loss   L_aux = E * sum_i f_i P_i,  f_i = (1/T) #{t: e_t1 = i},  P_i = (1/T) sum_t p_t,i
    z-loss      L_z   = (1/T) sum_t (log sum_j exp l_t,j)^2

``y`` is the layer's output only, **not** including the residual: a block computes x + y,
so a dropped token (keep = 0 for all its choices) passes through the residual unchanged.

Dropping order ("the paper's order"): every token of the call is one group, in row-major
order (batch element, then position). An expert keeps the first C choices it receives in
priority order and drops the rest; the priority order is slot-major: all first choices in
token order, then (k = 2) all second choices in token order (GShard Algorithm 1: a second
choice only uses the room the first choices left). f_i counts first choices before dropping
(as Switch and GShard do). GShard's random routing of the second expert is not used (the
second expert is always dispatched if there is room).

Padding (``key_mask`` False): a padding token is routed nowhere (output 0, gradient 0), takes
no capacity, and is left out of f, P, L_z and of T = T_real, the number of real tokens.
So a padded batch gives, on its real tokens, exactly what the unpadded one gives.

Auxiliary losses and the backward. ``forward`` returns y; the auxiliary losses are in the
cache (:func:`aux_losses`: ``balance`` = L_aux, ``z`` = L_z, ``load`` and ``dropped``), and
``backward`` returns the gradients of the scalar

    L = sum(dout * y) + aux_weight * L_aux + z_weight * L_z

(``aux_weight`` is the Switch paper's alpha, default 1e-2; ``z_weight`` ST-MoE's c_z, default
1e-3). :func:`aux_loss` is the weighted sum aux_weight * L_aux + z_weight * L_z; finite
differences of ``sum(dout * y) + aux_loss(cache)`` check the backward (the contract does,
through the registry field ``aux_loss``). Set both weights to 0 for the gradient of y alone.

Backward (the routing choice e_tj, keep_tj and f are constants):

    dh_a = keep g_tj dy_t for the assignment a = (t, j), to expert e_tj's rows only
    dg_tj = keep_tj dy_t . h_e_tj(x_t)
    k = 1: dp_t,e_t1 += dg_t1;   k = 2 (s = p_1 + p_2): dp_1 += p_2 (dg_1 - dg_2) / s^2,
                                                         dp_2 += p_1 (dg_2 - dg_1) / s^2
    dp_t,i += aux_weight * E f_i / T                         (real tokens)
    dl_t = p_t * (dp_t - p_t . dp_t) + p_t * z_weight * 2 lse_t / T     (softmax, d lse/dl = p)
    dW_r = (x * jitter)^T dl,   dx = (expert rows' dx, gathered back) + (dl W_r^T) * jitter

Causality. Capacity dropping makes y_t depend on other tokens of the call: with a batch of
several sequences, sequence 2's early tokens queue behind sequence 1's later ones; with
k = 2, any later token's first choice takes room before an earlier token's second choice.
In a decoder that leaks the future (``tests/test_switch.py`` shows it). ``causal=True`` is
the decodable setting: **no dropping** (every token reaches its k experts, y_t depends on
x_t alone); a ``capacity_factor`` other than None with ``causal=True`` raises. (A single
sequence with k = 1 is causal even with dropping, because a token's place in an expert's
queue counts only earlier tokens — the test shows that too.)

Jitter (Switch, Section 2.4): the router input is multiplied by noise
``uniform(1 - eps, 1 + eps)``, an explicit draw :func:`draw_jitter` (the same shape as x;
None: no noise, as at inference). The experts see x itself.

Shapes: x (..., N, D) with any leading batch axes; Wr (D, E); W1 (E, D, F), b1 (E, F),
W2 (E, F, D), b2 (E, D); key_mask (..., N). Returns y (..., N, D).

Cost per token: D E (router) + k (2 D F) (its experts) multiply-adds, against 2 D F for a dense
FFN of one expert's size, with E times its parameters. Tokens are grouped by expert with one
stable sort and each expert is one matmul on its rows (a loop over the E experts, never over
tokens).
"""
from __future__ import annotations

import math
from typing import NamedTuple

from ..backend import asarray, get_namespace
from ..nn.experts import check_tokens, expert_ffn_backward, expert_ffn_forward, flat_tokens, top_k
from ..nn.functional import softmax_backward, softmax_forward
from ..registry import Case, Mechanism, backward_of, forward_of, reads_cache, register
from ..validate import (check_bool, check_float_array, check_int, check_nonnegative_float, check_param,
                        check_positive_float)

LEAK = ("capacity_factor must be None when causal=True: capacity dropping makes a token's output depend on "
        "the other tokens of the call, later ones included (it leaks the future); the decodable setting "
        "drops no token")


class SwitchCache(NamedTuple):
    lead: tuple          # leading axes of x and N
    real: object         # (T,) bool: real tokens
    n_real: int          # T_real (at least 1 in the divisions)
    xr: object           # (T, D) the router input x * jitter
    jitter: object       # (T, D) or None
    Wr: object           # (D, E)
    soft: object         # softmax cache of p (T, E)
    lse: object          # (T, 1) log-sum-exp of the router logits
    idx: object          # (T, k) chosen experts, best first
    pk: object           # (T, k) their probabilities
    gates: object        # (T, k) g_tj (before dropping)
    keep: object         # (T, k) bool: the choice was dispatched (real and within capacity)
    sa: object           # (A,) dispatched assignments a = t * k + j, sorted by expert (stable)
    expert: object       # expert FFN cache (rows in the order of sa)
    out_a: object        # (T * k, D) h_e_tj(x_t) per assignment (0 where not dispatched)
    f: object            # (E,) f_i, share of real tokens whose first choice is i
    P: object            # (E,) P_i, mean router probability of expert i
    balance: float       # L_aux = E sum_i f_i P_i
    z: float             # L_z
    capacity: object     # C (int) or None
    aux_weight: float
    z_weight: float


def _check(x, Wr, W1, b1, W2, b2, key_mask, causal, k, capacity_factor, aux_weight, z_weight, jitter):
    check_tokens(x, key_mask)
    causal = check_bool("causal", causal)
    D = x.shape[-1]
    check_param("Wr", Wr, (D, None), x.dtype)
    E = Wr.shape[1]
    check_param("W1", W1, (E, D, None), x.dtype)
    F = W1.shape[2]
    check_param("b1", b1, (E, F), x.dtype)
    check_param("W2", W2, (E, F, D), x.dtype)
    check_param("b2", b2, (E, D), x.dtype)
    k = check_int("k", k)
    if k > 2 or k > E:
        raise ValueError(f"k must be 1 (Switch) or 2 (GShard) and at most the number of experts E={E}, got {k}")
    if capacity_factor is not None:
        capacity_factor = check_positive_float("capacity_factor", capacity_factor)
        if causal:
            raise ValueError(LEAK)
    aux_weight = check_nonnegative_float("aux_weight", aux_weight)
    z_weight = check_nonnegative_float("z_weight", z_weight)
    if jitter is not None:
        check_float_array("jitter", jitter, min_ndim=0)
        if tuple(jitter.shape) != tuple(x.shape) or jitter.dtype != x.dtype:
            raise ValueError(f"jitter must have the shape {tuple(x.shape)} and dtype {x.dtype} of x "
                             f"(draw it with draw_jitter), got {tuple(jitter.shape)} {jitter.dtype}")
    return k, capacity_factor, aux_weight, z_weight


def capacity(capacity_factor, n_real, experts):
    """Expert capacity C = ceil(capacity_factor * T_real / E) (None: unlimited)."""
    if capacity_factor is None:
        return None
    return int(math.ceil(capacity_factor * n_real / experts - 1e-9))


def _dispatch(idx, valid, C, E):
    """keep (T, k): which choices are dispatched. Priority order slot-major (all first choices in
    token order, then all second choices); an expert keeps the first C it receives."""
    xp = get_namespace(idx)
    if C is None:
        return valid
    T, k = idx.shape
    onehot = (idx.T[..., None] == xp.arange(E)) & valid.T[..., None]      # (k, T, E) slot-major
    pos = xp.cumsum(onehot.reshape(k * T, E), axis=0).reshape(k, T, E)  # 1-based place in the queue
    place = (pos * onehot).sum(axis=-1).T                               # (T, k)
    return valid & (place <= C)


@forward_of("switch")
def forward(x, *, Wr, W1, b1, W2, b2, key_mask=None, causal=False, k=1, capacity_factor=1.25,
            aux_weight=1e-2, z_weight=1e-3, jitter=None):
    """Mixture-of-experts FFN output y (..., N, D) (no residual) and a :class:`SwitchCache`.

    x (..., N, D); Wr (D, E); W1 (E, D, F); b1 (E, F); W2 (E, F, D); b2 (E, D); k: 1 or 2;
    capacity_factor: C = ceil(capacity_factor T_real / E), None = no dropping (required when
    causal); aux_weight, z_weight: the weights of L_aux and L_z in the backward's scalar;
    jitter: None or draw_jitter's (..., N, D) factors on the router input.
    """
    k, capacity_factor, aux_weight, z_weight = _check(x, Wr, W1, b1, W2, b2, key_mask, causal, k,
                                                      capacity_factor, aux_weight, z_weight, jitter)
    xp = get_namespace(x)
    E = Wr.shape[1]
    xf, real = flat_tokens(x, key_mask)
    T, D = xf.shape
    n_real = int(real.sum())
    denom = max(n_real, 1)
    jf = None if jitter is None else jitter.reshape(T, D)
    xr = xf if jf is None else xf * jf
    p, soft, lse = softmax_forward(xr @ Wr)                               # (T, E), lse (T, 1)
    pk, idx = top_k(p, k)                                                 # (T, k) best first
    gates = pk if k == 1 else pk / pk.sum(axis=-1, keepdims=True)
    C = capacity(capacity_factor, n_real, E)
    keep = _dispatch(idx, xp.broadcast_to(real[:, None], (T, k)), C, E)
    # group the dispatched assignments a = t k + j by expert
    kept = xp.nonzero(keep.reshape(-1))[0]
    ex = idx.reshape(-1)[kept]
    order = xp.argsort(ex, kind="stable")
    sa = kept[order]
    counts = [int(c) for c in xp.bincount(ex, minlength=E)]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    hs, ec = expert_ffn_forward(xf[sa // k], offsets, W1, b1, W2, b2)
    out_a = xp.zeros((T * k, D), dtype=x.dtype)
    out_a[sa] = hs
    gk = gates * keep
    y = (out_a.reshape(T, k, D) * gk[..., None]).sum(axis=1)
    # auxiliary losses (real tokens only)
    rf = real.astype(x.dtype)
    f = (((idx[:, 0:1] == xp.arange(E)) & real[:, None]).sum(axis=0)).astype(x.dtype) / denom
    P = (p * rf[:, None]).sum(axis=0) / denom
    balance = float(E * (f * P).sum())
    z = float((rf * lse[:, 0] ** 2).sum() / denom)
    cache = SwitchCache(tuple(x.shape[:-1]), real, denom, xr, jf, Wr, soft, lse, idx, pk, gates, keep, sa, ec,
                        out_a, f, P, balance, z, C, aux_weight, z_weight)
    return y.reshape(x.shape), cache


@backward_of("switch")
def backward(dout, cache):
    """Gradients of sum(dout * y) + aux_weight L_aux + z_weight L_z:
    {"x", "Wr", "W1", "b1", "W2", "b2"} (see the module docstring)."""
    c = cache
    xp = get_namespace(dout)
    T, k = c.idx.shape
    D = c.xr.shape[1]
    E = c.Wr.shape[1]
    dy = dout.reshape(T, D)
    gk = c.gates * c.keep
    # experts: each receives only its own tokens' gradient
    dh = dy[c.sa // k] * gk.reshape(-1)[c.sa][:, None]
    ge = expert_ffn_backward(dh, c.expert)
    dxa = xp.zeros((T * k, D), dtype=dout.dtype)
    dxa[c.sa] = ge.pop("x")
    dx = dxa.reshape(T, k, D).sum(axis=1)
    # gates
    dg = (c.out_a.reshape(T, k, D) * dy[:, None, :]).sum(axis=-1) * c.keep       # (T, k)
    if k == 1:
        dpk = dg
    else:
        s2 = c.pk.sum(axis=-1) ** 2
        diff = dg[:, 0] - dg[:, 1]
        dpk = xp.stack([c.pk[:, 1] * diff / s2, -c.pk[:, 0] * diff / s2], axis=-1)
    dp = xp.zeros((T, E), dtype=dout.dtype)
    xp.put_along_axis(dp, c.idx, dpk, axis=-1)                            # distinct experts per row
    rf = c.real.astype(dout.dtype)[:, None]
    if c.aux_weight:
        dp += (c.aux_weight * E / c.n_real) * c.f[None, :] * rf
    dlse = (c.z_weight * 2.0 / c.n_real) * c.lse * rf if c.z_weight else None
    dl = softmax_backward(dp, c.soft, dlse=dlse, inplace=True)
    dxr = dl @ c.Wr.T
    dx += dxr if c.jitter is None else dxr * c.jitter
    return {"x": dx.reshape(c.lead + (D,)), "Wr": c.xr.T @ dl, **ge}


@reads_cache("switch")
def weights(cache):
    """The combine weights (..., N, E): g_tj for each dispatched choice, 0 elsewhere (a dropped
    token's row is all 0); y_t = sum_e W_t,e h_e(x_t)."""
    c = cache
    xp = get_namespace(c.gates)
    T, k = c.idx.shape
    W = xp.zeros((T, c.Wr.shape[1]), dtype=c.gates.dtype)
    xp.put_along_axis(W, c.idx, c.gates * c.keep, axis=-1)
    return W.reshape(c.lead + (W.shape[1],))


@reads_cache("switch")
def probabilities(cache):
    """The router probabilities p (..., N, E) = softmax(l_t) (padding rows included: they are
    routed nowhere, whatever p says)."""
    return cache.soft[0].reshape(cache.lead + (cache.Wr.shape[1],))


@reads_cache("switch")
def aux_losses(cache):
    """{"balance": L_aux, "z": L_z, "load": (E,) dispatched choices per expert, "dropped": share of
    the real tokens' choices that were dropped}."""
    c = cache
    xp = get_namespace(c.gates)
    E = c.Wr.shape[1]
    dispatched = int(c.keep.sum())
    wanted = int(c.real.sum()) * c.idx.shape[1]
    load = xp.bincount(c.idx.reshape(-1)[c.sa], minlength=E)
    return {"balance": c.balance, "z": c.z, "load": load,
            "dropped": 0.0 if wanted == 0 else 1.0 - dispatched / wanted}


statistics = aux_losses     # what a model's SparseFeedForward.aux() reports


@reads_cache("switch")
def aux_loss(cache):
    """aux_weight * L_aux + z_weight * L_z: what ``backward`` differentiates beside sum(dout * y)."""
    return cache.aux_weight * cache.balance + cache.z_weight * cache.z


def loop(x, *, Wr, W1, b1, W2, b2, key_mask=None, causal=False, k=1, capacity_factor=1.25,
         aux_weight=1e-2, z_weight=1e-3, jitter=None):
    """The readable per-token form of :func:`forward`'s y: route each token alone, then walk
    the queue in the paper's order (first choices in token order, then second choices),
    counting each expert's room, then apply each kept expert to its token."""
    k, capacity_factor, _, _ = _check(x, Wr, W1, b1, W2, b2, key_mask, causal, k,
                                      capacity_factor, aux_weight, z_weight, jitter)
    xp = get_namespace(x)
    E = Wr.shape[1]
    xf, real = flat_tokens(x, key_mask)
    T, D = xf.shape
    jf = None if jitter is None else jitter.reshape(T, D)
    choices, gates = [], []
    for t in range(T):
        logits = (xf[t] if jf is None else xf[t] * jf[t]) @ Wr
        e = xp.exp(logits - logits.max())
        p = [float(v) for v in e / e.sum()]
        best = sorted(range(E), key=lambda i: (-p[i], i))[:k]
        choices.append(best)
        total = sum(p[i] for i in best)
        gates.append([p[i] if k == 1 else p[i] / total for i in best])
    n_real = sum(bool(r) for r in real)
    C = capacity(capacity_factor, n_real, E)
    room = [C] * E
    keep = [[False] * k for _ in range(T)]
    for j in range(k):                                   # slot-major: first choices, then second
        for t in range(T):
            if not bool(real[t]):
                continue
            e = choices[t][j]
            if C is None or room[e] > 0:
                keep[t][j] = True
                if C is not None:
                    room[e] -= 1
    y = xp.zeros((T, D), dtype=x.dtype)
    for t in range(T):
        for j in range(k):
            if keep[t][j]:
                e = choices[t][j]
                h = xp.maximum(xf[t] @ W1[e] + b1[e], 0.0)
                y[t] += gates[t][j] * (h @ W2[e] + b2[e])
    return y.reshape(x.shape)


reference = loop


def draw_jitter(rng, shape, eps=1e-2, dtype="float64"):
    """Switch's router jitter: multiplicative noise uniform(1 - eps, 1 + eps) of ``shape`` (x's),
    drawn on the host."""
    eps = check_nonnegative_float("eps", eps)
    return asarray(rng.uniform(1.0 - eps, 1.0 + eps, size=tuple(shape)), dtype=dtype)


def init_params(rng, D, F, E, *, dtype="float64"):
    """{Wr (D, E), W1 (E, D, F), b1 (E, F), W2 (E, F, D), b2 (E, D)} drawn on the host:
    weights ~ N(0, 1/fan_in), biases ~ 0.1 N(0, 1)."""
    p = {"Wr": rng.standard_normal((D, E)) * D ** -0.5,
         "W1": rng.standard_normal((E, D, F)) * D ** -0.5, "b1": 0.1 * rng.standard_normal((E, F)),
         "W2": rng.standard_normal((E, F, D)) * F ** -0.5, "b2": 0.1 * rng.standard_normal((E, D))}
    return {name: asarray(a, dtype=dtype) for name, a in p.items()}


def example(rng, batch=2, heads=2, n=64, d=8, causal=False, dtype="float64"):
    """A random case: x (batch, n, heads * d), E = 4 experts of width F = 2 d, k drawn from {1, 2}
    (so the contract's seeds cover Switch and GShard), capacity_factor 1.0 (None when causal),
    jitter eps 0.1, aux_weight 1, z_weight 0.1 (large, so the gradient check sees them)."""
    D = heads * d
    x = asarray(rng.standard_normal((batch, n, D)), dtype=dtype)
    params = init_params(rng, D, 2 * d, 4, dtype=dtype)
    jitter = draw_jitter(rng, x.shape, eps=0.1, dtype=dtype)
    k = int(rng.integers(1, 3))
    config = {"causal": causal, "k": k, "capacity_factor": None if causal else 1.0,
              "aux_weight": 1.0, "z_weight": 0.1, "jitter": jitter}
    return Case(inputs={"x": x, **params}, config=config, seq_inputs=("x",), key_inputs=("x",),
                out_follows_keys=True, n=n, m=n)


MECHANISM = register(Mechanism(
    name="switch",
    title="Switch Transformer / mixture of experts (top-1, GShard top-2)",
    citation="Fedus et al., 2021; Lepikhin et al., 2020",
    url="https://arxiv.org/abs/2101.03961",
    classes=("SP",),
    complexity="O(N·k·D·F)",
    causal=True,
    exact=False,
    kind="layer",
    notebook="09_sparse_models",
    forward=forward,
    backward=backward,
    weights=weights,
    make_example=example,
    reference=reference,
    aux_loss=aux_loss,
    sizes=("k",),
    summary="a router sends each token to k of E expert FFNs (capacity, load-balancing and z losses): E x the parameters, ~1 expert of FLOPs.",
))
