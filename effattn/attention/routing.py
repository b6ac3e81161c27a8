"""Routing Transformer: content-based sparse attention with online k-means.

Roy, Saffar, Vaswani, Grangier, 2021, *Efficient Content-Based Sparse Attention
with Routing Transformers* (TACL), https://arxiv.org/abs/2003.05997

Intuition: route queries and keys to the same few clusters with k-means and
let a query attend only to the keys of its cluster. The centroids are shared by
queries and keys and learned online (an exponential moving average of the
members, no gradient), so similar queries and keys meet. With c ~ sqrt(N)
clusters of w = N / c members each, the cost is O(N w) = O(N sqrt N).

Algorithm 1 of the paper, in its symbols (mu: the c centroids (c, d)):

    Q <- LayerNorm(Q),  K <- LayerNorm(K)         scale and bias disabled
    Q_prob = mu Q^T,    K_prob = mu K^T           (c, N) similarity to each centroid
    Q_idx = top-w(Q_prob) per cluster, sorted by position;  same for K_idx    (balanced)
    A = softmax(Q' K'^T / sqrt(d))  within each cluster (causal: Q_idx >= K_idx)
    X = scatter(Q_idx, A V')                      a token in several clusters: the mean
    mu <- lambda mu + (1 - lambda)/2 mean_{i: mu(Q_i)=mu} Q_i + (1 - lambda)/2 mean_{j: mu(K_j)=mu} K_j

Conventions (ours, with the references'):

* attention uses the layer-normalised q and k (the paper's Algorithm 1) with scale
  d^-0.5 (``scale=`` overrides). lucidrains' ``routing_transformer`` l2-normalises
  for the k-means, then attends with the raw q and k (``shared_qk=False``) or the raw q
  and the l2-normalised k (``shared_qk=True``, which also masks a query's own key).
* balanced clusters: each cluster takes its w nearest queries and w nearest keys
  (top-w of the similarity to the centroid, ties to the earlier position) — a
  token may be in several clusters or in none. Its output is the *mean* of its
  cluster outputs (lucidrains' ``scatter_mean``), zero when in no cluster.
* centroids: :func:`draw_centroids` (random unit vectors) or :func:`draw_centroids_from_data`
  (c data rows, k-means' Forgy start) — random draws, not learned parameters.
* ``update_centroids`` is the explicit online k-means step (state, no gradient):
  assignment by the nearest centroid (argmax of the similarity), lambda = 0.999,
  and the members' *mean* (the paper writes the sum; ``reduce="sum"`` gives it).
* causal: with top-w selection, whether an early key makes a cluster's top-w
  depends on *later* tokens, so outputs before t change when tokens after t do
  (the information leaks, and incremental decoding differs from training).
  ``selection="recent"`` (the default with ``causal=True``) is decoding-safe:
  query i joins its nearest centroid's cluster and attends to the w most recent
  keys j <= i of that cluster (keys assigned by their nearest centroid too). Pass
  ``selection="topk"`` with ``causal=True`` to get the paper's rule.
* key_mask: masked positions are never selected ahead of real ones (similarity
  -inf), as keys (they get zero weight) and as queries (a padded query never takes
  a real query's place in a cluster, so padding cannot change a real output).

Peer mapping (lucidrains ``routing-transformer`` 1.6.1,
``routing_transformer.routing_transformer.KmeansAttention(num_clusters, window_size, num_heads,
head_dim, causal, shared_qk=False)``, eval mode): its k-means ``means`` (H, c, d) = ``centroids``,
window_size = ``window``, its top-w per cluster = ``selection="topk"`` (causal too). It attends
with the q, k it is given, so we feed it LayerNorm(q), LayerNorm(k) (no affine, ``eps``); its
routing on their l2-normalised rows then picks our memberships (the rows' norms differ only by
O(eps); same sets checked). Two differences remain: its ``scatter_mean`` divides by
count + 1e-5 (out and gradients ~1e-5 relative: 1.6e-5 and 2.4e-5 measured; undone, 2e-15), and
in causal mode it forces one learned memory key/value per cluster that every query sees (O(1)
difference: 2.7 measured with its random init; the fixture gives that key zero weight). Not
matched: raw q, k (we layer-normalise: 1.8 measured), ``shared_qk=True`` (2.8), and ``key_mask``
(it selects masked keys into a cluster's top-w and then masks them; ours ranks them last: 1.5).
Fixtures ``routing__lucidrains_routing_transformer__*``.

Decoding (:func:`init_state`, :func:`prefill`, :func:`step`; ``selection="recent"``): query t
attends to the w most recent real keys of its nearest cluster, so the state is, per cluster, a
ring of the last w layer-normalised keys and their values (the key of rank r in its cluster in
slot r mod w): c w (d + dv + 1) + c numbers per batch entry and head, bounded. A step
layer-normalises q_t and k_t, routes both by the nearest centroid, puts a real k_t into its
cluster's ring and attends from q_t to its own cluster's ring: O(c d + w d). The decoder needs
``window`` given (its default depends on the final N); ``selection="topk"`` with ``causal=True``
is refused (``WHY_TOPK_CANNOT_DECODE``: its rows depend on later tokens). The centroids are
those of the parallel call (an :func:`update_centroids` between steps would change the rule).

Shapes: q, k (..., N, d), v (..., N, dv) (self-attention, M = N); centroids
(c, d) shared by the heads or (H, c, d) one set per head.

Complexity: similarities O(N c d), selection O(c N) (a partition per cluster),
attention O(c w^2 d) = O(N w d): O(N sqrt N) for c = sqrt N.

Backward (memberships held fixed):
    d out_b = gather(d out / count, Q_idx);  attend_backward inside each cluster;
    dQn = scatter(Q_idx, dQ'),  dKn = scatter(K_idx, dK'),  dV = scatter(K_idx, dV');
    layer norm backward:  dx = rstd (g - mean(g) - xhat mean(g xhat)).
"""
from __future__ import annotations

import itertools
import math
from typing import NamedTuple

from ..backend import asarray, get_namespace, to_numpy
from ..validate import (check_bool, check_choice, check_float_array, check_int, check_positive_float, check_qkv,
                        check_scale)
from ..nn.decode import check_state, check_step_inputs
from ..nn.functional import NEG_INF, layer_norm_backward, layer_norm_forward
from ..nn.lsh import bucket_ranks
from ..nn.sparse import (attend_backward, attend_forward, combine_masks, dense_from_groups, gather_rows, group_mask,
                         scatter_rows)
from ..registry import Mechanism, backward_of, forward_of, reads_cache, register


class RoutingCache(NamedTuple):
    attend: object     # AttendCache of the groups (clusters, or one query each for "recent")
    q_idx: object      # (..., G, bq) query positions of each group
    k_idx: object      # (..., G, bk) key positions of each group
    count: object      # (..., N, 1) number of groups containing each query (>= 1 where used)
    lnq: object        # layer-norm cache of q
    lnk: object        # layer-norm cache of k
    n: int
    allowed: object    # (..., G, bq, bk) bool


# --------------------------------------------------------------------------- centroids
def draw_centroids(rng, c, d, heads=None):
    """Random unit-norm centroids (c, d), or (heads, c, d) one set per head (host, NumPy)."""
    c = check_int("c", c)
    d = check_int("d", d)
    shape = (c, d) if heads is None else (check_int("heads", heads), c, d)
    mu = rng.standard_normal(shape)
    return mu / (mu * mu).sum(axis=-1, keepdims=True) ** 0.5


def draw_centroids_from_data(rng, x_normed, c):
    """k-means' "Forgy" start: c distinct rows of ``x_normed`` (..., N, d) (every batch entry and head
    pooled), drawn uniformly without replacement by ``rng`` (a numpy Generator). Returns (c, d).

    A random draw, not a learned parameter (the centroids are k-means state, moved by
    :func:`update_centroids`). lucidrains' ``routing_transformer`` draws its first means the same
    way (one set per head), then runs 10 k-means iterations before training.
    Random unit vectors (:func:`draw_centroids`) can start far from every token and never win a
    member ("dead" clusters); centroids drawn from the data start on it."""
    c = check_int("c", c)
    rows = x_normed.reshape(-1, x_normed.shape[-1])
    if c > rows.shape[0]:
        raise ValueError(f"c must be at most the number of rows {rows.shape[0]}, got {c}")
    return rows[rng.choice(rows.shape[0], size=c, replace=False)].copy()


def normalise(x, eps=1e-5):
    """LayerNorm without scale or bias (the paper's routing normalisation)."""
    return layer_norm_forward(x, None, None, eps)[0]


def assign(x_normed, centroids):
    """Nearest centroid of every row: argmax_c x . mu_c.  (..., N, d), centroids (c, d) or (H, c, d)
    (one set per head, for x (..., H, N, d)) -> (..., N) ints."""
    return (x_normed @ centroids.astype(x_normed.dtype, copy=False).swapaxes(-1, -2)).argmax(axis=-1)


def update_centroids(centroids, q_normed, k_normed, decay=0.999, reduce="mean", key_mask=None):
    """One online k-means step (no gradient): every centroid moves towards its members.

        mu <- decay mu + (1 - decay)/2 R(Q members) + (1 - decay)/2 R(K members)

    R = mean over the rows (of every batch entry) whose nearest centroid is mu
    ("mean", default) or their sum ("sum", the paper's formula). A centroid with
    no member among the queries (keys) keeps that half of its old value.
    centroids (c, d) or (H, c, d); q_normed, k_normed (..., [H,] N, d); key_mask (..., N)
    (True = real token): padding rows move no centroid. Returns new centroids.
    """
    check_choice("reduce", reduce, ("mean", "sum"))
    decay = float(decay)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must lie in [0, 1], got {decay}")
    xp = get_namespace(centroids, q_normed, k_normed)
    c = centroids.shape[-2]
    new = decay * centroids
    for x in (q_normed, k_normed):
        a = assign(x, centroids)                                             # (..., N)
        onehot = (a[..., None] == xp.arange(c)).astype(x.dtype)              # (..., N, c)
        if key_mask is not None:
            onehot = onehot * key_mask[..., :, None]                         # padding: no member
        sums = onehot.swapaxes(-1, -2) @ x                                   # (..., c, d)
        counts = onehot.sum(axis=-2)[..., None]                              # (..., c, 1)
        extra = x.ndim - centroids.ndim                                      # batch axes to sum
        axes = tuple(range(extra))
        if axes:
            sums, counts = sums.sum(axis=axes), counts.sum(axis=axes)
        target = sums / xp.maximum(counts, 1.0) if reduce == "mean" else sums
        target = xp.where(counts > 0, target, centroids) if reduce == "mean" else target
        new = new + (1.0 - decay) / 2.0 * target
    return new


# --------------------------------------------------------------------------- grouping
def _topk_members(x_normed, mu, w, exclude=None):
    """Indices (..., c, w) of the w rows nearest to every centroid, in position order.
    Stable: ties go to the earlier position. ``exclude`` (..., N) True rows come last."""
    xp = get_namespace(x_normed)
    sim = mu @ x_normed.swapaxes(-1, -2)                                     # (..., c, d) @ (..., d, N) -> (..., c, N)
    if exclude is not None:
        sim = xp.where(exclude[..., None, :], NEG_INF, sim)
    # top-w per cluster in O(N): the w-th largest similarity by a partition, then everything above
    # it and, among exact ties with it, the earliest positions (= a stable sort's first w)
    neg = -sim
    thr = xp.partition(neg, w - 1, axis=-1)[..., w - 1:w]                   # (..., c, 1)
    below = neg < thr
    tie = neg == thr
    need = w - below.sum(axis=-1, keepdims=True)
    if bool((tie.sum(axis=-1, keepdims=True) == need).all()):
        take = below | tie                                                  # no surplus tie (the usual case)
    else:
        take = below | (tie & (xp.cumsum(tie, axis=-1) <= need))           # exactly w per row
    return xp.nonzero(take)[-1].reshape(sim.shape[:-1] + (w,))              # positions, ascending


def _recent_members(qn, kn, mu, w, key_mask):
    """Decoding-safe groups: query i attends to the w most recent keys j <= i of its nearest cluster.
    Returns q_idx (..., N, 1), k_idx (..., N, w), valid (..., N, w)."""
    xp = get_namespace(qn)
    n = qn.shape[-2]
    c = mu.shape[-2]
    aq = (qn @ mu.swapaxes(-1, -2)).argmax(axis=-1)                         # (..., N) cluster of each query
    ak = (kn @ mu.swapaxes(-1, -2)).argmax(axis=-1)                         # (..., N) cluster of each key
    if key_mask is not None:
        ak = xp.where(key_mask, ak, c)                                       # masked keys: cluster c (none)
    lead = aq.shape[:-1]
    rows = math.prod(lead)
    base = (xp.arange(rows) * ((c + 1) * (n + 1))).reshape(lead + (1,))
    kkey = base + ak * (n + 1) + xp.arange(n)                                # keys by (cluster, position)
    order = xp.argsort(kkey, axis=-1, kind="stable")                         # (..., N)
    skey = xp.take_along_axis(kkey, order, axis=-1)
    qkey = base + aq * (n + 1) + xp.arange(n)
    ins = xp.searchsorted(skey.reshape(-1), qkey.reshape(-1), side="right").reshape(lead + (n,))
    ins = ins - (xp.arange(rows) * n).reshape(lead + (1,))                   # keys sorted before (aq_i, i]
    slots = ins[..., None] - w + xp.arange(w)                                # (..., N, w) the w slots before
    inside = slots >= 0
    slots = xp.clip(slots, 0, n - 1)
    k_idx = xp.take_along_axis(order, slots.reshape(lead + (-1,)), axis=-1).reshape(slots.shape)
    kc = xp.take_along_axis(ak, k_idx.reshape(lead + (-1,)), axis=-1).reshape(slots.shape)
    valid = inside & (kc == aq[..., None])
    q_idx = xp.broadcast_to(xp.arange(n)[:, None], lead + (n, 1))
    return q_idx, k_idx, valid


# --------------------------------------------------------------------------- kernel
def _check_centroids(centroids, d, lead, dtype, xp):
    """centroids (c, d), or (H, c, d) with lead = (..., H): as an ``xp`` array of ``dtype``."""
    if centroids is None:
        raise ValueError("centroids is required: draw them with draw_centroids(rng, c, d[, heads])")
    check_float_array("centroids", centroids, min_ndim=2)
    if centroids.ndim not in (2, 3) or centroids.shape[-1] != d:
        raise ValueError(f"centroids must have shape (c, d={d}) or (H, c, d), got {tuple(centroids.shape)}")
    if centroids.ndim == 3 and (len(lead) < 1 or lead[-1] != centroids.shape[0]):
        raise ValueError(f"centroids per head must have H = q.shape[-3] entries, got {tuple(centroids.shape)}")
    return xp.asarray(centroids).astype(dtype, copy=False)


def default_window(n, c):
    """Members per cluster: w = ceil(N / c) (balanced clusters cover N slots)."""
    return max(1, -(-n // c))


@forward_of("routing")
def forward(q, k, v, *, causal=False, key_mask=None, centroids=None, window=None, scale=None,
            selection=None, eps=1e-5):
    """Routing attention. Returns out (..., N, dv) and a :class:`RoutingCache`."""
    n, m, d, _ = check_qkv(q, k, v, key_mask=key_mask, self_attention=True)
    causal = check_bool("causal", causal)
    mu = _check_centroids(centroids, q.shape[-1], q.shape[:-2], q.dtype, get_namespace(q))
    c = mu.shape[-2]
    w = default_window(n, c) if window is None else check_int("window", window)
    w = min(w, n)
    scale = check_scale(scale, d)
    selection = check_choice("selection", selection, (None, "topk", "recent"))
    selection = selection or ("recent" if causal else "topk")
    eps = check_positive_float("eps", eps)
    xp = get_namespace(q, k, v)

    qn, lnq = layer_norm_forward(q, None, None, eps)                          # Q <- LayerNorm(Q)
    kn, lnk = layer_norm_forward(k, None, None, eps)                          # K <- LayerNorm(K)
    lead = q.shape[:-2]
    if selection == "topk":
        padded = None if key_mask is None else ~xp.broadcast_to(key_mask, lead + (n,))
        q_idx = _topk_members(qn, mu, w, padded)                              # (..., c, w) real queries first
        k_idx = _topk_members(kn, mu, w, padded)
        q_idx = xp.broadcast_to(q_idx, lead + q_idx.shape[-2:])
        k_idx = xp.broadcast_to(k_idx, lead + k_idx.shape[-2:])
        allowed = group_mask(q_idx, k_idx, n, n, causal=causal, key_mask=key_mask)   # (..., c, w, w)
        ones = xp.ones(q_idx.shape + (1,), dtype=q.dtype)
        count = scatter_rows(ones, q_idx, n)                                  # (..., N, 1) clusters per query
    else:
        q_idx, k_idx, valid = _recent_members(qn, kn, mu, w, key_mask)
        allowed = group_mask(q_idx, k_idx, n, n, causal=True, key_mask=key_mask) & valid[..., None, :]
        count = xp.ones(lead + (n, 1), dtype=q.dtype)
    qb = gather_rows(qn, q_idx)                                               # (..., G, bq, d)
    kb = gather_rows(kn, k_idx)                                               # (..., G, bk, d)
    vb = gather_rows(v, k_idx)                                                # (..., G, bk, dv)
    ob, _, acache = attend_forward(qb, kb, vb, allowed, scale)                # softmax(Q'K'^T / sqrt d) V'
    inv = 1.0 / xp.maximum(count, 1.0)                                        # mean over clusters; 0 if none
    out = scatter_rows(ob, q_idx, n) * inv                                    # (..., N, dv)
    return out, RoutingCache(acache, q_idx, k_idx, count, lnq, lnk, n, allowed)


@backward_of("routing")
def backward(dout, cache):
    """Gradients {"q", "k", "v"} (memberships fixed; the layer norms are differentiated)."""
    n = cache.n
    xp = get_namespace(dout)
    inv = 1.0 / xp.maximum(cache.count, 1.0)
    dob = gather_rows(dout * inv, cache.q_idx)                                # (..., G, bq, dv)
    g = attend_backward(dob, cache.attend)
    dqn = scatter_rows(g["q"], cache.q_idx, n)
    dkn = scatter_rows(g["k"], cache.k_idx, n)
    dv = scatter_rows(g["v"], cache.k_idx, n)
    return {"q": layer_norm_backward(dqn, cache.lnq)["x"], "k": layer_norm_backward(dkn, cache.lnk)["x"], "v": dv}


@reads_cache("routing")
def weights(cache):
    """W (..., N, N): W[i, j] = mean over i's groups of the group softmax weight of j; out == W @ v."""
    xp = get_namespace(cache.count)
    inv = 1.0 / xp.maximum(cache.count[..., 0], 1.0)                          # (..., N)
    lead = inv.shape[:-1]
    qi = xp.broadcast_to(cache.q_idx, lead + cache.q_idx.shape[-2:])
    wq = xp.take_along_axis(inv, qi.reshape(lead + (-1,)), axis=-1).reshape(qi.shape)
    return dense_from_groups(cache.attend.p * wq[..., None], cache.q_idx, cache.k_idx, cache.n, cache.n)


@reads_cache("routing")
def pattern(cache):
    """The support: j visible to i iff i and j share a group (and the masks allow it)."""
    a = cache.allowed
    xp = get_namespace(a)
    lead = cache.attend.p.shape[:-3]
    return dense_from_groups(xp.broadcast_to(a, lead + a.shape[-3:]).astype("float64"),
                             cache.q_idx, cache.k_idx, cache.n, cache.n) > 0


def reference(q, k, v, *, causal=False, key_mask=None, centroids=None, window=None, scale=None,
              selection=None, eps=1e-5):
    """Dense oracle, built independently: memberships by Python sorting / loops; for every
    cluster C, full attention masked to C x C; each query takes the mean over its clusters
    ("topk"), or full attention masked to its w most recent same-cluster keys ("recent")."""
    xp = get_namespace(q, k, v)
    n, d = q.shape[-2:]
    mu = _check_centroids(centroids, q.shape[-1], q.shape[:-2], q.dtype, get_namespace(q))
    c = mu.shape[-2]
    w = min(default_window(n, c) if window is None else window, n)
    selection = selection or ("recent" if causal else "topk")
    qn, kn = normalise(q, eps), normalise(k, eps)
    sq = to_numpy(qn @ mu.swapaxes(-1, -2))                                   # (..., N, c)
    sk = to_numpy(kn @ mu.swapaxes(-1, -2))
    lead = q.shape[:-2]
    km = None if key_mask is None else to_numpy(xp.broadcast_to(key_mask, lead + (n,)))
    every = list(itertools.product(*map(range, lead)))                        # every batch / head index
    real = lambda li, j: km is None or bool(km[li + (j,)])  # noqa: E731

    def dense(mask, causal=False):                                            # full attention of qn, kn, masked
        allowed = combine_masks(n, n, xp, causal=causal, key_mask=key_mask, mask=mask, lead=lead)
        return attend_forward(qn, kn, v, allowed, check_scale(scale, d))[0]

    if selection == "recent":
        masks = []
        for li in every:
            best = lambda s, t: max(range(c), key=lambda a: (float(s[li + (t, a)]), -a))  # noqa: E731  first argmax
            cq = [best(sq, t) for t in range(n)]
            ck = [best(sk, t) if real(li, t) else -1 for t in range(n)]
            rows = []
            for i in range(n):
                mine = [j for j in range(i + 1) if ck[j] == cq[i]][-w:]
                rows.append([j in mine for j in range(n)])
            masks.append(rows)
        return dense(xp.asarray(masks, dtype=bool).reshape(lead + (n, n)))
    total = xp.zeros(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)
    count = xp.zeros(q.shape[:-1] + (1,), dtype=q.dtype)
    for a in range(c):
        qm, km_rows = [], []
        for li in every:
            top_q = sorted(range(n), key=lambda t: (not real(li, t), -float(sq[li + (t, a)]), t))[:w]
            top_k = sorted(range(n), key=lambda t: (not real(li, t), -float(sk[li + (t, a)]), t))[:w]
            qm.append([t in top_q for t in range(n)])
            km_rows.append([t in top_k for t in range(n)])
        in_q = xp.asarray(qm, dtype=bool).reshape(lead + (n,))
        in_k = xp.asarray(km_rows, dtype=bool).reshape(lead + (n,))
        in_cluster = in_q[..., :, None] & in_k[..., None, :]                # (..., N, N): cluster a's block
        out_a = dense(in_cluster, causal=causal)
        total += out_a * in_q[..., None]
        count += in_q[..., None]
    return total / xp.maximum(count, 1.0)


# --------------------------------------------------------------------------- registry
def default_clusters(n):
    """About sqrt(N) clusters (the paper: c = sqrt(N) gives O(N sqrt N))."""
    return max(1, round(math.sqrt(n)))


def setup(rng, *, n, d, heads, causal=False, dtype="float64"):
    """No learnable parameters (the centroids are k-means state, updated by
    :func:`update_centroids`, not by gradients); config: per-head centroids and w."""
    c = default_clusters(n)
    mu = asarray(draw_centroids(rng, c, d, heads=heads), dtype=dtype)
    return {}, {"centroids": mu, "window": default_window(n, c)}


# --------------------------------------------------------------------------- decoding
WHY_TOPK_CANNOT_DECODE = ("selection='topk' with causal=True cannot decode: whether an early key is among a "
                          "cluster's top-w depends on later tokens, so row t of the parallel forward is not a "
                          "function of tokens <= t; decode with selection='recent' (the causal default)")


class RoutingState(NamedTuple):
    """Per batch entry, head and cluster, the w most recent real keys assigned to the cluster (a ring
    buffer: the key with rank r in its cluster sits in slot r mod w)."""

    k: object          # (..., c, w, d) layer-normalised keys
    v: object          # (..., c, w, dv) values
    filled: object     # (..., c, w) bool: the slot holds a key
    count: object      # (..., c) int: real keys assigned to the cluster so far
    t: int
    centroids: object  # (c, d) or (H, c, d) configuration
    scale: float
    eps: float

    def held(self):
        """Numbers held: c w (d + dv + 1) + c per batch entry and head, from the first token on."""
        return int(math.prod(self.k.shape[:-1]) * (self.k.shape[-1] + self.v.shape[-1] + 1) + self.count.size)


def init_state(*, lead, d, dv, dtype="float64", centroids=None, window=None, scale=None, selection=None, eps=1e-5):
    """The empty decoder state (:class:`RoutingState`) of ``selection="recent"``.

    Query t joins its nearest centroid's cluster and attends to the w most recent real keys j <= t
    assigned to that cluster, so the state keeps, per cluster, the last w layer-normalised keys and
    their values: c w (d + dv + 1) + c numbers per batch entry and head, allocated at once and
    constant in t (bounded). ``window`` must be given: its default ceil(N / c) depends on the final
    length N, which a decoder does not know. ``selection="topk"`` is refused
    (:data:`WHY_TOPK_CANNOT_DECODE`)."""
    xp = get_namespace()
    lead = tuple(int(x) for x in lead)
    d, dv = check_int("d", d), check_int("dv", dv)
    mu = _check_centroids(centroids, d, lead, dtype, xp)
    selection = check_choice("selection", selection, (None, "topk", "recent")) or "recent"
    if selection == "topk":
        raise ValueError(WHY_TOPK_CANNOT_DECODE)
    if window is None:
        raise ValueError("window must be given to decode: its default ceil(N / c) depends on the final length N, "
                         "which a decoder does not know (pass the window the parallel forward uses)")
    w = check_int("window", window)
    c = mu.shape[-2]
    return RoutingState(xp.zeros(lead + (c, w, d), dtype=dtype), xp.zeros(lead + (c, w, dv), dtype=dtype),
                        xp.zeros(lead + (c, w), dtype=bool), xp.zeros(lead + (c,), dtype=xp.int64), 0, mu,
                        check_scale(scale, d), check_positive_float("eps", eps))


def _rings(state):
    """The state's buffers with the lead axes flattened: k (L, c, w, d), v (L, c, w, dv), filled (L, c, w),
    count (L, c) (views: writing to them writes the state)."""
    c, w = state.k.shape[-3:-1]
    return (state.k.reshape((-1, c, w, state.k.shape[-1])), state.v.reshape((-1, c, w, state.v.shape[-1])),
            state.filled.reshape((-1, c, w)), state.count.reshape((-1, c)))


def _insert(state, kn, v, cluster, rank, where):
    """Keys kn (L, T, d) and values v (L, T, dv) of the flattened lead rows into their cluster's ring, at slot
    rank mod w, where ``where`` (L, T) is True (ranks distinct mod w per cluster)."""
    xp = get_namespace(kn)
    kk, vv, ff, _ = _rings(state)
    rows, cols = xp.nonzero(where)
    at = (rows, cluster[rows, cols], rank[rows, cols] % kk.shape[-2])
    kk[at] = kn[rows, cols]
    vv[at] = v[rows, cols]
    ff[at] = True


def _nearest(x_normed, mu):
    """Nearest centroid (..., T) of rows x_normed (..., T, d), as the forward assigns them."""
    return (x_normed @ mu.swapaxes(-1, -2)).argmax(axis=-1)


def _check_prompt(q, k, v, state):
    lead, d, dv = tuple(state.count.shape[:-1]), state.k.shape[-1], state.v.shape[-1]
    for name, x, last in (("q", q, d), ("k", k, d), ("v", v, dv)):
        check_float_array(name, x, min_ndim=2)
        if tuple(x.shape[:-2]) != lead or x.shape[-1] != last:
            raise ValueError(f"{name} must have shape {lead + ('T', last)} (the state's), got {tuple(x.shape)}")


def prefill(q, k, v, state, *, key_mask=None):
    """The first T tokens in one pass: out (..., T, dv), the rows of the causal :func:`forward`
    (``selection="recent"``), and the state: the last w real keys of every cluster among them."""
    state = check_state(state, RoutingState, "routing")
    if state.t != 0:
        raise ValueError(f"state must be fresh (from init_state) for prefill, this one is at position {state.t}")
    _check_prompt(q, k, v, state)
    c, w = state.k.shape[-3:-1]
    out, _ = forward(q, k, v, causal=True, key_mask=key_mask, centroids=state.centroids, window=w,
                     scale=state.scale, selection="recent", eps=state.eps)
    xp = get_namespace(q, k, v)
    n, lead = q.shape[-2], tuple(q.shape[:-2])
    kn = layer_norm_forward(k, None, None, state.eps)[0]
    cluster = _nearest(kn, state.centroids)                                    # (..., T)
    if key_mask is not None:
        cluster = xp.where(key_mask, cluster, c)                               # masked keys: cluster c (none)
    rank, total = bucket_ranks(cluster, c)                                     # rank in the cluster, (..., c + 1)
    recent = (cluster < c) & (rank >= xp.take_along_axis(total, cluster, axis=-1) - w)   # the cluster's last w
    flat = lambda x: x.reshape((-1,) + x.shape[len(lead):])  # noqa: E731
    _insert(state, flat(kn), flat(v), flat(xp.minimum(cluster, c - 1)), flat(rank), flat(recent))
    state.count[...] = total[..., :c]
    return out, state._replace(t=n)


def step(q_t, k_t, v_t, state, *, key_mask_t=None):
    """One token: out_t (..., dv), equal to row t of the causal :func:`forward` (``selection="recent"``),
    and the state. A real k_t joins its nearest cluster's ring (evicting the cluster's oldest key once it
    holds w); q_t attends to the keys of its own nearest cluster's ring."""
    state = check_state(state, RoutingState, "routing")
    xp = get_namespace(q_t, k_t, v_t)
    lead = tuple(state.count.shape[:-1])
    check_step_inputs(q_t, k_t, v_t, key_mask_t, lead, state.k.shape[-1], state.v.shape[-1])
    real = xp.ones(lead, dtype=bool) if key_mask_t is None else xp.broadcast_to(key_mask_t, lead)
    qn = layer_norm_forward(q_t[..., None, :], None, None, state.eps)[0]      # (..., 1, d)
    kn = layer_norm_forward(k_t[..., None, :], None, None, state.eps)[0]
    kk, vv, ff, count = _rings(state)
    ck = _nearest(kn, state.centroids).reshape(-1, 1)                          # (L, 1) the key's cluster
    rank = xp.take_along_axis(count, ck, axis=-1)                              # (L, 1)
    where = real.reshape(-1, 1)
    _insert(state, kn.reshape(-1, 1, kn.shape[-1]), v_t.reshape(-1, 1, v_t.shape[-1]), ck, rank, where)
    rows = xp.arange(count.shape[0])
    count[rows, ck[:, 0]] += where[:, 0]
    cq = _nearest(qn, state.centroids).reshape(-1)                             # (L,) the query's cluster
    out, _, _ = attend_forward(qn.reshape(-1, 1, qn.shape[-1]), kk[rows, cq], vv[rows, cq], ff[rows, cq][:, None, :],
                               state.scale)                                    # (L, 1, dv)
    return out.reshape(lead + (out.shape[-1],)), state._replace(t=state.t + 1)


MECHANISM = register(Mechanism(
    name="routing",
    title="Routing Transformer (k-means attention)",
    citation="Roy et al., 2021",
    url="https://arxiv.org/abs/2003.05997",
    classes=("LP",),
    complexity="O(N√N)",
    causal=True,
    exact=True,
    kind="kernel",
    notebook="03_learned_patterns",
    forward=forward,
    backward=backward,
    weights=weights,
    setup=setup,
    pattern=pattern,
    reference=reference,
    init_state=init_state,
    prefill=prefill,
    step=step,
    bounded_state=True,
    sizes=("window",),
    summary="Online k-means shared by queries and keys; each balanced cluster of w = N / c nearest "
            "tokens attends within itself (exact given the memberships).",
))
