"""The train command: every registered kernel trains in its mode, runs are reproducible,
checkpoints resume bit for bit and bad ones are refused, bad options fail before any work."""
import argparse
import json
import os

import numpy as np
import pytest

import effattn
from effattn.tools import train
from effattn.tools.tasks import ListOps, listops_tokens, listops_value, make_task

TINY = ["--steps", "3", "--d-model", "16", "--heads", "2", "--layers", "1", "--batch-size", "4", "--eval-every", "0"]


def args(*argv):
    ap = argparse.ArgumentParser()
    train.add_train_arguments(ap)
    return ap.parse_args(list(argv))


@pytest.mark.parametrize("name", effattn.names("kernel"))
def test_every_kernel_trains_in_its_mode(name):
    spec = effattn.get(name)
    if spec.setup is None:
        pytest.skip(f"{name} has no setup() (make_example only): not usable inside MultiHeadAttention")
    task = "lm" if spec.causal else "listops"   # decoder for kernels that decode, encoder otherwise
    # max_len 24 > seq_len 16: the kernel's config is re-made for n = 16, its params come from n = 24
    res = train.run_train(args("--task", task, "--attention", name, "--seq-len", "16", "--max-len", "24", *TINY))
    assert res["steps"] == 3 and np.isfinite(res["loss"]) and 0 <= res["accuracy"] <= 1, res


def test_same_seed_same_numbers_and_json_line(capsys):
    a = args("--task", "copy", *TINY, "--seq-len", "6")
    assert train.train_main(a) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    first = json.loads(lines[0])
    for key in ("task", "attention", "steps", "loss", "accuracy", "seconds"):
        assert key in first
    second = train.run_train(a)
    assert first["loss"] == second["loss"] and first["accuracy"] == second["accuracy"]
    other = train.run_train(args("--task", "copy", *TINY, "--seq-len", "6", "--seed", "1"))
    assert other["loss"] != first["loss"]


def _params(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files if k != "meta"}


@pytest.mark.parametrize("task", ["copy", "listops"])
def test_resume_equals_uninterrupted(tmp_path, task):
    base = ["--task", task, "--d-model", "16", "--heads", "2", "--layers", "1", "--batch-size", "4",
            "--seq-len", "8" if task == "copy" else "16", "--warmup", "2", "--eval-every", "0"]
    whole, half, resumed = (str(tmp_path / f) for f in ("whole.npz", "half.npz", "resumed.npz"))
    r_whole = train.run_train(args(*base, "--steps", "8", "--save", whole))
    train.run_train(args(*base, "--steps", "4", "--save", half))
    r_res = train.run_train(args(*base, "--steps", "8", "--resume", half, "--save", resumed))
    assert r_res["resumed_from"] == 4
    a, b = _params(whole), _params(resumed)
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert r_whole["loss"] == r_res["loss"] and r_whole["accuracy"] == r_res["accuracy"]


def test_bad_checkpoints_are_refused_and_nothing_changes(tmp_path):
    base = ["--task", "copy", "--seq-len", "6", *TINY]
    ck = str(tmp_path / "ck.npz")
    train.run_train(args(*base, "--save", ck))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="not a readable"):
        train.run_train(args(*base, "--resume", str(junk)))
    with pytest.raises(ValueError, match="does not exist"):
        train.run_train(args(*base, "--resume", str(tmp_path / "missing.npz")))
    with pytest.raises(ValueError, match="other settings.*d_model"):
        train.run_train(args(*[a if a != "16" else "32" for a in base], "--resume", ck))
    # a checkpoint whose arrays were tampered with: refused, and the model is left as it was
    data = dict(np.load(ck))
    name = next(k for k in data if k.startswith("param/"))
    data[name] = data[name][..., :1]
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, **data)
    s = train.settings_from_args(args(*base))
    task, model, opt, sched = train.build(s)
    before = {k: v.copy() for k, v in model.parameters()}
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="does not match"):
        train.load_checkpoint(bad, model, opt, rng, s)
    assert all(np.array_equal(before[k], v) for k, v in model.parameters()) and opt.t == 0
    data = dict(np.load(ck))
    data[name] = data[name] * np.nan
    np.savez(bad, **data)
    with pytest.raises(ValueError, match="corrupt"):
        train.load_checkpoint(bad, model, opt, rng, s)


@pytest.mark.parametrize("argv,match", [
    (["--task", "nope"], "unknown task 'nope'; tasks: copy, reverse, lm, listops, image"),
    (["--attention", "nope"], "unknown attention 'nope'; kernels: .*full"),
    (["--heads", "3", "--d-model", "16"], "--heads 3 must divide --d-model 16"),
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--seq-len", "20", "--max-len", "10"], "longer than the 10 positions"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--attn", "novalue"], "KEY=VALUE"),
    (["--task", "image", "--seq-len", "50"], "square"),
])
def test_bad_options_fail_before_work(argv, match):
    with pytest.raises(ValueError, match=match):
        train.run_train(args(*argv))


def test_train_main_prints_one_error_line(capsys):
    assert train.train_main(args("--task", "nope")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown task")


def test_parse_attn_literals():
    assert train.parse_attn(["w=8", "f=0.5", "flag=True", "shape=(4, 4)", "kind=lsh", "s='x'"]) == {
        "w": 8, "f": 0.5, "flag": True, "shape": (4, 4), "kind": "lsh", "s": "x"}


def test_listops_rules():
    """The generator's trees evaluate by the LRA rules (an independent recursive evaluator on tokens)."""
    def evaluate(tokens):
        stack = [[]]
        for t in tokens:
            if t.startswith("["):
                stack.append([t])
            elif t == "]":
                op, *vals = stack.pop()
                v = {"[MIN": min, "[MAX": max, "[SM": lambda a: sum(a) % 10,
                     "[MED": lambda a: int(np.median(a))}[op](vals)
                stack[-1].append(v)
            else:
                stack[-1].append(int(t))
        return stack[0][0]

    task = ListOps(seq_len=48, seed=3)
    rng = np.random.default_rng(0)
    for _ in range(200):
        tree = task.sample(rng)
        toks = listops_tokens(tree)
        assert task.min_len <= len(toks) <= 48
        assert listops_value(tree) == evaluate(toks)


def test_tasks_are_deterministic_and_held_out_fixed():
    for name in ("copy", "reverse", "lm", "listops", "image"):
        t1, t2 = make_task(name, seed=0), make_task(name, seed=0)
        b1 = t1.batch(np.random.default_rng(5), 4)
        b2 = t2.batch(np.random.default_rng(5), 4)
        assert all(np.array_equal(b1[k], b2[k]) for k in b1)
        e1, e2 = t1.eval_batches()[0], t2.eval_batches()[0]
        assert all(np.array_equal(e1[k], e2[k]) for k in e1)
    rev = make_task("reverse").batch(np.random.default_rng(0), 2)
    assert np.array_equal(rev["y"], rev["src"][:, ::-1]) and (rev["tgt"][:, 0] == 1).all()
    assert np.array_equal(rev["tgt"][:, 1:], rev["y"][:, :-1])


@pytest.mark.parametrize("task,target", [("copy", 0.95), ("listops", 0.30), ("lm", 0.35)])
def test_default_training_targets(task, target):
    """The CLI defaults reach the issue's targets (about 25 s for all three on an idle 2-core machine)."""
    res = train.run_train(args("--task", task))
    assert res["accuracy"] >= target, res


def test_command_line_and_train_model():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "effattn", "train", "--task", "reverse", "--seq-len", "6", *TINY],
                         capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"}, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["task"] == "reverse" and res["steps"] == 3
    bad = subprocess.run([sys.executable, "-m", "effattn", "train", "--task", "lm", "--attention", "linformer"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "cannot decode" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    r = train.train_model("listops", "full", steps=3, seq_len=16, d_model=16, layers=1, batch_size=4, eval_every=1)
    assert len(r["history"]["loss"]) == 3 and r["history"]["eval_step"] == [1, 2]
    assert r["model"].mode == "encoder" and r["task"].name == "listops"
    with pytest.raises(ValueError, match="unknown option"):
        train.train_model("copy", steps=1, nonsense=1)


def test_fit_stops_at_a_non_finite_loss_naming_step_and_loss():
    s = train.settings_from_args(args("--task", "copy", "--seq-len", "6", *TINY, "--lr", "1e30", "--clip", "0"))
    task, model, opt, sched = train.build(s)
    with np.errstate(all="ignore"), pytest.raises(train.Diverged, match=r"at step 2: loss nan .*at step 1") as e:
        train.fit(model, task, opt, sched, np.random.default_rng(0), steps=5, progress=False)
    assert e.value.step == 2 and opt.t == 1


def test_load_checkpoint_refuses_bad_metadata_and_changes_nothing(tmp_path):
    base = ["--task", "copy", "--seq-len", "6", *TINY]
    ck = str(tmp_path / "ck.npz")
    train.run_train(args(*base, "--save", ck))
    s = train.settings_from_args(args(*base))
    task, model, opt, sched = train.build(s)
    before = {k: v.copy() for k, v in model.parameters()}
    rng = np.random.default_rng([0, 2])
    rng_before = rng.bit_generator.state
    data = dict(np.load(ck))
    meta = json.loads(str(data["meta"]))
    for change, match in [({"rng": None}, "invalid generator state"), ({"rng": [1, 2]}, "invalid generator state"),
                          ({"step": None}, "no valid metadata"), ({"step": "3"}, "no valid metadata"),
                          ({"settings": "x"}, "no valid metadata")]:
        bad = str(tmp_path / "bad.npz")
        np.savez(bad, **{**data, "meta": np.array(json.dumps({**meta, **change}))})
        with pytest.raises(ValueError, match=match):
            train.load_checkpoint(bad, model, opt, rng, s)
    np.savez(bad, **{**data, "meta": np.array("[1, 2]")})
    with pytest.raises(ValueError, match="no valid metadata"):
        train.load_checkpoint(bad, model, opt, rng, s)
    npy = str(tmp_path / "x.npy")
    np.save(npy, np.zeros(2))
    with pytest.raises(ValueError, match="single array"):
        train.load_checkpoint(npy, model, opt, rng, s)
    assert all(np.array_equal(before[k], v) for k, v in model.parameters()) and opt.t == 0
    assert rng.bit_generator.state == rng_before


def test_save_checkpoint_is_atomic_and_leaves_no_temporary(tmp_path, monkeypatch):
    s = train.settings_from_args(args("--task", "copy", "--seq-len", "6", *TINY))
    task, model, opt, sched = train.build(s)
    ck = tmp_path / "ck.npz"
    train.save_checkpoint(str(ck), model, opt, 0, np.random.default_rng(0), s)
    good = ck.read_bytes()
    for exc in (OSError("disk full"), KeyboardInterrupt()):
        def savez(fh, **arrays):
            fh.write(b"PK partial")
            raise exc
        monkeypatch.setattr(train.np, "savez", savez)
        with pytest.raises(type(exc)):
            train.save_checkpoint(str(ck), model, opt, 1, np.random.default_rng(0), s)
        assert ck.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["ck.npz"]
