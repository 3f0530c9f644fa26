"""Tests of what the experiments publish: provenance, the JSON rule for non-finite numbers, the
committed results against the code that made and renders them, and one experiment re-run against
its committed numbers."""

from __future__ import annotations

import importlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS_DIR = REPO_ROOT / "experiments"
RESULTS_DIR = EXPERIMENTS_DIR / "results"
HAS_GIT = shutil.which("git") is not None and subprocess.run(
    ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True).returncode == 0


def _load(name: str):
    if str(EXPERIMENTS_DIR) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS_DIR))
    return importlib.import_module(name)


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                          check=True).stdout


def _first_difference(a, b, path="") -> str | None:
    """Where two parsed JSON values differ (exactly), or ``None``."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{path}: keys {sorted(a.keys() ^ b.keys())}"
        return next((d for k in a if (d := _first_difference(a[k], b[k], f"{path}/{k}"))), None)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path}: length {len(a)} vs {len(b)}"
        return next((d for i, (x, y) in enumerate(zip(a, b))
                     if (d := _first_difference(x, y, f"{path}[{i}]"))), None)
    return None if a == b and type(a) is type(b) else f"{path}: {a!r} vs {b!r}"


def _numbers(v) -> list[float]:
    """Every number in a parsed JSON value, in order (``None`` → NaN)."""
    if isinstance(v, dict):
        return [x for k in v for x in _numbers(v[k])]
    if isinstance(v, list):
        return [x for item in v for x in _numbers(item)]
    if v is None:
        return [math.nan]
    return [float(v)] if isinstance(v, (int, float)) and not isinstance(v, bool) else []


# --- provenance -------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_GIT, reason="not a git checkout")
def test_provenance_of_this_checkout():
    import fnbackprop as fb

    C = _load("_common")
    prov = C.provenance(["python", "experiments/x.py", "--out", "a b"])
    assert prov["command"] == "python experiments/x.py --out 'a b'"
    assert prov["git"]["commit"] == _git(REPO_ROOT, "rev-parse", "HEAD").strip()
    changed = [line[3:] for line in _git(REPO_ROOT, "status", "--porcelain").splitlines()
               if not line[3:].startswith(C.GENERATED_PATHS)]
    assert prov["git"]["dirty"] == bool(changed)
    assert prov["git"]["describe"].endswith("-dirty") == bool(changed)
    v = prov["versions"]
    assert v["python"] == platform.python_version() and v["jax"] == jax.__version__
    assert v["numpy"] == np.__version__ and v["fnbackprop"] == fb.__version__
    assert v["jaxlib"] and v["optax"]


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_dirty_flag_ignores_only_the_generated_files(tmp_path):
    C = _load("_common")
    for rel in ("experiments/results/a/results.json", "experiments/README.md", "experiments/x.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("0\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    assert C.git_state(tmp_path)["dirty"] is False
    (tmp_path / "experiments/results/a/results.json").write_text("1\n")
    (tmp_path / "experiments/results/b.png").write_text("new\n")
    (tmp_path / "experiments/README.md").write_text("1\n")
    assert C.git_state(tmp_path)["dirty"] is False  # outputs of the tooling
    (tmp_path / "experiments/x.py").write_text("1\n")
    (tmp_path / "notes.txt").write_text("untracked\n")
    state = C.git_state(tmp_path)
    assert state["dirty"] is True and sorted(state["dirty_paths"]) == ["experiments/x.py", "notes.txt"]
    assert state["describe"] == state["commit"][:12] + "-dirty"


def test_provenance_outside_a_git_checkout(tmp_path):
    C = _load("_common")
    state = C.git_state(tmp_path)
    assert state == {"commit": None, "describe": None, "dirty": None, "dirty_paths": []}
    line = C.provenance_line({"command": "python x", "git": state, "versions": C.versions()})
    assert "outside a git checkout" in line


# --- the JSON rule ----------------------------------------------------------------------------
def test_non_finite_numbers_are_null_in_json_and_spelled_out_in_tables(tmp_path):
    C = _load("_common")
    nan, inf = math.nan, math.inf
    report = C.Report(setup="s", tables=[C.Table("cap", ["a", "b"], [[nan, inf], [np.float32(1.5), -inf]])],
                      claims=[C.Claim("c", "supported", "e")],
                      raw={"x": np.array([1.0, nan]), "y": inf, "z": np.float32(2.5), "t": (1, 2)})
    module = types.SimpleNamespace(NAME="fake", TITLE="a test")
    payload = C.results_payload(module, "smoke", {"seed": 0}, report, 1.0, C.machine_info(),
                                C.provenance(["python", "fake.py"]))
    C.write_outputs(tmp_path, payload)

    def refuse(token):
        raise AssertionError(f"{token} written into results.json")

    data = json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)
    assert data["results"] == {"x": [1.0, None], "y": None, "z": 2.5, "t": [1, 2]}
    table = (tmp_path / "table.md").read_text()
    assert "| NaN | inf |" in table and "| 1.5 | -inf |" in table
    with pytest.raises(TypeError):  # what JSON cannot hold is refused, not written as text
        C.dumps({"a": object()})
    with pytest.raises(ValueError):
        C.Claim("c", "probably", "e")


# --- the committed results --------------------------------------------------------------------
def _committed() -> dict:
    run_all = _load("run_all")
    return {name: json.loads((RESULTS_DIR / name / "results.json").read_text())
            for name in run_all.EXPERIMENTS}


def test_committed_results_match_the_code():
    """Every committed results.json is the quick size of today's config, made by run_all.py from
    a clean tree; table.md, SUMMARY.md and the page are exactly what the renderers make of the
    committed JSON; and no experiment code changed since the recorded commit."""
    C = _load("_common")
    run_all = _load("run_all")
    results = _committed()
    summary = json.loads((RESULTS_DIR / "run_all.json").read_text())
    assert summary["mode"] == "quick"
    assert summary["provenance"]["command"] == "python experiments/run_all.py --quick"
    git = summary["provenance"]["git"]
    assert git["commit"] and git["dirty"] is False, git
    assert list(summary["experiments"]) == list(run_all.EXPERIMENTS)
    for name, payload in results.items():
        assert summary["experiments"][name]["exit_status"] == 0
        assert payload["mode"] == "quick"
        assert payload["config"] == json.loads(C.dumps(dict(_load(name).CONFIGS["quick"], seed=0))), name
        prov = payload["provenance"]
        assert prov["command"] == f"python experiments/{name}.py --quick --out experiments/results/{name}"
        assert prov["git"] == git, name
        assert payload["claims"] == summary["experiments"][name]["claims"]
        assert (RESULTS_DIR / name / "table.md").read_text() == C.render_table_md(payload), name
        for fname, _ in payload["figures"]:
            assert (RESULTS_DIR / name / fname).stat().st_size > 2000
    assert (RESULTS_DIR / "SUMMARY.md").read_text() == run_all.render_summary(summary)
    assert C.PAGE.read_text() == run_all.render_page(summary, results, C.PAGE.parent, RESULTS_DIR)
    if HAS_GIT:
        code = ["--", "experiments", *(f":(top,exclude){p}" for p in C.GENERATED_PATHS)]
        changed = _git(REPO_ROOT, "diff", "--name-only", git["commit"], *code).split()
        assert not changed, (f"{changed} changed since the results were made at {git['describe']}: "
                             "run `python experiments/run_all.py --quick` and commit the results")


def _xla_flags_without_fake_devices() -> str:
    flags = os.environ.get("XLA_FLAGS", "").split()
    return " ".join(f for f in flags if "xla_force_host_platform_device_count" not in f)


def test_vanishing_gradients_reproduces_its_committed_numbers(tmp_path):
    """``vanishing_gradients --quick`` re-run as a script must give the committed numbers: bitwise
    (config, raw results, claims with their evidence, displayed tables) on the CPU model that made
    them, else every number within a relative 1e-4 (float32 sums can be ordered differently by
    another CPU's vector width) with the same verdicts. Timing and provenance fields are not
    compared. Then the numbers are checked against jax.grad."""
    import fnbackprop as fb

    committed = json.loads((RESULTS_DIR / "vanishing_gradients" / "results.json").read_text())
    env = dict(os.environ, FNBACKPROP_JAX_CACHE="off", XLA_FLAGS=_xla_flags_without_fake_devices())
    out = tmp_path / "vanishing_gradients"
    done = subprocess.run([sys.executable, "experiments/vanishing_gradients.py", "--quick",
                           "--out", str(out)], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    fresh = json.loads((out / "results.json").read_text())
    same_cpu = all(fresh["machine"][k] == committed["machine"][k] for k in ("cpu", "backend"))
    if same_cpu:
        for key in ("config", "results", "claims", "tables"):
            diff = _first_difference(fresh[key], committed[key], key)
            assert diff is None, f"differs from the committed results.json at {diff}"
    else:
        assert fresh["config"] == committed["config"]
        assert [c["verdict"] for c in fresh["claims"]] == [c["verdict"] for c in committed["claims"]]
        np.testing.assert_allclose(_numbers(fresh["results"]), _numbers(committed["results"]),
                                   rtol=1e-4, atol=1e-12)

    # ‖∂C/∂b^l‖ = ‖mean_i δ_i^l‖ is the bias gradient of the batch-mean loss: check it with jax.grad
    cfg = committed["config"]
    data = _load("_common").load_digits()
    x = jnp.asarray(data.x_train[: cfg["n_measure"]], jnp.float32)
    y = jax.nn.one_hot(jnp.asarray(data.y_train[: cfg["n_measure"]]), 10, dtype=jnp.float32)
    net = fb.MLP((64, 30, 30, 30, 10), "sigmoid", "sigmoid", "binary_cross_entropy")
    g = fb.autodiff_grad(net, fb.init(jax.random.key(0), net, "nielsen", dtype=jnp.float32), x, y)
    measured = fresh["results"]["at_init"]["sigmoid + nielsen|3"]["bias_grad"][0]
    np.testing.assert_allclose(measured, [float(jnp.linalg.norm(g[l]["b"])) for l in range(3)],
                               rtol=1e-4)
    # and the chapter's shape: every seed's gradient shrinks towards the input in the sigmoid net
    for key, rec in fresh["results"]["at_init"].items():
        if key.startswith("sigmoid"):
            bg = np.array(rec["bias_grad"])
            assert np.all(bg[:, :-1] < bg[:, 1:]), key
