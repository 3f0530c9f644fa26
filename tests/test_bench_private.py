"""scripts/bench_private.py runs end to end at a tiny size (no timing claim is checked)."""

import importlib.util
import json
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts",
                      "bench_private.py")
PEERS = ("opacus", "jax_privacy")


def _run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], check=False, capture_output=True,
                          text=True, timeout=300)


def test_quick_run_names_its_peers_and_writes_its_results(tmp_path):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    # Installed peers are left out (timing them takes longer); missing ones must be named.
    missing = [m for m in PEERS if importlib.util.find_spec(m) is None]
    p = _run("--quick", "--reps", "1", "--steps", "1", "--peers", ",".join(missing),
             "--json", str(out), "--markdown", str(md))
    assert p.returncode == 0, p.stderr
    for m in missing:
        assert f"peer {m}: not installed, skipped (pip install" in p.stdout
    r = json.loads(out.read_text())
    assert r["peers"] == {m: None for m in missing}
    names = {v["name"] for v in r["variants"]}
    assert {"plain", "private", "private_no_noise", "clipped_b", "plain_padded",
            "clipped_padded_nomask", "plain_train"} == names
    assert r["config"]["capacity"] > r["config"]["batch"]  # the padded Poisson capacity
    assert r["goal"]["max"] == 1.25 and r["goal"]["applies"] is False  # set at 784-512-512-10
    assert all(len(s) == 1 and s[0] > 0 for s in r["samples_s"].values())
    assert "private / plain" in p.stdout and "| fnbackprop private" in md.read_text()


def test_usage_errors_exit_2():
    assert "--quick" in _run("--help").stdout
    bad = _run("--peers", "tensorflow_privacy")
    assert bad.returncode == 2 and "unknown peer" in bad.stderr
