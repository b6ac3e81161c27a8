# %% [markdown]
# ## 3 · Reversible blocks
#
# A residual block $y = x + f(x)$ cannot be undone without $x$, so the backward must have stored it — for every
# block, $O(L)$ activations. The reversible block (Gomez et al., 2017) splits the state in two halves and updates
# them in turn:
#
# $$Y_1 = X_1 + F(X_2), \qquad Y_2 = X_2 + G(Y_1) \qquad\Longleftrightarrow\qquad X_2 = Y_2 - G(Y_1), \qquad X_1 = Y_1 - F(X_2).$$
#
# Reformer takes $F$ = the (pre-LN) attention and $G$ = the (pre-LN) feed-forward. The backward walks down the stack
# with $(Y_1, Y_2)$ and $(dY_1, dY_2)$ only: it recomputes $G(Y_1)$ to rebuild $X_2$ and to backpropagate through $G$,
# then $F(X_2)$ likewise:
#
# $$dY_1' = dY_1 + G'(Y_1)^\top dY_2, \qquad dX_2 = dY_2 + F'(X_2)^\top dY_1', \qquad dX_1 = dY_1'.$$
#
# The stack starts from $X_1 = X_2 = x$ and ends with $h = \mathrm{LN}((Y_1 + Y_2)/2)$. No block keeps anything for
# the backward: memory does not grow with the depth.

# %%
show_source(Block.rev_forward)
show_source(Block.rev_backward)

# %% [markdown]
# The reconstructing backward against the same stack with every cache stored (the plain chain rule), float64, and the
# rebuilt input against the real one; then float32, where each block undoes its rounding only approximately:

# %%
for dtype in ("float64", "float32"):
    r = techniques.reconstruction_error(8, n=64, dtype=dtype)
    print(f"{dtype}: 8 blocks, rebuilt input error {r['input_error']:.1e}, "
          f"gradients vs stored {r['grad_error']:.1e} (relative, all parameters together)")
    assert r["grad_error"] < (1e-12 if dtype == "float64" else 1e-4)
depth_err = [techniques.reconstruction_error(L, n=64)["input_error"] for L in (2, 4, 8, 16)]
print("float32 input error against depth 2, 4, 8, 16:", ", ".join(f"{e:.1e}" for e in depth_err))

# %% [markdown]
# ## 4 · Gradient checkpointing
#
# The other way to forget activations: keep only the input of every $k$-th block in the forward, and in the backward
# re-run each segment of $k$ blocks from its saved input before backpropagating through it. Memory
# $\approx (L/k)$ saved inputs $+\ k$ blocks' caches, smallest near $k = \sqrt L$; the price is one more forward.
# The gradients are the plain ones exactly (the same operations, run twice).

# %%
show_source(Stack._checkpoint_backward)

# %%
rows = techniques.depth_table((2, 4, 8, 16))
print(" L   plain MiB   checkpoint (k) MiB   reversible MiB")
for r in rows:
    print(f"{r['layers']:2d}   {r['plain'] / MiB:9.2f}   {r['checkpoint'] / MiB:12.2f} ({r['k']})   "
          f"{r['reversible'] / MiB:14.2f}")
r16, r2 = rows[-1], rows[0]
assert r16["reversible"] <= 1.3 * r2["reversible"]             # reversible: flat in the depth
assert r16["plain"] > 3 * r2["plain"]                         # plain: grows with it
k4 = techniques.stack_memory(16, technique="checkpoint", k=4)
print(f"checkpoint k = 4 of 16 blocks: {k4 / r16['plain']:.2f} of the plain activation memory")
assert k4 <= 0.4 * r16["plain"]
fig, ax = plt.subplots(figsize=(5.5, 3.4))
Ls = [r["layers"] for r in rows]
for key, style in (("plain", "o-"), ("checkpoint", "s-"), ("reversible", "^-")):
    ax.plot(Ls, [r[key] / MiB for r in rows], style, label=key + (" (k = √L)" if key == "checkpoint" else ""))
ax.set(xlabel="blocks L", ylabel="peak memory of forward + backward (MiB)",
       title="N = 256, D = 64, batch 2, float32")
ax.legend(); ax.grid(alpha=0.3); plt.tight_layout(); plt.show()
