# %% [markdown]
# ## 2 · ETC: a global input beside the long input, and relative positions
#
# ETC splits the input into a short **global** input of $n_g$ tokens (one per sentence, paragraph or structured
# field) and the **long** input. Attention has four pieces:
#
# | piece | queries → keys | pattern |
# |---|---|---|
# | g2g | global → global | full |
# | g2l | global → long | full, or *hard-masked* to the global token's own segment |
# | l2g | long → global | full |
# | l2l | long → long | local, radius $r$ |
#
# Cost $O(n_g^2 + n_g N + N r)$, the survey's $O(N_g^2 + N N_g)$ for a fixed radius.
#
# **Relative positions** (Shaw et al., as ETC uses them): a learned vector $a_{l}$ for each clipped distance
# $l = \mathrm{clip}(j - i, -k, k)$ is added to the key,
#
# $$e_{ij} = \frac{q_i \cdot (k_j + a_{\mathrm{clip}(j-i)})}{\sqrt d},$$
#
# on the g2g and l2l pieces (the distance-labelled ones); `rel_emb` $(2k+1, d)$ is a learnable input with its
# gradient. In the banded computation the bias $q_i\cdot a_l$ is one product $QA^\top$ $(N \times (2k+1))$ followed by a
# fixed one-hot selection per block.
#
# **Layout.** One sequence of length $n_g + N_l$ whose first `n_global` positions are the global tokens, so the kernel
# keeps the contract `q, k, v -> out` and `out == weights @ v`. **No decoding:** the global tokens summarise the whole
# input, so `causal=True` raises.
#
# **The code** (`forward` in `effattn/attention/etc.py`). `relative_labels` is $\mathrm{clip}(j - i, -k, k) + k$ (the row
# of `rel_emb` holding $a_l$); `qa = q @ rel_emb.T` holds $q_i\cdot a_l$ for every label $l$ at once, and
# `select_forward(..., onehot)` picks $q_i\cdot a_{l(i,j)}$ for each pair, so `bias` $\cdot$ `scale` is the extra
# $q_i\cdot a_{l(i,j)}/\sqrt d$ of $e_{ij}$. The first cell is the global rows (g2g with the bias, g2l plain or
# hard-masked by `segment_ids`), the second the long rows: blocks of $r$ queries whose keys are the $n_g$ globals (l2g)
# and the blocks $c-1, c, c+1$ cut to $|i - j| \le r$ (l2l, with the bias).

# %%
etc = effattn.get("etc")
from effattn.attention import etc as etc_mod

show_source(etc_mod.relative_labels)
show_source(etc_mod.forward, "qa = q @ rel_emb.T", "bias=bias_g)")

# %%
show_source(etc_mod.forward, "qb = blocks(q)", "ol, _, long_cache = attend_forward")

# %%

rng = np.random.default_rng(2)
n_g, n_l, d = 4, 36, 8
N = n_g + n_l
q, k, v = (rng.standard_normal((1, 2, N, d)) for _ in range(3))
rel_emb = rng.standard_normal((2 * 2 + 1, d)) * 0.5
seg = etc_mod.contiguous_segments(n_l, n_g)          # global token s owns one contiguous run of long tokens
cfg = dict(n_global=n_g, radius=3, max_distance=2, rel_emb=rel_emb)
out, cache = etc.forward(q, k, v, **cfg)
out_h, cache_h = etc.forward(q, k, v, segment_ids=seg, **cfg)
for o, c, extra in ((out, cache, {}), (out_h, cache_h, {"segment_ids": seg})):
    assert np.allclose(etc.weights(c) @ v, o)
    assert np.abs(o - etc.reference(q, k, v, **cfg, **extra)).max() < 1e-12
print("segments:", seg)
try:
    etc.forward(q, k, v, causal=True, **cfg)
except ValueError as err:
    print("causal=True ->", err)

# %%
fig = plot_patterns([etc.weights(cache)[0, 0] != 0, etc.weights(cache_h)[0, 0] != 0],
                    ["g2g | g2l  /  l2g | l2l", "hard g2l masking (segments)"],
                    suptitle=f"ETC: {n_g} global + {n_l} long tokens as one block matrix")
for ax in fig.axes[:2]:
    ax.axhline(n_g - 0.5, color="#d62728", lw=1); ax.axvline(n_g - 0.5, color="#d62728", lw=1)
    for txt, (x, y) in {"g2g": (1.5, 1.5), "g2l": (22, 1.5), "l2g": (1.5, 22), "l2l": (30, 12)}.items():
        ax.text(x, y, txt, color="#d62728", ha="center", va="center", fontsize=9)
plt.show()
labels = etc_mod.relative_labels(np.arange(N), np.arange(N), 2, np) - 2
has = (np.arange(N)[:, None] < n_g) == (np.arange(N)[None, :] < n_g)
shown = np.where(has & (etc.weights(cache)[0, 0] != 0), labels, np.nan)
plot_pattern(shown, title="relative label clip(j - i, -2, 2) used on g2g and l2l", weights=True)
plt.show()

# %% [markdown]
# Gradients, including the relative embeddings, against finite differences (hard masks and a key mask on):

# %%
qs, ks, vs = (rng.standard_normal((1, 2, 11, 3)) for _ in range(3))
inputs = {"q": qs, "k": ks, "v": vs, "rel_emb": rng.standard_normal((5, 3))}
km = np.ones((1, 1, 11), bool); km[..., 7] = False
errors = check_gradients(etc.forward, etc.backward, inputs,
                         dict(n_global=2, radius=2, max_distance=2, segment_ids=etc_mod.contiguous_segments(9, 2),
                              hard_l2g=True, key_mask=km))
print({k_: f"{e:.1e}" for k_, e in errors.items()})
assert max(errors.values()) < 1e-6
