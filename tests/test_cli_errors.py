"""How ``python -m effattn`` fails: one line on stderr, the right exit status, no traceback, bad
arguments refused before any work, checkpoints never damaged (issue 11, the command-line part)."""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from effattn.tools import cli, train

ROOT = pathlib.Path(__file__).parents[1]
TINY = ["--task", "copy", "--seq-len", "6", "--d-model", "16", "--heads", "2", "--layers", "1",
        "--batch-size", "4", "--eval-every", "0"]


def one_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture
def no_training(monkeypatch):
    """Any training makes the test fail: the refusals must come before the work."""
    def fit(*a, **k):
        raise AssertionError("training started")
    monkeypatch.setattr(train, "fit", fit)


@pytest.fixture
def checkpoint(tmp_path):
    """A good two-step checkpoint and its bytes."""
    path = tmp_path / "ck.npz"
    assert cli.main(["train", *TINY, "--steps", "2", "--save", str(path)]) == 0
    return path


def step_of(path):
    with np.load(path) as z:
        return json.loads(str(z["meta"]))["step"]


# --------------------------------------------------------------------------- usage errors
@pytest.mark.parametrize("argv,flag", [
    (["--repeats", "0"], "--repeats"),
    (["--threads", "0"], "--threads"),
    (["--max-seconds", "-1"], "--max-seconds"),
    (["--n", "0", "64"], "--n"),
    (["--n", "-8", "64"], "--n"),
    (["--d", "0"], "--d"),
    (["--n", "64"], "--n"),                       # one N: no exponent can be fitted
    (["--n", "64", "64"], "--n"),
])
def test_bench_refuses_bad_sizes_up_front(argv, flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--names", "full", "--n", "16", "32", "--repeats", "1", *argv, "--out", str(tmp_path)])
    assert e.value.code == 2
    line = one_line(capsys)
    assert line.startswith(f"effattn: error: argument {flag}:"), line
    assert not list(tmp_path.iterdir())


def test_usage_error_of_any_command_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--steps", "x"])
    assert e.value.code == 2
    assert one_line(capsys).startswith("effattn: error: argument --steps:")


@pytest.mark.parametrize("argv,flag", [
    (["--attn", "key_mask=1"], "--attn key_mask"),
    (["--attn", "causal=True"], "--attn causal"),
    (["--attn", "q=1"], "--attn q"),
    (["--seq-len", "100000", "--max-len", "100000", "--batch-size", "32"], "--seq-len 100000"),
])
def test_train_refuses_bad_options_before_work(argv, flag, no_training, capsys):
    assert cli.main(["train", *TINY, "--steps", "2", *argv]) == 2
    line = one_line(capsys)
    assert line.startswith(f"effattn: error: {flag}"), line
    if flag.startswith("--seq-len"):              # the estimate is stated: 32 x 2 x 100000^2 x 4 bytes
        assert "2.33 TiB" in line and "N^2" in line, line


def test_attn_may_not_set_a_learnable_parameter(no_training, capsys):
    assert cli.main(["train", "--task", "listops", "--attention", "linformer", "--seq-len", "16", "--layers", "1",
                     "--attn", "E=1"]) == 2
    assert one_line(capsys).startswith("effattn: error: --attn E:")
    with pytest.raises(ValueError, match="--attn key_mask"):
        train.train_model("copy", steps=1, attn={"key_mask": None})


@pytest.mark.parametrize("where", ["folder", "missing folder"])
def test_save_path_is_checked_before_training(where, tmp_path, no_training, capsys):
    target = tmp_path / "out" if where == "folder" else tmp_path / "missing" / "dir" / "ck.npz"
    if where == "folder":
        target.mkdir()
    assert cli.main(["train", *TINY, "--steps", "2", "--save", str(target)]) == 2
    line = one_line(capsys)
    assert line.startswith(f"effattn: error: --save {str(target)!r}"), line
    assert sorted(p.name for p in tmp_path.rglob("*")) == (["out"] if where == "folder" else [])


# --------------------------------------------------------------------------- checkpoints
def _rewrite_meta(src, dst, **changes):
    data = dict(np.load(src))
    meta = json.loads(str(data["meta"]))
    meta.update(changes)
    data["meta"] = np.array(json.dumps(meta))
    np.savez(dst, **data)


@pytest.mark.parametrize("kind", ["npy", "rng null", "rng garbage", "rng wrong dict", "truncated", "text"])
def test_foreign_or_corrupt_checkpoint_is_refused_and_never_overwritten(kind, checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    if kind == "npy":
        bad = tmp_path / "bad.npy"
        np.save(bad, np.zeros(3))
    elif kind == "rng null":
        _rewrite_meta(checkpoint, bad, rng=None)
    elif kind == "rng garbage":
        _rewrite_meta(checkpoint, bad, rng="garbage")
    elif kind == "rng wrong dict":
        _rewrite_meta(checkpoint, bad, rng={"bit_generator": "PCG64", "state": 5})
    elif kind == "truncated":
        bad.write_bytes(checkpoint.read_bytes()[:3000])
    else:
        bad.write_text("hello\n")
    before = bad.read_bytes()
    assert cli.main(["train", *TINY, "--steps", "4", "--resume", str(bad), "--save", str(bad)]) == 2
    line = one_line(capsys)
    assert line.startswith(f"effattn: error: checkpoint {str(bad)!r}"), line
    assert bad.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ck.npz", bad.name])


def test_interrupted_save_leaves_the_old_file_and_no_temporary(checkpoint, monkeypatch):
    before = checkpoint.read_bytes()

    def savez(fh, **arrays):
        fh.write(b"half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(train.np, "savez", savez)
    with pytest.raises(KeyboardInterrupt):
        train.run_train(train_args("--steps", "3", "--save", str(checkpoint)))
    assert checkpoint.read_bytes() == before
    assert [p.name for p in checkpoint.parent.iterdir()] == ["ck.npz"]


def train_args(*argv):
    import argparse

    ap = argparse.ArgumentParser()
    train.add_train_arguments(ap)
    return ap.parse_args([*TINY, *argv])


# --------------------------------------------------------------------------- divergence
def test_divergence_names_the_step_and_loss_and_saves_nothing(checkpoint, capsys):
    before = checkpoint.read_bytes()
    status = cli.main(["train", *TINY, "--steps", "5", "--lr", "1e30", "--clip", "0", "--save", str(checkpoint)])
    line = one_line(capsys)
    assert status == 1
    assert line.startswith("effattn: error: training diverged at step 2: loss nan"), line
    assert "keeps what it held" in line
    assert checkpoint.read_bytes() == before


# --------------------------------------------------------------------------- Ctrl-C and pipes
def test_ctrl_c_in_any_command_is_one_line_and_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_list", interrupted)
    assert cli.main(["list"]) == 130
    assert one_line(capsys) == "effattn: interrupted"


def test_ctrl_c_in_train_saves_the_last_completed_step_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    whole, part = tmp_path / "whole.npz", tmp_path / "part.npz"
    assert cli.main(["train", *TINY, "--steps", "4", "--save", str(whole)]) == 0
    calls = {"n": 0}
    real = train.to_device

    def to_device(batch):                         # Ctrl-C while step 3 computes, after its batch was drawn
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(batch)

    monkeypatch.setattr(train, "to_device", to_device)
    capsys.readouterr()
    assert cli.main(["train", *TINY, "--steps", "4", "--save", str(part)]) == 130
    line = one_line(capsys)
    assert line.startswith("effattn: interrupted (after step 2 of 4;") and str(part) in line, line
    assert step_of(part) == 2
    monkeypatch.setattr(train, "to_device", real)
    assert cli.main(["train", *TINY, "--steps", "4", "--resume", str(part), "--save", str(part)]) == 0
    with np.load(whole) as a, np.load(part) as b:
        for k in a.files:
            if k != "meta":
                assert np.array_equal(a[k], b[k]), k


def test_an_update_is_never_cut_by_ctrl_c():
    ran = []
    with pytest.raises(KeyboardInterrupt):
        with train._interrupt_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            ran.append("rest of the update")
    assert ran == ["rest of the update"]


def test_broken_pipe_is_quiet():
    """``python -m effattn list | head -0``: the reader is gone before the first write."""
    p = subprocess.Popen([sys.executable, "-m", "effattn", "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=ROOT)
    p.stdout.close()
    err = p.stderr.read().decode()
    p.wait(timeout=120)
    assert err == "" and p.returncode == 141, (p.returncode, err)


# --------------------------------------------------------------------------- the test session
def test_unusable_cupy_stops_the_test_session_once(tmp_path):
    """EFFATTN_BACKEND=cupy without a usable CuPy (simulated by a cupy module that fails to import):
    one clear message at configuration, not one failure per test."""
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "cupy.py").write_text('raise ImportError("simulated: no CuPy on this machine")\n')
    (tmp_path / "suite").mkdir()
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "suite" / "conftest.py")
    (tmp_path / "suite" / "test_tiny.py").write_text(
        "from effattn import backend\n\n"
        + "".join(f"def test_{i}():\n    backend.xp()\n\n" for i in range(3)))
    env = {**os.environ, "EFFATTN_BACKEND": "cupy",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "suite"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 4, out
    assert out.count("EFFATTN_BACKEND=cupy but CuPy is unusable") == 1 and "simulated" in out, out
    assert "failed" not in out and "passed" not in out, out
