# %% [markdown]
# ## Your turn: the Funnel's pooling
#
# Write mean pooling with a stride s and the [CLS] token kept apart: row 0 of the output is x[0]; then positions
# 1, ..., N − 1 are pooled in consecutive groups of s (the last group may be shorter) by their mean. x is (N, D);
# the output (1 + ⌈(N − 1)/s⌉, D). `check` compares with `effattn.nn.pooling.pool_forward`.
#
# *Hint.* `range(1, N, s)` gives the first member of each group; a slice `x[a:a + s]` stops at the end by itself.

# %%
def my_pool(x, *, stride):
    """x (N, D) -> (N', D): [CLS] alone, then the mean of each group of ``stride`` positions."""
    return None          # replace with your code


ex_x = np.random.default_rng(4).standard_normal((10, 3))
ref = lambda x, stride: pooling.pool_forward(x, pooling.pool_groups(x.shape[0], stride, True))[0]
check(my_pool, None, {"x": ex_x}, config={"stride": 3}, reference=ref, tol=1e-12);

# %% [markdown]
# <details><summary>Answer (try first!)</summary>
#
# ```python
# def my_pool(x, *, stride):
#     rows = [x[0]] + [x[a:a + stride].mean(axis=0) for a in range(1, x.shape[0], stride)]
#     return np.stack(rows)
# ```
#
# `effattn/nn/pooling.py` builds the groups once as an (N', s) index array and pools with one gather, masks
# included; its backward spreads each pooled gradient over the group's real members.
# </details>

# %%
answer = load_answer("08_downsampling/80_exercise.py", "my_pool")
assert check(answer, None, {"x": ex_x}, config={"stride": 3}, reference=ref, tol=1e-12)
