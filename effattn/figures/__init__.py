"""Every figure of effattn, apart from the compute code (which never imports matplotlib).

One module per notebook (survey section), plus the shared style and the figures across
mechanisms:

    style.py                    plot_pattern, plot_patterns, save, the default pattern figure
    background.py               00: full attention in the three modes
    fixed_patterns.py           01: local, memory-compressed, Image Transformer, Sparse Transformer, axial
    combination_of_patterns.py  02: Longformer, ETC, BigBird
    learned_patterns.py         03: Reformer's buckets, Routing's clusters, Sinkhorn's sorting, Synthesizer
    neural_memory.py            04: Set Transformer's inducing points and seeds
    low_rank.py                 05: Linformer, Nystromformer
    kernels.py                  06: Performer's features
    recurrence.py               07: Transformer-XL's segments and memory, its relative score and shift;
                                the Compressive Transformer's two memories and reconstruction loss
    downsampling.py             08: the Funnel's pooled groups, Perceiver's cross-attention maps
    sparse_models.py            09: a mixture of experts' routing
    techniques.py               10: the online softmax of flash, tile by tile
    scaling.py                  the overview of every kernel, the measured scaling curves

:data:`FIGURES` maps each registry name to the function that draws its own figures,
``fn(out_dir, rng) -> [paths]`` (``None``: only the default pattern figure).
``python -m effattn figures`` calls :func:`write`, which draws, for every name, the
default ``<name>_pattern.png`` (kernels) and then the function in the table.
"""
from __future__ import annotations

import os

import numpy as np

from .. import registry
from . import (background, combination_of_patterns, downsampling, fixed_patterns, kernels, learned_patterns,
               low_rank, neural_memory, recurrence, scaling, sparse_models, techniques)
from .style import mechanism_pattern_figure

FIGURES = {
    "full": background.full_figures,
    "flash": techniques.flash_figures,
    "local": fixed_patterns.local_figures,
    "memory_compressed": fixed_patterns.memory_compressed_figures,
    "image_local_1d": fixed_patterns.image_local_1d_figures,
    "image_local_2d": fixed_patterns.image_local_2d_figures,
    "sparse_strided": fixed_patterns.sparse_strided_figures,
    "sparse_fixed": fixed_patterns.sparse_fixed_figures,
    "axial": fixed_patterns.axial_figures,
    "longformer": combination_of_patterns.longformer_figures,
    "etc": combination_of_patterns.etc_figures,
    "bigbird": combination_of_patterns.bigbird_figures,
    "reformer": learned_patterns.reformer_figures,
    "routing": learned_patterns.routing_figures,
    "sinkhorn": learned_patterns.sinkhorn_figures,
    "synthesizer_dense": learned_patterns.synthesizer_dense_figures,
    "synthesizer_random": learned_patterns.synthesizer_random_figures,
    "isab": neural_memory.isab_figures,
    "pma": neural_memory.pma_figures,
    "linformer": low_rank.linformer_figures,
    "nystromformer": low_rank.nystromformer_figures,
    "linear": kernels.linear_figures,
    "performer": kernels.performer_figures,
    "switch": sparse_models.switch_figures,
    "pkm": sparse_models.pkm_figures,
    "funnel": downsampling.funnel_figures,
    "perceiver": downsampling.perceiver_figures,
    "transformer_xl": recurrence.transformer_xl_figures,
    "compressive": recurrence.compressive_figures,
}


def write(names=None, out_dir="figures", progress=False):
    """Draw the figures of ``names`` (default: every registered mechanism, plus the overview)
    into ``out_dir``; returns the paths written, in order (a mechanism draws one to four files).

    ``progress``: a tqdm bar on a terminal only (``disable=None``: no bar when stderr is not a
    terminal, so logs stay clean; ``TQDM_DISABLE=1`` turns it off on a terminal too)."""
    every = names is None
    names = registry.names() if every else list(names)
    for name in names:
        registry.get(name)  # unknown names raise ValueError listing the valid ones
        if name not in FIGURES:
            raise ValueError(f"mechanism {name!r} has no entry in effattn.figures.FIGURES")
    from tqdm import tqdm

    written = []
    off = not progress or os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false")
    for name in tqdm(names, desc="figures", unit="mechanism", disable=True if off else None):
        spec = registry.get(name)
        if spec.kind == "kernel":
            written.append(mechanism_pattern_figure(spec, out_dir))
        if FIGURES[name] is not None:
            written.extend(FIGURES[name](out_dir, np.random.default_rng(0)))
    if every:
        written.append(scaling.overview_figure(out_dir))
    return list(dict.fromkeys(written))


__all__ = ["FIGURES", "write"]
