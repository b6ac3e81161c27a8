# %% [markdown]
# # 02 · Combinations of patterns: Longformer, ETC, BigBird
#
# *Efficient Transformers: A Survey* — Tay, Dehghani, Bahri, Metzler ([arXiv 2009.06732](https://arxiv.org/abs/2009.06732)),
# Section 3, "Combination of Patterns (CP)" and "Neural Memory (M)", and the walk-throughs of the three models.
#
# **Intuition.** A single fixed pattern has a blind spot: a sliding window never lets token 0 talk to token N-1 in one
# layer, and needs about N/w layers to do so. The models of this notebook *combine* a cheap local pattern with a few
# tokens that see, and are seen by, everything — **global tokens**, which the survey also counts as a form of *neural
# memory* (a small set of slots that every token reads and writes). BigBird adds a third ingredient, **random
# blocks**, and explains the combination with graph theory: window + random edges make a small-world graph, and
# global tokens make every pair of tokens two hops apart.
#
# | mechanism | paper | registry name | survey class | survey complexity |
# |---|---|---|---|---|
# | Longformer | Beltagy et al., 2020 ([2004.05150](https://arxiv.org/abs/2004.05150)) | `longformer` | FP + M | $O(n(k+m))$ |
# | ETC | Ainslie et al., 2020 ([2004.08483](https://arxiv.org/abs/2004.08483)) | `etc` | FP + M | $O(N_g^2 + N N_g)$ |
# | BigBird | Zaheer et al., 2020 ([2007.14062](https://arxiv.org/abs/2007.14062)) | `bigbird` | FP + M | $O(N)$ |
#
# All three are *exact*: their output equals full softmax attention masked by the pattern (for ETC with its relative
# position bias, for Longformer with its separate global projections: the dense `reference` oracle), and no $N\times N$
# array is ever allocated — the banded part runs as batched products over blocks (`effattn.nn.sparse.attend_forward`),
# the global rows as a dense $g \times N$ attention (`effattn.nn.global_tokens`, shared by the three). Each module also has
# `build_pattern(n, *, <its configuration>)`, the boolean pattern from sizes alone, which the pictures below use.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import effattn
from effattn.gradcheck import check_gradients, rel_error
from effattn.figures.style import plot_pattern, plot_patterns

for name in ("longformer", "etc", "bigbird"):
    s = effattn.get(name)
    print(f"{name:10s} {s.citation:22s} classes {'+'.join(s.classes):5s} complexity {s.complexity:18s} causal={s.causal}")
