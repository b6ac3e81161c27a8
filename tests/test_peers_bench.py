"""``bench --peers`` (benchmarks/peers.py) without torch, and its README section; nothing here needs torch."""
import ast
import importlib.util
import pathlib
import re
import subprocess
import sys

from effattn.tools import bench, readme
from effattn.tools.cli import main

ROOT = pathlib.Path(__file__).parents[1]
SCRIPT = ROOT / "benchmarks" / "peers.py"
PEER_MODULES = ("torch", "local_attention", "reformer_pytorch", "routing_transformer", "performer_pytorch",
                "sinkhorn_transformer", "fast_transformers")

# a child python where torch and the peers cannot be imported, whatever is installed
WITHOUT_TORCH = f"""
import sys
for name in {PEER_MODULES!r}:
    sys.modules[name] = None          # find_spec says absent; import raises ImportError
from effattn.tools.cli import main
status = main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m.split('.')[0] in {PEER_MODULES!r} and sys.modules[m] is not None)
print('LOADED', loaded, 'SCRIPT', 'effattn_peers_bench' in sys.modules, file=sys.stderr)
sys.exit(status)
"""


def _load_script():
    spec = importlib.util.spec_from_file_location("peers_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_torch_one_line_says_what_to_install_and_exits_0(tmp_path):
    out = tmp_path / "peers.csv"
    r = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, "bench", "--peers", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(bench.PEERS_INSTALL), r.stdout
    assert "pip install torch==2.13.0 local-attention reformer-pytorch routing-transformer performer-pytorch " \
           "sinkhorn-transformer" in lines[0]
    # neither torch (nor a peer) nor the timing script was imported, and nothing was written
    assert "LOADED [] SCRIPT False" in r.stderr, r.stderr
    assert not out.exists()


def test_without_the_script_one_line_says_so(tmp_path, capsys):
    assert bench.run_peers([], script=str(tmp_path / "benchmarks" / "peers.py")) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "is not here" in out[0] and "clone" in out[0]


def test_the_script_is_found_in_the_repository():
    assert pathlib.Path(bench.peers_script()).resolve() == SCRIPT.resolve()


def test_options_after_peers_are_the_scripts(monkeypatch):
    seen = []
    monkeypatch.setattr(bench, "run_peers", lambda argv: seen.append(list(argv)) or 0)
    assert main(["bench", "--peers", "--n", "4096", "--repeats", "3"]) == 0
    assert main(["bench", "--names", "local", "--peers", "--out", "x.csv"]) == 0      # --names before --peers too
    assert seen == [["--n", "4096", "--repeats", "3"], ["--names", "local", "--out", "x.csv"]]


def test_the_script_imports_torch_and_the_peers_only_inside_functions():
    tree = ast.parse(SCRIPT.read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            top.add(node.module.split(".")[0])
    assert not top & set(PEER_MODULES), f"benchmarks/peers.py imports {sorted(top & set(PEER_MODULES))} at the top"


def test_the_script_maps_every_row_in_its_docstring():
    peers = _load_script()
    doc = peers.__doc__
    for mech, rows in peers.ROWS.items():
        assert f"- ``{mech}``" in doc, f"benchmarks/peers.py's docstring does not describe the {mech} rows"
        assert mech in peers.PACKAGES
        for setting, ns, peer, make in rows:
            assert callable(make) and ns and peer.split(".")[0] in (peers.PACKAGES[mech][1], "torch")
    assert set(peers.COLUMNS[:12]) == {"mechanism", "setting", "peer", "peer_version", "n", "effattn_s", "peer_s",
                                       "ratio", "date", "machine", "torch_version", "numpy_version"}


def test_the_scripts_main_without_torch(monkeypatch, capsys):
    peers = _load_script()
    monkeypatch.setattr(peers, "_installed", lambda module: False)
    assert peers.main([]) == 0
    assert capsys.readouterr().out.strip().endswith(bench.PEERS_INSTALL)
    assert peers.missing_packages(["local"]) == ["torch", "local-attention"]


def test_torch_is_no_dependency():
    for path in ("requirements.txt", "pyproject.toml"):
        assert not re.search(r"^\s*[\"']?torch\b", (ROOT / path).read_text(), re.M), f"{path} lists torch"


# --------------------------------------------------------------------------- the README section
ROWS = [
    {"mechanism": "full", "setting": "causal", "peer": "torch.nn.functional.scaled_dot_product_attention",
     "peer_version": "2.13.0+cpu", "n": 4096, "effattn_s": 1.5, "peer_s": 0.5, "ratio": 3.0},
    {"mechanism": "reformer", "setting": "r2_c32", "peer": "reformer_pytorch.LSHAttention", "peer_version": "1.4.4",
     "n": 16384, "effattn_s": 0.25, "peer_s": 1.0, "ratio": 0.25},
]
STAMP = {"date": "2026-05-01", "machine": "Linux-x86_64, Some CPU, 2 CPUs", "torch_version": "2.13.0+cpu",
         "numpy_version": "2.4.6", "repeats": 5, "threads": 2}


def test_peers_csv_to_readme_table(tmp_path):
    peers = _load_script()
    path = peers.write_csv([{**r, **STAMP} for r in ROWS], tmp_path / "peers.csv")
    header = path.read_text().splitlines()[0].split(",")
    assert header[:12] == ["mechanism", "setting", "peer", "peer_version", "n", "effattn_s", "peer_s", "ratio",
                           "date", "machine", "torch_version", "numpy_version"]
    text = readme.peers_section(str(path))
    assert "| `full` | causal | `torch.nn.functional.scaled_dot_product_attention` 2.13.0+cpu | 4096 | 1500.0 | " \
           "500.0 | 3.00 |" in text
    assert "| `reformer` | r2_c32 | `reformer_pytorch.LSHAttention` 1.4.4 | 16384 | 250.0 | 1000.0 | 0.25 |" in text
    for fact in ("2026-05-01", "Linux-x86_64, Some CPU, 2 CPUs", "torch 2.13.0+cpu", "NumPy 2.4.6", "median of 5",
                 "2 threads", "effattn / peer < 1: effattn is faster", "benchmarks/peers.py"):
        assert fact in text, fact


def test_peers_section_without_csv_says_how_to_make_it(tmp_path):
    text = readme.peers_section(str(tmp_path / "peers.csv"))
    assert "python -m effattn bench --peers" in text and bench.PEERS_INSTALL in text and "|" not in text


def test_readme_gets_the_section_once_before_the_parity(tmp_path):
    figures = tmp_path / "figures"
    figures.mkdir()
    path = tmp_path / "README.md"
    path.write_text("# x\n\n<!-- mechanisms:start -->\n<!-- mechanisms:end -->\n\n## Measured scaling\n\ntext\n\n"
                    "## Parity with the peers\n\n## Gallery\n\n<!-- gallery:start -->\n<!-- gallery:end -->\n")
    _, changed = readme.update(str(path), str(figures))
    text = path.read_text()
    assert changed and text.count(readme.PEERS_HEADING) == 1
    assert text.index("## Measured scaling") < text.index(readme.PEERS_HEADING) < text.index("## Parity with the peers")
    assert "Not measured here yet" in text
    peers = _load_script()
    peers.write_csv([{**r, **STAMP} for r in ROWS], figures / "peers.csv")
    _, changed = readme.update(str(path), str(figures))
    text = path.read_text()
    assert changed and text.count(readme.PEERS_HEADING) == 1 and "| 16384 | 250.0 | 1000.0 | 0.25 |" in text
    assert "Not measured here yet" not in text
    assert readme.update(str(path), str(figures))[1] is False                     # current: nothing to change
