# %% [markdown]
# # 03 · Learnable patterns: Reformer, Routing Transformer, Sinkhorn, Synthesizer
#
# *Efficient Transformers: A Survey* — Tay, Dehghani, Bahri, Metzler ([arXiv 2009.06732](https://arxiv.org/abs/2009.06732)),
# Section 3 ("learnable patterns"), with the papers
#
# * **Reformer** — Kitaev, Kaiser, Levskaya, 2020 ([arXiv 2001.04451](https://arxiv.org/abs/2001.04451)): locality-sensitive
#   hashing, sort by bucket, attend within chunks — O(N log N).
# * **Routing Transformer** — Roy, Saffar, Vaswani, Grangier, 2021 ([arXiv 2003.05997](https://arxiv.org/abs/2003.05997)):
#   online k-means shared by queries and keys, attend within clusters — O(N √N).
# * **Sparse Sinkhorn attention** — Tay, Bahri, Yang, Metzler, Juan, 2020 ([arXiv 2002.11296](https://arxiv.org/abs/2002.11296)):
#   a learned, relaxed permutation of the blocks, so that each block also attends to one (soft-)sorted block.
# * **Synthesizer** (dense and random) — Tay, Bahri, Metzler, Juan, Zhao, Zheng, 2020
#   ([arXiv 2005.00743](https://arxiv.org/abs/2005.00743)): attention logits synthesised without query–key dot products.
#
# **Intuition.** Fixed patterns (notebook 01) decide *in advance* which keys a query may see: a window, a stride, a block.
# Softmax attention, however, is dominated by the few keys that are *most similar* to the query, wherever they are. A
# learnable pattern groups tokens by content — by a hash of their direction, or by their nearest k-means centroid —
# and lets a query attend only inside its group. The pattern is different for every input, and cheap to compute:
# a sort (Reformer) or a comparison with √N centroids (Routing).
#
# Discrete choices (buckets, clusters, a hard block permutation) are constants for the backward pass. Given them,
# Reformer and Routing are **exact**: they equal dense attention masked by the induced pattern, which the cells below
# check. Sinkhorn is exact in that sense only with a hard permutation; with the soft one (the default) and the two
# Synthesizers it is a *different* attention, not an approximation of softmax, and the registry marks it
# `exact=False` (the printed flags below).

# %%
import matplotlib.pyplot as plt
import numpy as np

import effattn
from effattn.attention import reformer as RF
from effattn.attention import routing as RT
from effattn.nn import lsh
from effattn.gradcheck import check_gradients
from effattn.tools.teach import check_kernel, load_answer, show_source
from effattn.figures.style import plot_pattern, plot_patterns

for name in ("reformer", "routing", "sinkhorn", "synthesizer_dense", "synthesizer_random"):
    s = effattn.get(name)
    print(f"{s.name:18s} {s.title:40s} {s.citation:20s} {'+'.join(s.classes):6s} {s.complexity:11s} "
          f"causal={s.causal} exact={s.exact}")
