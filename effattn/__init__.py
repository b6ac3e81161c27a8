"""effattn — the survey *Efficient Transformers* (Tay et al., arXiv 2009.06732) in plain NumPy.

    import effattn
    effattn.names()                       # every registered mechanism
    spec = effattn.get("full")
    out, cache = spec.forward(q, k, v, causal=True)
    grads = spec.backward(dout, cache)    # {"q", "k", "v", <params>}

See DESIGN.md (shared) and the README for the kernel contract.
"""
from .backend import get_backend, get_namespace, set_backend, to_numpy, use_backend
from .registry import Case, Mechanism, all_mechanisms, get, names, register

__version__ = "0.1.0"


class _Mechanisms:
    """``effattn.MECHANISMS["name"]`` / ``list(effattn.MECHANISMS)``: the registry as a read-only mapping."""

    def __getitem__(self, name):
        return get(name)

    def __iter__(self):
        return iter(names())

    def __len__(self):
        return len(names())

    def __contains__(self, name):
        return name in names()

    def keys(self):
        return names()


MECHANISMS = _Mechanisms()

__all__ = ["Case", "MECHANISMS", "Mechanism", "all_mechanisms", "get", "get_backend", "get_namespace",
           "names", "register", "set_backend", "to_numpy", "use_backend"]
