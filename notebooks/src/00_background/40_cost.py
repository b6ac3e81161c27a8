# %% [markdown]
# ## 4 · The quadratic cost, measured
#
# Forward + backward of one head in float32 with $d = 64$: the CPU time on one BLAS thread (the median of three runs)
# and the peak memory (what `tracemalloc` sees NumPy allocate) against $N$, with the exponent of a least-squares fit on
# log-log axes. Every notebook measures its cost with the same helper, `effattn.tools.bench.cost_table`, which asserts
# a sanity range for each fitted exponent. The survey's complexity is $O(N^2)$; from $N = 512$ on the $N \times N$
# work dominates, so both exponents come out close to 2 (at smaller $N$ the $O(Nd)$ parts still show and pull them
# down). `python -m effattn bench --clock cpu --threads 1` makes the same measurement for every mechanism.

# %%
from effattn.tools.bench import cost_table

ns = [512, 1024, 2048]
rows, exps = cost_table(["full"], ns, expect={"full": (1.6, 2.4)}, expect_memory={"full": (1.7, 2.2)})
fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
axes[0].loglog(ns, [r["time_s"] for r in rows["full"]], "o-")
axes[0].set_title(f"CPU time (s) ~ N^{exps['full']['time']:.2f}")
axes[1].loglog(ns, [r["peak_bytes"] / 2**20 for r in rows["full"]], "o-")
axes[1].set_title(f"peak memory (MiB) ~ N^{exps['full']['memory']:.2f}")
for ax in axes:
    ax.set_xlabel("N"); ax.grid(alpha=0.3, which="both")
plt.tight_layout(); plt.show()
print(f"at N = 2048 the peak holds {rows['full'][-1]['peak_bytes'] / (2048 * 2048 * 4):.1f} N x N float32 matrices")

# %% [markdown]
# **Where the FLOPs go in a Transformer layer.** Per token, the projections $W_q, W_k, W_v, W_o$ cost $8D^2$ flops
# (multiply-add = 2), the feed-forward layer with inner size $4D$ costs $16D^2$, and attention's $QK^\top$ and $PV$ cost
# $4ND$. Attention overtakes the rest only once $4ND > 24D^2$, i.e. $N > 6D$: for BERT-base ($D=768$) that is beyond
# 4,600 tokens — which is why efficient attention matters for long sequences, and why for short inputs the
# feed-forward layers and projections, not attention, dominate the cost of a layer.

# %%
D = 768
for n_ in (512, 4608, 16384):
    proj, ffn, attn = 8 * D * D, 16 * D * D, 4 * n_ * D
    total = proj + ffn + attn
    print(f"N={n_:6d}: projections {proj / total:5.1%}  feed-forward {ffn / total:5.1%}  attention {attn / total:5.1%}")
