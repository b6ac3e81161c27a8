"""The backend: choosing numpy or cupy (the import rule itself is enforced in test_architecture.py)."""

import numpy as np
import pytest

from effattn import backend

def test_default_backend_and_namespace():
    assert backend.get_backend() in ("numpy", "cupy")
    a = np.ones(3)
    assert backend.get_namespace(a, None) is np
    assert backend.to_numpy({"a": a, "b": [a]})["b"][0] is not None


def test_use_backend_restores_and_rejects_unknown():
    before = backend.get_backend()
    with backend.use_backend("numpy"):
        assert backend.get_backend() == "numpy"
    assert backend.get_backend() == before
    with pytest.raises(ValueError, match="backend"):
        backend.set_backend("torch")


def test_missing_cupy_gives_one_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "cupy":
            raise ImportError("No module named 'cupy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.setitem(backend._cupy, "module", None)
    with pytest.raises(backend.BackendError, match=r"effattn\[cuda12\]"):
        backend.set_backend("cupy")


def test_namespace_without_arrays_is_the_active_backend():
    """One rule: get_namespace() with no array (or only None) is the active backend, arrays decide otherwise."""
    assert backend.get_namespace() is backend.xp()
    assert backend.get_namespace(None, 3, 1.5) is backend.xp()
    assert backend.get_namespace(np.zeros(2), None) is np
