# %% [markdown]
# ## 3 · The backward pass, derived by hand
#
# With upstream gradient $dO = \partial L/\partial O$:
#
# * $O = PV \Rightarrow dV = P^\top dO$ and $dP = dO\,V^\top$.
# * Row-wise softmax $p = \operatorname{softmax}(s)$ has Jacobian $\operatorname{diag}(p) - pp^\top$, so
#   $dS_{ij} = P_{ij}\big(dP_{ij} - \sum_l P_{il}\, dP_{il}\big)$.
# * The row sum $\sum_l P_{il} dP_{il} = \sum_l P_{il}\, dO_i\cdot v_l = dO_i \cdot O_i$ — one dot product per row instead
#   of an N×M product (the flash-attention identity); masked entries have $P_{ij}=0$ and get no gradient.
# * $S = QK^\top/\sqrt d \Rightarrow dQ = dS\,K/\sqrt d$ and $dK = dS^\top Q/\sqrt d$.
#
# `full.backward` hands `dout` to the shared `attend_backward`, which implements these four lines (with $P = E\,r_z$,
# $r_z = 1/\mathrm{rowsum}(E)$, and $dS$ built in one product from $[r_z dO, -r_z\,\mathrm{rowsum}(dO\circ O)]$):

# %%
show_source(sparse.attend_backward)

# %% [markdown]
# The oracle is central finite differences, entry by entry, in float64:

# %%
q2, k2, v2 = (rng.standard_normal((1, 2, 7, 3)) for _ in range(3))
for causal in (False, True):
    errors = check_gradients(full.forward, full.backward, {"q": q2, "k": k2, "v": v2}, {"causal": causal})
    print("causal" if causal else "bidirectional", {k_: f"{e:.1e}" for k_, e in errors.items()})
    assert max(errors.values()) < 1e-7
