# %% [markdown]
# ## Your turn: attention by key tiles with the online softmax
#
# Write the forward of exact attention that visits the keys $B$ at a time and never holds more than one
# $(N, B)$ tile of scores — the recurrence of section 1. Keep per query row a running maximum $m$, a running sum
# $\ell$ and a running (unnormalised) output $a$; for each key tile $S = q K_{t}^\top \cdot \text{scale}$:
#
# $$m' = \max(m, \max_j S_{ij}), \quad \ell' = e^{m - m'}\ell + \textstyle\sum_j e^{S_{ij} - m'}, \quad
# a' = e^{m - m'} a + e^{S - m'} V_t, \qquad \text{out} = a / \ell .$$
#
# `check` compares your output with full attention's (the dense check). Non-causal, no masks; the tile size need not
# divide M.
#
# *Hints.* (1) Start with $m = -\infty$, $\ell = 0$, $a = 0$; $e^{-\infty - m'} = 0$ does the right thing on the first
# tile. (2) Keep $m$ and $\ell$ as (..., N, 1) columns so that they broadcast against the tile. (3) Why is the result
# exact, not an approximation — what does the factor $e^{m - m'}$ do to the terms summed so far?

# %%
def my_tiled_attention(q, k, v, *, block):
    """q (..., N, d), k (..., M, d), v (..., M, dv) -> out (..., N, dv), visiting the keys block at a time."""
    return None          # replace with your code


ex_rng = np.random.default_rng(7)
ex_inputs = {"q": ex_rng.standard_normal((2, 3, 20, 8)), "k": ex_rng.standard_normal((2, 3, 37, 8)),
             "v": ex_rng.standard_normal((2, 3, 37, 5))}
full_out = lambda q, k, v, block: effattn.get("full").forward(q, k, v)[0]
check(my_tiled_attention, None, ex_inputs, config={"block": 8}, reference=full_out, tol=1e-12);

# %% [markdown]
# <details><summary>Answer (try first!)</summary>
#
# ```python
# def my_tiled_attention(q, k, v, *, block):
#     scale = q.shape[-1] ** -0.5
#     m = np.full(q.shape[:-1] + (1,), -np.inf)            # running max (..., N, 1)
#     l = np.zeros(q.shape[:-1] + (1,))                     # running sum of exp
#     a = np.zeros(q.shape[:-1] + (v.shape[-1],))           # running output, unnormalised
#     for j0 in range(0, k.shape[-2], block):
#         s = q @ np.swapaxes(k[..., j0:j0 + block, :], -1, -2) * scale    # one (N, B) tile
#         m_new = np.maximum(m, s.max(axis=-1, keepdims=True))
#         e = np.exp(s - m_new)
#         rescale = np.exp(m - m_new)                                      # the old terms, rescaled exactly
#         l = rescale * l + e.sum(axis=-1, keepdims=True)
#         a = rescale * a + e @ v[..., j0:j0 + block, :]
#         m = m_new
#     return a / l
# ```
#
# Exact because every term summed so far carries the same factor $e^{-m}$: multiplying by $e^{m - m'}$ turns it into
# $e^{-m'}$, so after the last tile $a$ and $\ell$ are $\sum_j e^{S_{ij} - m_N} v_j$ and $\sum_j e^{S_{ij} - m_N}$
# — the softmax's numerator and denominator with the true row maximum. `effattn/attention/flash.py` does this with
# query tiles too, skips the tiles a causal query cannot see, and writes the backward.
# </details>

# %%
answer = load_answer("10_techniques/80_exercise.py", "my_tiled_attention")
assert check(answer, None, ex_inputs, config={"block": 8}, reference=full_out, tol=1e-12)
