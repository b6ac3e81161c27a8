"""Attention mechanisms at kernel level: ``forward(q, k, v, ...) -> (out, cache)``.

Each module registers itself in :mod:`effattn.registry` when imported.
"""
