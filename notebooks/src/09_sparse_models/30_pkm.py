# %% [markdown]
# ## 5 · The Product Key Memory
#
# A memory of K value rows read by a nearest-key search costs O(K d) per token — as much as attending over all K.
# PKM gives the keys a product structure: key (a, b) is the concatenation of sub-key $c_a$ from one codebook of
# $\sqrt K$ and $c'_b$ from another, so for a query split in halves $q = [q_1; q_2]$
#
# $$\langle q, [c_a; c'_b]\rangle = \langle q_1, c_a\rangle + \langle q_2, c'_b\rangle ,$$
#
# and the k best of the K product keys lie among the $k \times k$ pairs of the k best sub-keys of each half (a pair
# in the overall top-k has fewer than k pairs above it, so neither of its halves can have k better sub-keys). The
# search costs $O(\sqrt K\, d + k^2)$; the k chosen slots get softmax weights and the output is their weighted sum
# of value rows (an embedding bag). The backward touches only the chosen value rows and sub-keys.

# %%
show_source(pkm._search)

# %%
(path,) = pkm_figures("/tmp/effattn_pkm", np.random.default_rng(0))
plt.figure(figsize=(8, 8))
plt.imshow(plt.imread(path))
plt.axis("off")
plt.show()

# %% [markdown]
# The white squares are the $k^2$ candidates (the rows of the first half's top-k crossed with the columns of the
# second's), the stars the k slots finally read, with their weights. The exhaustive search over all K keys
# (`pkm.loop`, the registry's reference) picks the same slots, so the outputs agree:

# %%
mem = effattn.get("pkm")
case = mem.example(np.random.default_rng(1), batch=2, heads=2, n=10, d=4)
y_pkm = mem.forward(**case.inputs, **case.config)[0]
print("product search vs exhaustive:", np.abs(y_pkm - pkm.loop(**case.inputs, **case.config)).max())

# %% [markdown]
# ## 6 · Parameters against FLOPs per token
#
# Counted, for d_model = 512 and d_ff = 2048 (the layers' own formulas, `sparse_models.costs`): Switch holds 8
# times the dense FFN's parameters for the same multiply-adds (plus the router's D E); PKM holds the most and
# costs the least; reading the same K = 65536 values densely would cost 24 times the FFN.

# %%
for r in sparse_models.costs():
    print(f"{r['name']:32s} params {r['params'] / 1e6:6.1f} M   multiply-adds/token {r['flops'] / 1e6:6.2f} M")

# %% [markdown]
# Measured (forward + backward, float32, one thread, CPU clock; a smaller size than the report's so the notebook
# stays quick): the Switch layer against the dense FFN of one expert's size on the same tokens, and PKM against full
# attention of the same queries over the same K values. The report's numbers: `python -m effattn.tools.sparse_models`.

# %%
s = sparse_models.time_switch(2048, d_model=128, d_ff=512, repeats=3)
m = sparse_models.time_pkm(512, keys=65536, repeats=2)
print(f"Switch E=8 top-1 / dense FFN: {s['ratio']:.2f}x the time for {s['params_ratio']:.1f}x the parameters")
print(f"full attention over K=65536 values / PKM: {m['ratio']:.1f}x")
