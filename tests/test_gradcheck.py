"""The gradient checker: it passes on correct gradients, fails on wrong ones (mutation tests),
its report; jitted gradients trace once; the ``fnbackprop gradcheck`` command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import MappingProxyType

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbackprop as fb
import fnbackprop.activations as activations_module
from fnbackprop import cli
from fnbackprop.activations import Activation
from fnbackprop.gradcheck import default_tolerances
from fnbackprop.losses import output_delta, prepare_targets

REPO = Path(__file__).resolve().parents[1]
B = 5
NET = fb.MLP((3, 4, 4, 3), "tanh", "softmax", "cross_entropy")


def make_data(net=NET, dtype=jnp.float64, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(B, net.sizes[0])), dtype)
    if net.loss == "cross_entropy":
        y = jnp.asarray(rng.integers(0, net.sizes[-1], size=B))
    else:
        y = jnp.asarray(rng.uniform(0.1, 0.9, size=(B, net.sizes[-1])), dtype)
    # nielsen: N(0, 1) biases, so that a mistake in a bias gradient's penalty term shows.
    params = fb.init(jax.random.key(seed), net, "nielsen", dtype=dtype)
    return params, x, y


# --- passes on good gradients; the report ---------------------------------------------------
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_check_gradients_passes_and_report(dtype):
    params, x, y = make_data(dtype=dtype)
    report = fb.check_gradients(NET, params, x, y)
    assert isinstance(report, fb.GradCheckReport)
    assert report.passed, str(report)
    tols = default_tolerances(dtype)
    assert (report.tol_autodiff, report.tol_fd) == (tols["autodiff"], tols["fd"])
    assert report.dtype == jnp.dtype(dtype).name
    # One row per layer and parameter, in order, with the shapes of params.
    assert [(r.layer, r.param) for r in report.rows] == [
        (1, "w"), (1, "b"), (2, "w"), (2, "b"), (3, "w"), (3, "b")]
    assert [r.shape for r in report.rows] == [(3, 4), (4,), (4, 4), (4,), (4, 3), (3,)]
    assert [r.fd_checked for r in report.rows] == [12, 4, 16, 4, 12, 3]  # all entries (≤ 64)
    for r in report.rows:
        assert isinstance(r, fb.GradCheckRow) and r.passed
        assert 0 <= r.rel_autodiff <= report.tol_autodiff and 0 <= r.rel_fd <= report.tol_fd
        assert r.abs_autodiff >= 0 and r.abs_fd >= 0
    assert report.max_rel_autodiff == max(r.rel_autodiff for r in report.rows)
    assert report.max_rel_fd == max(r.rel_fd for r in report.rows)
    if dtype == jnp.float64:
        assert report.max_rel_autodiff <= 1e-10 and report.max_rel_fd <= 1e-5
    # The table: a header, a rule, a line per row, a summary.
    lines = str(report).splitlines()
    assert len(lines) == 2 + len(report.rows) + 1
    assert "layer" in lines[0] and "rel(manual-grad)" in lines[0] and "rel(vs FD)" in lines[0]
    assert all(line.rstrip().endswith("yes") for line in lines[2:-1])
    assert "PASSED" in lines[-1] and jnp.dtype(dtype).name in lines[-1]
    # A JSON-ready dict.
    d = json.loads(json.dumps(report.to_dict()))
    assert d["passed"] is True and d["dtype"] == report.dtype and len(d["rows"]) == 6
    assert d["rows"][2]["layer"] == 2 and d["rows"][2]["param"] == "w"
    assert d["rows"][2]["shape"] == [4, 4]


def test_check_gradients_other_heads_regularisation_and_dropout():
    for net, kw in [
        (fb.MLP((3, 4, 4, 3), "sigmoid", "sigmoid", "binary_cross_entropy"), {"l1": 0.01, "l2": 0.1}),
        (fb.MLP((3, 4, 4, 3), "softplus", "identity", "mse"),
         {"dropout": 0.3, "key": jax.random.key(1)}),
    ]:
        params, x, y = make_data(net)
        report = fb.check_gradients(net, params, x, y, **kw)
        assert report.passed, f"{net} {kw}\n{report}"


def test_finite_difference_subset_and_independent_central_differences():
    params, x, y = make_data()
    report = fb.check_gradients(NET, params, x, y, max_fd_per_param=3, fd_key=jax.random.key(5))
    assert report.passed
    assert [r.fd_checked for r in report.rows] == [3, 3, 3, 3, 3, 3]
    # Our own central differences on a few entries agree with manual_grad (float64: O(h²)).
    g = fb.manual_grad(NET, params, x, y)
    h = 1e-5
    for l, name, idx in [(0, "w", (2, 1)), (1, "b", (3,)), (2, "w", (0, 2)), (2, "b", (1,))]:
        def shifted(d):
            p = jax.tree.map(lambda v: v, params)
            p[l] = dict(p[l])
            p[l][name] = p[l][name].at[idx].add(d)
            return float(fb.loss(NET, p, x, y))

        fd = (shifted(h) - shifted(-h)) / (2 * h)
        assert fd == pytest.approx(float(g[l][name][idx]), rel=1e-6, abs=1e-9)


# --- mutation tests: a wrong derivative must fail --------------------------------------------
def _wrong_tanh_activations():
    wrong = dict(activations_module.ACTIVATIONS)
    tanh = wrong["tanh"]
    d_wrong = lambda z, a: 1 - a  # noqa: E731 - the mutation: tanh' = 1 − tanh (not 1 − tanh²)
    wrong["tanh"] = Activation("tanh", tanh.fn, lambda z, a, g: g * d_wrong(z, a), d_wrong)
    return MappingProxyType(wrong)


def test_mutation_wrong_tanh_derivative_fails(monkeypatch):
    # float32: see test_cli_in_process_float32_and_mutation.
    params, x, y = make_data()
    monkeypatch.setattr(activations_module, "ACTIVATIONS", _wrong_tanh_activations())
    report = fb.check_gradients(NET, params, x, y)
    assert not report.passed, str(report)
    assert "FAILED" in str(report)
    # The hidden layers' gradients depend on tanh', the output layer's do not.
    by_layer = {(r.layer, r.param): r for r in report.rows}
    for layer in (1, 2):
        for name in ("w", "b"):
            r = by_layer[(layer, name)]
            assert not r.passed and r.rel_autodiff > 1e-2 and r.rel_fd > 1e-2
    assert by_layer[(3, "w")].passed and by_layer[(3, "b")].passed
    assert "NO" in str(report)
    monkeypatch.undo()
    assert fb.check_gradients(NET, params, x, y).passed


def _hand_backprop(d_tanh):
    """A separate δ recursion for tanh hidden layers, with a pluggable tanh derivative."""

    def grad_fn(net, params, x, y, *, l1=0.0, l2=0.0, dropout=0.0, key=None):
        assert net.hidden == "tanh" and dropout == 0.0
        tr = fb.forward_trace(net, params, x)
        y = prepare_targets(net, y, x.shape[0], params[0]["w"].dtype)
        delta = output_delta(net, tr.z[-1], tr.a[-1], y) / x.shape[0]
        grads = [None] * net.num_layers
        for l in range(net.num_layers - 1, -1, -1):
            w = params[l]["w"]
            grads[l] = {"w": tr.a[l].T @ delta + l1 * jnp.sign(w) + l2 * w, "b": delta.sum(0)}
            if l:
                delta = (delta @ w.T) * d_tanh(tr.a[l])
        return grads

    return grad_fn


def test_mutation_via_grad_fn():
    params, x, y = make_data()
    right = _hand_backprop(lambda a: 1 - a * a)
    wrong = _hand_backprop(lambda a: 1 - a)
    assert fb.check_gradients(NET, params, x, y, grad_fn=right, l1=0.01, l2=0.1).passed
    report = fb.check_gradients(NET, params, x, y, grad_fn=wrong)
    assert not report.passed
    assert [r.passed for r in report.rows] == [False, False, False, False, True, True]


@pytest.mark.parametrize(
    "mutation",
    ["no_mean", "no_penalty", "penalised_bias"],
)
def test_mutation_other_mistakes_fail(mutation):
    params, x, y = make_data()
    kw = {"l1": 0.01, "l2": 0.1}

    def grad_fn(net, params, x, y, *, l1, l2, dropout, key):
        if mutation == "no_mean":  # the gradient of the summed loss, not the mean
            g = fb.manual_grad(net, params, x, y, dropout=dropout, key=key)
            g = jax.tree.map(lambda v: v * x.shape[0], g)
            return [{"w": gl["w"] + l1 * jnp.sign(p["w"]) + l2 * p["w"], "b": gl["b"]}
                    for gl, p in zip(g, params)]
        if mutation == "no_penalty":
            return fb.manual_grad(net, params, x, y, dropout=dropout, key=key)
        g = fb.manual_grad(net, params, x, y, l1=l1, l2=l2, dropout=dropout, key=key)
        return [{"w": gl["w"], "b": gl["b"] + l2 * p["b"]} for gl, p in zip(g, params)]

    report = fb.check_gradients(NET, params, x, y, grad_fn=grad_fn, **kw)
    assert not report.passed, mutation
    failed = {r.param for r in report.rows if not r.passed}
    assert failed == {"no_mean": {"w", "b"}, "no_penalty": {"w"}, "penalised_bias": {"b"}}[mutation]


# --- tracing --------------------------------------------------------------------------------
def test_jitted_manual_grad_traces_once_for_fixed_shapes():
    chex.clear_trace_counter()

    @chex.assert_max_traces(n=1)
    def step(params, x, y, key):
        g = fb.manual_grad(NET, params, x, y, l2=0.01, dropout=0.2, key=key)
        return jax.tree.map(lambda p, d: p - 0.1 * d, params, g)

    step_jit = jax.jit(step)
    params, x, y = make_data()
    for seed in range(3):  # new values, same shapes and dtypes: no new trace
        p2, x2, y2 = make_data(seed=seed)
        params = step_jit(params, x2, y2, jax.random.key(seed))
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(params))
    with pytest.raises(AssertionError, match="traced > 1"):
        step_jit(params, jnp.concatenate([x, x]), jnp.concatenate([y, y]), jax.random.key(0))
    chex.clear_trace_counter()


def test_jitted_manual_grad_static_net_retraces_only_for_new_shapes():
    chex.clear_trace_counter()
    grad = jax.jit(chex.assert_max_traces(fb.manual_grad, n=2), static_argnums=0)
    params, x, y = make_data()
    g1 = grad(NET, params, x, y)
    grad(fb.MLP((3, 4, 4, 3), "tanh", "softmax", "cross_entropy"), params, x + 1, y)  # equal net
    g2 = grad(NET, params, x[:2], y[:2])  # a new batch size: the second trace
    with pytest.raises(AssertionError):
        grad(NET, params, x[:3], y[:3])
    np.testing.assert_allclose(g1[0]["w"], fb.manual_grad(NET, params, x, y)[0]["w"], rtol=1e-12)
    np.testing.assert_allclose(g2[0]["w"], fb.manual_grad(NET, params, x[:2], y[:2])[0]["w"], rtol=1e-12)
    chex.clear_trace_counter()


# --- the command line -------------------------------------------------------------------------
def _run_cli(*args, tmp_path=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", "fnbackprop", "gradcheck", *args],
        capture_output=True, text=True, env=env, cwd=tmp_path or REPO, timeout=300,
    )


def test_cli_gradcheck_subprocess(tmp_path):
    out = tmp_path / "report.json"
    res = _run_cli("--sizes", "3,4,3", "--batch-size", "5", "--json", str(out), tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "gradient check: MLP(3, 4, 3)" in res.stdout
    assert "rel(manual-grad)" in res.stdout and "PASSED" in res.stdout
    report = json.loads(out.read_text())
    assert report["passed"] is True and report["dtype"] == "float64" and len(report["rows"]) == 4


@pytest.mark.parametrize(
    "args,named",
    [
        (["--sizes", "3,x,2"], "'x'"),
        (["--dropout", "1.5"], "1.5"),
    ],
)
def test_cli_bad_flags_subprocess(args, named):
    res = _run_cli(*args)
    assert res.returncode == 2
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr and named in lines[0] and "error" in lines[0]


def _main(argv, capsys):
    try:
        code = cli.main(["gradcheck", *argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "args,named",
    [
        (["--sizes", "3"], "'3'"),
        (["--sizes", "3,0,2"], "0"),
        (["--sizes", ""], "''"),
        (["--batch-size", "0"], "0"),
        (["--batch-size", "many"], "'many'"),
        (["--hidden", "swish"], "'swish'"),
        (["--output", "logistic"], "'logistic'"),
        (["--loss", "hinge"], "'hinge'"),
        (["--init", "glorot"], "'glorot'"),
        (["--dtype", "float16"], "'float16'"),
        (["--l2", "-1"], "-1"),
        (["--l1", "nan"], "nan"),
        (["--dropout", "-0.2"], "-0.2"),
        (["--max-fd", "0"], "0"),
        (["--seed", "abc"], "'abc'"),
        (["--frobnicate"], "--frobnicate"),
        (["--loss", "cross_entropy", "--output", "sigmoid"], "'sigmoid'"),
    ],
)
def test_cli_bad_flags_in_process(capsys, args, named):
    code, out, err = _main(args, capsys)
    assert code == 2, (args, err)
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert named in lines[0] and "error" in lines[0], lines[0]


def test_cli_in_process_float32_and_mutation(capsys, monkeypatch):
    args = ["--sizes", "3,4,4,3", "--batch-size", "5", "--dtype", "float32", "--hidden", "tanh"]
    code, out, _ = _main(args, capsys)
    assert code == 0 and "float32" in out and "PASSED" in out
    # The mutation is caught at float32's looser tolerances too; the exit status is then 1.
    monkeypatch.setattr(activations_module, "ACTIVATIONS", _wrong_tanh_activations())
    code, out, _ = _main(args, capsys)
    assert code == 1 and "FAILED" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [(r[0], r[1], r[-1]) for r in rows] == [
        ("1", "w", "NO"), ("1", "b", "NO"), ("2", "w", "NO"), ("2", "b", "NO"),
        ("3", "w", "yes"), ("3", "b", "yes")]


# --- kinks: finite differences across relu/leaky_relu/elu at 0 ---------------------------------
def _relu_derivative_everywhere_one():
    wrong = dict(activations_module.ACTIVATIONS)
    relu = wrong["relu"]
    d_wrong = lambda z, a: jnp.ones_like(z)  # noqa: E731 - the mutation: relu' = 1 everywhere
    wrong["relu"] = Activation("relu", relu.fn, lambda z, a, g: g * d_wrong(z, a), d_wrong)
    return MappingProxyType(wrong)


def test_cli_float32_relu_skips_kinks_and_still_catches_a_wrong_derivative(capsys, monkeypatch):
    """The reported case: a correct relu gradient in float32, where the finite-difference step
    (4.9e-3) crosses kinks, used to print FAILED; those entries are now skipped and counted."""
    args = ["--dtype", "float32", "--hidden", "relu"]
    code, out, _ = _main(args, capsys)
    assert code == 0 and "PASSED" in out, out
    assert "finite differences skipped: the ±h step crosses a kink" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert sum(int(r[-2]) for r in rows) > 0  # the kinks column
    monkeypatch.setattr(activations_module, "ACTIVATIONS", _relu_derivative_everywhere_one())
    code, out, _ = _main(args, capsys)
    assert code == 1 and "FAILED" in out


@pytest.mark.parametrize("hidden,dtype", [("relu", jnp.float32), ("leaky_relu", jnp.float64),
                                          ("elu", jnp.float64)])
def test_kinks_are_counted(hidden, dtype):
    net = fb.MLP((3, 8, 3), hidden, "softmax", "cross_entropy")
    params, x, y = make_data(net, dtype)
    # Put a pre-activation exactly at the kink: entry (0, 0) of w¹ then moves it across.
    params[0]["b"] = params[0]["b"].at[0].set(-(x[0] @ params[0]["w"][:, 0]))
    report = fb.check_gradients(net, params, x, y)
    assert report.passed, str(report)
    first = report.rows[0]
    assert first.fd_kinks >= 1 and first.fd_checked + first.fd_kinks == 24
    assert report.to_dict()["fd_kinks"] == report.fd_kinks >= 1
    assert f"{report.fd_kinks} finite differences skipped" in str(report)


def test_cli_conv_network(capsys, tmp_path):
    out_json = tmp_path / "r.json"
    # float32 with relu: the finite-difference step crosses kinks in the convolutions too.
    args = ["--input-shape", "12,2", "--conv", "3:3,3:3:2", "--sizes", "4,3", "--hidden", "relu",
            "--dtype", "float32", "--batch-size", "6", "--max-fd", "16", "--json", str(out_json)]
    code, out, err = _main(args, capsys)
    assert code == 0 and "PASSED" in out, out + err
    assert "input 12x2 conv3:3:1 conv3:3:2 flatten dense(4, 3)" in out
    report = json.loads(out_json.read_text())
    assert [r["layer"] for r in report["rows"]] == [1, 1, 2, 2, 4, 4, 5, 5]


@pytest.mark.parametrize(
    "args,named",
    [
        (["--conv", "3:3"], "--conv needs --input-shape L,C"),
        (["--input-shape", "12"], "--input-shape must be L,C"),
        (["--input-shape", "12,0"], "0 in '12,0' must be ≥ 1"),
        (["--input-shape", "12,2", "--conv", "3:0"], "--conv: 0 in '3:0' must be ≥ 1"),
        (["--input-shape", "12,2", "--conv", "3"], "'3' in '3' must be C:K or C:K:S"),
        (["--input-shape", "12,2", "--conv", "3:a"], "'a' in '3:a' is not an integer"),
        (["--input-shape", "12,2", "--sizes", "1"], "single output unit"),
    ],
)
def test_cli_conv_bad_flags(capsys, args, named):
    code, out, err = _main(args, capsys)
    assert code == 2 and out == "", (args, out)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "error" in lines[0], err


def test_cli_json_into_a_folder_or_a_missing_folder_is_refused_before_the_check(capsys, tmp_path):
    for path, named in ((tmp_path, "is a folder"), (tmp_path / "no" / "r.json", "does not exist")):
        code, out, err = _main(["--sizes", "3,4,3", "--json", str(path)], capsys)
        assert code == 2 and out == "", out  # the check did not run: nothing on stdout
        lines = err.strip().splitlines()
        assert len(lines) == 1 and named in lines[0] and "Traceback" not in err, err
