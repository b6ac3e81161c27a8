"""The one module that chooses between NumPy and CuPy.

Compute modules (``nn/``, ``attention/``, ``layers/``, ``models/``) never
import numpy or cupy: they ask :func:`get_namespace` for the array module of
the arrays they were given, so the same code runs on the host or on a GPU.

Where *new* arrays are made (examples, random draws moved to the device) the
active backend decides: ``"numpy"`` by default, ``"cupy"`` through
:func:`set_backend`, the :func:`use_backend` context manager or the
environment variable ``EFFATTN_BACKEND``.

Random draws always happen on the host with a ``numpy.random.Generator`` and
are then moved with :func:`asarray`, so one seed gives the same numbers on
both backends.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np

_BACKENDS = ("numpy", "cupy")
_INSTALL_HINT = (
    'install CuPy for your CUDA version, e.g. pip install "effattn[cuda12]" '
    '(CUDA 12) or pip install "effattn[cuda13]" (CUDA 13)'
)
_state = {"name": None}
_cupy = {"module": None}


class BackendError(RuntimeError):
    """The requested backend cannot be used on this machine."""


def _import_cupy():
    """Import cupy lazily and check that a GPU is usable; one clear error otherwise."""
    if _cupy["module"] is not None:
        return _cupy["module"]
    try:
        import cupy  # noqa: PLC0415 (lazy on purpose)
    except Exception as exc:  # ImportError, or a broken CUDA install
        raise BackendError(f"the cupy backend needs CuPy, which could not be imported ({exc}); {_INSTALL_HINT}") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        raise BackendError(f"CuPy is installed but no CUDA GPU is usable ({exc}); {_INSTALL_HINT}") from None
    if count < 1:
        raise BackendError(f"CuPy is installed but no CUDA GPU was found; {_INSTALL_HINT}")
    _cupy["module"] = cupy
    return cupy


def _check_name(name):
    if not isinstance(name, str) or name.lower() not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    return name.lower()


def get_backend() -> str:
    """Name of the active backend ("numpy" or "cupy")."""
    if _state["name"] is None:
        env = os.environ.get("EFFATTN_BACKEND", "numpy").strip() or "numpy"
        try:
            name = _check_name(env)
        except ValueError:
            raise ValueError(f"EFFATTN_BACKEND must be one of {_BACKENDS}, got {env!r}") from None
        if name == "cupy":
            _import_cupy()
        _state["name"] = name
    return _state["name"]


def set_backend(name: str) -> None:
    """Make ``name`` ("numpy" or "cupy") the backend where new arrays are created."""
    name = _check_name(name)
    if name == "cupy":
        _import_cupy()
    _state["name"] = name


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: ``with use_backend("cupy"): ...`` then restore the previous one."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        _state["name"] = previous


def xp():
    """The array module of the active backend (numpy or cupy)."""
    return _import_cupy() if get_backend() == "cupy" else np


def get_namespace(*arrays):
    """Array module (numpy or cupy) of the given arrays; ``None`` entries and Python scalars are skipped.

    The one rule for choosing where arrays live: the module of the arrays given, and the active
    backend (:func:`xp`) when none is given (``get_namespace()``, ``get_namespace(None)``), so a
    pattern built from sizes alone lands where :func:`set_backend` says. Raises ValueError when host
    and device arrays are mixed.
    """
    found = None
    for a in arrays:
        if a is None or isinstance(a, (int, float, bool)):
            continue
        mod = type(a).__module__.split(".")[0]
        space = "cupy" if mod == "cupy" else "numpy"
        if found is None:
            found = space
        elif found != space:
            raise ValueError("arrays live on different backends (numpy and cupy); move them with effattn.backend.asarray")
    if found is None:
        return xp()
    if found == "cupy":
        return _import_cupy()
    return np


def asarray(a, dtype=None):
    """Move ``a`` to the active backend (a no-op when it is already there)."""
    mod = xp()
    if a is None:
        return None
    return mod.asarray(a, dtype=dtype)


def to_numpy(a):
    """Bring an array (or a dict / tuple / list of arrays) back to the host as NumPy."""
    if isinstance(a, dict):
        return {k: to_numpy(v) for k, v in a.items()}
    if isinstance(a, (list, tuple)):
        return type(a)(to_numpy(v) for v in a)
    if a is None:
        return None
    if type(a).__module__.split(".")[0] == "cupy":
        return a.get()
    return np.asarray(a)


def set_blas_threads(n: int) -> bool:
    """Set the host BLAS (OpenBLAS, as NumPy wheels ship it) to ``n`` threads at run time.

    Small matrix products (training small models, blockwise attention) run several
    times faster on one thread of a busy two-core machine, and timings are steadier.
    Returns False (and changes nothing) when no OpenBLAS is loaded.
    """
    import ctypes

    try:
        with open("/proc/self/maps") as fh:
            libs = sorted({line.split()[-1] for line in fh if "openblas" in line and ".so" in line})
    except OSError:
        return False
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for fn in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                   "openblas_set_num_threads64_", "openblas_set_num_threads"):
            if hasattr(lib, fn):
                getattr(lib, fn)(int(n))
                return True
    return False
