"""Figures of notebook 00 (background): full attention in the three modes."""
from __future__ import annotations

import os

import numpy as np

from .style import plot_patterns, save


def full_figures(out_dir, rng=None):
    """Full attention: bidirectional (encoder), causal (decoder), cross-attention (encoder-decoder)."""
    n, m = 16, 24
    ones = np.ones((n, n), bool)
    fig = plot_patterns(
        [ones, np.tril(ones), np.ones((n, m), bool)],
        ["encoder: bidirectional", "decoder: causal", "encoder-decoder: cross (N=16, M=24)"],
        suptitle="Full attention in the three modes")
    return [save(fig, os.path.join(out_dir, "full_modes.png"))]
