import os

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_configure(config):
    """EFFATTN_BACKEND=cupy on a machine where CuPy cannot run: stop the session once, with the
    reason, rather than failing every test with the same error."""
    wanted = os.environ.get("EFFATTN_BACKEND", "").strip()
    if wanted.lower() in ("", "numpy"):
        return
    from effattn import backend

    try:
        backend.get_backend()            # reads EFFATTN_BACKEND and imports and probes CuPy
    except Exception as exc:  # noqa: BLE001 - BackendError, a bad name, a broken CUDA install
        if wanted.lower() == "cupy":
            msg = f"EFFATTN_BACKEND=cupy but CuPy is unusable: {exc}; install cupy or unset EFFATTN_BACKEND"
        else:
            msg = f"{exc}; unset EFFATTN_BACKEND or set it to numpy or cupy"
        pytest.exit(msg, returncode=pytest.ExitCode.USAGE_ERROR)
