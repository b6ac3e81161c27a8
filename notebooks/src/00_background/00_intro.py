# %% [markdown]
# # 00 · Background: scaled dot-product attention and why it is quadratic
#
# *Efficient Transformers: A Survey* — Tay, Dehghani, Bahri, Metzler ([arXiv 2009.06732](https://arxiv.org/abs/2009.06732)), Section 2,
# on top of *Attention Is All You Need* — Vaswani et al. ([arXiv 1706.03762](https://arxiv.org/abs/1706.03762)).
#
# **Intuition.** Each position asks a question (its *query*), every position offers an answer label (its *key*) and
# content (its *value*). A query scores every key by a dot product, the softmax turns the scores into weights that sum to
# one, and the output is the weighted mean of the values. Every query looks at every key: with N queries and M keys the
# score matrix has N·M entries — time and memory grow as N² for self-attention. Every mechanism of the survey is a way
# around this matrix.
#
# This notebook follows the template used by every notebook here: equations → the package's own lines that compute
# them (printed from the source with `effattn.tools.teach.show_source`, never a copy) → shape and gradient checks →
# pictures → measured cost → an exercise you write and check → summary.

# %%
import matplotlib.pyplot as plt
import numpy as np

import effattn
from effattn.gradcheck import check_gradients, rel_error
from effattn.figures.style import plot_pattern, plot_patterns
from effattn.nn import sparse
from effattn.tools.teach import check_kernel, load_answer, show_source

full = effattn.get("full")
print(full.title, "|", full.citation, "|", full.complexity)
