# %% [markdown]
# # 02 · Fixed patterns with global memory (FP + M): Longformer, ETC, BigBird
#
# *Efficient Transformers: A Survey* — Tay, Dehghani, Bahri, Metzler ([arXiv 2009.06732](https://arxiv.org/abs/2009.06732)),
# Section 3 (the taxonomy: "Fixed Patterns (FP)" and "Neural Memory (M)"), and the walk-throughs of the three models.
#
# **Which survey class.** The survey files all three models under **two** classes at once, FP + M (the registry's codes,
# printed below): a fixed local pattern, plus a few global tokens that act as a memory. In its Figure 2 they sit where
# the fixed-pattern and the memory sets overlap. None of them carries the survey's separate code CP ("combination of
# patterns": two or more fixed access patterns in one layer, which the survey's text illustrates with the Sparse
# Transformer's strided + local heads of notebook 01). The folder name `02_combination_of_patterns` is kept for the
# links; read it as "a fixed pattern combined with a global memory", not as the class CP.
#
# **Intuition.** A single fixed pattern has a blind spot: a sliding window never lets token 0 talk to token N-1 in one
# layer, and needs about N/w layers to do so. The models of this notebook add to a cheap local pattern a few
# tokens that see, and are seen by, everything — **global tokens**, the survey's *neural memory* here (a small set of
# slots that every token reads and writes). BigBird adds a third ingredient, **random
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
# Beside each rule, a cell prints the package's own lines that compute it (`effattn.tools.teach.show_source`: the
# source itself, never a copy), and the notebook ends with an exercise: a window + global kernel of your own.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import effattn
from effattn.gradcheck import check_gradients, rel_error
from effattn.figures.style import plot_pattern, plot_patterns
from effattn.tools.teach import check, check_kernel, load_answer, show_source

for name in ("longformer", "etc", "bigbird"):
    s = effattn.get(name)
    print(f"{name:10s} {s.citation:22s} classes {'+'.join(s.classes):5s} complexity {s.complexity:18s} causal={s.causal}")
    assert set(s.classes) == {"FP", "M"}, (name, s.classes)      # the label of this notebook's title
