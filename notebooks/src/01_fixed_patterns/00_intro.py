# %% [markdown]
# # 01 · Fixed patterns: local blocks, compressed memory, image neighbourhoods, strides and axes
#
# *Efficient Transformers: A Survey* — Tay, Dehghani, Bahri, Metzler ([arXiv 2009.06732](https://arxiv.org/abs/2009.06732)),
# Section 3, "Fixed Patterns (FP)", and the walk-throughs of the models below.
#
# **Intuition.** The earliest way around the $N \times N$ attention matrix is to decide *in advance* which keys each
# query may look at, and never compute the other scores. The pattern is fixed (it depends on positions, not on
# content), so it can be laid out as a few dense, regular pieces — blocks, strides, grid rows and columns — that
# batched matrix products handle well. The survey lists three flavours:
#
# * **Blockwise patterns** — chop the sequence into blocks and attend inside each block (plus a neighbour or two):
#   cost $O(N b)$ for blocks of $b$. *Local attention* here, the *Image Transformer*'s 1-D and 2-D query/memory
#   blocks.
# * **Strided patterns** — attend at fixed intervals so that information hops across the sequence:
#   *Sparse Transformer* (strided and fixed), $O(N\sqrt N)$.
# * **Compressed / axial patterns** — pool the sequence (*Memory-compressed attention*, $O(N \cdot N/k)$), or attend
#   along one axis of a reshaped grid at a time (*Axial attention*, $O(N\sqrt N)$).
#
# | mechanism | paper | registry name | survey complexity |
# |---|---|---|---|
# | blockwise local attention | Liu et al., 2018 ([1801.10198](https://arxiv.org/abs/1801.10198)); Parmar et al., 2018 | `local` | $O(N b)$ |
# | memory-compressed attention | Liu et al., 2018, *Generating Wikipedia by Summarizing Long Sequences* ([1801.10198](https://arxiv.org/abs/1801.10198)) | `memory_compressed` | $O(N_b^2)$ |
# | Image Transformer, 1-D and 2-D local | Parmar et al., 2018, *Image Transformer* ([1802.05751](https://arxiv.org/abs/1802.05751)) | `image_local_1d`, `image_local_2d` | $O(N m)$ |
# | Sparse Transformer | Child et al., 2019 ([1904.10509](https://arxiv.org/abs/1904.10509)) | `sparse_strided`, `sparse_fixed` | $O(N\sqrt N)$ |
# | Axial attention | Ho et al., 2019 ([1912.12180](https://arxiv.org/abs/1912.12180)) | `axial` | $O(N\sqrt N)$ |
#
# Every exact mechanism here keeps the contract of the package: its output equals full softmax attention masked by
# the pattern that its `pattern(cache)` rebuilds from the paper's rule, and its `weights(cache)` is the
# $N \times N$ matrix with `out == weights @ v`. Memory-compressed attention is the one approximation of the chapter:
# it attends to *summaries* of the keys. Beside each rule, the cells print the package's own lines that compute it
# (`effattn.tools.teach.show_source`: the source itself, never a copy).

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import effattn
from effattn.gradcheck import check_gradients, rel_error
from effattn.figures.style import plot_pattern, plot_patterns
from effattn.tools.teach import check_kernel, load_answer, show_source

full = effattn.get("full")
fixed_pattern_names = [n for n in effattn.names() if effattn.get(n).notebook == "01_fixed_patterns"]
for name in fixed_pattern_names:
    spec = effattn.get(name)
    print(f"{name:18s} {spec.title:45s} {spec.citation:35s} {'+'.join(spec.classes):5s} {spec.complexity}")
