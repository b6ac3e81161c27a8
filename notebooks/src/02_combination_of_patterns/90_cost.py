# %% [markdown]
# ## 5 · Cost against N, next to full attention
#
# Forward + backward of one head ($B = H = 1$), float32, $d = 64$, each mechanism with its default configuration
# from `setup` for that $N$ (Longformer: $w = 64$, 2 global positions; ETC: $n_g = 16$, $r = 64$, $k = 16$; BigBird:
# $b = 32$, $g = 2$, $r = 3$ — constant in $N$ from $N = 1024$, so the growth is the mechanism's, not the
# configuration's). Peak memory is what `tracemalloc` sees NumPy allocate; the exponent is the slope of a
# least-squares fit on log-log axes. Time on a shared machine is noisy (one run per point, to keep the notebook quick);
# the memory is deterministic. `python -m effattn bench` measures up to $N = 16384$.

# %%
from effattn.tools.bench import fit_exponent, measure

ns = [1024, 2048, 4096]
names_cp = ["full", "longformer", "etc", "bigbird"]
rows = {name: [measure(effattn.get(name), n_, d=64, repeats=1) for n_ in ns] for name in names_cp}
fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
for name, rs in rows.items():
    style = dict(color="k", lw=2.2) if name == "full" else dict(lw=1.2)
    axes[0].loglog(ns, [r_["time_s"] for r_ in rs], "o-", ms=3, label=name, **style)
    axes[1].loglog(ns, [r_["peak_bytes"] / 2**20 for r_ in rs], "o-", ms=3, label=name, **style)
axes[0].set_ylabel("forward + backward time (s)"); axes[1].set_ylabel("peak memory (MiB)")
for ax in axes:
    ax.set_xlabel("sequence length N"); ax.grid(True, which="both", alpha=0.3)
axes[1].legend(fontsize=8)
plt.tight_layout(); plt.show()
print(f"{'mechanism':11s} {'survey':18s} {'time exp':>8s} {'memory exp':>10s} {'memory vs full at N=4096':>25s}")
for name, rs in rows.items():
    te = fit_exponent(ns, [r_["time_s"] for r_ in rs])
    me = fit_exponent(ns, [r_["peak_bytes"] for r_ in rs])
    ratio = rows["full"][-1]["peak_bytes"] / rs[-1]["peak_bytes"]
    print(f"{name:11s} {effattn.get(name).complexity:18s} {te:8.2f} {me:10.2f} {ratio:24.1f}x")
    if name != "full":
        assert me < 1.3, (name, me)      # linear memory

# %% [markdown]
# ## Summary
#
# * **Longformer** = dilated sliding window (per head) + symmetric global attention on task-chosen positions, with
#   separate global projections feeding only the global rows (HuggingFace's convention). It can decode
#   (`causal=True`: the band looks back, global tokens summarise their prefix).
# * **ETC** = a separate global input beside the long input; four pieces g2g, g2l, l2g (full) and l2l (local), learned
#   relative position embeddings on the distance-labelled pieces, optional hard segment masks. Encoder only.
# * **BigBird** = window + global + random blocks; the random layout is an explicit, per-head argument (and
#   HuggingFace's `rand_attn` maps onto it). Encoder only.
# * All three are exact, $O(N)$ in memory for fixed window / global / random sizes, and the global tokens turn a
#   path-like receptive field (diameter $\sim N/w$) into a two-hop one.
#
# ## Exercises
#
# 1. Longformer: with `w = 2` and `dilation = (1, 3)` on two heads, after how many layers does token 0 hear from
#    token 40 if the heads are combined (union of the two patterns)? Check with `hops` on the union.
# 2. Pass `q_global = q, k_global = k, v_global = v` explicitly: show that the result equals the default
#    (no separate projections), then perturb `k_global` and see which rows move.
# 3. ETC: set `max_distance` to 1 and then to `radius`; how do the weights of the l2l band change? Which rows of
#    `rel_emb` receive gradient when `max_distance > radius`?
# 4. BigBird: draw layouts with `r = 0, 1, 3` and `g = 0`; plot the diameter of the block graph against $n_b$ and
#    fit $a + b \log n_b$.
# 5. BigBird vs Longformer at equal cost: choose $b, g, r$ and $w$ so that both attend ~256 keys per query at
#    $N = 4096$, and compare their measured time and their diameters.
