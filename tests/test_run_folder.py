"""Nothing silent: the run folder knows its run, corrupt checkpoints, hostile command lines.

Each case runs in a fresh temporary folder; a refused command is one line on stderr, exit 2, and
leaves every file as it was.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fnbackprop import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _no_compile_cache(monkeypatch):
    monkeypatch.setenv("FNBACKPROP_COMPILE_CACHE", "0")


def _main(argv):
    try:
        return cli.main(argv)
    except SystemExit as e:
        return int(e.code)


def _snapshot(folder):
    """Every file under ``folder`` with its bytes (to prove nothing changed)."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = fh.read()
    return out


def _refused(capsys, rc, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and "Traceback" not in err[0], err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def _npz(path, seed=0, flip=False, scale=1.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(120, 5)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int32)
    np.savez(path, x=x * scale + (1.0 if scale != 1.0 else 0.0), y=1 - y if flip else y)


SMALL = ["--hidden", "8", "--batch-size", "16", "--quiet"]


def test_a_changed_data_file_is_not_resumed(tmp_path, capsys):
    data, out = tmp_path / "mut.npz", tmp_path / "run"
    _npz(data)
    assert _main(["train", "--dataset", str(data), "--epochs", "4", "--checkpoint-every", "1",
                  *SMALL, "--out", str(out)]) == 0
    for step in ("3", "4"):
        shutil.rmtree(out / "checkpoints" / step)
    _npz(data, scale=3.0, flip=True)
    capsys.readouterr()
    before = _snapshot(out)
    rc = _main(["train", "--dataset", str(data), "--epochs", "4", "--checkpoint-every", "1",
                *SMALL, "--out", str(out), "--resume"])
    _refused(capsys, rc, "data", "changed")
    assert _snapshot(out) == before


def test_a_finished_run_is_not_overwritten_by_other_flags(tmp_path, capsys):
    out = tmp_path / "r2"
    assert _main(["train", "--dataset", "xor", "--checkpoint-every", "0", "--epochs", "3",
                  "--hidden", "8", "--quiet", "--out", str(out)]) == 0
    capsys.readouterr()
    before = _snapshot(out)
    rc = _main(["train", "--dataset", "xor", "--resume", "--out", str(out), "--epochs", "5",
                "--hidden", "32", "--lr", "0.05", "--quiet"])
    line = _refused(capsys, rc, "epochs: 3 → 5", "hidden: [8] → [32]", "lr: 0.01 → 0.05")
    assert "nothing was changed" in line
    assert _snapshot(out) == before


def test_a_folder_that_is_not_a_run_is_not_resumed(tmp_path, capsys):
    out = tmp_path / "other"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc = _main(["train", "--dataset", "xor", "--resume", "--out", str(out), "--quiet"])
    _refused(capsys, rc, "run.json")
    assert os.listdir(out) == ["notes.txt"]


def _corrupt_run(tmp_path, how):
    out = tmp_path / "run"
    args = ["train", "--dataset", "xor", "--epochs", "6", "--checkpoint-every", "1",
            "--keep-checkpoints", "6", *SMALL, "--out", str(out)]
    assert _main(args) == 0
    want = json.loads((out / "summary.json").read_text())["params_sha256"]
    for step in ("5", "6"):
        shutil.rmtree(out / "checkpoints" / step)
    newest = out / "checkpoints" / "4"
    if how == "truncate":
        victim = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        victim.write_bytes(victim.read_bytes()[:20])
    else:
        (newest / "meta" / "metadata").write_text("")
    os.remove(out / "summary.json")
    return out, args, want


@pytest.mark.parametrize("how", ["truncate", "empty_meta"])
def test_resume_falls_back_past_a_corrupt_newest_checkpoint(tmp_path, capsys, how):
    out, args, want = _corrupt_run(tmp_path, how)
    capsys.readouterr()
    assert _main(args + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert "warning: checkpoint 4 could not be read" in err and "epoch 3" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_epoch"] == 3 and summary["params_sha256"] == want
    assert sorted(os.listdir(out / "checkpoints")) == list("123456")  # saving works again
    assert os.listdir(str(out / "checkpoints") + "-unreadable") == ["4"]


def test_a_checkpoint_folder_that_cannot_be_read_at_all_is_one_line(tmp_path, capsys):
    out, args, _ = _corrupt_run(tmp_path, "empty_meta")
    for step in "123":
        (out / "checkpoints" / step / "meta" / "metadata").write_text("")
    capsys.readouterr()
    before = _snapshot(out)
    _refused(capsys, _main(args + ["--resume"]), "no readable checkpoint")
    assert _snapshot(out) == before


@pytest.mark.parametrize("argv, needle", [
    (["--out", "afile.txt/sub"], "is a file"),
    (["--out", "/proc/fnbackprop-test/sub"], "cannot be written"),
    (["--hidden", "200000,200000", "--dataset", "mnist1d"], "memory"),
    (["--hidden", "100000000", "--dataset", "mnist1d"], "memory"),
    (["--hidden", ""], "'none'"),
    (["--hidden", "8,"], "--hidden"),
])
def test_hostile_command_lines_are_one_line_exit_2(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile.txt").write_text("x")
    t0 = time.perf_counter()
    rc = _main(["train", *argv] + ([] if "--out" in argv else ["--out", "o"]))
    _refused(capsys, rc, needle)
    assert time.perf_counter() - t0 < 30  # refused before any real work
    assert sorted(os.listdir(tmp_path)) == ["afile.txt"]


def test_an_internal_error_has_a_traceback_and_exit_3(tmp_path, capsys, monkeypatch):
    from fnbackprop import training

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(training, "train", broken)
    rc = _main(["train", "--dataset", "xor", "--quiet", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == cli.INTERNAL_ERROR == 3 and "Traceback" in err and "boom" in err


def test_sigterm_saves_the_state_and_resume_is_exact(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, FNBACKPROP_COMPILE_CACHE="0")
    env.pop("XLA_FLAGS", None)
    args = [sys.executable, "-m", "fnbackprop", "train", "--dataset", "xor", "--hidden", "16",
            "--batch-size", "1", "--epochs", "100", "--dropout", "0.1", "--quiet"]
    ref = subprocess.run(args + ["--out", str(tmp_path / "ref")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    want = json.loads((tmp_path / "ref" / "summary.json").read_text())["params_sha256"]
    out = tmp_path / "term"
    proc = subprocess.Popen(args + ["--out", str(out)], env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in err and "--resume" in err
    assert not (out / "summary.json").exists() and os.listdir(out / "checkpoints")
    again = subprocess.run(args + ["--out", str(out), "--resume"], env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "summary.json").read_text())["params_sha256"] == want
