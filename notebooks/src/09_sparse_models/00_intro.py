# %% [markdown]
# # 09 · Sparse models: Switch / mixture of experts and the Product Key Memory
#
# *Efficient Transformers: A Survey* — Tay et al. ([arXiv 2009.06732](https://arxiv.org/abs/2009.06732)) counts among
# its classes the **sparse models**: layers that hold many parameters but let each token use only a few of them
# (conditional computation). They replace the position-wise feed-forward, not the attention:
#
# | layer | paper | each token uses | parameters |
# |---|---|---|---|
# | `switch`, k = 1 | Fedus et al. 2021 ([arXiv 2101.03961](https://arxiv.org/abs/2101.03961)) | 1 of E expert FFNs | E × one FFN |
# | `switch`, k = 2 | GShard, Lepikhin et al. 2020 ([arXiv 2006.16668](https://arxiv.org/abs/2006.16668)) | 2 of E experts | E × one FFN |
# | `pkm` | Lample et al. 2019 ([arXiv 1907.05242](https://arxiv.org/abs/1907.05242)) | k of K value rows | K × d_model |
#
# Both are registered layers (`kind="layer"`: x (..., N, D) → y (..., N, D), no residual) with the whole contract
# (gradients of every parameter — through the auxiliary losses too —, key masks, causality, a per-token loop
# reference), and both can replace a block's feed-forward: `python -m effattn train --ffn switch --experts 8
# --capacity 1.25` or `--ffn pkm --pkm-keys 1024`.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import effattn
from effattn.backend import set_blas_threads
from effattn.layers import pkm, switch
from effattn.tools import sparse_models
from effattn.tools.teach import check, load_answer, show_source
from effattn.tools.train import train_model

T0 = time.time()
set_blas_threads(1)          # timings below on one thread and the CPU clock (steady on a shared machine)
