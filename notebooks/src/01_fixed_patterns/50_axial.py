# %% [markdown]
# ## Axial attention: attend along the rows and columns of a grid
#
# *Axial Attention in Multidimensional Transformers* — Ho, Kalchbrenner, Weissenborn, Salimans, 2019
# ([arXiv 1912.12180](https://arxiv.org/abs/1912.12180)). Code: `effattn/attention/axial.py` (registered as `axial`).
#
# **Intuition.** An $r \times c$ image flattened to $N = rc$ tokens costs $N^2$ with full attention. Keep the grid
# instead: *row attention* lets each cell look at the $c$ cells of its row, *column attention* at the $r$ cells of its
# column. Each is a batch of small full attentions — the rows are the batch — so the cost is $O(N(r + c))$,
# $O(N\sqrt N)$ on a square grid, and a row layer followed by a column layer connects every pair of cells.
#
# Position $i$ is the raster-order cell $(\lfloor i/c \rfloor,\ i \bmod c)$:
#
# $$A^{\text{row}}_i = \{j : \lfloor j/c\rfloor = \lfloor i/c\rfloor\}, \qquad
#   A^{\text{col}}_i = \{j : j \bmod c = i \bmod c\}, \qquad
#   A^{\text{both}}_i = A^{\text{row}}_i \cup A^{\text{col}}_i$$
#
# Causal (the paper's masked arrangement, raster order): intersect with $j \le i$ — the row attention sees the earlier
# cells of its row, the column attention the cells above.
#
# **Conventions.** Config `axis` = `"row"`, `"column"` or `"both"` (default: one softmax over the union, so one call
# has the pattern the survey draws); the paper applies row and column attention in separate layers — pass
# `axis="row"` and `axis="column"` to alternate layers for that. Config `shape=(r, c)` (or any number of axes); by
# default a near-square grid $c = \lceil\sqrt N\rceil$, $r = \lceil N/c \rceil$, the tail of the last row padded and
# masked. lucidrains' `axial-attention` takes tensors already shaped `(B, r, c, d)` and *sums* one attention per axis
# (separately normalised), not one softmax over the union.

# %%
from effattn.attention import axial as axial_mod
from effattn.figures.fixed_patterns import plot_axial_grid, plot_axial_masks
from effattn.nn.image import default_image_shape

axial = effattn.get("axial")
print(axial.title, "|", axial.citation, "|", axial.complexity, "| default grid for N=1000:", default_image_shape(1000))

# %%
show_source(axial_mod._part)                              # one axis: the lines of the grid along it
show_source(axial_mod.forward, "parts = tuple", "out, cache = union_forward")

# %% [markdown]
# ### Shape check: rows are a batched matmul over the reshaped grid
#
# For $N = rc$, row attention is nothing but full attention on `x.reshape(B, H, r, c, d)` (rows = a batch axis) and
# column attention the same on the transposed grid. The contract holds for any $N$ (here 30 on a 4 × 8 grid, 2 cells
# of padding).

# %%
r, c = 6, 8
qg, kg, vg = (rng.standard_normal((B, H, r * c, d)) for _ in range(3))
grid = lambda x: x.reshape(B, H, r, c, d)                    # (B, H, N, d) -> (B, H, r, c, d)
out_row, _ = axial.forward(qg, kg, vg, shape=(r, c), axis="row")
ref_row, _ = full.forward(grid(qg), grid(kg), grid(vg))      # (B, H, r, c, d): rows are groups
out_col, _ = axial.forward(qg, kg, vg, shape=(r, c), axis="column")
ref_col, _ = full.forward(*(grid(x).swapaxes(-3, -2) for x in (qg, kg, vg)))  # (B, H, c, r, d): columns are groups
print("row", out_row.shape, np.abs(out_row - ref_row.reshape(out_row.shape)).max())
print("column", out_col.shape, np.abs(out_col - ref_col.swapaxes(-3, -2).reshape(out_col.shape)).max())
assert np.allclose(out_row, ref_row.reshape(out_row.shape), atol=1e-12)
assert np.allclose(out_col, ref_col.swapaxes(-3, -2).reshape(out_col.shape), atol=1e-12)

for axis in ("row", "column", "both"):
    for causal in (False, True):
        out, cache = axial.forward(qg[:, :, :30], kg[:, :, :30], vg[:, :, :30], shape=(4, 8), axis=axis, causal=causal)
        ref, _ = full.forward(qg[:, :, :30], kg[:, :, :30], vg[:, :, :30], causal=causal, mask=axial.pattern(cache))
        assert out.shape == (B, H, 30, d) and np.abs(out - ref).max() < 1e-12
print("axial == full masked by its pattern: row, column, both; causal and not")

# %% [markdown]
# ### Gradient check

# %%
qs, ks, vs = (rng.standard_normal((1, 2, 10, 3)) for _ in range(3))
for axis in ("row", "column", "both"):
    errors = check_gradients(axial.forward, axial.backward, {"q": qs, "k": ks, "v": vs},
                             {"causal": True, "shape": (3, 4), "axis": axis, "key_mask": km})
    print(axis, {n_: f"{e:.1e}" for n_, e in errors.items()})
    assert max(errors.values()) < 1e-7

# %% [markdown]
# ### Rows and columns on the grid, and as N × N masks
#
# On the grid the pattern of one query is a cross; flattened in raster order the row is a block on the diagonal and the
# column a set of diagonals $c$ apart — the same shape as the strided Sparse Transformer with $l = c$ (its $A^{(2)}$ *is*
# column attention on a $G \times l$ grid).

# %%
plot_axial_grid(shape=(6, 8), query=(3, 5))
plt.show()
plot_axial_masks(shape=(6, 8), causal=True)
plt.show()
plot_axial_masks(shape=(6, 8), causal=False)
plt.show()

# %% [markdown]
# ### Cost
#
# Each cell touches $r + c - 1$ keys: $O(N\sqrt N)$ score entries on the default near-square grid.

# %%
def axial_entries(n):
    x = np.zeros((1, 1, n, 1))
    _, cache = axial.forward(x, x, x, causal=True)
    return sum(a.p.size for a in cache.union.attends)


entries = {n: axial_entries(n) for n in (256, 1024, 4096, 16384)}
for n, e_n in entries.items():
    print(f"N={n:6d}  grid {default_image_shape(n)}  score entries {e_n:10d}  (N^2 = {n * n:10d})")
e = np.log(entries[16384] / entries[1024]) / np.log(16)
print(f"axial: score entries grow as N^{e:.2f} (survey: {axial.complexity})")
assert e < 1.6
