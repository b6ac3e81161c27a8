# %% [markdown]
# ## Your turn
#
# ### 1 · The relative shift with an index
#
# Write the relative shift without the reshape trick: from P (N, W) over the distances M − 1, ..., −(N − 1)
# (W = M + N − 1), return BD (N, M) with BD[i, j] = P[i, N − 1 − i + j]. `check` compares with
# `effattn.nn.relative.rel_shift`.
#
# *Hint.* An (N, M) array of column indices, `N - 1 - i + j`, built from two `np.arange`s, and
# `np.take_along_axis` (or a loop over the rows).

# %%
def my_rel_shift(P, *, m):
    """P (N, W) -> BD (N, m), BD[i, j] = P[i, N - 1 - i + j]."""
    return None          # replace with your code


ex_P = np.random.default_rng(5).standard_normal((4, 6 + 4 - 1))
check(my_rel_shift, None, {"P": ex_P}, config={"m": 6}, reference=lambda P, m: relative.rel_shift(P, m), tol=1e-15);

# %% [markdown]
# <details><summary>Answer (try first!)</summary>
#
# ```python
# def my_rel_shift(P, *, m):
#     n = P.shape[0]
#     cols = n - 1 - np.arange(n)[:, None] + np.arange(m)[None, :]
#     return np.take_along_axis(P, cols, axis=1)
# ```
#
# A gather: it copies N M numbers and needs the index array. `rel_shift` reads the same numbers through a view of P
# (a reshape and a slice), and its backward `rel_unshift` writes through that view.
# </details>

# %%
answer = load_answer("07_recurrence/80_exercise.py", "my_rel_shift")
assert check(answer, None, {"P": ex_P}, config={"m": 6}, reference=lambda P, m: relative.rel_shift(P, m), tol=1e-15)

# %% [markdown]
# ### 2 · How far back a stack sees
#
# Without the matrix powers of section 1: follow the earliest position. The first query of a segment is at
# p = s N; through one layer its earliest key is s N − L (the start of its segment minus the memory); the earliest
# key of *that* position, through the layer below, is the start of its own segment minus L, and so on (never
# below 0). Write `my_reach(layers, segment, mem_len, n_segments)` returning the list of p − earliest after
# 1, ..., `layers` layers for p = (n_segments − 1) · segment; it is checked against `figs.receptive_field`.

# %%
def my_reach(layers, segment, mem_len, n_segments):
    """[how far back the first query of the last segment sees through 1..layers layers]."""
    return None          # replace with your code


def reach_ok(fn):
    cases = [(5, 8, 4, 12), (5, 8, 8, 12), (4, 8, 16, 12), (6, 4, 6, 6)]
    good = all(fn(*c) is not None and list(fn(*c)) == figs.receptive_field(c[3], c[1], c[2], c[0])[1].tolist()
               for c in cases)
    print("my_reach:", "PASS, equal to receptive_field" if good else "not yet equal to receptive_field")
    return good


reach_ok(my_reach);

# %% [markdown]
# <details><summary>Answer (try first!)</summary>
#
# ```python
# def my_reach(layers, segment, mem_len, n_segments):
#     p = (n_segments - 1) * segment
#     earliest, out = p, []
#     for _ in range(layers):
#         earliest = max(0, (earliest // segment) * segment - mem_len)
#         out.append(p - earliest)
#     return out
# ```
#
# With L a multiple of N, every step goes back exactly L: the reach is l L. With L < N, after the first layer each
# step lands at the end of a segment and goes back to that segment's start minus L: N per layer. The last case above
# (N = 4, L = 6, 6 segments) reaches the start of the sequence, where the reach stops growing.
# </details>

# %%
answer = load_answer("07_recurrence/80_exercise.py", "my_reach")
assert reach_ok(answer)

# %% [markdown]
# ### 3 · The compressed memory by hand
#
# Follow positions through the Compressive Transformer's state update (section 3) without the layer: segment s holds
# the positions s N, ..., s N + N − 1; after it, all = [memory; segment], the memory keeps the last n_m positions of
# all, the k older ones fall out, the oldest k mod c of those are dropped and the rest form groups of c consecutive
# positions, appended to the compressed memory, which keeps its last n_cm groups. Write
# `my_compressed_groups(segment, n_segments, mem_len, cmem_len, rate)` returning, after each segment, the list of
# compressed rows, each the list of positions it summarises (oldest first); it is checked against
# `figs.compressive_positions`, which tracks one-hot positions through the layer itself.

# %%
def my_compressed_groups(segment, n_segments, mem_len, cmem_len, rate):
    """[after segment 1, 2, ...: [[positions of compressed row 0], [positions of row 1], ...]]."""
    return None          # replace with your code


def groups_ok(fn):
    cases = [(4, 6, 4, 4, 2), (3, 5, 3, 4, 2), (4, 5, 2, 3, 3), (5, 4, 4, 2, 2), (4, 4, 0, 3, 2)]
    good = True
    for c in cases:
        want = [r["compressed"] for r in figs.compressive_positions(segment=c[0], n_segments=c[1], mem_len=c[2],
                                                                    cmem_len=c[3], rate=c[4])]
        got = fn(*c)
        good = good and got is not None and [[list(g) for g in row] for row in got] == want
    print("my_compressed_groups:", "PASS, equal to the layer's own state" if good else
          "not yet equal to the layer's state")
    return good


groups_ok(my_compressed_groups);

# %% [markdown]
# <details><summary>Answer (try first!)</summary>
#
# ```python
# def my_compressed_groups(segment, n_segments, mem_len, cmem_len, rate):
#     mem, comp, out = [], [], []
#     for s in range(n_segments):
#         all_ = mem + list(range(s * segment, (s + 1) * segment))
#         keep = min(mem_len, len(all_))
#         old, mem = all_[:len(all_) - keep], all_[len(all_) - keep:]
#         g = len(old) // rate
#         old = old[len(old) - g * rate:]                  # the oldest k mod c fill no group
#         comp = comp + [old[i * rate:(i + 1) * rate] for i in range(g)]
#         comp = comp[max(0, len(comp) - cmem_len):] if cmem_len else []
#         out.append(comp)
#     return out
# ```
#
# Two slips are easy: `comp[-cmem_len:]` is wrong when `cmem_len` is 0 (it keeps everything), and the groups start at
# the *newest* end of `old` (the layer drops the oldest rows that fill no group, so the groups line up with the
# memory's edge). With n_m = 0 the whole segment falls out at once: the layer is then a compressed memory alone.
# </details>

# %%
answer = load_answer("07_recurrence/80_exercise.py", "my_compressed_groups")
assert groups_ok(answer)
