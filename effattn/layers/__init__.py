"""Mechanisms that are whole layers (Set Transformer blocks, ...): ``forward(x, ...) -> (out, cache)``."""
