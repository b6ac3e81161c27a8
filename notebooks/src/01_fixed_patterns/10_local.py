# %% [markdown]
# ## Blockwise local attention
#
# Code: `effattn/attention/local.py` (registered as `local`), the window copy in `effattn/nn/blockwise.py`.
# Used as the local layer of Liu et al., 2018 ([arXiv 1801.10198](https://arxiv.org/abs/1801.10198)) and, in image
# form, of the Image Transformer.
#
# **Intuition.** Most of what a token needs is nearby. Cut the sequence into blocks of $b$ positions; each query
# attends inside its own block and, with `look_back` $= r$, to the $r$ blocks before it. Every block is a small dense
# attention problem of size $b \times (r+1)b$, so the layer costs $O(N b)$ instead of $O(N^2)$.
#
# For query $i$ in block $g = \lfloor i/b \rfloor$, with $r$ = `look_back` and $a$ = `look_ahead`:
#
# $$\mathcal{W}(i) = \{\, j : (g - r)\,b \le j < (g + 1 + a)\,b \,\}\ \ [\,\cap\ \{j \le i\}\ \text{if causal}\,]$$
# $$S_{ij} = \frac{q_i \cdot k_j}{\sqrt d}\ \ (j \in \mathcal W(i)), \qquad P_i = \mathrm{softmax}_j(S_{ij}), \qquad o_i = \sum_j P_{ij}\, v_j$$
#
# **How it runs.** The queries are reshaped into $(N/b,\ b,\ d)$ blocks. The keys and values of block $g$'s window are
# the padded blocks $g - r, \dots, g + a$: each is a *basic slice* of a zero-padded, blocked view of $K$ — no gather
# with index arrays, no `add.at` in the backward (the window gradients are added back through the same slices).
# One batched `@` then does all blocks at once (`effattn.nn.sparse.attend_forward`). $N$ not divisible by $b$: padded
# inside and masked.
#
# **Conventions.** tensor2tensor's `masked_local_attention_1d(block_length=b)` = `local` with `block=b, look_back=1,
# causal=True`. lucidrains' `LocalAttention(window_size, look_backward, look_forward)` = our `block`, `look_back`,
# `look_ahead` (its `look_forward` defaults to 1 when not causal; ours defaults to 0 — pass `look_ahead=1` for a
# symmetric encoder window). Default `look_back=1`: with 0, information never crosses a block border and the first
# query of every block sees only itself in a decoder.

# %%
from effattn.nn import blockwise

show_source(blockwise.blockwise_forward)     # what local.forward calls: before = look_back b, after = look_ahead b

# %%
from effattn.attention import local as local_mod

local = effattn.get("local")
rng = np.random.default_rng(0)
B, H, N, d = 2, 4, 50, 16                                   # 50 is not a multiple of b = 8: padding inside
q, k, v = (rng.standard_normal((B, H, N, d)) for _ in range(3))
for causal in (False, True):
    out, cache = local.forward(q, k, v, causal=causal, block=8, look_back=1)
    mask = local.pattern(cache)                             # (N, N) from the rule, not from the fast path
    ref, _ = full.forward(q, k, v, causal=causal, mask=mask)
    err = np.abs(out - ref).max()
    print(f"causal={causal!s:5s} out {out.shape}  pattern {mask.shape}  keys per query {mask.sum(1).max()}  "
          f"max|local - full[pattern]| = {err:.1e}")
    assert out.shape == (B, H, N, d) and err < 1e-12
    assert np.allclose(out, local.weights(cache) @ v)

# %% [markdown]
# The readable version, one query at a time, is in the module too (`loop`, built on the shared per-query loop
# `effattn.nn.loops.masked_loop`): the fast path must agree with it.

# %%
ref = local_mod.loop(q[0, 0], k[0, 0], v[0, 0], block=8, look_back=1, causal=True)
out, _ = local.forward(q, k, v, block=8, look_back=1, causal=True)
print("max |fast - loop| =", np.abs(out[0, 0] - ref).max())
assert np.allclose(out[0, 0], ref, atol=1e-12)

# %% [markdown]
# ### Gradient check (central finite differences, float64)
#
# Per block: $dV_{\text{win}} = P^\top dO$, $dS = P \circ (dP - \mathrm{rowsum}(dO \circ O))$ with $dP = dO\,V_{\text{win}}^\top$,
# $dQ = dS\,K_{\text{win}}/\sqrt d$, $dK_{\text{win}} = dS^\top Q/\sqrt d$; each key position receives the sum over the
# $r + 1 + a$ windows that copied it.

# %%
qs, ks, vs = (rng.standard_normal((1, 2, 13, 3)) for _ in range(3))
km = np.ones((1, 1, 13), bool); km[..., 4] = False
for cfg in ({"block": 4, "look_back": 1, "causal": True, "key_mask": km}, {"block": 3, "look_back": 2, "look_ahead": 1}):
    errors = check_gradients(local.forward, local.backward, {"q": qs, "k": ks, "v": vs}, cfg)
    print({n_: f"{e:.1e}" for n_, e in errors.items()}, cfg.get("causal", False))
    assert max(errors.values()) < 1e-7

# %% [markdown]
# ### The pattern
#
# Grid lines mark the blocks. `look_back = 0` gives isolated diagonal blocks; `look_back = 1` adds the block before;
# causal keeps the lower triangle of that band; `look_ahead = 1` makes the window symmetric for an encoder.

# %%
n_, b_ = 32, 8
plot_patterns([local_mod.build_pattern(n_, block=b_, look_back=0, xp=np),
               local_mod.build_pattern(n_, block=b_, look_back=1, xp=np),
               local_mod.build_pattern(n_, block=b_, look_back=1, causal=True, xp=np),
               local_mod.build_pattern(n_, block=b_, look_back=1, look_ahead=1, xp=np)],
              ["look_back=0", "look_back=1", "look_back=1, causal", "look_back=1, look_ahead=1"],
              suptitle=f"Blockwise local attention, N={n_}, b={b_}", grid=b_)
plt.show()

# %% [markdown]
# And the weights of one head (causal, `look_back=1`): every row is a softmax over at most $2b$ keys.

# %%
_, cache = local.forward(q[:, :, :40], k[:, :, :40], v[:, :, :40], causal=True, block=8)
plot_pattern(local.weights(cache)[0, 0], title="local, causal, b=8: weights P of one head", grid=8)
plt.show()

# %% [markdown]
# **Receptive field.** One layer with `look_back = 1` sees at most $2b$ positions; information travels one block per
# layer, so reaching position 0 from position $N$ takes about $N/b$ layers. This is why the Wikipedia model (and
# Sparse Transformer, below) mix local layers with layers that reach far: memory-compressed layers or strided ones.
