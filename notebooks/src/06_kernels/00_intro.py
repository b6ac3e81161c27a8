# %% [markdown]
# # 06 · Kernels: Performer and the Linear Transformer
#
# *Efficient Transformers: A Survey* — Tay et al. ([arXiv 2009.06732](https://arxiv.org/abs/2009.06732)), the "kernels"
# family, with *Rethinking Attention with Performers* — Choromanski et al. 2021
# ([arXiv 2009.14794](https://arxiv.org/abs/2009.14794)) and *Transformers are RNNs* — Katharopoulos et al. 2020
# ([arXiv 2006.16236](https://arxiv.org/abs/2006.16236)).
#
# **Intuition: attention is a kernel smoother.** Softmax attention computes
#
# $$\mathrm{out}_i = \frac{\sum_j \kappa(q_i, k_j)\, v_j}{\sum_j \kappa(q_i, k_j)},\qquad \kappa(q, k) = \exp\!\big(q\cdot k/\sqrt d\big).$$
#
# If the kernel is a dot product of feature maps, $\kappa(q, k) = \phi(q)\cdot\phi(k)$ with $\phi: \mathbb{R}^d \to \mathbb{R}^m$,
# the sums over keys can be computed once and shared by every query:
#
# $$\mathrm{out}_i = \frac{\phi(q_i)^\top \overbrace{\textstyle\sum_j \phi(k_j) v_j^\top}^{S\ (m \times d_v)}}{\phi(q_i)^\top \underbrace{\textstyle\sum_j \phi(k_j)}_{z\ (m)}}$$
#
# — $O(N m d_v)$ instead of $O(N^2 d)$, and no N x N matrix. The **Performer** picks random features whose dot
# product *estimates* the softmax kernel (an approximation of softmax attention); the **Linear Transformer** picks
# $\phi(x) = \mathrm{elu}(x) + 1$ (a different attention, exact for its own kernel). In causal mode S and z become prefix
# sums — an RNN with a constant-size state, so both can decode.

# %%
import math
import time

import matplotlib.pyplot as plt
import numpy as np

import effattn
from effattn.attention import linear as linear_mod
from effattn.attention import performer as performer_mod
from effattn.backend import to_numpy
from effattn.gradcheck import check_gradients
from effattn.figures.style import plot_patterns

performer = effattn.get("performer")
linear = effattn.get("linear")
full = effattn.get("full")
for spec in (performer, linear):
    print(f"{spec.title:20s} | {spec.citation:26s} | {spec.classes} | {spec.complexity} | causal={spec.causal} exact={spec.exact}")
