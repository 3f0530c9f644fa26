"""Data-parallel training equals one device: 8 simulated CPU devices (sharding and pmap) and
2 processes × 2 devices through jax.distributed on loopback."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import fnbackprop as fb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small but real: digits, one hidden layer, a partial last batch (1438 = 22·64 + 30).
KW = dict(dataset="digits", hidden=(32,), epochs=3, batch_size=64, dropout=0.0, lr=1e-3,
          checkpoint_every=0)


def _close(a, b, rtol):
    for u, v in zip(a, b):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=1e-6)


@pytest.fixture(scope="module")
def single():
    return fb.train(**KW)


@pytest.mark.parametrize("parallel", ["sharding", "pmap"])
def test_eight_devices_equal_one(single, parallel):
    r = fb.train(devices=8, parallel=parallel, **KW)
    assert r.summary["devices"] == 8 and r.summary["parallel"] == parallel
    ref = single.summary["final_train_loss"]
    assert abs(r.summary["final_train_loss"] - ref) <= 1e-4 * abs(ref)
    import jax

    _close(jax.tree.leaves(r.params), jax.tree.leaves(single.params), rtol=1e-4)
    assert [h["steps"] for h in r.history] == [h["steps"] for h in single.history]


@pytest.mark.parametrize("parallel", ["sharding", "pmap"])
def test_per_example_clipping_with_noise_equal_across_devices(parallel):
    kw = dict(KW, per_example_clip=0.5, noise_multiplier=0.3, epochs=2, train_metrics=True)
    one = fb.train(**kw)
    many = fb.train(devices=8, parallel=parallel, **kw)
    ref = one.summary["final_train_loss"]
    assert abs(many.summary["final_train_loss"] - ref) <= 1e-4 * abs(ref)


def test_pmap_refuses_indivisible_batch_naming_both_numbers():
    with pytest.raises(ValueError, match=r"\b60\b.*\b8\b"):
        fb.train(devices=8, parallel="pmap", **dict(KW, batch_size=60))


def test_bad_devices_and_mode():
    with pytest.raises(ValueError, match="pmapp"):
        fb.train(devices=2, parallel="pmapp", **KW)
    with pytest.raises(ValueError, match="99"):
        fb.train(devices=99, **KW)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(args, env_devices, timeout=240):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={env_devices}",
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, FNBACKPROP_COMPILE_CACHE="0")
    return subprocess.Popen([sys.executable, "-m", "fnbackprop", "train", *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _two_processes(extra):
    """Runs the CLI as 2 processes × 2 simulated CPU devices on loopback; both must succeed."""
    port = _free_port()
    procs = [
        _cli(FLAGS + extra + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                              "--process-id", str(i)], 2)
        for i in range(2)
    ]
    for q in procs:
        _, err = q.communicate(timeout=240)
        assert q.returncode == 0, err


FLAGS = ["--dataset", "digits", "--hidden", "32", "--epochs", "3", "--batch-size", "64",
         "--dropout", "0", "--lr", "0.001", "--per-example-clip", "1.0", "--quiet"]


def test_two_processes_times_two_devices_equal_one_device(tmp_path):
    p = _cli(FLAGS + ["--out", str(tmp_path / "one"), "--checkpoint-every", "0"], 1)
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, err
    one = json.loads((tmp_path / "one" / "summary.json").read_text())

    multi_out = str(tmp_path / "multi")
    _two_processes(["--out", multi_out])
    multi = json.loads((tmp_path / "multi" / "summary.json").read_text())
    assert multi["devices"] == 4 and multi["processes"] == 2
    assert abs(multi["final_train_loss"] - one["final_train_loss"]) <= 1e-4 * one["final_train_loss"]
    assert multi["epochs_run"] == one["epochs_run"] == 3
    assert os.path.isdir(os.path.join(multi_out, "checkpoints"))

    # --resume works across processes: the finished run is restored, not retrained.
    _two_processes(["--out", multi_out, "--resume"])
    again = json.loads((tmp_path / "multi" / "summary.json").read_text())
    assert again["params_sha256"] == multi["params_sha256"]
    assert again["resumed_from_epoch"] == 3
