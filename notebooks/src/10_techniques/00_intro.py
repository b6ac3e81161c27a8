# %% [markdown]
# # 10 · Techniques for efficiency: tiled exact attention, chunking, reversible layers, checkpointing, low precision
#
# *Efficient Transformers: A Survey* — Tay et al. ([arXiv 2009.06732](https://arxiv.org/abs/2009.06732)): besides the
# mechanisms of its taxonomy, the survey discusses efforts orthogonal to the attention pattern — quantisation and mixed
# precision among them — and Reformer (Kitaev et al., 2020, [arXiv 2001.04451](https://arxiv.org/abs/2001.04451), its
# Section 3) owes two of its three contributions to such techniques: **reversible residual layers** and the
# **chunked feed-forward**. This notebook teaches five techniques that change *how* a model runs, not *what* it
# computes (the reversible block excepted: it is its own architecture):
#
# | technique | paper | what it saves | what it costs |
# |---|---|---|---|
# | `flash`: exact attention by tiles, online softmax | Milakov & Gimelshein 2018; Rabe & Staats 2021; Dao et al. 2022 | the N × M matrix | a recomputation in the backward |
# | chunked feed-forward | Reformer §3 | the (N, d_ff) hidden activations | nothing but a loop |
# | reversible blocks | Gomez et al. 2017 ([arXiv 1707.04585](https://arxiv.org/abs/1707.04585)); Reformer §3 | every block's activations | one more forward per block |
# | gradient checkpointing | Chen et al. 2016 ([arXiv 1604.06174](https://arxiv.org/abs/1604.06174)) | all but √L blocks' activations | one more forward |
# | bfloat16 / float16 / int8 | Micikevicius et al. 2018 ([arXiv 1710.03740](https://arxiv.org/abs/1710.03740)) | half (a quarter) of the bytes | rounding error, overflow |
#
# Memory is measured throughout as the `tracemalloc` peak of one forward + backward (what the activations and the
# step's temporaries take; `effattn.tools.techniques` and `effattn.tools.bench` measure it the same way). The same
# switches exist for training: `python -m effattn train --reversible`, `--checkpoint K`, `--ffn-chunk C`,
# `--precision bf16|fp16`.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import effattn
from effattn.models.transformer import Block, Stack
from effattn.nn.modules import FeedForward
from effattn.tools import techniques
from effattn.tools.teach import check, load_answer, show_source

T0 = time.time()
MiB = 2 ** 20
