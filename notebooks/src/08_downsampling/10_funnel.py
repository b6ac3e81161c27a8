# %% [markdown]
# ## 1 · The Funnel Transformer: pool the queries, keep the keys
#
# A Funnel encoder runs in **stages**. Between two stages the sequence is pooled by a stride s (2 here): positions
# are grouped in consecutive pairs and each group becomes one position, with the [CLS] token (position 0) kept out
# of the pooling so that it survives every stage. The pooling step is an attention layer in which only the
# queries are pooled:
#
# $$h' = \mathrm{LayerNorm}\big(\mathrm{pool}(h) + \mathrm{MHA}(Q = \mathrm{pool}(h),\ K = h,\ V = h)\big)$$
#
# so each pooled position summarises its group *and* reads the whole unpooled sequence. The later blocks of a stage
# are ordinary self-attention at length N' = 1 + ⌈(N − 1)/s⌉: four times less attention for s = 2, half the
# feed-forward. With a key mask, a group pools over its real members only and a pooled position is real if any of
# its members is, so padding changes nothing real.
#
# The groups, written out (−1: a short group):

# %%
print(pooling.pool_groups(9, 2, separate_cls=True))
show_source(pooling.pool_forward)

# %% [markdown]
# The layer itself is three lines over the shared multihead attention of `effattn.nn.mha`:

# %%
show_source(funnel.forward)

# %% [markdown]
# A shape check, its per-position reference (every pooled position computed by a loop over its group), and the
# hand-written backward against central differences:

# %%
rng = np.random.default_rng(0)
D = 8
x = rng.standard_normal((2, 9, D))
params = funnel.init_params(rng, D)
for pool in ("mean", "max"):
    report = check(funnel.forward, funnel.backward, {"x": x, **params}, config={"heads": 2, "pool": pool},
                   reference=funnel.reference, expected_shape=(2, 5, D), tol=1e-12)
    assert report

# %%
show(funnel_figures("/tmp/effattn_funnel", np.random.default_rng(0))[0])

# %% [markdown]
# Top: what a pooled position stands for after one and two poolings (pairs, then groups of four; [CLS] alone).
# Bottom left: a random layer's pooled queries already read far beyond their own group (cyan) — the compression is
# learned by attention, not fixed by the pooling. Bottom right: the first layer of each stage costs N'·N, the other
# layers N'^2.
#
# The encoder (`effattn.models.downsampling.FunnelEncoder`) stacks the stages; its decoder, for token-level outputs,
# repeats each pooled row over its group back to N and adds the first stage's output:

# %%
from effattn.models.downsampling import FunnelEncoder

enc = FunnelEncoder(8, 4, np.random.default_rng(0), d_model=16, heads=2, stages=(2, 2, 2), max_len=64,
                    decoder_layers=1)
ids = np.random.default_rng(1).integers(0, 8, (2, 64))
logits = enc.forward(ids)
print("lengths stage by stage:", enc.cache, " logits", logits.shape)
assert enc.cache == [64, 33, 17]
