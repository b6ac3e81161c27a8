# %% [markdown]
# ## 4 · Linear time, measured
#
# Forward + backward of one head, float32, d = 64 (Performer: m = 128 orthogonal features; causal runs use chunks of
# 128). Timings on a shared machine are noisy; the memory exponent is the cleaner signal.

# %%
from effattn.bench import fit_exponent, measure

ns = [256, 512, 1024, 2048]
runs = [("full", False), ("performer", False), ("linear", False), ("performer", True), ("linear", True)]
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
exps = {}
for name, causal in runs:
    rs = [measure(effattn.get(name), n_, d=64, causal=causal, repeats=2) for n_ in ns]
    label = name + (" causal" if causal else "")
    t_exp = fit_exponent(ns, [r["time_s"] for r in rs])
    m_exp = fit_exponent(ns, [r["peak_bytes"] for r in rs])
    exps[label] = m_exp
    axes[0].loglog(ns, [r["time_s"] for r in rs], "o-", label=f"{label} ~N^{t_exp:.2f}")
    axes[1].loglog(ns, [r["peak_bytes"] / 2**20 for r in rs], "o-", label=f"{label} ~N^{m_exp:.2f}")
    print(f"{label:17s} time exponent {t_exp:.2f}  memory exponent {m_exp:.2f}  peak at N={ns[-1]}: {rs[-1]['peak_bytes'] / 2**20:.1f} MiB")
axes[0].set_title("forward + backward time (s)"); axes[1].set_title("peak memory (MiB)")
for ax in axes:
    ax.set_xlabel("N"); ax.legend(fontsize=7); ax.grid(alpha=0.3, which="both")
plt.tight_layout(); plt.show()
assert all(e < 1.2 for label, e in exps.items() if label != "full")

# %% [markdown]
# ## Summary
#
# | | Performer (FAVOR+) | Linear Transformer |
# |---|---|---|
# | kernel | $\exp(q\cdot k/\sqrt d)$, estimated with m random features | $(\mathrm{elu}(q)+1)\cdot(\mathrm{elu}(k)+1)$, exact |
# | feature map | $e^{w^\top x - \|x\|^2/2}/\sqrt m$ (positive), orthogonal $w$ | $\mathrm{elu}(x) + 1$, m = d |
# | approximates softmax? | yes, unbiased kernel; error $\sim 1/\sqrt m$ | no: a different attention |
# | cost | $O(N m (d + d_v))$ | $O(N d\, d_v)$ |
# | causal | prefix sums (chunked) / RNN | prefix sums (chunked) / RNN (`recurrent_step`) |
#
# Both replace the N x N matrix by a feature-space state $S = \sum_j \phi(k_j) v_j^\top$; both decode as RNNs with
# constant memory per step. Positive features matter because attention is mostly small weights, where trigonometric
# features are unreliable and can flip the normaliser's sign.
#
# ## Exercises
#
# 1. Section 1: repeat with the `"hyperbolic"` kernel. Where is its variance lower than the positive one?
# 2. Section 2: draw the features with `norms="fixed"`. Does the error against m change?
# 3. Scale q by 10 and compare Performer's W with softmax for m = 64: why does the approximation get worse for peaked
#    attention? (Hint: the variance of a single feature is $\exp(\|x\|^2)$-ish.)
# 4. In `effattn/attention/performer.py`, make causal mode subtract the sequence-wide key max (as the official code
#    does) and run `pytest tests/test_contract.py -k "performer and causal"`. Which test fails, and why?
# 5. Linear attention with `chunk=1` and `chunk=N`: same result, different cost. Which terms of
#    $O(N C (m + d_v) + (N/C)\, m\, d_v)$ dominate at each end?
