# %% [markdown]
# ## 3 · Cost against N
#
# Forward + backward of each layer's registry example (one head of size 64, float32, CPU time on one thread), with
# the fitted exponents: the Funnel's pooling layer is still quadratic (N/2 queries over N keys: half of full
# attention — its saving is in the layers *after* it); the Perceiver's cross-attention is linear (the example has
# m = 5 latents; at these sizes the fixed per-call work keeps the linear exponents below 1). Beside them, the two relatives from earlier notebooks that shrink the keys instead:
# Nyströmformer's landmarks (05) and the Set Transformer's inducing points (ISAB, 04), both linear too.

# %%
rows, ex = cost_table(["full", "funnel", "perceiver", "nystromformer", "isab"], [512, 1024, 2048, 4096],
                      expect={"full": (1.4, 2.5), "funnel": (1.4, 2.5), "perceiver": (0.2, 1.3),
                              "nystromformer": (0.2, 1.3), "isab": (0.2, 1.3)},
                      expect_memory={"full": (1.6, 2.3), "perceiver": (0.6, 1.2)})

# %% [markdown]
# With m = 64 latents and one latent layer (the layer's whole cost, feed-forwards included) against full attention
# at the same N: the Perceiver's time grows linearly and its memory too, while full attention's grow as N².

# %%
prow, pex = downsampling.time_perceiver(ns=(512, 1024, 2048, 4096), m=64, repeats=2)
for r in prow:
    print(f"N = {r['n']:5d}: perceiver {r['perceiver_s'] * 1e3:7.1f} ms, {r['perceiver_bytes'] / 2**20:6.1f} MiB | "
          f"full {r['full_s'] * 1e3:7.1f} ms, {r['full_bytes'] / 2**20:6.1f} MiB | full / perceiver time "
          f"{r['full_s'] / r['perceiver_s']:.1f}x")
print({k: round(v, 2) for k, v in pex.items()})
assert pex["perceiver_bytes"] < 1.2 and pex["full_bytes"] > 1.7

# %% [markdown]
# And a whole training step of a 3-stage Funnel encoder (2 + 2 + 2 blocks) against the plain encoder of the same
# depth (6 blocks) and width, at N = 1024:

# %%
f = downsampling.time_funnel(1024, d_model=32, repeats=2)
print(f"lengths {f['lengths']}: plain {f['plain_s']:.2f} s, funnel {f['funnel_s']:.2f} s, "
      f"plain / funnel = {f['ratio']:.2f}x")
assert f["ratio"] > 1.3
