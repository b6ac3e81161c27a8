"""The README's quick start, oracle snippet and mechanism table stay true, and CI runs the quick start."""
import pathlib
import re
import shutil

import numpy as np
import pytest

import effattn
from effattn.tools.cli import main

ROOT = pathlib.Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def _section(title):
    """The README text from the heading ``## title`` to the next ``## `` heading."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end >= 0 else None]


def _block(text, lang):
    """The first fenced ``lang`` block of ``text``, without its fences."""
    m = re.search(rf"```{lang}\n(.*?)```", text, re.S)
    assert m, f"no ```{lang} block"
    return m.group(1)


def quick_start_commands():
    """The commands of the Quick start block, comments and alignment stripped."""
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in _block(_section("Quick start"), "bash").splitlines()]
    return [line for line in lines if line]


def test_quick_start_commands():
    assert quick_start_commands() == ["python -m pip install -r requirements.txt && python -m effattn figures",
                                      "python -m pytest"]


def test_ci_runs_exactly_the_quick_start():
    """.ci/run runs the quick start's commands verbatim, in order, and nothing else (but its setup lines)."""
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    run = [line.strip() for line in ci if line.strip() and not line.lstrip().startswith("#")]
    setup = [line for line in run if line.startswith(("set ", "cd ", "export "))]
    commands = [re.sub(r"\s*\|\|\s*exit 1$", "", line) for line in run if line not in setup]
    assert commands == quick_start_commands(), f".ci/run runs {commands}, the README's quick start is {quick_start_commands()}"
    assert any("TQDM_DISABLE=1" in line for line in setup) and any("MPLBACKEND=Agg" in line for line in setup)


def test_quick_start_names_the_python_version_of_pyproject():
    want = re.search(r'requires-python = ">=(\d+\.\d+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert f"Python {want} or newer" in _section("Quick start")


def test_front_door_instructions():
    qs = _section("Quick start")
    for text in ("python -m venv .venv && . .venv/bin/activate", "jupyter lab notebooks/",
                 "python -m pip install -e .", "--quick", "about 6 minutes"):
        assert text in qs, f"the quick start does not say {text!r}"
    gpu = _section("On a GPU")
    assert 'pip install -e ".[cuda12]"' in gpu and '".[cuda13]"' in gpu
    assert 'install "effattn[' not in README          # effattn is not on PyPI: only the clone installs


def test_license_file_matches_pyproject():
    assert 'license = {text = "MIT"}' in (ROOT / "pyproject.toml").read_text()
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "effattn authors" in text


def _oracle_snippet():
    code = _block(_section("Using a function as an oracle"), "python")
    assert "case = spec.example(rng" in code and "spec.forward(**case.inputs, **case.config)" in code
    return code


def _stand_in(name):
    """What a user's correct implementation returns: W @ v, W the mechanism's effective attention
    matrix (recomputed here from its own forward; ``out == W @ v`` is the contract's claim)."""
    def my_attention(**kwargs):
        spec = effattn.get(name)
        _, cache = spec.forward(**kwargs)
        return spec.weights(cache) @ kwargs["v"]
    return my_attention


@pytest.mark.parametrize("name", effattn.names(kind="kernel"))
def test_oracle_snippet_runs_for_every_kernel(name):
    code = _oracle_snippet()
    shown = re.search(r'effattn\.get\("(\w+)"\)', code)
    assert shown and shown.group(1) in effattn.names(kind="kernel")
    code = code.replace(shown.group(0), f'effattn.get("{name}")')
    scope = {"my_attention": _stand_in(name)}
    exec(compile(code, f"README oracle snippet ({name})", "exec"), scope)
    inputs, out, W = scope["case"].inputs, scope["out"], scope["W"]
    assert out.shape == inputs["q"].shape[:-1] + inputs["v"].shape[-1:]         # (B, H, N, d_v)
    assert W.shape == out.shape[:-1] + inputs["k"].shape[-2:-1]                # (B, H, N, M)
    assert set(scope["grads"]) == set(scope["case"].inputs)      # a gradient for every input
    assert np.isfinite(out).all()


def test_table_lists_every_registered_mechanism():
    missing = [n for n in effattn.names() if f"| `{n}` |" not in README]
    assert not missing, f"README table is stale (run python -m effattn list --markdown): {missing}"


def test_readme_command_says_whether_it_changed_anything(tmp_path, capsys):
    path = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", path)
    args = ["readme", "--path", str(path), "--figures", str(ROOT / "figures")]
    assert main(args) == 0                                   # brings the copy up to date (if it was not)
    capsys.readouterr()
    current = path.read_text()
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == f"{path} is up to date" and path.read_text() == current
    stale = current.replace("| `full` |", "| `full_old` |", 1)
    assert stale != current
    path.write_text(stale)
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == f"updated {path}" and path.read_text() == current
