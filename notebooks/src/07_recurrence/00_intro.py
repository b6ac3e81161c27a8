# %% [markdown]
# # 07 · Recurrence: Transformer-XL and the Compressive Transformer
#
# *Efficient Transformers: A Survey* — Tay et al. ([arXiv 2009.06732](https://arxiv.org/abs/2009.06732)) gives
# **recurrence** (RC) a class of its own. The blockwise models of notebook 01 cut a long sequence into blocks that
# never see each other; a recurrent model cuts it into **segments** processed one after another and connects each
# segment to the one before through a memory of hidden states. Within a segment it is ordinary attention; across
# segments information flows only forward, through the memory. The survey notes that these models could be seen as
# fixed patterns, but their state carried from call to call sets them apart.
#
# | layer | paper | a segment of N tokens attends over | cost per segment |
# |---|---|---|---|
# | `transformer_xl` | Dai et al. 2019 ([arXiv 1901.02860](https://arxiv.org/abs/1901.02860)) | [memory of L states; segment] | O(N (L + N) D) |
# | `compressive` | Rae et al. 2020 ([arXiv 1911.05507](https://arxiv.org/abs/1911.05507)) | [compressed memory of L_c rows, each c old states; memory; segment] | O(N (L_c + L + N) D) + the compression |
#
# **The intuition.** A language model trained on segments of N tokens knows nothing before its segment: the context
# is cut at every boundary, and predicting token by token over a long text would mean recomputing a whole window at
# each step. Transformer-XL keeps, for every layer, the L states the layer received in the previous segment(s) — the
# **memory** m — and lets the current segment attend over [m; h]. The memory is a *constant* of the current step:
# no gradient flows into it (the paper's stop-gradient SG), so a training step costs one segment's forward and
# backward, whatever came before. Yet a layer's memory holds the outputs of the layer below, which themselves read
# *their* memory: the context grows by about L tokens per layer (section 1).
#
# The **Compressive Transformer** (section 3) keeps what Transformer-XL forgets: the states that leave the memory
# are compressed c : 1 into a second memory, so that the same number of keys reaches further back. Sections 1–2: the
# Transformer-XL layer and its relative positions; 3: the Compressive Transformer; 4: the cost; 5: both trained, with
# and without memory, on a task whose answers lie one or two segments back.
#
# **Why relative positions.** With absolute positions, token 3 of this segment and token 3 of the previous one
# would carry the same position embedding, and the memory's keys would collide with the segment's. So the score of
# query i and key j depends on their *distance* only, through a fixed sinusoid R_t of the distance t and two learned
# vectors.
#
# **The layer** (`effattn/layers/transformer_xl.py`, the paper's Section 3.3; h the layer's input (N, D), m the memory
# (L, D), M = L + N; per head, d = D / heads):
#
# $$\tilde h = [\mathrm{SG}(m);\ h],\qquad q = h W_q,\quad k = \tilde h W_k,\quad v = \tilde h W_v,\quad r_t = R_t W_R$$
#
# $$A_{ij} = \underbrace{q_i\cdot k_j}_{(a)} + \underbrace{q_i\cdot r_{L+i-j}}_{(b)} + \underbrace{u\cdot k_j}_{(c)}
#  + \underbrace{v\cdot r_{L+i-j}}_{(d)} = (q_i + u)\cdot k_j + (q_i + v)\cdot r_{L+i-j}$$
#
# $$y = \mathrm{LayerNorm}\big(h + \mathrm{softmax}(A/\sqrt d + \text{mask})\,V W_o\big)$$
#
# Query i sits at position L + i of the extended context and key j at position j, so their distance is L + i − j.
# The four terms: (a) content against content, as in every attention; (b) content against position — how far back
# *this* query likes to look; (c) a global content bias u — some keys matter to every query; (d) a global position
# bias v — some distances matter to every query. (The bias v is not the values V; the code calls it `vb`.) Causal
# (the language model): query i sees keys j ≤ L + i, the whole memory and its past in the segment. R_t =
# [sin(t f), cos(t f)] with f_k = 10000^(−2k/D).
#
# Computing (b) + (d) pair by pair would need an (N, M, d) tensor of r_{L+i−j}. The **relative shift**
# (`effattn/nn/relative.py`, section 1) gets it from one product over the M + N − 1 distinct distances and a
# reshape.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

from effattn.backend import set_blas_threads
from effattn.figures import recurrence as figs
from effattn.gradcheck import numerical_gradient
from effattn.layers import compressive as cp
from effattn.layers import transformer_xl as xl
from effattn.nn import relative
from effattn.tools import recurrence
from effattn.tools.teach import check, load_answer, show_source
from effattn.tools.train import evaluate, train_model

T0 = time.time()
set_blas_threads(1)          # timings below on one thread and the CPU clock (steady on a shared machine)


def show(path, size=(11, 7)):
    plt.figure(figsize=size)
    plt.imshow(plt.imread(path))
    plt.axis("off")
    plt.show()
