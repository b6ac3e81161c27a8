# %% [markdown]
# ## Receptive fields: what stacking sparse layers reaches
#
# A sparse layer drops most edges of the attention graph; what matters for modelling is which positions can still
# influence a query after a few layers. If layer $t$ has pattern $A_t$ (a boolean $N \times N$ matrix), query $i$
# reaches key $j$ after layers $1..t$ iff there is a path $i \to k \to \dots \to j$ of allowed edges:
#
# $$R_1 = A_1, \qquad R_t = A_t\, R_{t-1} \quad\text{(boolean matrix product)}.$$
#
# `receptive_field(A_1, A_2, ...)` (in `effattn/nn/factorized.py`) computes this (dense, for teaching). Claim of the Sparse Transformer paper: with
# $A^{(1)}$ (local) then $A^{(2)}$ (strided), two layers already reach every earlier position.

# %%
from effattn.figures.fixed_patterns import plot_sparse_receptive_field
from effattn.nn.factorized import receptive_field

n, l = 64, 8
a1 = ss_mod.build_pattern(n, stride=l, causal=True, part=1)
a2 = ss_mod.build_pattern(n, stride=l, causal=True, part=2)
tril = np.tril(np.ones((n, n), bool))
for name, mats in (("A1 alone", [a1]), ("A2 alone", [a2]), ("A1 then A1", [a1, a1]),
                   ("A1 then A2", [a1, a2]), ("merged once", [a1 | a2])):
    reach = receptive_field(*mats)
    print(f"{name:12s}: query {n - 1} reaches {reach[-1].sum():2d} of {n} positions; reaches all earlier keys: "
          f"{np.array_equal(reach, tril)}")
assert np.array_equal(receptive_field(a1, a2), tril)

# %%
plot_sparse_receptive_field(n=64, stride=8)
plt.show()

# %% [markdown]
# After one layer a query sees about $2\sqrt N$ keys; after two, every earlier key. A purely local layer of width $l$
# would need $N/l$ layers for the same reach. The fixed pattern gets there too (own block → summary cell → that cell's
# block), and axial attention does it with row then column:

# %%
def reach_counts(layers, n):
    return [int(receptive_field(*layers[:t])[-1].sum()) for t in range(1, len(layers) + 1)]


f = sf_mod.build_pattern(n, block=l, summary=2, causal=True)
row = axial_mod.build_pattern(n, shape=(8, 8), axis="row", causal=True)
col = axial_mod.build_pattern(n, shape=(8, 8), axis="column", causal=True)
print("last query reaches, after 1, 2, 3, 4 layers:")
print("  local only (A1)        ", reach_counts([a1] * 4, n))
print("  strided A1, A2, A1, A2 ", reach_counts([a1, a2, a1, a2], n))
print("  fixed merged           ", reach_counts([f] * 4, n))
print("  axial row, column, ... ", reach_counts([row, col, row, col], n))
assert np.array_equal(receptive_field(f, f), tril)
rc = receptive_field(row, col)        # causal row, then causal column
missed = tril & ~rc
print("causal axial row then column misses", missed.sum(), "of", tril.sum(), "earlier (query, key) pairs")
assert missed.any() and np.array_equal(receptive_field(axial_mod.build_pattern(n, shape=(8, 8), axis="row"),
                                                       axial_mod.build_pattern(n, shape=(8, 8), axis="column")),
                                       np.ones((n, n), bool))

mid = n // 2 + 3
fig, axes = plt.subplots(1, 4, figsize=(13, 3.2))
for a_, (title, layers) in zip(axes, (("local A1 only", [a1, a1]), ("strided A1 then A2", [a1, a2]),
                                      ("fixed merged twice", [f, f]), ("axial row then column", [row, col]))):
    one = receptive_field(*layers[:1])[mid].reshape(8, 8).astype(int)
    two = receptive_field(*layers)[mid].reshape(8, 8).astype(int)
    a_.imshow(one + two, cmap="Blues", vmin=0, vmax=2)
    a_.set_title(f"{title}\n(dark: 1 layer, light: +2nd layer)", fontsize=9)
    a_.text(mid % 8, mid // 8, "q", ha="center", va="center", color="red")
    a_.set_xticks([]); a_.set_yticks([])
fig.suptitle(f"Receptive field of query {mid} (N = 64 drawn as an 8 x 8 grid, causal)")
plt.show()

# %% [markdown]
# Note the axial panel: with *masked* (causal) row and column attention, the query misses the cells above and to its
# right — they are earlier in raster order, but neither its row prefix nor the column above leads to them. The paper's
# Axial Transformer closes this gap with an extra, *unmasked* row attention over the rows above (its "outer decoder",
# whose output is shifted down one row), so every earlier pixel is reached; bidirectional row-then-column reaches
# everything in two layers (asserted above).
#
# **Exercises.** (1) Change `l` so it is far from $\sqrt N$ and count the score entries: where is the minimum of
# $N(2l + N/l)$? (2) With `combine="layers"`, which order — $A^{(2)}$ then $A^{(1)}$ — also covers everything?
# (3) Build a bidirectional axial pattern on a 3-D grid `shape=(4, 4, 4)` and find how many layers reach all cells.
