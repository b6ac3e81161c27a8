# %% [markdown]
# ## Decoding one token at a time
#
# A causal mechanism decodes with a **state** (`init_state`, `prefill`, `step`; DESIGN.md, "Decode steps"): full
# attention keeps every key and value (the KV cache, growing with the position), a local window keeps a bounded band,
# linear attention and the Performer keep $S = \sum_j \phi(k_j) v_j^\top$ and $z = \sum_j \phi(k_j)$, whatever the
# position. Stepping equals the causal parallel forward (the contract checks it to $10^{-10}$). Below: what each state
# holds against the position, and the time per generated token, from `effattn.tools.bench.decode_run` (the same as
# `python -m effattn bench --decode`, here with a short prompt).

# %%
from effattn.figures.scaling import decode_figures
from effattn.tools import bench

rows, traces = bench.decode_run(["full", "local", "sparse_fixed", "routing", "linear", "performer"], prompt=256,
                                steps=512, window=64, progress=False)
print(bench.format_decode_table(rows))
paths = decode_figures(traces, "/tmp/effattn_decode", smooth=32)
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
for ax, p in zip(axes, paths):
    ax.imshow(plt.imread(p))
    ax.axis("off")
plt.show()

# %% [markdown]
# A model generates by steps too: `Decoder.generate` prefills the prompt in one pass and then steps each layer's state
# (cross-attention keys and values of an encoder-decoder are projected once). It gives the same tokens as recomputing
# the whole prefix at every token, at a fraction of the cost:

# %%
dec = Decoder(50, np.random.default_rng(0), attention="full", d_model=32, heads=2, layers=2, max_len=256)
prompt = np.random.default_rng(1).integers(0, 50, size=(1, 128))
t0 = time.time()
fast = dec.generate(prompt, 64)
t_steps = time.time() - t0
t0 = time.time()
slow = dec.generate(prompt, 64, by_steps=False)
t_recompute = time.time() - t0
print("same tokens:", bool((fast == slow).all()), f"| by steps {t_steps:.2f} s, by recomputation {t_recompute:.2f} s")
