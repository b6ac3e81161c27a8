# %% [markdown]
# ## Image Transformer: 1-D and 2-D local attention
#
# *Image Transformer* — Parmar, Vaswani, Uszkoreit, Kaiser, Shazeer, Ku, Tran, 2018
# ([arXiv 1802.05751](https://arxiv.org/abs/1802.05751)), Section 3.2 and Figure 2. Code:
# `effattn/attention/image_local_1d.py` and `effattn/attention/image_local_2d.py` (registered as `image_local_1d` and
# `image_local_2d`), the image layouts in `effattn/nn/image.py`. Survey: FP, $O(N \cdot m)$.
#
# **Intuition.** A $32 \times 32 \times 3$ image is a sequence of 3,072 intensities — far too long for full attention in
# 2018 — but a pixel depends mostly on its neighbourhood. The paper cuts the *queries* into non-overlapping blocks and
# gives every query block one shared, larger *memory block* that contains it. All queries of a block attend to the same
# memory, so each block is one small dense attention problem: cost $O(N m)$ for memories of $m$ positions.
#
# **1-D local attention** (raster order): query blocks of $l_q$ positions; the memory of block $g$ is the block and the
# $l_m$ positions before it:
#
# $$\mathcal M_{1D}(g) = \{\, j : g\,l_q - l_m \le j < (g+1)\,l_q \,\}$$
#
# **2-D local attention**: query blocks of $h_q \times w_q$ pixels; the memory extends the block $h_m$ rows up and $w_m$
# columns left and right (the "memory flange"):
#
# $$\mathcal M_{2D}(R, C) = [R h_q - h_m,\ (R+1) h_q) \times [C w_q - w_m,\ (C+1) w_q + w_m)$$
#
# **Masked (generation) versions**, `causal=True`: a query at raster position $i$ sees a memory position $j$ only if
# $j \le i$. Unmasked, the same memory is used whole.
#
# **How it runs.** 1-D is the blockwise window of the previous section with a window of $l_m$ *positions* before
# the block (not whole blocks). 2-D is separable: one window copy along the rows (block $h_q$, $h_m$ rows before), one
# along the columns (block $w_q$, $w_m$ on both sides), then a transpose puts each memory rectangle together —
# reshapes and basic slices only (`effattn/nn/image.py`).
#
# **Conventions.** tensor2tensor `masked_local_attention_2d(query_shape=(h_q, w_q), memory_flange=(h_m, w_m))` uses the
# same names. Its *unmasked* `local_attention_2d` also extends the memory $h_m$ rows below; ours keeps the paper's
# memory and only drops the raster mask. `masked_local_attention_1d(block_length=b)` is our 1-D with $l_q = l_m = b$.
# Channels: the paper's positions are channel intensities; this kernel works on raster positions of an `image_shape`
# grid, so pass `image_shape=(H, W*3)` to fold channels into the width as the paper's 2-D models do. Any $N$ works:
# the last image row may be incomplete ($(H-1)W < N \le HW$); `setup` uses a near-square shape.

# %%
from effattn.attention import image_local_2d as il2_mod

show_source(il2_mod.forward, "qb = query_blocks_2d", "out = query_blocks_2d_backward")  # 1-D: blockwise_forward

# %%
from effattn.attention import image_local_1d as il1_mod
from effattn.attention import image_local_2d as il2_mod
from effattn.nn.image import positions_2d
from effattn.nn.loops import masked_loop

il1, il2 = effattn.get("image_local_1d"), effattn.get("image_local_2d")
rng = np.random.default_rng(2)
B, H, d = 2, 2, 16
img = (10, 12)
N = img[0] * img[1] - 5                                    # ragged last row: 5 cells absent
q, k, v = (rng.standard_normal((B, H, N, d)) for _ in range(3))
configs = [(il1, {"block_length": 12, "memory_length": 18}),
           (il2, {"image_shape": img, "query_shape": (4, 4), "memory_flange": (3, 2)})]
for spec, cfg in configs:
    for causal in (False, True):
        out, cache = spec.forward(q, k, v, causal=causal, **cfg)
        mask = spec.pattern(cache)
        ref, _ = full.forward(q, k, v, causal=causal, mask=mask)
        err = np.abs(out - ref).max()
        print(f"{spec.name:15s} causal={causal!s:5s} out {out.shape}  block scores {cache.attend.p.shape}  "
              f"max|fast - full[pattern]| = {err:.1e}")
        assert out.shape == (B, H, N, d) and err < 1e-12

# %% [markdown]
# The 2-D rule written for one pair of pixels, looped over every query (`effattn.nn.loops.masked_loop`, the per-query
# loop the modules' `loop` functions share), agrees with the fast path; so does the module's own `loop`:

# %%
def rule_2d(i, j, w=img[1], qs=(4, 4), fl=(3, 2)):
    (r, c), (rj, cj) = divmod(i, w), divmod(j, w)
    top, left = r // qs[0] * qs[0], c // qs[1] * qs[1]
    return top - fl[0] <= rj < top + qs[0] and left - fl[1] <= cj < left + qs[1] + fl[1] and j <= i


out, _ = il2.forward(q, k, v, causal=True, **configs[1][1])
ref = masked_loop(q[0, 0], k[0, 0], v[0, 0], allowed=rule_2d)
ref_mod = il2_mod.loop(q[0, 0], k[0, 0], v[0, 0], causal=True, **configs[1][1])
print("max |fast - loop| =", np.abs(out[0, 0] - ref).max(), " max |fast - il2.loop| =", np.abs(out[0, 0] - ref_mod).max())
assert np.allclose(out[0, 0], ref, atol=1e-12) and np.allclose(out[0, 0], ref_mod, atol=1e-12)

# %% [markdown]
# ### Gradient check (central finite differences, float64)

# %%
qs_, ks_, vs_ = (rng.standard_normal((1, 2, 14, 3)) for _ in range(3))
kms = np.ones((1, 1, 14), bool); kms[..., 6] = False
for spec, cfg in ((il1, {"block_length": 4, "memory_length": 5}),
                  (il2, {"image_shape": (3, 5), "query_shape": (2, 3), "memory_flange": (1, 2)})):
    errors = check_gradients(spec.forward, spec.backward, {"q": qs_, "k": ks_, "v": vs_},
                             {"causal": True, "key_mask": kms, **cfg})
    print(f"{spec.name:15s}", {n_: f"{e:.1e}" for n_, e in errors.items()})
    assert max(errors.values()) < 1e-7

# %% [markdown]
# ### One query block and its memory, on the pixel grid
#
# Dark: the queries; light: the memory they attend to. Top: 1-D local attention on an $8 \times 12$ image with
# $l_q = 12$ (one image row) and $l_m = 18$; bottom: 2-D with $4 \times 4$ query blocks and flange $(3, 2)$ — the
# unmasked memory of a whole block, then what the first and the last query of the block see in the masked version.

# %%
from effattn.figures.fixed_patterns import draw_image_block

h_, w_ = 8, 12
n1 = h_ * w_
p1 = il1_mod.build_pattern(n1, block_length=12, memory_length=18, xp=np)
p1m = il1_mod.build_pattern(n1, block_length=12, memory_length=18, causal=True, xp=np)
block = np.arange(48, 60)
fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
draw_image_block(axes[0], (h_, w_), block, np.flatnonzero(p1[48]), n1, "1-D, unmasked: block + memory")
draw_image_block(axes[1], (h_, w_), [48], np.flatnonzero(p1m[48]), n1, "1-D, masked: first query")
draw_image_block(axes[2], (h_, w_), [59], np.flatnonzero(p1m[59]), n1, "1-D, masked: last query")
plt.tight_layout(); plt.show()

shape2, qs2, fl2 = (12, 16), (4, 4), (3, 2)
n2 = shape2[0] * shape2[1]
qpos, kpos = positions_2d(np, n2, shape2, qs2, fl2)
g = 1 * 4 + 2                                              # block row 1, block column 2
p2m = il2_mod.build_pattern(n2, image_shape=shape2, query_shape=qs2, memory_flange=fl2, causal=True, xp=np)
fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
draw_image_block(axes[0], shape2, qpos[g], kpos[g], n2, f"2-D, unmasked: query {qs2}, flange {fl2}")
for ax, i in zip(axes[1:], (qpos[g][0], qpos[g][-1])):
    draw_image_block(ax, shape2, [i], np.flatnonzero(p2m[i]), n2, f"2-D, masked: query at {divmod(int(i), shape2[1])}")
plt.tight_layout(); plt.show()

# %% [markdown]
# The same rules as $N \times N$ matrices (raster order). 1-D is a band of blocks like `local`, but the memory starts
# $l_m$ positions back, not on a block border. 2-D is a set of short bands: one per image row in the memory rectangle.

# %%
n3, shape3 = 60, (6, 10)
cfg3 = {"image_shape": shape3, "query_shape": (2, 5), "memory_flange": (2, 2), "xp": np}
plot_patterns([il1_mod.build_pattern(n3, block_length=10, memory_length=15, causal=True, xp=np),
               il2_mod.build_pattern(n3, **cfg3), il2_mod.build_pattern(n3, causal=True, **cfg3)],
              ["1-D, l_q=10, l_m=15, masked", "2-D, 6x10 image, query (2, 5), flange (2, 2)", "2-D, masked"],
              suptitle="Image Transformer local attention: the patterns", ncols=3)
plt.show()

# %% [markdown]
# **Memory sizes.** 1-D: $l_q$ queries share $l_q + l_m$ keys. 2-D: $h_q w_q$ queries share
# $(h_q + h_m)(w_q + 2 w_m)$ keys. Per query, 2-D reaches the pixels directly above it with a small memory, where a
# 1-D memory must span $W$ positions to see even one row up: for images, the 2-D shape spends the same budget of keys
# on a more useful neighbourhood.
