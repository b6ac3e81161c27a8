# %% [markdown]
# # 08 · Downsampling: the Funnel Transformer and the Perceiver
#
# *Efficient Transformers: A Survey* — Tay et al. ([arXiv 2009.06732](https://arxiv.org/abs/2009.06732)) names a
# class of models that make attention cheaper by making the **sequence shorter**: instead of sparsifying or
# approximating the N × N attention, they attend over fewer positions.
#
# | layer | paper | N inputs become | cost |
# |---|---|---|---|
# | `funnel` | Dai et al. 2020 ([arXiv 2006.03236](https://arxiv.org/abs/2006.03236)) | N / s pooled positions per stage | O(N' N) for the pooling layer, O(N'^2) after |
# | `perceiver` | Jaegle et al. 2021 ([arXiv 2103.03206](https://arxiv.org/abs/2103.03206)) | m learned latents | O(m N) once, O(m^2) per layer |
# | `perceiver`, causal | Perceiver AR, Hawthorne et al. 2022 ([arXiv 2202.07765](https://arxiv.org/abs/2202.07765)) | the last m positions | O(m N) once, O(m^2) per layer |
#
# Both are registered **layers whose output is shorter than their input**: x (..., N, D) → y (..., N', D). The
# registry's contract follows the rows to the inputs they stand for: `Case.real_rows` (which output rows are real
# under a key mask: a pooled position is real if any of its members is) and `Case.out_positions` (the input position
# each output row of a causal layer stands for, which the causality test uses). Two relatives seen earlier shrink
# the *keys* rather than the sequence: Nyströmformer's landmarks (notebook 05) and the Set Transformer's inducing
# points (notebook 04); section 4 measures them side by side.
#
# Encoders built on these layers train with `python -m effattn train --task image --arch perceiver --latents 16` or
# `--arch funnel --stages 2,2,2`.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import effattn
from effattn.backend import set_blas_threads
from effattn.figures.downsampling import funnel_figures, perceiver_figures, perceiver_maps
from effattn.layers import funnel, perceiver
from effattn.nn import pooling
from effattn.tools import downsampling
from effattn.tools.bench import cost_table
from effattn.tools.teach import check, load_answer, show_source
from effattn.tools.train import train_model

T0 = time.time()
set_blas_threads(1)          # timings below on one thread and the CPU clock (steady on a shared machine)


def show(path, size=(11, 7)):
    plt.figure(figsize=size)
    plt.imshow(plt.imread(path))
    plt.axis("off")
    plt.show()
