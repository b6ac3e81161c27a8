# %% [markdown]
# ## 2. The Compressive Transformer (`compressive`)
#
# Rae, Potapenko, Jayakumar, Hillier, Lillicrap, 2020, *Compressive Transformers for Long-Range Sequence Modelling*,
# https://arxiv.org/abs/1911.05507.
#
# Transformer-XL forgets a state once it leaves the memory of $n_m$ rows. The Compressive Transformer keeps it in a
# coarser form: the states that fall out are compressed $c : 1$ by a function $f_c$ into a **compressed memory** of
# $n_{cm}$ slots, and every segment attends over $[\text{cm};\ m;\ h]$ with Transformer-XL's relative score. After a
# segment, with $\text{all} = [m; h]$ (Algorithm 1 of the paper):
#
# $$m' = \text{last } n_m \text{ rows of all},\qquad \text{old} = \text{the rows that fell out},\qquad
#   \text{cm}' = \text{last } n_{cm} \text{ rows of } [\text{cm};\ f_c(\text{old})].$$
#
# $f_c$ is a learned 1-D convolution with kernel = stride = $c$ (`compress="conv"`), or max / mean pooling. The
# convolution is trained by the **attention-reconstruction loss**: the current queries' attention over the old
# states must be reproducible from their compressed form,
# $\mathcal L = \lVert \text{attn}(q, \text{old}) - \text{attn}(q, f_c(\text{old}))\rVert^2$, with the gradient
# stopped everywhere but in $f_c$ — the main loss never shapes the compression, and the loss never moves attention.
#
# Which positions the two memories hold after each segment (segment 4, $n_m = 4$, $n_{cm} = 4$ slots, $c = 2$): the
# compressed memory reaches $c\, n_{cm} = 8$ positions further back than the memory, for 4 more keys.

# %%
from effattn.figures.recurrence import compressive_contents, compressive_memory
from effattn.layers import compressive as cp

mems, comps = compressive_contents(segment=4, n_segments=6, mem_len=4, cmem_len=4, rate=2)
for s, (m_, c_) in enumerate(zip(mems, comps), 1):
    print(f"after segment {s}: memory {[int(v) for v in m_]}, compressed {[f'{int(a)}-{int(b)}' for a, b in c_]}")
from IPython.display import Image
import tempfile, os
Image(compressive_memory(os.path.join(tempfile.mkdtemp(), "compressive_memory.png")))

# %% [markdown]
# Two special cases pin the construction down (and are tests): $c = 1$ with an identity compression (mean of one
# row) is Transformer-XL with a memory of $n_m + n_{cm}$; no compressed memory ($n_{cm} = 0$) is Transformer-XL.

# %%
import numpy as np
import effattn
from effattn.layers import transformer_xl as xl

rng = np.random.default_rng(0)
p = cp.init_params(rng, 8, 2, compress="mean")
x = rng.standard_normal((2, 24, 8))


def by_segments(mod, keys, x, segment, **kw):
    state, outs = {}, []
    for s0 in range(0, x.shape[1], segment):
        out, cache = mod.forward(x[:, s0:s0 + segment], **state, **kw)
        state = dict(zip(keys, mod.next_memory(cache)))
        outs.append(out)
    return np.concatenate(outs, axis=1)


a = by_segments(cp, effattn.get("compressive").state_keys, x, 4, heads=2, mem_len=3, cmem_len=6, rate=1,
                compress="mean", causal=True, **p)
b = by_segments(xl, effattn.get("transformer_xl").state_keys, x, 4, heads=2, mem_len=9, causal=True, **p)
print("rate 1, mean: max |compressive - transformer_xl with memory 9| =", np.abs(a - b).max())
assert np.abs(a - b).max() < 1e-12

# %% [markdown]
# The reconstruction loss trains only the compression. Plain gradient steps on $W_c, b_c$ alone (the layer's
# `backward` with a zero upstream gradient returns exactly the loss's gradient: zero for every other parameter),
# against the parameter-free max and mean pooling:

# %%
import matplotlib.pyplot as plt

rng = np.random.default_rng(1)
pc = cp.init_params(rng, 16, 2)
xs, mem = rng.standard_normal((4, 8, 16)), rng.standard_normal((4, 8, 16))
kw = dict(memory=mem, heads=2, mem_len=8, cmem_len=8, rate=2, causal=True)
losses = []
for step in range(60):
    out, cache = cp.forward(xs, **kw, **pc)
    losses.append(cp.aux_loss(cache))
    g = cp.backward(np.zeros_like(out), cache)
    assert all(np.abs(g[k]).max() == 0 for k in ("x", "Wq", "Wk", "Wv", "Wo"))
    pc = {**pc, "Wc": pc["Wc"] - 0.3 * g["Wc"], "bc": pc["bc"] - 0.3 * g["bc"]}
base = {mode: cp.aux_loss(cp.forward(xs, **kw, compress=mode, **{k: v for k, v in pc.items() if k not in ("Wc", "bc")})[1])
        for mode in ("max", "mean")}
print(f"reconstruction loss: conv {losses[0]:.4f} -> {losses[-1]:.4f}; max {base['max']:.4f}, mean {base['mean']:.4f}")
assert losses[-1] < losses[0]
fig, ax = plt.subplots(figsize=(5, 2.8))
ax.plot(losses, label="conv, trained on the reconstruction loss")
for mode, ls in (("max", ":"), ("mean", "--")):
    ax.axhline(base[mode], color="k", ls=ls, lw=1, label=f"{mode} pooling")
ax.set_xlabel("gradient step"); ax.set_ylabel("reconstruction loss"); ax.legend(fontsize=7); plt.show()
