# %% [markdown]
# ## 1 · Longformer: dilated sliding window + global attention
#
# **Rule.** With one-sided window $w$ and head dilation $\delta$, a query $i$ that is not global attends to
#
# $$\{\, i + t\delta \;:\; |t| \le w \,\} \;\cup\; G,$$
#
# and a query in the global set $G$ attends to *every* key (global attention is symmetric: $G$'s rows and $G$'s
# columns are full). The cost is $O(N(2w+1) + N g)$ — the survey's $O(n(k+m))$ with $k$ the window and $m$ the
# number of global tokens.
#
# **Separate global projections** (paper, Section 3.1): global attention uses its own $Q_g, K_g, V_g$. HuggingFace's
# `LongformerSelfAttention` computes `query_global`, `key_global`, `value_global` for all positions and uses them only
# for the **rows** of global tokens: $\mathrm{softmax}(q^g_i K_g^\top/\sqrt d)\,V_g$ over all positions. The other rows
# see the global positions through the ordinary $k$ and $v$ (`_concat_with_global_key_attn_probs`). Here these are the
# optional inputs `q_global`, `k_global`, `v_global`.
#
# **Conventions.** `w` is one-sided; HuggingFace's `config.attention_window` is two-sided, so
# `w = attention_window // 2`. A global key inside the window is counted once (HuggingFace removes global positions
# from the windowed scores).
#
# **The code.** The band rule, as `_forward` in `effattn/attention/longformer.py` computes it on blocks of $w$ queries
# (in the residue-ordered layout, so that a dilated band is a plain band): `diff` is $j - i$, `lay.dil` is $\delta$,
# `abs(diff) <= w * lay.dil` with `diff % lay.dil == 0` is $j = i + t\delta,\ |t| \le w$, `is_global` marks $G$ (a
# global key joins every block from the appended list, so the band drops it), and `rule` leaves the rows of $G$ to the
# second cell: the dense rows $\mathrm{softmax}(q^g_i K_g^\top/\sqrt d)\,V_g$, `global_rows_forward` of
# `effattn/nn/global_tokens.py` (shared with ETC and BigBird), then written over `out[..., gidx, :]`.

# %%
lf = effattn.get("longformer")
from effattn.attention import longformer as lf_mod
from effattn.nn import global_tokens

show_source(lf_mod._forward, "diff = lay.kpos", "ob, _, band_cache = attend_forward")
show_source(lf_mod._forward, "qsrc, ksrc, vsrc", "out[..., gidx, :] = og")
show_source(global_tokens.global_rows_forward)

# %%

rng = np.random.default_rng(0)
B, H, N, d = 2, 2, 40, 8
q, k, v = (rng.standard_normal((B, H, N, d)) for _ in range(3))
out, cache = lf.forward(q, k, v, w=3, dilation=(1, 2), global_positions=(0, 20))
W = lf.weights(cache)
print("out", out.shape, " W", W.shape)
assert out.shape == (B, H, N, d)
assert np.allclose(W @ v, out) and np.allclose(W.sum(-1), 1)
# the support of W is the paper's rule (per head: dilation 1 and 2)
assert np.array_equal(W[0] != 0, lf.pattern(cache))
ref = lf.reference(q, k, v, w=3, dilation=(1, 2), global_positions=(0, 20))
print("max |banded - dense reference| =", np.abs(out - ref).max())

# %% [markdown]
# The pictures: the band, a dilated band, the global rows and columns; then one dilation per head (the paper dilates
# a few heads of the upper layers so that they see further at the same cost).

# %%
n_ = 48
pats = [lf_mod.build_pattern(n_, w=4), lf_mod.build_pattern(n_, w=4, dilation=2),
        lf_mod.build_pattern(n_, w=4, global_positions=(0, 20)),
        lf_mod.build_pattern(n_, w=4, global_positions=(0, 20), causal=True)]
fig = plot_patterns(pats, ["band w=4", "dilated, delta=2", "band + global {0, 20}", "causal (autoregressive)"],
                    suptitle="Longformer patterns")
plt.show()
per_head = lf_mod.build_pattern(n_, w=3, dilation=(1, 2, 3, 4), global_positions=(0,))
fig = plot_patterns(list(per_head), [f"head {h}: delta={h + 1}" for h in range(4)],
                    suptitle="one dilation per head (w = 3, global position 0)")
plt.show()

# %% [markdown]
# **Separate global projections and their gradients.** A case with `q_global, k_global, v_global` as inputs; the
# local rows do not depend on the global projections at all, and the backward returns gradients for all six inputs.

# %%
case = lf_mod.separate_global_case(np.random.default_rng(1), batch=1, heads=2, n=12, d=3, w=2, global_positions=(0, 6))
errors = check_gradients(lf.forward, lf.backward, case.inputs, case.config)
print({k_: f"{e:.1e}" for k_, e in errors.items()})
assert max(errors.values()) < 1e-6
o1, _ = lf.forward(**case.inputs, **case.config)
o2, _ = lf.forward(**{**case.inputs, "k_global": case.inputs["k_global"] * 2}, **case.config)
local_rows = [i for i in range(12) if i not in (0, 6)]
assert np.array_equal(o1[..., local_rows, :], o2[..., local_rows, :]) and not np.allclose(o1[..., [0, 6], :], o2[..., [0, 6], :])
print("k_global changes only the global rows (HuggingFace's convention)")

# %% [markdown]
# **Autoregressive Longformer** (`causal=True`): the window becomes $j \in [i - w\delta, i]$, global keys are visible
# only when $j \le i$, and the global rows are causal too (a global token at position $i$ summarises the prefix
# $0..i$). The band is computed on blocks of $w$ queries with the previous and own block as keys.

# %%
out_c, cache_c = lf.forward(q, k, v, w=3, dilation=(1, 2), global_positions=(0, 20), causal=True)
Wc = lf.weights(cache_c)
assert np.all(np.triu(Wc[0, 0], 1) == 0)
plot_pattern(Wc[0, 1], title="causal, head 1 (delta=2): the weights")
plt.show()
