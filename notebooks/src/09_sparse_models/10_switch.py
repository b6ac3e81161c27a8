# %% [markdown]
# ## 1 · The router and its experts
#
# For tokens $x_t$, router $W_r$ (D, E) and experts $h_e(x) = \mathrm{relu}(x W_{1e} + b_{1e}) W_{2e} + b_{2e}$:
#
# $$p_t = \mathrm{softmax}(x_t W_r), \qquad e_t = \text{top-}k(p_t), \qquad
# y_t = \sum_{j \le k} \mathrm{keep}_{tj}\, g_{tj}\, h_{e_{tj}}(x_t),$$
#
# with $g_{t1} = p_{t,e_{t1}}$ for Switch and the two gates renormalised, $g_{tj} = p_{t,e_{tj}}/(p_{t,e_{t1}} +
# p_{t,e_{t2}})$, for GShard. An expert takes at most $C = \lceil \text{capacity\_factor} \cdot T / E \rceil$ tokens;
# the choices beyond it are **dropped** (keep = 0: the token passes through the residual). The router learns only
# through the gates $g$ (the choice itself is constant) and through two auxiliary losses: the load-balancing loss
# $L_\text{aux} = E \sum_i f_i P_i$ ($f_i$ the share of tokens sent to expert $i$, $P_i$ its mean probability) and
# ST-MoE's z-loss $L_z = \frac1T \sum_t (\log \sum_j e^{l_{tj}})^2$. The dispatch, grouped by expert with one stable
# sort (a loop over experts, never over tokens):

# %%
show_source(switch.forward, "p, soft, lse", "y = (out_a")

# %%
from effattn.figures.sparse_models import pkm_figures, switch_figures

(path,) = switch_figures("/tmp/effattn_switch", np.random.default_rng(0))
plt.figure(figsize=(13, 5))
plt.imshow(plt.imread(path))
plt.axis("off")
plt.show()

# %% [markdown]
# Left: every token has a probability for every expert. Middle: Switch keeps one gate per token — the rows left
# empty are tokens over their expert's capacity (capacity factor 1.0 here), dropped. Right: GShard's two
# renormalised gates per token.
#
# The registry's oracle is a per-token loop (`switch.reference`): it routes the tokens one by one in the paper's
# priority order. The vectorised forward equals it, and its hand-derived backward equals central differences of
# $\sum \text{dout} \cdot y + \alpha L_\text{aux} + c_z L_z$:

# %%
spec = effattn.get("switch")
case = spec.example(np.random.default_rng(3), batch=2, heads=2, n=12, d=4)
y, cache = spec.forward(**case.inputs, **case.config)
print("forward vs loop:", np.abs(y - spec.reference(**case.inputs, **case.config)).max())
print(switch.aux_losses(cache))
