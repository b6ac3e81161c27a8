# %% [markdown]
# ## 5 · Cost against N, next to full attention
#
# Forward + backward of one head ($B = H = 1$), float32, $d = 64$, each mechanism with its default configuration
# from `setup` for that $N$ (Longformer: $w = 64$, 2 global positions; ETC: $n_g = 16$, $r = 64$, $k = 16$; BigBird:
# $b = 32$, $g = 2$, $r = 3$ — constant in $N$ from $N = 1024$, so the growth is the mechanism's, not the
# configuration's). Time is the process's CPU time on one BLAS thread, the median of three runs
# (`effattn.tools.bench.cost_table`, the one measuring helper of every notebook); peak memory is what `tracemalloc`
# sees NumPy allocate. The exponent is the slope of a least-squares line on log-log axes, and each has an asserted
# sanity range: wide enough for a busy two-core machine, narrow enough that full attention measured as $N^{0.5}$, or a
# linear mechanism measured as $N^{1.5}$, fails the cell. `python -m effattn bench --clock cpu --threads 1` measures up
# to $N = 16384$.

# %%
from effattn.tools.bench import cost_table

ns = [1024, 2048, 4096]
names_cp = ["full", "longformer", "etc", "bigbird"]
linear_time, linear_memory = (0.6, 1.35), (0.7, 1.25)
rows, exps = cost_table(names_cp, ns, expect={"full": (1.4, 2.6), **{n_: linear_time for n_ in names_cp[1:]}},
                        expect_memory={"full": (1.6, 2.2), **{n_: linear_memory for n_ in names_cp[1:]}})
fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
for (name, rs), marker in zip(rows.items(), "osd^"):
    style = dict(color="k", lw=2.2) if name == "full" else dict(lw=1.2)
    axes[0].loglog(ns, [r_["time_s"] for r_ in rs], marker=marker, ms=4, label=f"{name} ~N^{exps[name]['time']:.2f}", **style)
    axes[1].loglog(ns, [r_["peak_bytes"] / 2**20 for r_ in rs], marker=marker, ms=4,
                   label=f"{name} ~N^{exps[name]['memory']:.2f}", **style)
axes[0].set_ylabel("forward + backward CPU time (s)"); axes[1].set_ylabel("peak memory (MiB)")
for ax in axes:
    ax.set_xlabel("sequence length N"); ax.grid(True, which="both", alpha=0.3); ax.legend(fontsize=7, loc="upper left")
plt.tight_layout(); plt.show()

# %% [markdown]
# Full attention's time and memory grow close to $N^2$; the three models here grow linearly in both, as the survey's
# complexities promise for a fixed window, number of global tokens and random blocks. At $N = 4096$ they already need
# a fraction of full attention's time and memory (the last two columns of the table), and that fraction roughly halves
# with every doubling of $N$.

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
# * In the survey's taxonomy all three are **FP + M**: a fixed pattern plus global tokens as a memory.
# * All three are exact, $O(N)$ in memory for fixed window / global / random sizes, and the global tokens turn a
#   path-like receptive field (diameter $\sim N/w$) into a two-hop one.
# * The code beside each rule: the band rule and the global rows of Longformer, the relative bias and the four pieces
#   of ETC, BigBird's key-block slots — and, in *Your turn*, a window + global-token kernel you wrote yourself (its
#   mask checked against `longformer.build_pattern`, its output against `full` masked by that pattern, with a hidden
#   worked answer).
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
