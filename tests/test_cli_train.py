"""The ``fnbackprop train`` command: bad input, help, a real run, divergence, resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fnbackprop import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _no_compile_cache(monkeypatch):
    """In-process runs must not turn on the persistent compilation cache for the test session."""
    monkeypatch.setenv("FNBACKPROP_COMPILE_CACHE", "0")


def _main(argv) -> int:
    """``cli.main`` as a process would see it: argparse errors exit with SystemExit(2)."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return int(e.code)


@pytest.fixture
def precious(tmp_path):
    """An existing --out folder with a file that must survive every refused command."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    return out


def _assert_untouched(out):
    assert sorted(os.listdir(out)) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("argv, needle", [
    (["--lr", "-1"], "--lr"),
    (["--batch-size", "0"], "--batch-size"),
    (["--epochs", "-3"], "--epochs"),
    (["--dropout", "1.5"], "--dropout"),
    (["--hidden", "64,abc"], "'abc'"),
    (["--activation", "sigmod"], "sigmod"),
    (["--dataset", "nope"], "unknown dataset 'nope'"),
    (["--dataset", "missing.csv"], "file not found: missing.csv"),
    (["--dataset", "missing.npz"], "file not found: missing.npz"),
    (["--noise-multiplier", "1"], "per_example_clip"),
    (["--early-stopping", "2", "--val-fraction", "0"], "val_fraction"),
    ([], "not empty"),  # an existing, non-empty --out without --resume
])
def test_bad_input_is_one_line_exit_2_and_out_untouched(argv, needle, precious, tmp_path,
                                                         monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = _main(["train", *argv, "--out", str(precious)])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2
    assert len(lines) == 1 and needle in lines[0], captured.err
    assert "Traceback" not in captured.err + captured.out
    _assert_untouched(precious)


def test_bad_data_file_and_resume_without_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.csv").write_text("a,b,y\n1,2,0\n3,nan,1\n5,6,0\n7,8,1\n")
    assert _main(["train", "--dataset", "d.csv", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "d.csv" in err[0] and "'b'" in err[0]
    assert not (tmp_path / "o").exists()
    assert _main(["train", "--resume"]) == 2
    assert "--out" in capsys.readouterr().err


def test_every_config_field_has_a_flag():
    import dataclasses

    from fnbackprop.training import TrainConfig

    assert set(cli.TRAIN_FIELDS) == {f.name for f in dataclasses.fields(TrainConfig)}


def test_help_documents_every_flag_with_its_default(capsys):
    assert _main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    options = text.split("options:", 1)[1].split("per-dataset defaults", 1)[0]
    blocks, current = {}, None
    for line in options.splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            blocks[current] = line
        elif current:
            blocks[current] += " " + line.strip()
    flags = {f"--{f.replace('_', '-')}" for f in cli.TRAIN_FIELDS} | {"--out", "--resume",
                                                                       "--quiet"}
    assert flags <= set(blocks) | {"--augment"} and "--augment" in text
    for flag, block in blocks.items():
        if flag != "-h":
            assert "(default:" in block, block
    for name in ("digits", "mnist1d", "breast_cancer", "diabetes"):
        assert name in text.split("per-dataset defaults", 1)[1]


def test_divergence_exits_1_with_a_message(tmp_path, capsys):
    out = tmp_path / "run"
    rc = _main(["train", "--dataset", "xor", "--hidden", "4", "--optimizer", "sgd", "--lr", "1e36",
                "--epochs", "4", "--quiet", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 1
    assert "diverged in epoch" in captured.err and "Traceback" not in captured.err
    assert json.loads((out / "summary.json").read_text())["diverged"] is True


# --- subprocess runs ---------------------------------------------------------------------------
def _env(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax-cache")
    env.pop("FNBACKPROP_COMPILE_CACHE", None)
    env.pop("XLA_FLAGS", None)
    return env


def _run(args, tmp_path, **kw):
    return subprocess.run([sys.executable, "-m", "fnbackprop", "train", *args], cwd=tmp_path,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=300, **kw)


def test_a_small_run_prints_the_check_and_the_result(tmp_path):
    out = tmp_path / "run"
    p = _run(["--dataset", "xor", "--epochs", "3", "--out", str(out)], tmp_path)
    assert p.returncode == 0, p.stderr
    assert "gradient check of the first batch" in p.stdout and "passed" in p.stdout
    assert "test accuracy" in p.stdout and str(out) in p.stdout
    for name in ("metrics.jsonl", "summary.json", "curves.png", "gradient_flow.png"):
        assert (out / name).is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_run"] == 3 and summary["config"]["hidden"] == [16, 16]


def test_resume_after_sigkill_ends_with_the_same_parameters(tmp_path):
    args = ["--dataset", "xor", "--hidden", "16", "--batch-size", "8", "--epochs", "120",
            "--checkpoint-every", "1", "--keep-checkpoints", "2", "--dropout", "0.1", "--quiet"]
    ref = _run([*args, "--out", str(tmp_path / "ref")], tmp_path)
    assert ref.returncode == 0, ref.stderr
    want = json.loads((tmp_path / "ref" / "summary.json").read_text())["params_sha256"]

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fnbackprop", "train", *args, "--out", str(out)],
                            cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = out / "checkpoints"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.is_dir() and any(d.isdigit() for d in os.listdir(ckpt)):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists(), "the run finished before it could be killed"

    resumed = _run([*args, "--out", str(out), "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_epoch"] >= 1
    assert summary["params_sha256"] == want
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == list(range(1, 121))

    changed = _run([*args, "--out", str(out), "--resume", "--lr", "0.5"], tmp_path)
    assert changed.returncode == 2
    assert len(changed.stderr.strip().splitlines()) == 1 and "lr" in changed.stderr
