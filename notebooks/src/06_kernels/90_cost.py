# %% [markdown]
# ## 4 · Linear time, measured
#
# Forward + backward of one head, float32, d = 64 (Performer: m = 128 orthogonal features; causal runs use chunks of
# 128). CPU time, so that other users of a shared machine barely move the numbers.

# %%
from effattn.backend import set_blas_threads
from effattn.tools.bench import fit_exponent, measure

set_blas_threads(1)  # one BLAS thread: CPU time then counts the work done, whatever else runs on the machine


def cpu_measure(spec, n, causal=False):
    """Forward + backward at B = H = 1, d = 64, float32 (effattn.tools.bench.measure): (CPU seconds, peak traced bytes)."""
    r = measure(spec, n, d=64, causal=causal, repeats=3, clock="cpu")
    return r["time_s"], r["peak_bytes"]


ns = [512, 1024, 2048, 4096]
runs = [("full", False), ("performer", False), ("linear", False), ("performer", True), ("linear", True)]
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
exps = {}
for name, causal in runs:
    ns_ = ns[:3] if name == "full" else ns
    rs = [cpu_measure(effattn.get(name), n_, causal=causal) for n_ in ns_]
    label = name + (" causal" if causal else "")
    t_exp = fit_exponent(ns_, [r[0] for r in rs])
    m_exp = exps[label] = fit_exponent(ns_, [r[1] for r in rs])
    axes[0].loglog(ns_, [r[0] for r in rs], "o-", label=f"{label} ~N^{t_exp:.2f}")
    axes[1].loglog(ns_, [r[1] / 2**20 for r in rs], "o-", label=f"{label} ~N^{m_exp:.2f}")
    print(f"{label:17s} time exponent {t_exp:.2f}  memory exponent {m_exp:.2f}  at N={ns_[-1]}: "
          f"{rs[-1][0] * 1e3:.0f} ms CPU, peak {rs[-1][1] / 2**20:.1f} MiB")
axes[0].set_title("forward + backward CPU time (s)"); axes[1].set_title("peak memory (MiB)")
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
# | causal | prefix sums (chunked) / RNN | prefix sums (chunked) / RNN (`step`) |
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
