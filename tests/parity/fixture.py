"""The parity fixture format lives in :mod:`effattn.tools.parity` (read its docstring); the
generators beside this file import :func:`save` from here."""
from effattn.tools.parity import FIXTURES, all_fixtures, compare, load, save  # noqa: F401
