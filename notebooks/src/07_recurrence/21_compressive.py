# %% [markdown]
# ## 3 · The Compressive Transformer
#
# Rae, Potapenko, Jayakumar, Hillier, Lillicrap 2020, *Compressive Transformers for Long-Range Sequence Modelling*
# ([arXiv 1911.05507](https://arxiv.org/abs/1911.05507)); `effattn/layers/compressive.py`.
#
# **The intuition.** Transformer-XL keeps the last n_m states and throws the older ones away; a longer memory costs
# attention linearly (section 4). The Compressive Transformer does not discard the states that fall out of the
# memory: it **compresses** them c : 1 (c = `rate` old states become one row) into a second, **compressed memory** of
# n_cm rows, and every segment attends over [compressed memory; memory; segment]. For the same n_m + n_cm rows of keys
# it reaches n_m + c n_cm states back instead of n_m + n_cm; the price is detail: c states share one key and one
# value.
#
# **The layer.** Transformer-XL's, over a longer concatenation (post-LN; cm the compressed memory (L_c, D), m the
# memory (L, D), h the segment (N, D), M = L_c + L + N):
#
# $$\tilde h = [\mathrm{SG}(cm);\ \mathrm{SG}(m);\ h],\qquad y = \mathrm{LayerNorm}\big(h + \mathrm{RelMHA}(h, \tilde h)\, W_o\big)$$
#
# with the relative score of section 2: query i sits at position L_c + L + i, key j at j. A compressed row counts as
# *one* position in these distances, though it stands for c states (as the peer implementation, `tests/parity`).
#
# **The state after a segment** (the paper's Algorithm 1), with all = [m; h] (L + N rows):
#
# $$m' = \text{the last } n_m \text{ rows of all},\qquad \text{old} = \text{all}[:\,L + N - n_m]\ (k \text{ rows, the oldest}),$$
#
# $$C = f_c(\text{old}) \ (\lfloor k / c\rfloor \text{ rows}),\qquad cm' = \text{the last } n_{cm} \text{ rows of } [cm;\ C].$$
#
# f_c takes groups of c consecutive old rows, oldest first; when c does not divide k, the oldest k mod c rows fill
# no group and are dropped (with N a multiple of c and a full memory, never). Three **compression functions**
# (`compress`):
#
# * `"conv"`: a learned 1-D convolution with kernel = stride = c, $C_g = b_c + \sum_{t<c} \text{old}_{gc+t}\, W_c[t]$
#   (W_c (c, D, D), b_c (D,): the only new parameters);
# * `"max"`, `"mean"`: pooling over each group's members, no parameters.
#
# **Masks** follow the rows: a memory row is real if its state was, a compressed row is real if any of its members
# is (max and mean pool over the real members only; the convolution reads masked members as 0).
#
# **The attention-reconstruction loss** (Section 3.1) trains f_c. The current queries q = h W_q, attending over the
# old states, should get the same result from their compressed form (per head, content only, no mask of time):
#
# $$\mathcal L_{attn} = w \cdot \mathrm{mean}_{\text{real rows, heads}, d}\Big(\mathrm{attn}(q, \text{old}\,W_k, \text{old}\,W_v) - \mathrm{attn}(q, C\,W_k, C\,W_v)\Big)^2,\qquad \mathrm{attn}(q, K, V) = \mathrm{softmax}(q K^\top / \sqrt d)\, V .$$
#
# Its gradient is **stopped** everywhere but in f_c: q, old, W_k and W_v are constants of $\mathcal L_{attn}$, so it
# trains the compression and never moves the attention; and the compressed memory handed on is a constant of the next
# segment, like the memory, so the task's loss never reaches f_c. Each trains one thing: the task the attention, the
# reconstruction the compression. Cost per segment O(N (L_c + L + N) D), plus O(k D²) for the convolution.
#
# ### The layer on a small case
#
# The state update, as it is in `forward`, and the compression:

# %%
show_source(cp.forward, "# the next state", "state = (new_mem")
show_source(cp.compress_rows)

# %% [markdown]
# The shape, the reference `loop` (every distance written out) and the backward against central differences, with
# a memory of L = 3 and a compressed memory of L_c = 2 given as configuration (constants of the step). The
# reconstruction loss is switched off here (w = 0), so that `backward` is the output's gradient alone; its own
# gradient is checked below.

# %%
rng = np.random.default_rng(0)
D, heads, N = 8, 2, 4
cparams = cp.init_params(rng, D, heads, rate=2)
x = rng.standard_normal((2, N, D))
state0 = {"memory": rng.standard_normal((2, 3, D)), "compressed": rng.standard_normal((2, 2, D))}
for causal in (False, True):
    assert check(cp.forward, cp.backward, {"x": x, **cparams},
                 config={**state0, "heads": heads, "mem_len": 3, "cmem_len": 4, "rate": 2, "causal": causal,
                         "recon_weight": 0.0},
                 reference=cp.loop, expected_shape=(2, N, D), tol=1e-12)

# %% [markdown]
# Segment by segment against `one_pass`, which writes the whole sequence out position by position (each segment's
# memory is the last n_m positions before it, its compressed memory the last n_cm groups of c positions before
# those, each compressed by f_c): 6 segments of N = 4, the learned convolution, with c dividing the rows that fall
# out and not.

# %%
X = rng.standard_normal((2, 6 * N, D))
for causal in (True, False):
    for mem_len, cmem_len, rate in ((4, 4, 2), (3, 2, 2), (4, 3, 3)):
        p_ = cp.init_params(np.random.default_rng(rate), D, heads, rate=rate)
        kw_ = dict(causal=causal, heads=heads, mem_len=mem_len, cmem_len=cmem_len, rate=rate, **p_)
        outs, st = [], {}
        for s in range(6):
            y, cache = cp.forward(X[:, s * N:(s + 1) * N], **st, **kw_)
            outs.append(y)
            st = dict(zip(("memory", "memory_mask", "compressed", "compressed_mask"), cp.next_memory(cache)))
        diff = np.abs(np.concatenate(outs, axis=1) - cp.one_pass(X, segment=N, **kw_)).max()
        print(f"causal={causal!s:5s} n_m={mem_len} n_cm={cmem_len} c={rate}: compressed memory "
              f"{st['compressed'].shape[-2]} rows, segments vs one_pass max difference {diff:.1e}")
        assert diff < 1e-12

# %% [markdown]
# ### What the two memories hold
#
# Which input positions sit where is computed, not drawn by hand: feed the layer the one-hot code of each position
# (x_p = e_p) with mean compression; then every memory row is some e_p and every compressed row is the mean of its
# members' codes, (1/c) Σ e_p, whose non-zero entries name them (`figs.compressive_positions`, through `forward` and
# `next_memory`). N = 4, n_m = 4, n_cm = 4, c = 2, 6 segments; the state handed on after each:

# %%
track = figs.compressive_positions(segment=4, n_segments=6, mem_len=4, cmem_len=4, rate=2)
for s, r in enumerate(track, 1):
    groups = " ".join(f"{g[0]}-{g[-1]}" for g in r["compressed"]) or "-"
    print(f"after segment {s}: memory {r['memory'][0]}-{r['memory'][-1]}, compressed rows {groups:24s} "
          f"forgotten {len(r['forgotten'])}")
assert track[-1]["compressed"] == [[12, 13], [14, 15], [16, 17], [18, 19]]
show(figs.compressive_memory("/tmp/effattn_xl/compressive_memory.png"), size=(15, 4.5))

# %% [markdown]
# From the third segment on, the 8 rows reach 12 states back, against Transformer-XL's 8 with the same rows (right).
# Each segment's N = 4 states push 4 rows out of the memory, compressed into 2 rows; the compressed memory, full,
# drops its 2 oldest. When c does not divide the k rows that fall out, the oldest k mod c fill no group and are
# dropped at once: N = n_m = 3, c = 2 — every segment loses the first of its three states:

# %%
for s, r in enumerate(figs.compressive_positions(segment=3, n_segments=4, mem_len=3, cmem_len=4, rate=2), 1):
    print(f"after segment {s}: memory {r['memory']}, compressed {r['compressed']}, forgotten {r['forgotten']}")

# %% [markdown]
# And the masks: 6 old rows of which the 2nd–4th are padding, mean compression by 2: the middle group has no real
# member, so its row is masked (and zero); the others average their real members only.

# %%
old = np.arange(6.0)[None, :, None] * np.ones((1, 6, 2))
C_, cmask, _ = cp.compress_rows(old, np.array([[True, False, False, False, True, True]]), rate=2, compress="mean",
                                params={})
print("old rows (feature 0):", old[0, :, 0].tolist(), " real:", [1, 0, 0, 0, 1, 1])
print("compressed (feature 0):", C_[0, :, 0].tolist(), " real:", cmask[0].astype(int).tolist())
assert C_[0, :, 0].tolist() == [0.0, 0.0, 4.5] and cmask[0].tolist() == [True, False, True]

# %% [markdown]
# ### Two special cases
#
# With c = 1 and mean compression, f_c is the identity: the compressed memory is simply the n_cm rows that left the
# memory before, and [cm; m] are the last n_m + n_cm states, with the same positions. So the layer *is*
# Transformer-XL with a memory of n_m + n_cm — checked by running both segment by segment over 6 segments with the
# same parameters; and n_cm = 0 is Transformer-XL with memory n_m.

# %%
pm = cp.init_params(np.random.default_rng(4), D, heads, compress="mean")       # Transformer-XL's parameters


def run_segments(layer, keys, X, segment, **kw):
    state, outs = {}, []
    for s0 in range(0, X.shape[1], segment):
        out, cache = layer.forward(X[:, s0:s0 + segment], **state, **kw)
        state = dict(zip(keys, layer.next_memory(cache)))
        outs.append(out)
    return np.concatenate(outs, axis=1)


CP_KEYS, XL_KEYS = ("memory", "memory_mask", "compressed", "compressed_mask"), ("memory", "memory_mask")
for n_m, n_cm in ((3, 6), (4, 4), (2, 0)):
    a = run_segments(cp, CP_KEYS, X, N, heads=heads, mem_len=n_m, cmem_len=n_cm, rate=1, compress="mean",
                     causal=True, **pm)
    b = run_segments(xl, XL_KEYS, X, N, heads=heads, mem_len=n_m + n_cm, causal=True, **pm)
    print(f"c = 1, mean, n_m = {n_m}, n_cm = {n_cm}: max |compressive - transformer_xl with memory {n_m + n_cm}| "
          f"= {np.abs(a - b).max():.1e}")
    assert np.abs(a - b).max() < 1e-12

# %% [markdown]
# ### The reconstruction loss and its stop-gradient
#
# `aux_loss(cache)` returns $\mathcal L_{attn}$ of the last call; `backward` adds its gradient (upstream 1) to W_c,
# b_c. So `backward` with a **zero** upstream gradient returns the reconstruction loss's gradient alone: non-zero in
# W_c and b_c only. It is checked against central differences of `aux_loss`; and the gradients of every other
# parameter are the same whatever its weight w — the loss does not move the attention.

# %%
x1, m1 = rng.standard_normal((2, N, D)), rng.standard_normal((2, 4, D))
kw1 = dict(memory=m1, heads=heads, mem_len=4, cmem_len=4, rate=2, causal=True)
y1, c1 = cp.forward(x1, **kw1, **cparams)
g0 = cp.backward(np.zeros_like(y1), c1)
num = numerical_gradient(lambda: np.array(cp.aux_loss(cp.forward(x1, **kw1, **cparams)[1])), cparams["Wc"],
                         np.array(1.0))
print(f"reconstruction loss {cp.aux_loss(c1):.4f}; backward(0) is non-zero in {[k for k in g0 if np.any(g0[k])]}")
print(f"dL_attn/dW_c: backward against central differences, max difference {np.abs(g0['Wc'] - num).max():.1e}")
dout1 = rng.standard_normal(y1.shape)
g_w1 = cp.backward(dout1, c1)
g_w0 = cp.backward(dout1, cp.forward(x1, **kw1, recon_weight=0.0, **cparams)[1])
same = max(np.abs(g_w1[k] - g_w0[k]).max() for k in g_w1 if k not in ("Wc", "bc"))
print(f"the other gradients with w = 1 and w = 0: max difference {same:.1e}")
assert [k for k in g0 if np.any(g0[k])] == ["Wc", "bc"] and np.abs(g0["Wc"] - num).max() < 1e-8 and same == 0

# %% [markdown]
# **Training the compression alone.** One layer (D = 16, 2 heads), its attention weights fixed at random; each step
# a random segment of N = 8 and a memory of 8 states that all fall out (4 groups of c = 2), and a plain gradient step
# on W_c, b_c with what `backward(0, cache)` returns (`figs.compression_training`). Against the parameter-free max and
# mean pooling on the same held-out states. Left, independent random states; right, states whose pairs have a
# salient first row (scaled by 3, the second by 0.5).

# %%
recon_runs = [figs.compression_training(np.random.default_rng(0), salient=False),
              figs.compression_training(np.random.default_rng(0), salient=True)]
for name, r in zip(("random states", "salient first row"), recon_runs):
    print(f"{name:18s}: conv {r['held_out'][0]:.3f} -> {r['held_out'][-1]:.3f} in {r['steps'][-1]} steps; "
          f"mean pooling {r['mean']:.3f}, max pooling {r['max']:.3f}")
plain, salient = recon_runs
eye = np.eye(plain["Wc"].shape[-1])
print(f"random states: max |W_c[t] - I / c| = {np.abs(plain['Wc'] - eye / 2).max():.2f} "
      f"(entries up to {np.abs(plain['Wc']).max():.2f})")
print("salient first row: mean diagonal of W_c[0], W_c[1] =",
      [round(float(np.trace(w)) / len(w), 2) for w in salient["Wc"]])
assert plain["held_out"][-1] < 0.25 * plain["held_out"][0] and plain["held_out"][-1] < 1.2 * plain["mean"]
assert salient["held_out"][-1] < 0.5 * salient["mean"]
show(figs.compressive_reconstruction("/tmp/effattn_xl/compressive_reconstruction.png", runs=recon_runs),
     size=(13, 4.5))

# %% [markdown]
# On independent random states there is nothing to choose between the two members of a pair, and the convolution,
# started at random far above both poolings, settles on the mean pooling's loss: its W_c ends close to I / c, the
# mean. Max pooling is much worse (per feature it takes the larger of two Gaussians: a biased row that no query saw).
# When the first member of each pair dominates its pair's attention, the convolution learns to keep it (W_c[0] about
# 0.8 I, W_c[1] about 0) and ends at about a quarter of the mean's loss: what to keep is learned from the attention
# it must reproduce. The paper compares these and further compression functions on its language-modelling benchmarks; this
# is only a sketch of why a learned f_c can pay.
