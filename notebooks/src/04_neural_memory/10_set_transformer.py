# %% [markdown]
# ## 2 · The Set Transformer's blocks
#
# A set has no order, so a set -> set layer must be **permutation equivariant**, f(πX) = π f(X), and a set -> vector
# pooling **permutation invariant**, f(πX) = f(X). Self-attention without position encodings is equivariant, but it
# compares all N² pairs. Lee et al. build everything from one block, the *multihead attention block* (Section 3.1),
# in the paper's symbols (X: n x D queries, Y: the set attended over):
#
# $$\mathrm{Att}(Q, K, V) = \mathrm{softmax}(QK^\top/\sqrt{d})\,V, \qquad
# \mathrm{Multihead}(Q, K, V) = \mathrm{concat}(O_1, \dots, O_h)\,W^O,\quad O_j = \mathrm{Att}(QW_j^Q, KW_j^K, VW_j^V)$$
#
# $$\mathrm{MAB}(X, Y) = \mathrm{LayerNorm}(H + \mathrm{rFF}(H)), \qquad H = \mathrm{LayerNorm}(X + \mathrm{Multihead}(X, Y, Y))$$
#
# and the three layers built from it:
#
# | layer | definition | cost |
# |---|---|---|
# | SAB | $\mathrm{SAB}(X) = \mathrm{MAB}(X, X)$ | O(N²) |
# | ISAB | $\mathrm{ISAB}_m(X) = \mathrm{MAB}(X, H),\; H = \mathrm{MAB}(I, X)$, $I \in \mathbb{R}^{m \times D}$ learned | O(N m) |
# | PMA | $\mathrm{PMA}_k(Z) = \mathrm{MAB}(S, \mathrm{rFF}(Z))$, $S \in \mathbb{R}^{k \times D}$ learned | O(N k) |
#
# rFF is a row-wise feed-forward layer (here Linear–ReLU–Linear). ISAB is equivariant (I is the same whatever the order;
# MAB(X, H) treats each row of X alone); PMA is invariant (the seeds' softmax sums over the set).
#
# **Two forms.** `form="paper"` (default) computes the equations above. `form="official"` reproduces the authors' code
# ([juho-lee/set_transformer `modules.py`](https://github.com/juho-lee/set_transformer/blob/master/modules.py)) line for
# line, which differs in four ways: the residual is on the *projected* queries, `O = Q_ + A V_`, with no output
# projection W^O; the scale is 1/√D (the full width `dim_V`), not 1/√d per head; the rFF is `O + relu(fc_o(O))`, one
# linear layer; and PMA is `MAB(S, X)` without the rFF on Z. Both forms take `ln=True/False`: the official code's default
# is `ln=False` (no LayerNorms at all); the paper's equations have them. The official key projection's bias is dropped
# here: it adds the same q·b to every logit of a row, which the softmax cancels (its gradient is exactly zero).
#
# The code: the block lives once in `effattn/nn/mab.py`, one `mab_forward` / `mab_backward` pair composed of the
# functional pairs (`linear`, `layer_norm`, `relu`, the two-layer `mlp` for the rFF, `split_heads` / `merge_heads`) and
# the shared attention kernel `attend_forward` / `attend_backward`. First $\mathrm{Multihead}(X, Y, Y)$ before $W^O$:
# `Q, K, V` are $XW^Q, YW^K, YW^V$ for all heads at once, `split_heads` cuts their $D$ columns into $h$ blocks of
# $d = D/h$, and `attend_forward` is $\mathrm{Att}$ per head; `A` is $\mathrm{concat}(O_1, \dots, O_h)$:

# %%
show_source(mab.mab_forward, "Q, cq = linear_forward", "A = merge_heads(a)")

# %% [markdown]
# Then the rest of $\mathrm{MAB}(X, Y)$: `M` = $\mathrm{concat}(O_j)\,W^O$, `R0` = $X + \mathrm{Multihead}$, `H` its
# LayerNorm, `F` = $\mathrm{rFF}(H)$, and `out` = $\mathrm{LayerNorm}(H + \mathrm{rFF}(H))$ (the `else` branches are the
# official form):

# %%
show_source(mab.mab_forward, 'if form == "paper":', "return out, MABCache")

# %% [markdown]
# The two registered layers, `effattn/layers/isab.py` and `effattn/layers/pma.py`, each a `forward` / `backward` /
# `weights` like every mechanism, are the table's definitions in one or two calls: ISAB's `H` is $\mathrm{MAB}(I, X)$
# (`Ib` = the inducing points $I$, broadcast over the batch) and `out` is $\mathrm{MAB}(X, H)$; PMA's `Z` is
# $\mathrm{rFF}(Z)$ and `out` is $\mathrm{MAB}(S, \mathrm{rFF}(Z))$ with the seeds `S`. Each nests the caches of its MABs:

# %%
show_source(isab.forward, "lead = tuple", "return out, ISABCache")
show_source(pma.forward, 'if form == "paper":', "return out, PMACache")

# %% [markdown]
# Parameters are explicit keyword arrays (one flat dict, so the registry's `case.inputs` holds them and `backward`
# returns a gradient for each); their names depend on the form and on `ln`:

# %%
print("ISAB:", isab.param_names())
print("PMA: ", pma.param_names())
print("PMA, official form without LayerNorm:", pma.param_names("official", ln=False))

# %% [markdown]
# ### Shape check
# x is (..., N, D) with any leading batch axes; ISAB returns (..., N, D), PMA (..., k, D); the inducing points'
# attention (`isab.weights`) is (..., h, m, N) — never N x N.

# %%
rng = np.random.default_rng(0)
B, N, D, heads, m, k = 3, 50, 16, 4, 6, 2
x = rng.standard_normal((B, N, D))
p_isab = isab.init_params(rng, D, D, m)
p_pma = pma.init_params(rng, D, D, k)
h, cache_i = isab.forward(x, heads=heads, **p_isab)
z, cache_p = pma.forward(h, heads=heads, **p_pma)
print("x", x.shape, "-> ISAB", h.shape, "-> PMA", z.shape)
print("inducing points' attention", isab.weights(cache_i).shape, "| seeds' attention", pma.weights(cache_p).shape)
assert h.shape == (B, N, D) and z.shape == (B, k, D) and isab.weights(cache_i).shape == (B, heads, m, N)

# %% [markdown]
# ### Gradient check
# The backward is hand-written (derivation in the module docstring): per MAB, dR1 = LN1'(dout), dH = dR1 + rFF'(dR1),
# dR0 = LN0'(dH), then the residual (dX += dR0), W^O, the attention backward (dV = PᵀdO, dS = P∘(dP − rowsum(dO∘O))),
# and the three projections; ISAB sends MAB(X, H)'s dH into MAB(I, X), and dI sums over the batch. Every parameter is
# compared with central finite differences, in both forms, with and without LayerNorm, with a key mask:

# %%
rng = np.random.default_rng(1)
xs = rng.standard_normal((2, 7, 6))
km = np.ones((2, 7), bool)
km[1, 4:] = False                                                       # the second set has 4 elements
worst = {}
for form in ("paper", "official"):
    for ln in (True, False):
        for name, init in (("isab", isab.init_params), ("pma", pma.init_params)):
            spec = effattn.get(name)
            inputs = {"x": xs.copy(), **init(rng, 6, 6, 3, form=form, ln=ln)}
            errors = check_gradients(spec.forward, spec.backward, inputs,
                                     {"heads": 2, "form": form, "ln": ln, "key_mask": km}, rng=rng)
            worst[(name, form, ln)] = max(errors.values())
            assert len(errors) == len(inputs) and worst[(name, form, ln)] < 1e-7, errors
for key, err in worst.items():
    print(key, f"worst relative error {err:.1e}")

# %% [markdown]
# ### Equivariance and invariance
# Shuffle the set (and its mask): ISAB's output rows are shuffled the same way, PMA's output does not change.

# %%
rng = np.random.default_rng(2)
x = rng.standard_normal((1, 40, D))
perm = rng.permutation(40)
a, _ = isab.forward(x, heads=heads, **p_isab)
b, _ = isab.forward(x[:, perm], heads=heads, **p_isab)
print("ISAB: max |ISAB(πX) - π ISAB(X)| =", np.abs(b - a[:, perm]).max())
a, _ = pma.forward(x, heads=heads, **p_pma)
b, _ = pma.forward(x[:, perm], heads=heads, **p_pma)
print("PMA:  max |PMA(πX) - PMA(X)|     =", np.abs(b - a).max())
assert np.abs(b - a).max() < 1e-12

# %% [markdown]
# ### Variable-size sets: padding + `key_mask`
# A batch of sets of different sizes is padded to one length; masked elements get exactly zero weight wherever they are
# keys, so PMA's output and ISAB's output at real positions equal those of the unpadded set (ISAB's rows at padded
# positions are computed but are padding: ignore them).

# %%
small = x[:, :25]
padded = np.concatenate([small, 100 * rng.standard_normal((1, 15, D))], axis=1)
mask = np.arange(40)[None] < 25
print("ISAB real rows:", np.abs(isab.forward(padded, key_mask=mask, heads=heads, **p_isab)[0][:, :25]
                                - isab.forward(small, heads=heads, **p_isab)[0]).max())
print("PMA:           ", np.abs(pma.forward(padded, key_mask=mask, heads=heads, **p_pma)[0]
                                - pma.forward(small, heads=heads, **p_pma)[0]).max())

# %% [markdown]
# `causal=True` is refused with the reason (the survey marks Set Transformer as unable to decode):

# %%
try:
    isab.forward(x, causal=True, heads=heads, **p_isab)
except ValueError as err:
    print("ValueError:", err)
