# %% [markdown]
# ## 2 · Expert load with and without the balancing loss
#
# Without $L_\text{aux}$ nothing stops the router from favouring the experts that happened to learn first: they get
# more tokens, learn more, and the others starve. Two small language models with 8-expert Switch feed-forwards,
# identical but for the weight $\alpha$ of the balancing loss (`train --ffn switch --aux-weight 0`):

# %%
runs = {}
for alpha in (1e-2, 0.0):
    runs[alpha] = train_model("lm", steps=150, d_model=32, heads=2, layers=2, seq_len=32, eval_every=0, seed=0,
                              ffn="switch", experts=8, aux_weight=alpha)["result"]
    r = runs[alpha]
    print(f"alpha={alpha:<5}: loss {r['loss']:.3f}, load per expert {r['expert_load']}")
fig, ax = plt.subplots(figsize=(8, 3))
for i, (alpha, r) in enumerate(runs.items()):
    ax.bar(np.arange(8) + 0.4 * i - 0.2, r["expert_load"], width=0.4, label=f"alpha = {alpha}")
ax.axhline(1 / 8, color="k", ls="--", lw=1, label="uniform 1/8")
ax.set_xlabel("expert"); ax.set_ylabel("share of the tokens"); ax.legend(); plt.show()
spread = {a: max(r["expert_load"]) / max(min(r["expert_load"]), 1e-4) for a, r in runs.items()}
print("max/min load:", {a: round(s, 1) for a, s in spread.items()})

# %% [markdown]
# ## 3 · Capacity factor against dropped tokens
#
# The capacity is what makes the layer run in fixed-size batches on accelerators; what it costs is tokens dropped
# when the router is unbalanced. For a router of random weights (a little unbalanced) the share of dropped choices
# falls with the capacity factor, and top-2 needs more room (second choices queue behind all first choices):

# %%
rng = np.random.default_rng(0)
x = rng.standard_normal((4, 256, 32))
params = switch.init_params(rng, 32, 64, 8)
factors = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0]
for k in (1, 2):
    dropped = [switch.aux_losses(spec.forward(x, k=k, capacity_factor=cf, **params)[1])["dropped"] for cf in factors]
    plt.plot(factors, dropped, "o-", label=f"k = {k}")
    print(f"k={k}: dropped", [round(v, 3) for v in dropped])
plt.xlabel("capacity factor"); plt.ylabel("share of choices dropped"); plt.legend(); plt.show()
assert dropped[-1] <= dropped[0]

# %% [markdown]
# ## 4 · Capacity dropping leaks the future
#
# Whether a token is dropped depends on how many tokens before it in the queue chose the same expert — and the
# queue is the whole batch: sequence 2's first tokens queue behind all of sequence 1. So in a decoder a token's output
# can change when *another sequence's* tokens change, or (k = 2) when a later token's first choice takes the room of
# an earlier second choice. A causal model must not do that. Change the **second half** (positions 128–255) of
# sequence 1 and watch the **first half** of sequence 2 — outputs at positions that, in time, come before the change:

# %%
x2 = x[:2].copy()
y0 = spec.forward(x2, k=1, capacity_factor=1.0, **params)[0]
x2[0, 128:] = rng.standard_normal((128, 32))
y1 = spec.forward(x2, k=1, capacity_factor=1.0, **params)[0]
moved = np.abs(y1[1, :128] - y0[1, :128]).max(axis=-1) > 1e-12
print(f"positions 0..127 of sequence 2 whose output moved: {moved.sum()} (first: {np.flatnonzero(moved)[:8]})")
assert moved.any()
try:
    spec.forward(x2, k=1, capacity_factor=1.0, causal=True, **params)
except ValueError as e:
    print("ValueError:", str(e)[:110], "...")
yc0 = spec.forward(x[:2], k=1, capacity_factor=None, causal=True, **params)[0]
yc1 = spec.forward(x2, k=1, capacity_factor=None, causal=True, **params)[0]
print("decodable setting (no dropping): largest change in sequence 2:", np.abs(yc1[1] - yc0[1]).max())
assert np.abs(yc1[1] - yc0[1]).max() < 1e-12     # 0, or the last bit of an expert GEMM whose row count changed

# %% [markdown]
# The decodable setting (`causal=True`) therefore drops nothing: each token reaches its k experts and $y_t$ depends
# on $x_t$ alone, so decoding token by token equals the parallel forward. A decoder built with `--ffn switch` uses it.
