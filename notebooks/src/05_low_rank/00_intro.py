# %% [markdown]
# # 05 · Low rank: Linformer and Nyströmformer
#
# *Efficient Transformers: A Survey* — Tay et al. ([arXiv 2009.06732](https://arxiv.org/abs/2009.06732)), the
# "low rank" family, with
# *Linformer: Self-Attention with Linear Complexity* — Wang et al. 2020 ([arXiv 2006.04768](https://arxiv.org/abs/2006.04768)) and
# *Nyströmformer: A Nyström-Based Algorithm for Approximating Self-Attention* — Xiong et al. 2021
# ([arXiv 2102.03902](https://arxiv.org/abs/2102.03902)).
#
# **Intuition.** The N x N attention matrix $P = \mathrm{softmax}(QK^\top/\sqrt d)$ of a trained model is close to a
# matrix of much smaller rank: a few directions carry almost all of it. If $P \approx$ (N x k)(k x N) with $k \ll N$, we
# never need the N x N matrix. Linformer *learns* a projection of the sequence axis to k slots; Nyströmformer
# reconstructs $P$ from a few landmark rows and columns and a pseudo-inverse. Both cost $O(N k)$ — and neither can
# decode causally, because every compressed slot mixes the whole sequence, future included.
#
# Beside each equation a cell prints the package's own lines that compute it (`effattn.tools.teach.show_source`: the
# source itself, never a copy); after the two mechanisms you write Linformer's attention and its backward yourself.

# %%
import math
import time

import matplotlib.pyplot as plt
import numpy as np

import effattn
from effattn.backend import to_numpy
from effattn.gradcheck import check_gradients
from effattn.figures.style import plot_patterns
from effattn.tools.teach import check_kernel, load_answer, show_source

linformer = effattn.get("linformer")
nystromformer = effattn.get("nystromformer")
full = effattn.get("full")
for spec in (linformer, nystromformer):
    print(f"{spec.title:15s} | {spec.citation:22s} | {spec.classes} | {spec.complexity} | causal={spec.causal}")


def softmax_matrix(q, k):
    """The exact attention matrix, for comparisons (small N only)."""
    return to_numpy(full.forward(q, k, k[..., :1] * 0 + 1.0)[1].attend.p)


def smooth_qk(rng, n, d, noise=0.3):
    """Queries and keys that drift smoothly along the sequence (like token embeddings plus position):
    their attention matrix has the structure of real ones (near-diagonal mass, smooth rows)."""
    x = np.cumsum(rng.standard_normal((n, d)), axis=0) / math.sqrt(n / 8)
    q = x + noise * rng.standard_normal((n, d))
    k = x + noise * rng.standard_normal((n, d))
    return q[None, None], k[None, None]
