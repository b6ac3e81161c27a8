"""The README's quick start and mechanism table stay true."""
import pathlib

import effattn

README = (pathlib.Path(__file__).parents[1] / "README.md").read_text()


def test_quick_start_commands():
    assert "python -m pip install -r requirements.txt && python -m effattn figures" in README
    assert "\npython -m pytest" in README


def test_table_lists_every_registered_mechanism():
    missing = [n for n in effattn.names() if f"| `{n}` |" not in README]
    assert not missing, f"README table is stale (run python -m effattn list --markdown): {missing}"
