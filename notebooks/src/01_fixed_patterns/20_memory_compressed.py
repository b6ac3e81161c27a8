# %% [markdown]
# ## Memory-compressed attention
#
# *Generating Wikipedia by Summarizing Long Sequences* — Liu, Saleh, Pot, Goodrich, Sepassi, Kaiser, Shazeer, 2018
# ([arXiv 1801.10198](https://arxiv.org/abs/1801.10198)), Section 4.2.3. Code: `effattn/attention/memory_compressed.py`
# (registered as `memory_compressed`). The survey (Table 1) lists it as FP+M with complexity $O(N_b^2)$.
#
# **Intuition.** Keep all $N$ queries, but shorten the keys and values $k$ times with a learned *strided
# convolution* (kernel = stride = $k$): every $k$ consecutive positions become one memory *slot*. Each query
# attends to $M/k$ slots, so the score matrix is $N \times M/k$ — $k$ times cheaper, still quadratic in $N$. The
# paper's decoder (T-DMCA) alternates these layers with blockwise local-attention layers (previous section): local
# layers see detail, compressed layers see the whole sequence coarsely. Compose the two kernels in a model for that.
#
# Slot $s$ summarises positions $sk, \dots, sk+k-1$ (keys and values of masked or padding positions are zero):
#
# $$K^c_s = \sum_{o<k} K_{sk+o}\, W^K_o \quad (W^K = \texttt{conv\_k},\ (k, d, d)), \qquad
#   V^c_s = \sum_{o<k} w^V_o\, V_{sk+o} \quad (w^V = \texttt{conv\_v},\ (k,))$$
# $$P_i = \mathrm{softmax}_s\!\Big(\frac{q_i \cdot K^c_s}{\sqrt d}\Big), \qquad o_i = \sum_s P_{is}\, V^c_s$$
#
# **Causal.** Slot $s$ is visible to query $i$ only once every position it summarises is $\le i$:
# $e_s = \min((s+1)k, M) - 1 \le i$. The first $k-1$ queries see no slot and output zeros (lucidrains' version adds a
# learned null key/value for them). **Key mask**: masked positions are zeroed *before* the convolution, and a slot
# made only of masked positions is masked out.
#
# **Why `conv_v` is one weight per offset.** The paper (and tensor2tensor) convolves values with $d_{model}$ filters
# that mix features. Then $o = P\, \mathrm{conv}(V)$ is no longer "a matrix times $V$", and nothing could be drawn as
# an attention map. With one scalar per offset, $o = P\,C\,V$ with $C_{s,\,sk+o} = w^V_o$, so
# $W = P\,C$ ($N \times M$) *is* the attention map, and `out == weights(cache) @ v` holds. A feature mixing of the
# form $w^V_o A$ folds into the output projection $W^O$. The keys keep the full $(k, d, d)$ convolution: it only
# shapes the logits. Both parameters are shared by all heads.

# %%
from effattn.attention import memory_compressed as mc_mod

show_source(mc_mod._compress)                                   # K^c and V^c: one product each
show_source(mc_mod.forward, "allowed = slot_visibility", "return out, MemoryCompressedCache")

# %%
from effattn.attention import memory_compressed as mc_mod

mc = effattn.get("memory_compressed")
rng = np.random.default_rng(1)
B, H, N, d, k_c = 2, 4, 50, 16, 4                         # 50 is not a multiple of k = 4: the last slot is partial
q, k, v = (rng.standard_normal((B, H, N, d)) for _ in range(3))
params = mc_mod.init_compression(rng, k_c, d)             # conv_k (4, 16, 16), conv_v (4,)
print({n_: p.shape for n_, p in params.items()})
km = rng.random((B, 1, N)) > 0.2
for causal in (False, True):
    out, cache = mc.forward(q, k, v, causal=causal, key_mask=km, **params)
    ref = mc.reference(q, k, v, causal=causal, key_mask=km, **params)   # slot-by-slot loops + full attention
    err = np.abs(out - ref).max()
    print(f"causal={causal!s:5s} out {out.shape}  compressed scores {cache.attend.p.shape}  max|fast - reference| = {err:.1e}")
    assert out.shape == (B, H, N, d) and err < 1e-12
    assert np.allclose(out, mc.weights(cache) @ v)         # the implied N x N map reproduces the output

# %% [markdown]
# A sanity check that ties it to full attention: with $k = 1$, $W^K = I$ and $w^V = 1$ nothing is compressed, and the
# mechanism *is* full attention.

# %%
out1, _ = mc.forward(q, k, v, causal=True, conv_k=np.eye(d)[None], conv_v=np.ones(1))
ref1, _ = full.forward(q, k, v, causal=True)
print("k=1, identity: max|memory_compressed - full| =", np.abs(out1 - ref1).max())
assert np.allclose(out1, ref1, atol=1e-12)

# %% [markdown]
# ### Gradient check (central finite differences, float64), parameters included
#
# From the attention backward we get $dK^c, dV^c$; then $dW^K_o = \sum_s K_{sk+o}^\top dK^c_s$,
# $dK_{sk+o} = dK^c_s (W^K_o)^\top$, $dw^V_o = \sum_s V_{sk+o} \cdot dV^c_s$, $dV_{sk+o} = w^V_o\, dV^c_s$, and the
# gradients of masked positions are zero.

# %%
qs, ks, vs = (rng.standard_normal((1, 2, 11, 3)) for _ in range(3))
small = mc_mod.init_compression(rng, 3, 3)
kms = np.ones((1, 1, 11), bool); kms[..., 4] = False
for causal in (False, True):
    errors = check_gradients(mc.forward, mc.backward, {"q": qs, "k": ks, "v": vs, **small},
                             {"causal": causal, "key_mask": kms})
    print(f"causal={causal!s:5s}", {n_: f"{e:.1e}" for n_, e in errors.items()})
    assert max(errors.values()) < 1e-7

# %% [markdown]
# ### Which slots a query sees, and the implied attention map
#
# Left to right: bidirectional (every slot), causal (a staircase: slot $s$ appears at its last position), causal with a
# key mask that empties slot 2. Below: the $N \times N$ map $W = PC$ of one head — each slot's weight spread over the
# $k$ positions it summarises, with the per-offset weights $w^V_o$.

# %%
n_, k_ = 24, 4
vis = mc_mod.slot_visibility(n_, n_, k_, True, np)
kmask = np.ones(n_, bool); kmask[8:12] = False
real = kmask.reshape(-1, k_).any(axis=1)
fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
for ax, m_, t_ in zip(axes, [np.ones_like(vis), vis, vis & real], ["bidirectional", "causal", "causal + key_mask"]):
    plot_pattern(m_, ax=ax, title=t_, xlabel="compressed slot s", colorbar=False); ax.set_aspect("auto")
plt.tight_layout(); plt.show()

qq, kk, vv = (rng.standard_normal((1, 1, n_, 8)) for _ in range(3))
_, cache = mc.forward(qq, kk, vv, causal=True, **mc_mod.init_compression(rng, k_, 8))
plot_pattern(mc.weights(cache)[0, 0], title=f"memory_compressed, causal, k={k_}: W = P C")
plt.show()

# %% [markdown]
# **An option beyond the paper: `local_block`.** The paper alternates local and compressed *layers*. With
# `local_block=b`, one call does both in a single softmax: each query also sees the raw keys of its own block of $b$
# positions. The first queries of a causal call are no longer empty, and the map gains a block diagonal of fine detail.

# %%
_, cache_lb = mc.forward(qq, kk, vv, causal=True, local_block=6, **mc_mod.init_compression(rng, k_, 8))
plot_pattern(mc.weights(cache_lb)[0, 0], title=f"memory_compressed, causal, k={k_}, local_block=6")
plt.show()
ref_lb = mc.reference(qq, kk, vv, causal=True, local_block=6, conv_k=cache_lb.conv_k, conv_v=cache_lb.conv_v)
assert np.allclose(mc.weights(cache_lb) @ vv, ref_lb)

# %% [markdown]
# **Cost.** Time $O(N \cdot \tfrac{M}{k} \cdot d)$ for the attention plus $O(M d^2)$ for the
# convolution; memory $O(N M / k)$. It is still quadratic — the exponent measured at the end of the notebook is close to
# 2 — but with a constant $k$ times smaller ($k = 3$ in the paper); that, combined with the local layers, let the
# Wikipedia model read inputs of about 11,000 tokens in 2018.
