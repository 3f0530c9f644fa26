"""Smoke tests of the experiment scripts (experiments/*.py) at tiny size.

Each runs an experiment's ``main(["--smoke", "--out", tmp])`` in-process and checks that it writes
its table, JSON and figures and that its numbers are sane. The smoke sizes mean little
scientifically; the full results come from ``python experiments/run_all.py --quick``.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"


@pytest.fixture(autouse=True)
def _no_persistent_cache(monkeypatch):
    # The experiments turn on JAX's persistent compilation cache when run as scripts; keep the
    # test process's global JAX configuration untouched.
    monkeypatch.setenv("FNBACKPROP_JAX_CACHE", "off")


def _load(name: str):
    if str(EXPERIMENTS_DIR) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS_DIR))
    return importlib.import_module(name)


def _run(name: str, tmp_path: Path) -> dict:
    mod = _load(name)
    out = tmp_path / name
    assert mod.main(["--smoke", "--out", str(out)]) == 0
    table = (out / "table.md").read_text()
    assert table.startswith(f"# {name}:")
    assert "## Setup" in table and "## Results" in table
    assert "machine" in table.lower()
    # every figure the table links to exists and is a non-trivial PNG
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", table)
    assert figures, "no figure linked from table.md"
    for f in figures:
        data = (out / f).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    with open(out / "results.json") as fh:
        res = json.load(fh)
    assert res["experiment"] == name and res["mode"] == "smoke"
    assert res["machine"]["jax"] and res["machine"]["devices"]
    for c in res["claims"]:
        assert c["verdict"] in ("supported", "partly supported", "not supported")
    return res


def _num(v) -> float:
    return float("nan") if v in (None, "NaN") else float("inf") if v == "Infinity" else float(v)


def test_gradient_equivalence(tmp_path):
    res = _run("gradient_equivalence", tmp_path)
    o = res["results"]["overall"]
    assert o["f64_manual_vs_autodiff"] < 1e-10
    assert o["f64_per_example_manual_vs_vmap"] < 1e-10
    assert o["f64_per_example_mean_vs_manual"] < 1e-10
    assert o["f64_vs_fd"] < 1e-5
    assert o["f32_manual_vs_autodiff"] < 1e-4
    assert o["f32_manual_vs_f64_truth"] < 1e-4
    assert len(res["results"]["rows"]) >= 2


def test_vanishing_gradients(tmp_path):
    res = _run("vanishing_gradients", tmp_path)
    at_init = res["results"]["at_init"]
    sig = np.array(at_init["sigmoid + nielsen|3"]["bias_grad"])  # (seeds, 3 hidden layers)
    assert np.all(sig[:, 0] < sig[:, 1]) and np.all(sig[:, 1] < sig[:, 2])  # shrinks toward input
    f_sig = at_init["sigmoid + nielsen|3"]["factor_per_example"]
    f_relu = at_init["relu + he|3"]["factor_per_example"]
    assert 0 < f_sig < 0.35 < f_relu
    # σ' ≤ 1/4: the predicted factor is below the bound
    assert at_init["sigmoid + nielsen|3"]["predicted_factor"] <= at_init["sigmoid + nielsen|3"]["bound_factor"] + 1e-6
    for v in res["results"]["training"].values():
        assert np.all(np.isfinite(np.array(v["bias_grad"], float)))


def test_initialization(tmp_path):
    res = _run("initialization", tmp_path)
    flow = res["results"]["flow"]
    zeros = np.array(flow["relu|zeros"]["grad_w"])
    assert np.all(zeros[:, :-1] == 0)  # no gradient reaches a hidden layer from zero weights
    he = np.array(flow["relu|he_normal"]["grad_w"])
    assert np.all(np.isfinite(he)) and np.all(he > 0)
    assert math.isclose(np.mean(flow["relu|zeros"]["loss"]), math.log(10), rel_tol=1e-6)


def test_gd_sgd_minibatch(tmp_path):
    res = _run("gd_sgd_minibatch", tmp_path)
    for vt in res["results"]["variance"].values():
        assert vt["mean_vs_batch_grad"] < 1e-4
        rows = vt["rows"]
        exact = [r["exact"] for r in rows]
        assert all(a > b for a, b in zip(exact, exact[1:]))  # variance falls with b
        assert math.isclose(rows[0]["exact"], vt["s2"] / rows[0]["b"] * (vt["n"] - rows[0]["b"]) / (vt["n"] - 1))
        for r in rows:  # sampled batches agree with the formula (loosely: heavy-tailed norms)
            assert abs(r["sampled"] - r["exact"]) < max(6 * r["sampled_se"], 0.3 * r["exact"])
    for rr in res["results"]["runs"].values():
        assert np.all(np.isfinite(np.array([_num(v) for v in rr["train_loss"]])))
        # no regularisation sneaks in from the dataset's defaults
        c = rr["config"]
        assert c["dropout"] == 0 and c["l1"] == 0 and c["l2"] == 0 and not c["augment"]
        assert c["optimizer"] == "sgd" and c["activation"] == "relu"


def test_exploding_gradients(tmp_path):
    res = _run("exploding_gradients", tmp_path)
    ai = res["results"]["at_init"]
    deep = max(int(k.split("|")[1]) for k in ai)
    normal = np.array([_num(v) for v in ai[f"normal|{deep}"]["total"]])
    xavier = np.array([_num(v) for v in ai[f"xavier_normal|{deep}"]["total"]])
    assert np.all(normal > 100 * xavier)
    assert _num(res["results"]["growth_per_layer"]) > 1.5
    tr = res["results"]["training"]
    clipped = next(v for k, v in tr.items() if "clip_norm" in k)
    assert not clipped["diverged"] and sum(clipped["skipped"]) == 0


def test_regularization(tmp_path):
    res = _run("regularization", tmp_path)
    summary = res["results"]["digits"]["summary"]
    assert "all" in summary  # every regulariser at once: l1, l2, dropout, augment, early stopping
    c = res["results"]["digits"]["runs"]["all"][0]["config"]
    assert c["l1"] > 0 and c["l2"] > 0 and c["dropout"] > 0 and c["augment"] and c["early_stopping"]
    for s in summary.values():
        assert 0 <= s["train"] <= 1 and 0 <= s["test"] <= 1
        assert math.isclose(s["gap"], s["train"] - s["test"], abs_tol=1e-9)


def test_per_example_cost(tmp_path):
    res = _run("per_example_cost", tmp_path)
    rows = [r for r in res["results"]["results"] if "time_s" in r]
    assert {r["method"] for r in rows} == {"plain", "ours", "outer", "vmap"}
    for r in rows:
        assert r["time_s"] > 0
        if r["method"] in ("ours", "outer"):
            assert r["rel_err_vs_ref"] < 1e-4
    # ours never materialises B × P numbers: far less scratch memory than vmap
    for b in {r["batch"] for r in rows}:
        by = {r["method"]: r for r in rows if r["batch"] == b}
        assert by["ours"]["temp_bytes"] < by["vmap"]["temp_bytes"]


def test_optimizers(tmp_path):
    res = _run("optimizers", tmp_path)
    assert set(res["results"]["best_lr"]) == {"sgd", "adam"}
    for recs in res["results"]["runs"].values():
        for r in recs:
            assert np.all(np.isfinite(np.array([_num(v) for v in r["train_loss"]])))


def test_cli_errors_are_one_line(tmp_path, capsys):
    mod = _load("optimizers")
    with pytest.raises(SystemExit) as e:
        mod.main(["--quick", "--smoke"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not allowed with argument" in err
    run_all = _load("run_all")
    assert run_all.main(["--only", "nonsense", "--out", str(tmp_path)]) == 2
    assert "unknown experiment" in capsys.readouterr().err
