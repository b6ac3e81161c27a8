"""The command line: every subcommand runs, errors are one clear line with a non-zero exit."""
import os
import pathlib
import subprocess
import sys

import pytest

from effattn.tools.cli import main

ROOT = pathlib.Path(__file__).parents[1]


def test_list_markdown_has_every_mechanism(capsys):
    import effattn

    assert main(["list", "--markdown"]) == 0
    out = capsys.readouterr().out
    for name in effattn.names():
        assert f"`{name}`" in out


def test_figures_only_full(tmp_path, capsys):
    assert main(["figures", "--out", str(tmp_path), "--only", "full"]) == 0
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "full_pattern.png" in names and "full_modes.png" in names
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1] == f"wrote {len(names)} files for 1 mechanism into {tmp_path}{os.sep}"
    assert err == ""                                   # no tqdm bar when stderr is not a terminal (a log)


def test_check_full_passes(capsys):
    assert main(["check", "--only", "full"]) == 0
    out, err = capsys.readouterr()
    assert "PASS" in out and err == ""                 # no tqdm bar into a log


def test_bars_only_on_a_terminal_and_never_with_tqdm_disable(monkeypatch):
    from effattn.tools.cli import _no_bar

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert _no_bar() is None and _no_bar(progress=False) is True     # None: tqdm shows a bar on a tty only
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert _no_bar() is True


def test_bench_tiny(tmp_path, capsys):
    assert main(["bench", "--names", "full", "local", "--n", "64", "128", "--repeats", "1", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "time exp" in out and (tmp_path / "scaling.csv").exists() and (tmp_path / "scaling_time.png").exists()
    # off a terminal: no bar, one progress line per mechanism on stderr
    assert err.splitlines() == [line for line in err.splitlines() if line.startswith("bench [")]
    assert [line.split(":")[0] for line in err.splitlines()] == ["bench [1/2] full", "bench [2/2] local"]
    assert all("N = 64..128" in line for line in err.splitlines())


def test_bench_default_out_is_not_the_committed_figures():
    from effattn.tools.cli import build_parser

    out = build_parser().parse_args(["bench"]).out
    assert pathlib.Path(out).resolve() != (ROOT / "figures").resolve()
    ignored = (ROOT / ".gitignore").read_text().split()
    assert f"{out}/" in ignored or out in ignored, f"bench's default --out {out!r} is not git-ignored"
    help_text = subprocess.run([sys.executable, "-m", "effattn", "bench", "--help"], capture_output=True, text=True,
                               timeout=120).stdout
    help_text = " ".join(help_text.split())               # argparse wraps lines at the terminal's width
    assert "--out figures && python -m effattn readme" in help_text and "--quick" in help_text


def test_bench_decode_reports_time_per_token_and_state(tmp_path, capsys):
    assert main(["bench", "--decode", "--names", "full", "local", "--prompt", "40", "--steps", "30", "--out",
                 str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ms/token" in out and "full" in out and "local" in out
    for f in ("decode.csv", "decode_state.png", "decode_time.png"):
        assert (tmp_path / f).exists()
    rows = (tmp_path / "decode.csv").read_text().splitlines()
    full = next(r for r in rows if r.startswith("full,")).split(",")
    assert int(full[7]) > int(full[6])                       # the KV cache grows: state last > state first


def test_unknown_name_is_one_line_error(capsys):
    assert main(["check", "--only", "no_such_thing"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "registered:" in err[0] and "full" in err[0]


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "effattn", "list"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "full" in r.stdout


@pytest.mark.parametrize("argv", [["bench", "--n", "x"], ["nope"]])
def test_bad_arguments_exit_nonzero(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code != 0


def test_scaling_table_from_csv(tmp_path):
    from effattn.tools.readme import scaling_table

    path = tmp_path / "scaling.csv"
    rows = ["name,n,d,dtype,causal,time_s,peak_bytes,speedup_vs_full,memory_vs_full"]
    for n in (1024, 2048, 4096):
        rows.append(f"full,{n},64,float32,False,{(n / 1024) ** 2},{(n / 1024) ** 2 * 1e6},1,1")
        rows.append(f"local,{n},64,float32,False,{n / 1024 * 0.1},{n / 1024 * 1e5},0,0")
    path.write_text("\n".join(rows) + "\n")
    table = scaling_table(str(path))
    assert "| `full` | 1024-4096 | 2.00 | 2.00 | 1.0 | 1.000 |" in table
    assert "| `local` | 1024-4096 | 1.00 | 1.00 | 40.0 | 0.025 |" in table


def test_figures_write_a_png_for_every_mechanism(tmp_path, capsys):
    import effattn

    assert main(["figures", "--out", str(tmp_path)]) == 0
    written = [p.name for p in tmp_path.glob("*.png")]
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary == f"wrote {len(written)} files for {len(effattn.names())} mechanisms into {tmp_path}{os.sep}"
    missing = [n for n in effattn.names() if not any(w.startswith(n + "_") for w in written)]
    assert not missing, f"no figure for {missing}"
    assert "overview_patterns.png" in written
    # every committed figure (but the bench's scaling and decoding curves) is one the command writes
    committed = {p.name for p in (ROOT / "figures").glob("*.png")}
    lost = sorted(n for n in committed - set(written) if not n.startswith(("scaling_", "decode_")))
    assert not lost, f"figures/ holds PNGs that python -m effattn figures no longer writes: {lost}"
