# %% [markdown]
# ## 2 · The chunked feed-forward
#
# The feed-forward acts on each position alone, $\mathrm{FFN}(x) = \mathrm{GELU}(x W_1 + b_1) W_2 + b_2$ with a hidden
# width $d_{ff} = 4D$: its hidden activations, $(N, d_{ff})$ per sequence, are the largest arrays of a block once
# attention is efficient. Since row $i$ of the output needs only row $i$ of the input, the rows can go through the MLP
# $c$ at a time; the backward recomputes each chunk's hidden activations from the saved input and backpropagates
# through them at once. Same result (the sums over rows of $dW$ are only split differently), memory
# $O(c\, d_{ff})$ instead of $O(N d_{ff})$.

# %%
show_source(FeedForward._chunked_forward)
show_source(FeedForward._chunked_backward)

# %%
rng = np.random.default_rng(0)
x, dy = rng.standard_normal((2, 50, 16)), rng.standard_normal((2, 50, 16))
outs = {}
for chunk in (None, 7):
    ff = FeedForward(16, 64, np.random.default_rng(1), chunk=chunk)
    ff.zero_grad()
    outs[chunk] = (ff.forward(x), ff.backward(dy), dict(ff.gradients()))
(y0, dx0, g0), (y1, dx1, g1) = outs[None], outs[7]
err = max(np.abs(y1 - y0).max(), np.abs(dx1 - dx0).max(), *(np.abs(g1[k] - g0[k]).max() for k in g0))
print(f"chunks of 7 rows against one pass: max difference of y, dx, dW, db = {err:.1e}")
assert err < 1e-12

# %% [markdown]
# Working memory against the chunk size, N = 16384 positions, D = 64, d_ff = 256, float32 (the peak less the input
# gradient and the output, which every version returns):

# %%
table = techniques.chunk_table(16384, chunks=(None, 4096, 1024, 256, 128, 32))
whole = table[0]["working"]
for r in table:
    print(f"chunk {str(r['chunk'] or 'none'):>5s}: working memory {r['working'] / MiB:7.2f} MiB  "
          f"({r['working'] / whole:.3f} of the whole FFN)")
c128 = next(r for r in table if r["chunk"] == 128)
assert c128["working"] <= whole / 20                           # the target: at most 1/20
fig, ax = plt.subplots(figsize=(5, 3.2))
cs = [r["chunk"] for r in table[1:]]
ax.loglog(cs, [r["working"] / MiB for r in table[1:]], "o-", label="by chunks")
ax.axhline(whole / MiB, color="k", ls="--", label="one pass")
ax.set(xlabel="chunk c (positions)", ylabel="working memory (MiB)", title="chunked FFN, N = 16384")
ax.legend(); ax.grid(alpha=0.3, which="both"); plt.tight_layout(); plt.show()
