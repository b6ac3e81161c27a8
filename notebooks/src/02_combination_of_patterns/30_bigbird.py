# %% [markdown]
# ## 3 · BigBird: window + global + random blocks
#
# BigBird works on blocks of $b$ tokens. Query block $c$ attends to
#
# * the **window**: blocks $c-1, c, c+1$;
# * the **global** blocks: in BigBird-ITC the first $g$ existing blocks are made global — they attend everywhere and
#   everyone attends to them (BigBird-ETC instead prepends extra global tokens: see ETC above);
# * $r$ **random** blocks, a new draw for every query block and every head.
#
# Cost $O(N b (3 + g + r))$ = $O(N)$ for fixed $b, g, r$. The random layout is an explicit argument
# (`random_blocks`, $(n_b, r)$ shared or $(H, n_b, r)$ per head, $-1$ = none) drawn by `draw_random_blocks(rng, ...)`,
# which excludes the window and the global blocks. HuggingFace makes the first **and last** block global and draws
# `rand_attn` $(H, n_b - 2, r)$ (row $i-1$ = query block $i$) with `_bigbird_block_rand_mask`;
# `from_huggingface(rand_attn, n_blocks)` maps it to `random_blocks` and `global_blocks=(0, n_b - 1)`, so a user can
# replay HuggingFace's exact layout. A block listed twice (say a random block equal to a window block) counts once.
#
# **No decoding:** global blocks read everything and random blocks point into the future; the paper's BigBird is
# an encoder, so `causal=True` raises.
#
# **The code** (`effattn/attention/bigbird.py`). `block_slots` lists, for every query block $c$, its key blocks
# `kblk` = [the $g$ globals, $c-1, c, c+1$, the $r$ random ones] and which of them count (`valid`: inside the sequence,
# not a global block again, a random block outside the window and not repeated). In `forward`, `keys(x)` gathers those
# blocks of K and V into one `(..., n_b, (g+3+r) b, d)` array per query block, and one batched `attend_forward` is the
# softmax over them; the rows of the global blocks (`is_gq`) are left to a dense `global_rows_forward`, as in Longformer.

# %%
bb = effattn.get("bigbird")
from effattn.attention import bigbird as bb_mod

show_source(bb_mod.block_slots, "c = xp.arange(nb)", "valid = xp.concatenate")
show_source(bb_mod.forward, "def keys(x):", "ob, _, band_cache = attend_forward")

# %%

rng = np.random.default_rng(3)
N, b, g, r, H = 64, 4, 1, 2, 3
nb = N // b
layout = bb_mod.draw_random_blocks(rng, nb, r, g, heads=H)     # (H, n_b, r), host NumPy
print("random blocks of head 0, query blocks 0..5:\n", layout[0, :6])
q, k, v = (rng.standard_normal((2, H, N, 8)) for _ in range(3))
out, cache = bb.forward(q, k, v, block=b, random_blocks=layout, global_blocks=g)
ref, _ = effattn.get("full").forward(q, k, v, mask=bb.pattern(cache))
print("max |block-sparse - full masked by the layout| =", np.abs(out - ref).max())
assert np.abs(out - ref).max() < 1e-12 and np.allclose(bb.weights(cache) @ v, out)

# %%
none = -np.ones((nb, r), int)
parts = [bb_mod.build_pattern(N, block=b, random_blocks=none, global_blocks=0),
         bb_mod.build_pattern(N, block=b, random_blocks=none, global_blocks=g), bb.pattern(cache)[0]]
fig = plot_patterns(parts, ["window (3 blocks)", "+ global block", "+ random blocks (head 0)"],
                    suptitle="BigBird = window + global + random", grid=b)
plt.show()
fig = plot_patterns(list(bb.pattern(cache)), [f"head {h}" for h in range(H)],
                    suptitle="a new random layout per head", grid=b)
plt.show()

# %%
rand_attn = np.array([[[3, 5], [4, 6], [5, 1], [1, 2], [2, 3], [3, 4]]])   # HF's (H=1, n_b - 2 = 6, r = 2)
random_blocks, global_blocks = bb_mod.from_huggingface(rand_attn, 8)
print("HF layout ->", global_blocks, "\n", random_blocks[0])
plot_pattern(bb_mod.build_pattern(16, block=2, random_blocks=random_blocks, global_blocks=global_blocks)[0],
             title="HuggingFace's convention: first and last block global", grid=2)
plt.show()
small = bb.example(np.random.default_rng(4), batch=1, heads=2, n=14, d=3)
errors = check_gradients(bb.forward, bb.backward, small.inputs, small.config)
print({k_: f"{e:.1e}" for k_, e in errors.items()})
assert max(errors.values()) < 1e-6
