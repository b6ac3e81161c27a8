# %% [markdown]
# ## Your turn: a sliding window with global tokens, without the N × N matrix
#
# Write the simplest model of this notebook yourself: Longformer with dilation 1. A query $i \notin G$ attends to the
# window $\{j : |i - j| \le w\}$ and to the global positions $G$; a query in $G$ attends to every key:
#
# $$\text{allowed}_{ij} = \big[\,|i - j| \le w\,\big] \;\lor\; [\,i \in G\,] \;\lor\; [\,j \in G\,].$$
#
# 1. `my_window_global_mask(n, w, global_positions)`: the boolean $(N, N)$ pattern above. The check compares it with
#    the package's rule, `longformer.build_pattern(n, w=w, global_positions=G)`.
# 2. `my_window_global_attention(q, k, v, *, w, global_positions)`: the attention itself, **without** any
#    $(N, N)$ array: each non-global query gathers its $2w + 1$ window keys and the $g$ global keys,
#    $(\ldots, N, 2w + 1 + g)$ scores in all, $O(N (w + g))$ memory; the $g$ global rows are a dense $(g \times N)$
#    attention. `check_kernel` runs the **dense check**: your output must equal effattn's `full` attention masked by
#    the package's pattern (not by your mask).
#
# *Hints.* (1) `idx = np.arange(n)[:, None] + np.arange(-w, w + 1)[None, :]` is the $(N, 2w+1)$ table of window key
# positions; positions outside $[0, N)$ are not keys (clip the index, and mask the slot). (2) `k[..., idx, :]` gathers
# the window keys, shape `(..., N, 2w+1, d)`, for any leading batch and head axes. (3) A global key that is also in
# the window must be counted **once** — mask it out of the window slots and take it from the global list. (4) The
# scores of a gathered layout are `(q[..., :, None, :] * kw).sum(-1)`; put `-np.inf` where a slot is not allowed before
# the row softmax. (5) Overwrite the global rows with the dense attention of `q[..., G, :]` over all keys.

# %%
def my_window_global_mask(n, w, global_positions):
    """(N, N) bool: True where query i may attend to key j (window |i - j| <= w, or i or j global)."""
    return None          # replace with your code


def my_window_global_attention(q, k, v, *, w, global_positions):
    """q, k (..., N, d), v (..., N, dv) -> out (..., N, dv); never builds an N x N array."""
    return None          # replace with your code


ex_w, ex_g, ex_n = 3, (0, 11), 24


def as_float(fn):
    """The mask as 0/1 floats (so that the dense check can compare it); a stub's None passes through."""
    def wrapped(**kw):
        m = fn(**kw)
        return None if m is None else np.asarray(m, dtype=float)
    wrapped.__name__ = fn.__name__
    return wrapped


def package_pattern(n, w, global_positions):
    return lf_mod.build_pattern(n, w=w, global_positions=global_positions).astype(float)


check(as_float(my_window_global_mask), config={"n": ex_n, "w": ex_w, "global_positions": ex_g},
      reference=package_pattern, expected_shape=(ex_n, ex_n))
check_kernel(my_window_global_attention, config={"w": ex_w, "global_positions": ex_g}, n=ex_n,
             mask=lambda n, m: lf_mod.build_pattern(n, w=ex_w, global_positions=ex_g));

# %% [markdown]
# <details><summary>Answer (try first!)</summary>
#
# ```python
# def my_window_global_mask(n, w, global_positions):
#     i, j = np.arange(n)[:, None], np.arange(n)[None, :]
#     is_g = np.zeros(n, bool)
#     is_g[list(global_positions)] = True
#     return (np.abs(i - j) <= w) | is_g[:, None] | is_g[None, :]
#
#
# def my_window_global_attention(q, k, v, *, w, global_positions):
#     n, d = q.shape[-2:]
#     gidx = np.array(sorted(global_positions), dtype=int)
#     is_g = np.zeros(n, bool)
#     is_g[gidx] = True
#     scale = d ** -0.5
#     idx = np.arange(n)[:, None] + np.arange(-w, w + 1)[None, :]          # (N, 2w+1) window key positions
#     ok = (idx >= 0) & (idx < n)                                          # inside the sequence
#     idx = np.clip(idx, 0, n - 1)
#     ok &= ~is_g[idx]                                                     # a global key comes from the list below
#     lead = q.shape[:-2]
#     kg = np.broadcast_to(k[..., None, gidx, :], lead + (n, len(gidx), d))          # (..., N, g, d)
#     vg = np.broadcast_to(v[..., None, gidx, :], lead + (n, len(gidx), v.shape[-1]))
#     kw = np.concatenate([k[..., idx, :], kg], axis=-2)                   # (..., N, 2w+1+g, d)
#     vw = np.concatenate([v[..., idx, :], vg], axis=-2)
#     allowed = np.concatenate([ok, np.ones((n, len(gidx)), bool)], axis=-1)
#     s = np.where(allowed, (q[..., :, None, :] * kw).sum(-1) * scale, -np.inf)   # (..., N, 2w+1+g)
#     p = np.exp(s - s.max(axis=-1, keepdims=True))
#     p /= p.sum(axis=-1, keepdims=True)
#     out = (p[..., None] * vw).sum(axis=-2)                               # (..., N, dv)
#     if len(gidx):                                                        # global rows: dense over every key
#         sg = q[..., gidx, :] @ k.swapaxes(-1, -2) * scale                # (..., g, N)
#         pg = np.exp(sg - sg.max(axis=-1, keepdims=True))
#         out[..., gidx, :] = (pg / pg.sum(axis=-1, keepdims=True)) @ v
#     return out
# ```
#
# Every row has at least one allowed slot (a non-global query sees itself), so no row of the softmax is empty. The
# package does the same with *blocks* of $w$ queries sharing the keys of three blocks (fewer, larger products than one
# gather per query), and with a residue reordering for the dilated heads.
# </details>
#
# The worked answer, through the same checks, then with other sizes (a global token at the end, none at all):

# %%
ans_mask = load_answer("02_combination_of_patterns/85_exercise.py", "my_window_global_mask")
ans_attn = load_answer("02_combination_of_patterns/85_exercise.py", "my_window_global_attention")
for n_, w_, g_ in ((ex_n, ex_w, ex_g), (10, 2, (9,)), (13, 4, ())):
    cfg = {"n": n_, "w": w_, "global_positions": g_}
    assert check(as_float(ans_mask), config=cfg, reference=package_pattern, expected_shape=(n_, n_), verbose=n_ == ex_n)
    assert check_kernel(ans_attn, config={"w": w_, "global_positions": g_}, n=n_, verbose=n_ == ex_n,
                        mask=lambda n, m, w_=w_, g_=g_: lf_mod.build_pattern(n, w=w_, global_positions=g_))
