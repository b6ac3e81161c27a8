# %% [markdown]
# ## 4 · Cost: ISAB and PMA against SAB
#
# Forward + backward of one layer on one set, float32, D = 64, one head, m = 16 inducing points, k = 1 seed: time
# (best of 3) and peak memory (what `tracemalloc` sees NumPy allocate) against N, with the exponent of a least-squares
# fit on log-log axes. The survey's complexities: SAB O(N²), ISAB O(N·m), PMA O(N·k). ISAB's and PMA's work is
# O(N·m·D + N·D²) — linear in N — but their *time* exponent comes out between 1 and 1.5 here, because the (N, D)
# arrays outgrow the CPU caches as N grows and the machine is shared; *memory* is the clean signal (exponent ~1).
# SAB's N x N score matrices take over its memory from N ~ 1000 on (the O(N·D) arrays still show at small N, so we
# also print the slope between the last two points).

# %%
from effattn.tools.bench import fit_exponent


def measure_layer(fwd, bwd, inputs, config, repeats=3):
    out, cache = fwd(**inputs, **config)
    dout = np.ones_like(out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out, cache = fwd(**inputs, **config)
        bwd(dout, cache)
        times.append(time.perf_counter() - t0)
    del out, cache
    tracemalloc.start()
    try:
        out, cache = fwd(**inputs, **config)
        bwd(dout, cache)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return min(times), peak


def as32(p):
    return {k: np.asarray(v, dtype=np.float32) for k, v in p.items()}


D_c, m_c = 64, 16
rng = np.random.default_rng(0)
layers = {
    "SAB (O(N²))": (mab.sab_forward, mab.sab_backward, as32(mab.init_mab(rng, "mab_", D_c, D_c, D_c))),
    "ISAB (O(N·m))": (isab.forward, isab.backward, as32(isab.init_params(rng, D_c, D_c, m_c))),
    "PMA (O(N·k))": (pma.forward, pma.backward, as32(pma.init_params(rng, D_c, D_c, 1))),
}
ns = [256, 512, 1024, 2048, 4096]
results = {}
for label, (fwd, bwd, p) in layers.items():
    rows = []
    for n in ns:
        if label.startswith("SAB") and n > 2048:
            break                                                          # 4096² float32 = 64 MiB per matrix
        xc = rng.standard_normal((1, n, D_c)).astype(np.float32)
        rows.append((n, *measure_layer(fwd, bwd, {"x": xc, **p}, {"heads": 1})))
    results[label] = rows

fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
for label, rows in results.items():
    n_, t_, m_ = zip(*rows)
    te, me = fit_exponent(n_, t_), fit_exponent(n_, m_)
    axes[0].loglog(n_, t_, "o-", label=f"{label}: N^{te:.2f}")
    axes[1].loglog(n_, np.array(m_) / 2**20, "o-", label=f"{label}: N^{me:.2f}")
    print(f"{label:14s} time exponent {te:.2f}, memory exponent {me:.2f};  at N={n_[-1]}: "
          f"{t_[-1] * 1e3:.1f} ms, {m_[-1] / 2**20:.1f} MiB")
axes[0].set_ylabel("forward + backward (s)"); axes[1].set_ylabel("peak memory (MiB)")
for ax in axes:
    ax.set_xlabel("set size N"); ax.grid(alpha=0.3); ax.legend(fontsize=8)
    ax.set_xticks(ns, [str(n) for n in ns]); ax.minorticks_off()
plt.tight_layout(); plt.show()

isab_mem = fit_exponent(*zip(*[(n, mem) for n, _, mem in results["ISAB (O(N·m))"]]))
(n1, _, m1), (n2, _, m2) = results["SAB (O(N²))"][-2:]
sab_last = np.log(m2 / m1) / np.log(n2 / n1)
print(f"memory slope between N={n1} and N={n2}: SAB {sab_last:.2f}")
assert isab_mem < 1.2 and sab_last > 1.5

# %% [markdown]
# ## Summary
#
# * **Neural memory** = a few slots that read the whole input and that every position reads back: two hops connect
#   everything, each hop costs O(N·m). As a mask over full attention it is the "global tokens" of Longformer, ETC and
#   BigBird; the Set Transformer takes the memory *out* of the input and learns it (inducing points I).
# * **ISAB_m(X) = MAB(X, MAB(I, X))** is permutation equivariant, O(N·m); **PMA_k = MAB(S, rFF(Z))** is a learned,
#   permutation-invariant pooling, O(N·k); **SAB = MAB(X, X)** is the O(N²) block they replace.
# * The official code differs from the paper's equations (residual on the projected queries and no W^O, scale 1/√D,
#   one-layer rFF, no rFF before PMA, LayerNorm off by default); `form="official"` reproduces it exactly,
#   `form="paper"` (default) follows the equations.
# * Sets cannot be decoded left to right: `causal=True` is refused. Variable-size sets: pad and pass `key_mask`.
# * The memory is a bottleneck: m slots must summarise everything that the elements need to know about each other.
# * The code beside the equations: the global-token functions of `effattn/nn/global_tokens.py`, `mab_forward` in two
#   parts, and the one or two MAB calls of ISAB and PMA. In *Your turn* you wrote PMA's core, pooling by attention with
#   k learned seeds, and its backward; the dense check (against `full` with the seeds as queries) and the gradient
#   check (x, S, W^K, W^V) judged it, and the hidden answer is checked for permutation invariance too.
#
# ## Exercises
#
# 1. Train the max task with m = 1 and m = 16 inducing points. Does the bottleneck matter for a max? Try a task that
#    needs more than one summary, e.g. "how many distinct values" on sets of small integers.
# 2. Replace PMA by a mean over the (masked) ISAB outputs followed by the same Linear. How well does it learn the max?
#    Why does a mean struggle where the attention pooling succeeds (look at the seed's weights above)?
# 3. Switch the layers to `form="official", ln=False` (the official default). Does the max task still train with the
#    same learning rate? What changes when you add `ln=True`?
# 4. Show that the key bias of the official code has no effect: add `b_k` to K in `official_mab` of `tests/test_mab.py` and prove
#    that every row of the score matrix shifts by the same constant.
# 5. Build the global-memory mask of section 1 with a local window added (each token also sees its w neighbours) and
#    count the allowed entries: it is Longformer's pattern, O(N(w + g)).
