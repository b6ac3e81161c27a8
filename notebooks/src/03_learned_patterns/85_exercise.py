# %% [markdown]
# ## Your turn: write content-based (cluster) attention and its backward
#
# In the spirit of CS231n's assignments: write the simplest learnable pattern yourself, in plain NumPy, and let the
# project's own checks judge it. Given $c$ centroids $\mu \in \mathbb{R}^{c \times d}$ (fixed here — in Routing they are
# the online k-means state), every query and every key goes to its nearest centroid by dot product,
# $a(x) = \arg\max_c\, \mu_c \cdot x$, and query $i$ attends only to the keys of its own cluster:
#
# $$o_i = \sum_{j:\ a(k_j) = a(q_i)} \operatorname{softmax}_j\!\Big(\frac{q_i \cdot k_j}{\sqrt d}\Big)\, v_j,
#   \qquad o_i = 0 \ \text{ if no key shares } q_i\text{'s cluster}.$$
#
# This is Routing attention with the *unbalanced* nearest-centroid rule (the balanced top-$w$ rule of section 2 is a
# refinement). The assignments are discrete: like every mechanism of this notebook, treat them as constants in the
# backward pass. `effattn.tools.teach.check_kernel` then runs
#
# * the **dense check**: your output equals effattn's `full` attention masked by the cluster pattern
#   $[a(q_i) = a(k_j)]$ (built by `cluster_mask` below from `routing.assign`, not from your code);
# * the **gradient check**: your `backward` against central finite differences, for q, k and v.
#
# *Hints.* (1) `a_q = (q @ centroids.T).argmax(-1)` works for any leading batch and head axes; the mask is
# `a_q[..., :, None] == a_k[..., None, :]`, shape (..., N, M). (2) Put `-np.inf` where the mask is False before the row
# maximum; a row with no allowed key then has maximum `-inf` — replace it by 0 and divide only where the row sum is
# positive (`np.divide(..., where=...)`), so that row stays 0. (3) The backward is masked softmax attention's
# (notebook 00, exercise 1): $dV = P^\top dO$, $dP = dO\,V^\top$, $dS = P \circ (dP - \mathrm{rowsum}(P \circ dP))$,
# $dQ = \text{scale}\; dS\,K$, $dK = \text{scale}\; dS^\top Q$ — the zero entries of $P$ carry the mask through.

# %%
def my_cluster_attention_forward(q, k, v, *, centroids):
    """q (..., N, d), k (..., M, d), v (..., M, dv), centroids (c, d) -> (out (..., N, dv), cache)."""
    return None          # replace with your code


def my_cluster_attention_backward(dout, cache):
    """dout (..., N, dv), the forward's cache -> {"q": dq, "k": dk, "v": dv} (the clusters held fixed)."""
    return None          # replace with your code


def cluster_mask(q, k, centroids):
    """The oracle's pattern (..., N, M): True where key j is in query i's cluster (routing.assign, nearest centroid)."""
    return RT.assign(q, centroids)[..., :, None] == RT.assign(k, centroids)[..., None, :]


def cluster_reference(q, k, v, *, centroids):
    """The dense oracle: effattn's full softmax attention masked by the cluster pattern."""
    return effattn.get("full").forward(q, k, v, mask=cluster_mask(q, k, centroids))[0]


mu_ex = np.random.default_rng(11).standard_normal((3, 4))          # 3 centroids in d = 4
check_kernel(my_cluster_attention_forward, my_cluster_attention_backward, reference=cluster_reference,
             config={"centroids": mu_ex}, n=9);

# %% [markdown]
# <details><summary>Answer (try first!)</summary>
#
# ```python
# def my_cluster_attention_forward(q, k, v, *, centroids):
#     a_q = (q @ centroids.T).argmax(axis=-1)                 # (..., N) nearest centroid of every query
#     a_k = (k @ centroids.T).argmax(axis=-1)                 # (..., M) and of every key
#     allowed = a_q[..., :, None] == a_k[..., None, :]        # (..., N, M): same cluster
#     scale = q.shape[-1] ** -0.5
#     s = np.where(allowed, q @ k.swapaxes(-1, -2) * scale, -np.inf)
#     top = s.max(axis=-1, keepdims=True)
#     top = np.where(np.isfinite(top), top, 0.0)              # a row with no key in its cluster
#     p = np.exp(s - top)                                     # exp(-inf) = 0 outside the cluster
#     z = p.sum(axis=-1, keepdims=True)
#     p = np.divide(p, z, out=np.zeros_like(p), where=z > 0)  # that row stays all zero
#     return p @ v, (q, k, v, p, scale)
#
#
# def my_cluster_attention_backward(dout, cache):
#     q, k, v, p, scale = cache
#     dv = p.swapaxes(-1, -2) @ dout                          # dV = P^T dO
#     dp = dout @ v.swapaxes(-1, -2)                          # dP = dO V^T
#     ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True))    # zero outside the cluster: P is
#     return {"q": ds @ k * scale, "k": ds.swapaxes(-1, -2) @ q * scale, "v": dv}
# ```
#
# The clusters are a function of q and k, but a piecewise-constant one: a small change of q moves no token to another
# cluster (almost surely), so central differences see the same pattern and the gradient check passes with the clusters
# held fixed — which is exactly the convention of `routing.backward`.
# </details>
#
# The worked answer above, run through the same checks (this is what the notebook asserts), then once more with an
# empty cluster row (a centroid that attracts queries but no key):

# %%
answer = load_answer("03_learned_patterns/85_exercise.py", "my_cluster_attention_forward",
                     "my_cluster_attention_backward", namespace=globals())
assert check_kernel(*answer, reference=cluster_reference, config={"centroids": mu_ex}, n=9)
assert check_kernel(*answer, reference=cluster_reference, config={"centroids": mu_ex}, n=6, m=3, seed=5)
rng5 = np.random.default_rng(5)                                     # the draws check_kernel made from seed 5
q5, k5 = rng5.standard_normal((2, 2, 6, 4)), rng5.standard_normal((2, 2, 3, 4))
empty = int((~cluster_mask(q5, k5, mu_ex).any(-1)).sum())
print("queries with no key in their cluster in the second check:", empty)
assert empty > 0
