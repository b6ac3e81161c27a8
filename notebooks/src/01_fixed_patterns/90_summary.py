# %% [markdown]
# ## Cost: time and memory against N, next to full attention
#
# Forward + backward of one head ($B = H = 1$), float32, $d = 64$, at $N$ = 1024, 2048, 4096, with each mechanism's
# default configuration from its `setup` (`local`: $b = 128$, `look_back = 1`; `image_local_1d`: $l_q = l_m = 128$;
# `image_local_2d`: $8 \times 8$ query blocks, flange $(4, 4)$; `memory_compressed`: $k = 8$; the Sparse Transformer and
# axial choose $\sqrt N$-sized strides and grids). Time is CPU time on one BLAS thread, the median of three runs
# (`effattn.tools.bench.cost_table`, the one measuring helper of every notebook): other users of a shared machine barely
# move it, and one thread keeps BLAS threads from fighting over cores in the many small block products. Peak memory is
# what `tracemalloc` sees NumPy allocate during forward + backward. The exponent is the slope of a least-squares line
# on log-log axes; each has an asserted sanity range (wide enough for a busy machine, narrow enough to catch a wrong
# complexity; a time exponent outside its range is measured again, keeping each point's smallest time, since a busy
# machine only ever adds time). `python -m effattn bench --clock cpu --threads 1` runs the same measurement up to $N = 16384$.

# %%
from effattn.tools.bench import cost_table

ns = [1024, 2048, 4096]
names_fp = ["full"] + [n_ for n_ in effattn.names() if effattn.get(n_).notebook == "01_fixed_patterns"
                       and effattn.get(n_).kind == "kernel"]
blockwise_names = ("local", "image_local_1d", "image_local_2d")
expect = {"full": (1.4, 2.4), "memory_compressed": (1.0, 2.2), "axial": (0.8, 1.8), "sparse_strided": (0.8, 1.8),
          "sparse_fixed": (0.8, 1.8), **{n_: (0.6, 1.35) for n_ in blockwise_names}}
expect_memory = {"full": (1.6, 2.2), **{n_: (0.8, 1.2) for n_ in blockwise_names}}
rows, exps = cost_table(names_fp, ns, expect={n_: r for n_, r in expect.items() if n_ in names_fp},
                        expect_memory={n_: r for n_, r in expect_memory.items() if n_ in names_fp})

fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for (name, rs), marker in zip(rows.items(), "os^v<>Dph"):
    style = dict(color="k", lw=2.2) if name == "full" else dict(lw=1.2)
    axes[0].loglog(ns, [r["time_s"] for r in rs], marker=marker, ms=4, label=name, **style)
    axes[1].loglog(ns, [r["peak_bytes"] / 2**20 for r in rs], marker=marker, ms=4, label=name, **style)
axes[0].set_ylabel("forward + backward CPU time (s)"); axes[1].set_ylabel("peak memory (MiB)")
for ax in axes:
    ax.set_xlabel("sequence length N"); ax.grid(True, which="both", alpha=0.3)
axes[1].legend(fontsize=7, loc="upper left")
plt.tight_layout(); plt.show()
summary = {name: (e["time"], e["memory"], rows["full"][-1]["time_s"] / rows[name][-1]["time_s"],
                  rows["full"][-1]["peak_bytes"] / rows[name][-1]["peak_bytes"]) for name, e in exps.items()}

# %% [markdown]
# The memory exponents are the honest check of the complexity column: `full` approaches 2 (its $N \times N$ matrices
# dominate); the blockwise patterns (`local`, `image_local_1d`, `image_local_2d`) stay at 1 — their blocks have a fixed
# size. At these sizes the $\sqrt N$ patterns (Sparse Transformer, axial) also measure close to 1: their $N\sqrt N$
# score entries (counted exactly in their sections, growing as $N^{1.5}$) are still no larger than the $O(N d)$ inputs,
# windows and gradients with $d = 64 = \sqrt{4096}$. Memory-compressed attention is quadratic with a constant $k$ times
# smaller than full attention's; its exponent climbs towards 2 as $N/k$ outgrows $d$.

# %%
for name in blockwise_names:
    if name in summary:
        assert summary[name][3] > 3, (name, summary[name])       # already several times less memory than full at 4096
if "memory_compressed" in summary:
    assert summary["memory_compressed"][3] > 2

# %% [markdown]
# ## Summary
#
# * **Fixed patterns** decide from positions alone which scores to compute. Because the pattern is known in advance it
#   can be laid out as dense regular pieces — blocks, windows, strides, grid axes — and computed with batched matrix
#   products, without ever building the $N \times N$ matrix. Each exact mechanism here equals full attention masked by
#   its pattern, to rounding.
# * **Blockwise local attention** (`local`) is the simplest: $O(N b)$ and exact, but information moves only one block
#   per layer.
# * **The Image Transformer** gives each *query block* a larger shared *memory block*: 1-D along the raster order,
#   2-D as a rectangle with flanges above and to the sides — a better neighbourhood for images at the same cost.
# * **Memory-compressed attention** keeps global reach by attending to $N/k$ learned summaries; it is an
#   approximation, still quadratic, and the paper interleaves it with local layers.
# * **Strided and axial patterns** (Sparse Transformer, axial attention, earlier in this notebook) reach every
#   position in two hops at $O(N\sqrt N)$.
# * The cost curves show what the complexity column promises: linear memory for the blockwise patterns, $N^{1.5}$ score
#   entries for the factorized ones (hidden behind the $O(Nd)$ terms at these sizes), $N^2/k$ for compressed memory.
#
# ## Exercises
#
# 1. Set `look_back=0` in `local` and stack a few layers' patterns (`local.build_pattern` as boolean matrices, multiplied
#    as in the receptive-field section): how many layers until the last query reaches position 0? Repeat with `look_back=1`.
# 2. With `image_local_2d`, take `query_shape=(1, W)` and `memory_flange=(0, 0)` on an $H \times W$ image. Which 1-D
#    mechanism do you get? Check it numerically against `image_local_1d` (the tests do this).
# 3. For the same number of keys per query, compare what a 1-D memory ($l_m$) and a 2-D memory (flange $h_m, w_m$)
#    cover on a $32 \times 32$ image: draw both with `draw_image_block`. Which one sees the pixel directly above the
#    first query of a block?
# 4. In `memory_compressed`, make the first $k - 1$ queries of a causal call see *something*: add a "null" key/value
#    slot as lucidrains does (a learned $k_0$, $v_0$ always visible). Which equations and which gradients change?
# 5. Replace `conv_v` (one weight per offset) by a full $(k, d_v, d_v)$ convolution in a copy of the module. Show that
#    `out == weights(cache) @ v` can no longer hold for any single $N \times N$ matrix, and that it does again when
#    $A_o = w_o A$ for a shared $A$ (fold $A$ into the output projection).
# 6. Measure `local` with $b$ = 32, 64, 128, 256 at $N$ = 4096: where is the optimum on this machine, and why does a
#    tiny $b$ lose even though it computes fewer scores?
