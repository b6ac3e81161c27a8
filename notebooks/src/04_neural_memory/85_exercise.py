# %% [markdown]
# ## Your turn: pooling by attention with k learned seeds, forward and backward
#
# Write the heart of PMA yourself: $k$ learned seeds $S \in \mathbb{R}^{k \times D}$ read a set $X$ of $N$ elements
# through one softmax attention (one head, no residual, LayerNorm or rFF around it):
#
# $$\mathrm{Pool}(X) = \mathrm{softmax}\!\Big(\frac{S\,(XW^K)^\top}{\sqrt D}\Big)\,XW^V \;\in\; \mathbb{R}^{k \times D},$$
#
# where masked elements of a padded set (`key_mask` False) get zero weight. This is PMA's
# $\mathrm{Att}(SW^Q, ZW^K, ZW^V)$ with $W^Q = I$; the seeds are a memory of $k$ slots that reads the whole set, so the
# cost is $O(N k D)$ and the result does not depend on the order of the elements. `check` runs the project's checks on
# your pair:
#
# * the **dense check**: your output equals effattn's `full` attention with the seeds as queries,
#   `full.forward(S, X Wk, X Wv, key_mask=...)`;
# * the **gradient check**: your `backward` against central finite differences, for $X$, $S$, $W^K$ and $W^V$.
#
# *Hints.* (1) `S` has no batch axis: `np.broadcast_to(S, x.shape[:-2] + S.shape)` gives it one. (2) Scores
# `(..., k, N)`; put `-np.inf` at masked elements (`key_mask[..., None, :]`) before the row maximum. (3) The backward of
# the attention is notebook 00's: $dV = P^\top dO$, $dP = dO\,V^\top$, for the scores $E$:
# $dE = P \circ (dP - \mathrm{rowsum}(P \circ dP))$, then $dS = \text{scale}\; dE\,K$ and
# $dK = \text{scale}\; dE^\top S$. (4) $S$, $W^K$, $W^V$ are shared by every set of the batch: their gradients **sum over the
# batch axes** (e.g. `x.reshape(-1, D).T @ dK.reshape(-1, D)` for $dW^K$). (5) $X$ feeds both $K = XW^K$ and
# $V = XW^V$: $dX = dK\,W^{K\top} + dV\,W^{V\top}$.

# %%
def my_attention_pool(x, S, Wk, Wv, *, key_mask=None):
    """x (..., N, D), S (k, D), Wk, Wv (D, D), key_mask (..., N) bool -> (out (..., k, D), cache)."""
    return None          # replace with your code


def my_attention_pool_backward(dout, cache):
    """dout (..., k, D) -> {"x": dx, "S": dS, "Wk": dWk, "Wv": dWv}."""
    return None          # replace with your code


def pool_reference(x, S, Wk, Wv, *, key_mask=None):
    """The dense oracle: effattn's full attention with the seeds as queries over the projected set."""
    seeds = np.broadcast_to(S, x.shape[:-2] + S.shape)
    return full.forward(seeds, x @ Wk, x @ Wv, key_mask=key_mask)[0]


ex_rng = np.random.default_rng(7)
ex_inputs = {"x": ex_rng.standard_normal((2, 7, 4)), "S": ex_rng.standard_normal((2, 4)),
             "Wk": ex_rng.standard_normal((4, 4)) / 2, "Wv": ex_rng.standard_normal((4, 4)) / 2}
ex_mask = np.ones((2, 7), bool)
ex_mask[1, 4:] = False                                                  # the second set has 4 elements
check(my_attention_pool, my_attention_pool_backward, ex_inputs, config={"key_mask": ex_mask},
      reference=pool_reference, expected_shape=(2, 2, 4));

# %% [markdown]
# <details><summary>Answer (try first!)</summary>
#
# ```python
# def my_attention_pool(x, S, Wk, Wv, *, key_mask=None):
#     D = S.shape[-1]
#     seeds = np.broadcast_to(S, x.shape[:-2] + S.shape)                 # (..., k, D)
#     K, V = x @ Wk, x @ Wv                                              # (..., N, D)
#     scale = D ** -0.5
#     s = seeds @ K.swapaxes(-1, -2) * scale                             # (..., k, N)
#     if key_mask is not None:
#         s = np.where(key_mask[..., None, :], s, -np.inf)               # masked elements: zero weight
#     p = np.exp(s - s.max(axis=-1, keepdims=True))
#     p /= p.sum(axis=-1, keepdims=True)
#     return p @ V, (x, seeds, K, V, p, Wk, Wv, scale)
#
#
# def my_attention_pool_backward(dout, cache):
#     x, seeds, K, V, p, Wk, Wv, scale = cache
#     D = x.shape[-1]
#     dV = p.swapaxes(-1, -2) @ dout                                     # (..., N, D)
#     dp = dout @ V.swapaxes(-1, -2)                                     # (..., k, N)
#     ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True))               # zero at masked elements
#     dseeds = ds @ K * scale                                            # (..., k, D)
#     dK = ds.swapaxes(-1, -2) @ seeds * scale                           # (..., N, D)
#     flat = lambda a: a.reshape(-1, a.shape[-1])                        # the batch axes folded into the rows
#     return {"x": dK @ Wk.T + dV @ Wv.T,
#             "S": dseeds.reshape((-1,) + seeds.shape[-2:]).sum(axis=0),  # shared by every set: sum
#             "Wk": flat(x).T @ flat(dK), "Wv": flat(x).T @ flat(dV)}
# ```
#
# Every row of `p` has an unmasked element (a set is never empty), so no row is all `-inf`. `effattn.layers.pma` wraps
# this core in the MAB of the previous section: $W^Q$, $h$ heads, $W^O$, the residual $S + \ldots$, two LayerNorms and
# the rFF (and an rFF on the set before pooling).
# </details>
#
# The worked answer, through the same checks (without and with the mask), then the property that makes it a pooling:
# shuffling the set (and its mask) leaves the output unchanged.

# %%
ans_pool = load_answer("04_neural_memory/85_exercise.py", "my_attention_pool", "my_attention_pool_backward")
assert check(*ans_pool, ex_inputs, reference=pool_reference, expected_shape=(2, 2, 4), verbose=False)
assert check(*ans_pool, ex_inputs, config={"key_mask": ex_mask}, reference=pool_reference, expected_shape=(2, 2, 4))
ex_perm = ex_rng.permutation(7)
a_, _ = ans_pool[0](**ex_inputs, key_mask=ex_mask)
b_, _ = ans_pool[0](**{**ex_inputs, "x": ex_inputs["x"][:, ex_perm]}, key_mask=ex_mask[:, ex_perm])
print("max |Pool(pi X) - Pool(X)| =", np.abs(a_ - b_).max())
assert np.abs(a_ - b_).max() < 1e-12
