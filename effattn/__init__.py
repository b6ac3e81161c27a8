"""effattn — the survey *Efficient Transformers* (Tay et al., arXiv 2009.06732) in plain NumPy.

    import effattn
    effattn.names()                       # every registered mechanism, in the survey's order
    effattn.names("kernel")               # only kernels ((q, k, v) -> out); "layer" for layers
    spec = effattn.get("full")            # the registry entry: title, paper, complexity, forward, ...
    out, cache = spec.forward(q, k, v, causal=True)
    grads = spec.backward(dout, cache)    # {"q", "k", "v", <params>}

``get`` and ``names`` are the one way to look mechanisms up. The architecture, the
kernel contract and the registry's fields are in DESIGN.md at the project root.
"""
from .backend import get_backend, get_namespace, set_backend, to_numpy, use_backend
from .registry import Case, Mechanism, get, names, register

__version__ = "0.1.0"

__all__ = ["Case", "Mechanism", "get", "get_backend", "get_namespace", "names", "register", "set_backend",
           "to_numpy", "use_backend"]
