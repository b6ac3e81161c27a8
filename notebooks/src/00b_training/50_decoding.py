# %% [markdown]
# ## Decoding one token at a time
#
# A causal mechanism decodes with a **state** (`init_state`, `prefill`, `step`; DESIGN.md, "Decode steps"): full
# attention keeps every key and value (the KV cache, growing with the position), a local window keeps a bounded band,
# linear attention and the Performer keep $S = \sum_j \phi(k_j) v_j^\top$ and $z = \sum_j \phi(k_j)$, whatever the
# position. Stepping equals the causal parallel forward (the contract checks it to $10^{-10}$). Below: what each state
# holds against the position, and the CPU time per generated token on one BLAS thread, from
# `effattn.tools.bench.decode_run` (the same as `python -m effattn bench --decode`, here with a short prompt). At these
# sizes a step costs well under a millisecond for every mechanism; the state sizes are the deterministic signal.

# %%
from effattn.figures.scaling import decode_figures
from effattn.tools import bench

rows, traces = bench.decode_run(["full", "local", "sparse_fixed", "routing", "linear", "performer"], prompt=256,
                                steps=512, window=64, progress=False, clock="cpu")
print(bench.format_decode_table(rows))
paths = decode_figures(traces, "/tmp/effattn_decode", smooth=32)
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
for ax, p in zip(axes, paths):
    ax.imshow(plt.imread(p))
    ax.axis("off")
plt.show()
by_name = {r["name"]: r for r in rows}
assert by_name["full"]["size_last"] > 2 * by_name["full"]["size_first"]           # the KV cache grows with t
for name in ("local", "routing", "linear", "performer"):
    assert by_name[name]["size_last"] <= by_name[name]["size_first"], name        # bounded states do not

# %% [markdown]
# A model generates by steps too: `Decoder.generate` prefills the prompt in one pass and then steps each layer's state
# (cross-attention keys and values of an encoder-decoder are projected once). It gives the same tokens as recomputing
# the whole prefix at every token, at a fraction of the cost (CPU time, median of three runs):

# %%
dec = Decoder(50, np.random.default_rng(0), attention="full", d_model=32, heads=2, layers=2, max_len=256)
prompt = np.random.default_rng(1).integers(0, 50, size=(1, 128))


def cpu_seconds(f, repeats=3):
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        f()
        times.append(time.process_time() - t0)
    return float(np.median(times))


fast, slow = dec.generate(prompt, 64), dec.generate(prompt, 64, by_steps=False)
t_steps = cpu_seconds(lambda: dec.generate(prompt, 64))
t_recompute = cpu_seconds(lambda: dec.generate(prompt, 64, by_steps=False))
print("same tokens:", bool((fast == slow).all()), f"| recomputation / steps: {t_recompute / t_steps:.1f}x the CPU time")
assert (fast == slow).all() and t_recompute > 1.5 * t_steps
