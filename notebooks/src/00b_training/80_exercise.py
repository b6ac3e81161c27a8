# %% [markdown]
# ## Your turn: the backward of a layer norm
#
# Every block above starts its sublayers with a LayerNorm, $y = \gamma \odot \hat x + \beta$ with
# $\hat x = (x - \mu)/\sqrt{\sigma^2 + \epsilon}$ over the last axis ($\mu$, $\sigma^2$ the mean and variance of each
# row). Write its forward and backward; `effattn.tools.teach.check` runs the dense check (your $y$ equals
# `effattn.nn.functional.layer_norm_forward`'s) and the gradient check of $x$, $\gamma$ and $\beta$ against central
# differences. Replace the two `return None` lines.
#
# *Hints.* (1) Keep $\hat x$ and $r = 1/\sqrt{\sigma^2+\epsilon}$ in the cache. (2) $d\gamma$ and $d\beta$ sum over every
# axis but the last. (3) With $g = dy \odot \gamma$, the three paths through $x$ (directly, through $\mu$, through
# $\sigma^2$) add up to $dx = r\,\big(g - \mathrm{mean}(g) - \hat x\, \mathrm{mean}(g \odot \hat x)\big)$, means over the
# last axis — derive it from $\partial \hat x_i / \partial x_j = r(\delta_{ij} - 1/D - \hat x_i \hat x_j / D)$.

# %%
def my_layer_norm_forward(x, gamma, beta, eps=1e-5):
    """x (..., D), gamma (D,), beta (D,) -> (y (..., D), cache)."""
    return None          # replace with your code


def my_layer_norm_backward(dy, cache):
    """dy (..., D) -> {"x": dx, "gamma": dgamma, "beta": dbeta}."""
    return None          # replace with your code


from effattn.nn.functional import layer_norm_forward

g_rng = np.random.default_rng(5)
ln_inputs = {"x": g_rng.standard_normal((2, 3, 6)), "gamma": g_rng.standard_normal(6), "beta": g_rng.standard_normal(6)}
reference = lambda x, gamma, beta: layer_norm_forward(x, gamma, beta)[0]
check(my_layer_norm_forward, my_layer_norm_backward, ln_inputs, reference=reference);

# %% [markdown]
# <details><summary>Answer (try first!)</summary>
#
# ```python
# def my_layer_norm_forward(x, gamma, beta, eps=1e-5):
#     mu = x.mean(axis=-1, keepdims=True)
#     r = 1.0 / np.sqrt(((x - mu) ** 2).mean(axis=-1, keepdims=True) + eps)
#     xhat = (x - mu) * r
#     return xhat * gamma + beta, (xhat, r, gamma)
#
#
# def my_layer_norm_backward(dy, cache):
#     xhat, r, gamma = cache
#     lead = tuple(range(dy.ndim - 1))                   # every axis but the last
#     g = dy * gamma
#     dx = r * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
#     return {"x": dx, "gamma": (dy * xhat).sum(axis=lead), "beta": dy.sum(axis=lead)}
# ```
#
# The package's own pair is `layer_norm_forward` / `layer_norm_backward` in `effattn/nn/functional.py`.
# </details>

# %%
answer = load_answer("00b_training/80_exercise.py", "my_layer_norm_forward", "my_layer_norm_backward")
assert check(*answer, ln_inputs, reference=reference)
