"""Building blocks, each a forward/backward pair (CS231n style)."""
