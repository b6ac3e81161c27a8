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
from effattn.nn import kernel_attention
from effattn.tools.teach import check_kernel, load_answer, show_source

performer = effattn.get("performer")
linear = effattn.get("linear")
full = effattn.get("full")
for spec in (performer, linear):
    print(f"{spec.title:20s} | {spec.citation:26s} | {spec.classes} | {spec.complexity} | causal={spec.causal} exact={spec.exact}")

# %% [markdown]
# **The code.** Both mechanisms hand their feature maps to one function, `kernel_attention_forward` of
# `effattn/nn/kernel_attention.py` (the package's own lines below, printed by `effattn.tools.teach.show_source`, never a
# copy). Without a causal mask it is the equation above, term by term: `s` $= S = \sum_j \phi(k_j) v_j^\top$ (one
# product `phi_k^T v`), `z` $= \sum_j \phi(k_j)$, `num` $= \phi(q_i)^\top S$ and `den` $= \phi(q_i)^\top z$ for every
# query at once, and `inv` $= 1/(\text{den} + \epsilon)$ (0 where that is 0). The causal form (section 3) replaces S and
# z by prefix sums; the notebook ends with an exercise in which you write that form yourself.

# %%
show_source(kernel_attention.kernel_attention_forward, "if not causal:", "out = num * inv")
