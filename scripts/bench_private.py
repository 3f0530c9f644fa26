#!/usr/bin/env python
"""A private training step (Poisson, padded, clipped, noised) vs a plain step, with optional peers.

Our steps are the real compiled epochs of :func:`fnbackprop.training.step.make_epoch` (a
``lax.scan`` over ``--steps`` steps gathering their rows from the whole training set), on the
same network, optimiser and expected batch size B:

* ``plain``: the non-private step: ``B`` shuffled rows, no mask, no clipping; no diagnostics and
  no non-finite skipping (the leanest plain step, so that the ratio is the cost of privacy);
* ``private``: the DP-SGD step of ``fnbackprop train --noise-multiplier``: Poisson batches of
  expected size B (:func:`fnbackprop.training.sampling.poisson_batches`) padded to the capacity
  of :func:`fnbackprop.training.sampling.batching` (rows beyond the real ones are masked),
  per-example clipping to C, Gaussian noise of std σC on the clipped sum, divided by B;
* ``private_no_noise``: the same with σ = 0, so the clipping and the noise are separated.

The padded capacity (more than B rows) is part of the honest private cost: a compiled step has a
fixed shape, and a Poisson batch must fit it. Where the time goes is measured by variants that
add one ingredient at a time: ``clipped_b`` (clipping on B shuffled rows, no padding),
``plain_padded`` (a plain step on the padded Poisson batches: the padding alone),
and ``clipped_padded_nomask`` (clipping on the padded rows without a mask: the mask's cost).
``plain_train`` is the non-private step as ``fnbackprop train`` runs it (diagnostics, skipping
non-finite steps).

Peers, measured in the same run when importable (``pip install '.[bench]'``):

* Opacus: ``PrivacyEngine.make_private(grad_sample_mode="ghost")`` (ghost clipping) on the same
  MLP in PyTorch, with and without noise, on Poisson batches of the same sizes (unpadded:
  PyTorch runs any shape), against a plain PyTorch step on B shuffled rows. Each sample chains
  steps until it lasts ``--min-sample-ms``; the data loader is not timed on either side (rows
  are gathered from a tensor of the whole training set, as our epoch gathers them). PyTorch's
  OpenMP threads spin while they wait; on a machine shared with other jobs that makes its steps
  erratic, so ``OMP_WAIT_POLICY=PASSIVE`` is set unless the environment sets it.
* jax_privacy: ``jax_privacy.clipped_grad`` (``vmap`` of ``jax.grad`` per example) on B rows, in
  a ``lax.scan`` of ``--jp-steps`` steps, against a plain ``jax.grad`` step in the same scan;
  once with its defaults and once with ``microbatch_size=--jp-microbatch``.
  It also serves as the reference of an equality check: our clipped gradient (no noise) on the
  same batch, unpadded and padded with a mask, must equal its gradient.

The data are synthetic (standard normal inputs, uniform labels) of MNIST's shape: nothing is
downloaded and timings do not depend on the values. Everything is float32.

Timing: every variant is compiled ahead of time and run once (warm-up, excluded); then
``--reps`` rounds each time every variant once, the order rotating between rounds. Reported:
the median time per step, and for every ratio the median over rounds of the ratio of the two
samples of the same round (paired), with its interquartile range.

Goal (issue "Private training that keeps its promise"): private / plain ≤ 1.25 at
784-512-512-10, B = 256, on the CPU.

Usage::

    python scripts/bench_private.py                    # 784-512-512-10, B=256, one epoch/sample
    python scripts/bench_private.py --quick            # a few seconds, tiny sizes
    python scripts/bench_private.py --json r.json --markdown r.md
"""

from __future__ import annotations

import copy
import os

# Before PyTorch (and its OpenMP runtime) is imported: see the module docstring.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib
import logging
import math
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import fnbackprop as fb  # noqa: E402
from _report import write_outputs  # noqa: E402
from fnbackprop.cli.args import (  # noqa: E402
    Parser, UsageError, parse_int_list, positive_float, positive_int)
from fnbackprop.training.sampling import (  # noqa: E402
    Batches, batching, poisson_batches, shuffled_batches)
from fnbackprop.training.step import (  # noqa: E402
    OptimizerSpec, StepSpec, TrainState, compile_epoch, make_epoch, make_optimizer)

GOAL = 1.25
FULL = dict(n=60000, sizes=(784, 512, 512, 10), batch=256, reps=11, jp_steps=1)
QUICK = dict(n=2048, sizes=(784, 32, 10), batch=32, reps=3, jp_steps=1, min_sample_ms=10.0)
PEERS = {
    "opacus": ("opacus", "pip install torch==2.13.0 opacus   (or: pip install '.[bench]')"),
    "jax_privacy": ("jax_privacy", "pip install jax-privacy   (or: pip install '.[bench]')"),
}
VMAP_LIMIT_BYTES = 8e9  # jax_privacy's vmap materialises B × P gradients: skip beyond this


class Variant(NamedTuple):
    """One timed thing: ``run()`` executes one sample of ``steps`` steps and blocks."""

    name: str
    label: str
    rows: str
    steps: int
    run: Callable[[], None]


class Config(NamedTuple):
    """The settings of a run (printed and written with its results)."""

    n: int
    sizes: tuple[int, ...]
    batch: int
    steps: int
    epochs: int
    capacity: int
    overflow: float
    optimizer: str
    lr: float
    clip: float
    sigma: float
    reps: int
    jp_steps: int
    jp_microbatch: int
    min_sample_ms: float
    seed: int


# ---------------------------------------------------------------------------------------------
# Machine and peers.


def machine_info() -> dict:
    """CPU model, cores, load, versions: printed with the results (they vary run to run)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = jax.devices()[0]
    return {"cpu": model, "cpu_count": os.cpu_count(),
            "device": f"{dev.platform}: {dev.device_kind}", "jax": jax.__version__,
            "python": platform.python_version(),
            "loadavg_start": list(os.getloadavg()),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}


def find_peers(wanted: list[str]) -> dict:
    """``{peer: version or None}`` for the peers asked for; ``None``: not importable."""
    found = {}
    for name in wanted:
        try:
            mod = importlib.import_module(PEERS[name][0])
            found[name] = getattr(mod, "__version__", "?")
        except Exception:  # noqa: BLE001 - any import failure means "not available"
            found[name] = None
    return found


# ---------------------------------------------------------------------------------------------
# Our steps: the compiled epochs.


def _spec(cfg: Config, net, **kw) -> StepSpec:
    opt = OptimizerSpec(cfg.optimizer, cfg.lr, "constant", 0)
    base = dict(net=net, optimizer=opt, batch=cfg.batch, skip_non_finite=False, diagnostics=False)
    base.update(kw)
    return StepSpec(**base)


def _private(cfg: Config, net, sigma: float) -> StepSpec:
    """The private step as :func:`fnbackprop.training.prepare.prepare` builds it."""
    return _spec(cfg, net, per_example_clip=cfg.clip, noise_multiplier=sigma, batch=cfg.capacity,
                 masked=True, denominator=float(cfg.batch))


def our_variants(cfg: Config, net, params, x, y, shuffled, poisson) -> list[Variant]:
    """The compiled epochs of our steps, each a variant whose sample is one epoch call."""
    key = jax.random.key(cfg.seed)
    shuffled = shuffled._replace(idx=shuffled.idx[:cfg.steps])
    cap, b = f"{cfg.capacity} (padded)", str(cfg.batch)
    plans = [  # (name, label, rows, spec, batches)
        ("plain", "fnbackprop plain", b, _spec(cfg, net), shuffled),
        ("private", "fnbackprop private (Poisson, padded, clip, noise)", cap,
         _private(cfg, net, cfg.sigma), poisson),
        ("private_no_noise", "fnbackprop private without noise", cap,
         _private(cfg, net, 0.0), poisson),
        ("clipped_b", "  clipping only (B shuffled rows)", b,
         _spec(cfg, net, per_example_clip=cfg.clip), shuffled),
        ("plain_padded", "  padding only (plain step, padded Poisson)", cap,
         _spec(cfg, net, batch=cfg.capacity, masked=True, denominator=float(cfg.batch)),
         poisson),
        ("clipped_padded_nomask", "  clipping on padded rows, no mask", cap,
         _private(cfg, net, 0.0), poisson._replace(mask=None)),
        ("plain_train", "  plain as `fnbackprop train` runs it", b,
         _spec(cfg, net, skip_non_finite=True, diagnostics=True), shuffled),
    ]
    out = []
    for name, label, rows, spec, batches in plans:
        opt_state = make_optimizer(spec.optimizer).init(params)
        state = TrainState(params, opt_state, key)
        mask = None if batches.mask is None else jnp.asarray(batches.mask)
        args = (state, jnp.asarray(batches.idx), mask, x, y)
        exe = compile_epoch(spec, args)
        out.append(Variant(name, label, rows, cfg.steps,
                           lambda exe=exe, args=args: jax.block_until_ready(exe(*args))))
    return out


# ---------------------------------------------------------------------------------------------
# Peers.


def _chained(step: Callable[[int], None], one_sample_s: float, min_sample_ms: float):
    """``(run, steps)``: a sample chaining enough steps to last ``min_sample_ms``."""
    steps = max(1, math.ceil(min_sample_ms / 1e3 / max(one_sample_s, 1e-7)))
    counter = [0]

    def run():
        for _ in range(steps):
            step(counter[0])
            counter[0] += 1

    return run, steps


def _timed_once(step: Callable[[int], None]) -> float:
    for i in range(3):  # warm-up
        step(i)
    t0 = time.perf_counter()
    step(3)
    return time.perf_counter() - t0


def opacus_variants(cfg: Config, x_np, y_np, shuffled, poisson) -> list[Variant]:
    """A plain PyTorch step and Opacus ghost-clipping DP steps (with and without noise)."""
    import torch
    from opacus import PrivacyEngine
    from torch import nn

    torch.manual_seed(cfg.seed)
    # Ghost clipping's second backward pass warns on every first call (inputs need no grad).
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    x = torch.from_numpy(x_np)
    y = torch.from_numpy(y_np.astype(np.int64))
    layers = []
    for i, (a, b) in enumerate(zip(cfg.sizes[:-1], cfg.sizes[1:], strict=True)):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(cfg.sizes) - 2 else [])
    base = nn.Sequential(*layers)

    def optimizer(params):
        return (torch.optim.SGD(params, lr=cfg.lr) if cfg.optimizer == "sgd"
                else torch.optim.Adam(params, lr=cfg.lr))

    plain_idx = [torch.from_numpy(r.astype(np.int64)) for r in shuffled.idx]
    poisson_idx = [torch.from_numpy(r[m].astype(np.int64))
                   for r, m in zip(poisson.idx, poisson.mask, strict=True)]

    model = copy.deepcopy(base)
    opt = optimizer(model.parameters())
    loss_fn = nn.CrossEntropyLoss()

    def plain_step(i):
        rows = plain_idx[i % len(plain_idx)]
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x[rows]), y[rows]).backward()
        opt.step()

    def private(sigma):
        m = copy.deepcopy(base)
        loader = torch.utils.data.DataLoader(  # only tells Opacus the sampling rate B / n
            torch.utils.data.TensorDataset(x, y), batch_size=cfg.batch, drop_last=True)
        quiet = logging.getLogger("opacus.data_loader")  # "Ignoring drop_last": we know
        level, quiet.level = quiet.level, logging.ERROR
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m, o, crit, _ = PrivacyEngine().make_private(
                module=m, optimizer=optimizer(m.parameters()), criterion=nn.CrossEntropyLoss(),
                data_loader=loader, noise_multiplier=sigma, max_grad_norm=cfg.clip,
                grad_sample_mode="ghost", poisson_sampling=True)
        quiet.setLevel(level)

        def step(i):
            rows = poisson_idx[i % len(poisson_idx)]
            o.zero_grad(set_to_none=True)
            crit(m(x[rows]), y[rows]).backward()
            o.step()

        return step

    out = []
    rows_poisson = f"Poisson, mean {np.mean([len(r) for r in poisson_idx]):.0f}"
    for name, label, rows, step in [
        ("torch_plain", "PyTorch plain", str(cfg.batch), plain_step),
        ("opacus", "Opacus ghost clipping + noise", rows_poisson, private(cfg.sigma)),
        ("opacus_no_noise", "Opacus ghost clipping, no noise", rows_poisson, private(0.0)),
    ]:
        run, steps = _chained(step, _timed_once(step), cfg.min_sample_ms)
        out.append(Variant(name, label, rows, steps, run))
    return out


def _jp_loss(net):
    return lambda p, xb, yb: fb.loss(net, p, xb, yb)


def jax_privacy_variants(cfg: Config, net, params, x, y, shuffled) -> list[Variant]:
    """A plain ``jax.grad`` step and a ``jax_privacy.clipped_grad`` step, each a scan of steps."""
    import jax_privacy

    loss = _jp_loss(net)
    tx = make_optimizer(OptimizerSpec(cfg.optimizer, cfg.lr, "constant", 0))
    clipped = jax_privacy.clipped_grad(loss, l2_clip_norm=cfg.clip, normalize_by=cfg.batch,
                                       batch_argnums=(1, 2))

    def scan_of(grad_fn):
        def steps(po, idx, x, y):
            def body(po, rows):
                p, o = po
                upd, o = tx.update(grad_fn(p, x[rows], y[rows]), o, p)
                return (optax.apply_updates(p, upd), o), None
            return jax.lax.scan(body, po, idx)[0]
        return jax.jit(steps)

    po = (params, tx.init(params))
    out = []
    plans = [("jax_grad", "JAX plain jax.grad", jax.grad(loss), cfg.steps),
             ("jax_privacy", "jax_privacy clipped_grad (vmap)", clipped, cfg.jp_steps)]
    if cfg.jp_microbatch:
        plans.append(("jax_privacy_mb", f"jax_privacy clipped_grad, microbatch {cfg.jp_microbatch}",
                      jax_privacy.clipped_grad(loss, l2_clip_norm=cfg.clip,
                                               normalize_by=cfg.batch, batch_argnums=(1, 2),
                                               microbatch_size=cfg.jp_microbatch),
                      cfg.jp_steps))
    for name, label, fn, k in plans:
        idx = jnp.asarray(shuffled.idx[:k])
        exe = scan_of(fn).lower(po, idx, x, y).compile()
        out.append(Variant(name, label, str(cfg.batch), k,
                           lambda exe=exe, idx=idx: jax.block_until_ready(exe(po, idx, x, y))))
    return out


# ---------------------------------------------------------------------------------------------
# Equality with jax_privacy.


def _capture():
    """An optax transformation that applies nothing and keeps the last gradient as its state:
    the gradient a real compiled step computed, read back without rounding."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def _max_rel(ours, ref) -> float:
    """max over leaves of ``max|ours − ref| / max|ref|``."""
    return max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
               for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True))


def equality_check(cfg: Config, net, params, x, y, shuffled, poisson) -> dict:
    """Our clipped gradients (no noise) vs ``jax_privacy.clipped_grad`` on the same batches.

    C is the median per-example gradient norm of the batch, so that about half the examples are
    clipped. Two checks: ``fb.clipped_grad`` on B shuffled rows; and the gradient of the real
    private step (σ = 0, read back from the compiled epoch) on the first padded Poisson batch,
    against ``jax_privacy.clipped_grad`` with ``is_padding_example`` and ``normalize_by=B``.
    """
    import jax_privacy

    rows = jnp.asarray(shuffled.idx[0])
    xb, yb = x[rows], y[rows]
    clip = float(jnp.median(fb.per_example_grad_norms(net, params, xb, yb)))
    jp = jax.jit(jax_privacy.clipped_grad(_jp_loss(net), l2_clip_norm=clip,
                                          normalize_by=cfg.batch, batch_argnums=(1, 2)))
    ours_b = jax.jit(lambda p, a, t: fb.clipped_grad(net, p, a, t, clip))(params, xb, yb)
    rel_b = _max_rel(ours_b, jp(params, xb, yb))

    spec = _private(cfg._replace(clip=clip), net, 0.0)
    tx = _capture()
    state = TrainState(params, tx.init(params), jax.random.key(cfg.seed))
    idx, mask = jnp.asarray(poisson.idx[:1]), jnp.asarray(poisson.mask[:1])
    state, _ = jax.jit(make_epoch(spec, tx))(state, idx, mask, x, y)
    xp, yp = x[idx[0]], y[idx[0]]
    rel_p = _max_rel(state.opt_state, jp(params, xp, yp, is_padding_example=~mask[0]))
    return {"clip_norm": clip, "max_rel_diff_unpadded": rel_b, "max_rel_diff_private_step": rel_p,
            "padded_rows": int(idx.shape[1]), "real_rows": int(jnp.sum(mask[0]))}


# ---------------------------------------------------------------------------------------------
# Timing and reporting.


def measure(variants: list[Variant], reps: int, log=print) -> dict:
    """Warm-up, then ``reps`` interleaved rounds: ``{name: [seconds per step, one per round]}``."""
    for v in variants:
        v.run()
    samples = {v.name: [] for v in variants}
    for r in range(reps):
        t_round = time.perf_counter()
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            t0 = time.perf_counter()
            v.run()
            samples[v.name].append((time.perf_counter() - t0) / v.steps)
        log(f"  round {r + 1}/{reps}: {time.perf_counter() - t_round:.1f} s")
    return samples


RATIOS = [  # (name, numerator, denominator)
    ("private/plain", "private", "plain"),
    ("private_no_noise/plain", "private_no_noise", "plain"),
    ("clipped_b/plain", "clipped_b", "plain"),
    ("plain_padded/plain", "plain_padded", "plain"),
    ("clipped_padded_nomask/plain", "clipped_padded_nomask", "plain"),
    ("private_no_noise/clipped_padded_nomask", "private_no_noise", "clipped_padded_nomask"),
    ("private/private_no_noise", "private", "private_no_noise"),
    ("plain_train/plain", "plain_train", "plain"),
    ("opacus/torch_plain", "opacus", "torch_plain"),
    ("opacus_no_noise/torch_plain", "opacus_no_noise", "torch_plain"),
    ("jax_privacy/jax_grad", "jax_privacy", "jax_grad"),
    ("jax_privacy/clipped_b", "jax_privacy", "clipped_b"),
    ("jax_privacy_mb/jax_grad", "jax_privacy_mb", "jax_grad"),
    ("jax_privacy_mb/clipped_b", "jax_privacy_mb", "clipped_b"),
    ("opacus/private", "opacus", "private"),
    ("torch_plain/plain", "torch_plain", "plain"),
]


def summarise(samples: dict) -> tuple[dict, dict, dict]:
    """Median ms per step with IQR, and the paired ratios (median and IQR over rounds)."""
    q = lambda s, p: float(np.percentile(s, p))  # noqa: E731
    ms = {k: 1e3 * statistics.median(s) for k, s in samples.items()}
    iqr = {k: [1e3 * q(s, 25), 1e3 * q(s, 75)] for k, s in samples.items()}
    ratios = {name: _paired(samples, a, b) for name, a, b in RATIOS
              if a in samples and b in samples}
    return ms, iqr, ratios


_BASE = {"opacus": "torch_plain", "opacus_no_noise": "torch_plain", "torch_plain": "torch_plain",
         "jax_privacy": "jax_grad", "jax_privacy_mb": "jax_grad", "jax_grad": "jax_grad"}


def table(result: dict) -> list[str]:
    """The side-by-side table: every variant, its ms/step and its ratio to its own plain step."""
    ms, variants = result["ms_per_step"], result["variants"]
    lines = [f"{'variant':52s} {'rows':>20s} {'ms/step':>9s}  ratio to its plain step (IQR)"]
    for v in variants:
        name = v["name"]
        base = _BASE.get(name, "plain")
        if name == base:
            ratio = "1 (baseline)"
        else:
            r = _paired(result["samples_s"], name, base)
            ratio = f"{r['median']:.3f} ({r['iqr'][0]:.3f}–{r['iqr'][1]:.3f})"
        lines.append(f"{v['label']:52s} {v['rows']:>20s} {ms[name]:9.3f}  {ratio}")
    return lines


def _paired(samples, a, b) -> dict:
    """Median and IQR over rounds of ``a``'s sample / ``b``'s sample of the same round."""
    r = [u / v for u, v in zip(samples[a], samples[b], strict=True)]
    return {"median": statistics.median(r),
            "iqr": [float(np.percentile(r, 25)), float(np.percentile(r, 75))]}


def markdown(result: dict) -> str:
    """A short README-ready table."""
    m, c, ms, r = result["machine"], result["config"], result["ms_per_step"], result["ratios"]
    rows = {v["name"]: v["rows"] for v in result["variants"]}
    lines = [
        f"`scripts/bench_private.py` ({'-'.join(map(str, c['sizes']))}, B={c['batch']}, "
        f"{c['optimizer']}, float32, synthetic MNIST-shaped data n={c['n']}, {c['steps']} steps "
        f"per sample, median of {c['reps']} interleaved rounds; {m['cpu']}, {m['cpu_count']} "
        f"cores, JAX {m['jax']}"
        + (f", PyTorch {result['peers'].get('torch')}, Opacus {result['peers']['opacus']}"
           if result["peers"].get("opacus") else "")
        + (f", jax_privacy {result['peers']['jax_privacy']}" if result["peers"].get("jax_privacy")
           else "") + "):",
        "",
        "| step | rows | ms / step | ratio to its own plain step |",
        "|---|---|---|---|",
    ]

    def row(label, name, ratio_key, bold=False):
        if name not in ms:
            return
        rr = r.get(ratio_key)
        txt = "1.00" if rr is None else f"{rr['median']:.2f}"
        txt = f"**{txt}**" if bold else txt
        lines.append(f"| {label} | {rows[name]} | {ms[name]:.2f} | {txt} |")

    row("fnbackprop plain", "plain", None)
    row("fnbackprop private: Poisson, clip, noise", "private", "private/plain", True)
    row("fnbackprop private without noise", "private_no_noise", "private_no_noise/plain")
    row("fnbackprop clipping only", "clipped_b", "clipped_b/plain")
    row("fnbackprop plain on padded Poisson batches", "plain_padded", "plain_padded/plain")
    row("PyTorch plain", "torch_plain", None)
    row("Opacus ghost clipping + noise", "opacus", "opacus/torch_plain", True)
    row("Opacus ghost clipping, no noise", "opacus_no_noise", "opacus_no_noise/torch_plain")
    row("JAX plain `jax.grad`", "jax_grad", None)
    row("jax_privacy `clipped_grad` (vmap)", "jax_privacy", "jax_privacy/jax_grad", True)
    row(f"jax_privacy `clipped_grad`, `microbatch_size={c['jp_microbatch']}`", "jax_privacy_mb",
        "jax_privacy_mb/jax_grad")
    g = result["goal"]
    if g["applies"]:
        lines += ["", (f"Goal private / plain ≤ {GOAL}: {'met' if g['met'] else 'not met'} "
                       f"({g['ratio']:.2f}).")]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"tiny sizes, a few seconds: n={QUICK['n']}, "
                        f"{'-'.join(map(str, QUICK['sizes']))}, B={QUICK['batch']}")
    p.add_argument("--sizes", help="layer widths (default 784,512,512,10)")
    p.add_argument("--batch", type=positive_int("--batch"), help="expected batch size B (256)")
    p.add_argument("--n", type=positive_int("--n"), help="training examples (60000)")
    p.add_argument("--steps", type=positive_int("--steps"),
                   help="steps per sample of our epochs (default: one epoch, the full batches "
                        "of n)")
    p.add_argument("--epochs", type=positive_int("--epochs"), default=20,
                   help="epochs of the run the Poisson capacity is sized for (default 20)")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--lr", type=positive_float("--lr"), default=0.01)
    p.add_argument("--clip", type=positive_float("--clip"), default=1.0, help="C (default 1)")
    p.add_argument("--noise-multiplier", type=positive_float("--noise-multiplier"), default=1.0,
                   help="σ of the noised steps (default 1; the time does not depend on it)")
    p.add_argument("--reps", type=positive_int("--reps"), help="interleaved rounds (default 11)")
    p.add_argument("--jp-steps", type=positive_int("--jp-steps"),
                   help="steps per sample of jax_privacy's steps (default 1)")
    p.add_argument("--jp-microbatch", type=positive_int("--jp-microbatch", allow_zero=True),
                   default=16, help="also time jax_privacy with this microbatch_size (0: don't)")
    p.add_argument("--min-sample-ms", type=positive_float("--min-sample-ms"), default=None,
                   help="PyTorch: chain steps until a sample lasts this long (default 200)")
    p.add_argument("--peers", default="opacus,jax_privacy",
                   help="peers to measure when installed, comma-separated; '' for none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write a short table as Markdown")
    args = p.parse_args(argv)
    preset = {**FULL, "min_sample_ms": 200.0, **(QUICK if args.quick else {})}
    try:
        sizes = (parse_int_list(args.sizes, "--sizes") if args.sizes is not None
                 else preset["sizes"])
        if len(sizes) < 2:
            raise UsageError(f"--sizes needs at least 2 widths, got {args.sizes!r}")
        peers = [s.strip() for s in args.peers.split(",") if s.strip()]
        for s in peers:
            if s not in PEERS:
                raise UsageError(f"unknown peer {s!r}; known: {', '.join(PEERS)}")
        n = args.n or preset["n"]
        batch = args.batch or preset["batch"]
        if batch > n:
            raise UsageError(f"--batch {batch} exceeds --n {n}")
        if "jax_privacy" in peers and args.jp_microbatch and batch % args.jp_microbatch:
            raise UsageError(f"--jp-microbatch {args.jp_microbatch} does not divide B={batch}: "
                             f"give a divisor, or 0 to time jax_privacy only with its defaults")
        for flag, k in (("--steps", args.steps), ("--jp-steps", args.jp_steps)):
            if k is not None and k > n // batch:
                raise UsageError(f"{flag} {k} exceeds the {n // batch} full batches of --n")
    except UsageError as e:
        p.error(str(e))
    for path in (args.json, args.markdown):
        if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            p.error(f"folder of {path!r} does not exist")
    plan = batching(n, batch, poisson=True, epochs=args.epochs)
    cfg = Config(n=n, sizes=tuple(sizes), batch=batch,
                 steps=args.steps or min(plan.steps, n // batch), epochs=args.epochs,
                 capacity=plan.rows, overflow=plan.overflow_probability,
                 optimizer=args.optimizer, lr=args.lr, clip=args.clip,
                 sigma=args.noise_multiplier, reps=args.reps or preset["reps"],
                 jp_steps=args.jp_steps or preset["jp_steps"], jp_microbatch=args.jp_microbatch,
                 min_sample_ms=args.min_sample_ms or preset["min_sample_ms"], seed=args.seed)
    return args, cfg, peers


def main(argv=None) -> int:
    args, cfg, wanted = parse_args(sys.argv[1:] if argv is None else argv)
    machine = machine_info()
    peers = find_peers(wanted)
    if peers.get("opacus"):
        import torch
        peers["torch"] = torch.__version__
        machine["torch_threads"] = torch.get_num_threads()
    print(f"{machine['cpu']}, {machine['cpu_count']} cores, {machine['device']}, "
          f"JAX {machine['jax']}, load average {machine['loadavg_start'][0]:.2f}", flush=True)
    for name in wanted:
        if peers[name]:
            print(f"peer {name} {peers[name]}: found"
                  + (f" (PyTorch {peers['torch']}, {machine['torch_threads']} threads)"
                     if name == "opacus" else ""))
        else:
            print(f"peer {name}: not installed, skipped ({PEERS[name][1]})")
    print(f"{'-'.join(map(str, cfg.sizes))}, B={cfg.batch}, n={cfg.n} synthetic MNIST-shaped "
          f"rows (N(0,1) inputs, uniform labels), {cfg.optimizer} lr={cfg.lr}, float32; "
          f"Poisson capacity {cfg.capacity} rows ({cfg.capacity / cfg.batch:.2f} B; overflow "
          f"bound {cfg.overflow:.1e} over {cfg.epochs} epochs); C={cfg.clip}, σ={cfg.sigma}; "
          f"{cfg.steps} steps per sample of ours, {cfg.reps} rounds", flush=True)

    rng = np.random.default_rng(cfg.seed)
    x_np = rng.standard_normal((cfg.n, cfg.sizes[0]), dtype=np.float32)
    y_np = rng.integers(0, cfg.sizes[-1], cfg.n).astype(np.int32)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    net = fb.MLP(cfg.sizes, hidden="relu", output="softmax", loss="cross_entropy")
    params = fb.init(jax.random.key(cfg.seed), net, dtype=jnp.float32)
    full = shuffled_batches(cfg.seed, 0, cfg.n, cfg.batch).idx[:cfg.n // cfg.batch]
    shuffled = Batches(full[:max(cfg.steps, cfg.jp_steps)], None)  # full batches: no mask
    poisson = poisson_batches(cfg.seed, 0, cfg.n, cfg.batch, cfg.steps, cfg.capacity)

    result = {"machine": machine, "config": cfg._asdict(), "peers": peers, "goal": None}
    equal = None
    if peers.get("jax_privacy"):
        equal = equality_check(cfg, net, params, x, y, shuffled, poisson)
        result["equality_jax_privacy"] = equal
        print(f"equality with jax_privacy (C = median norm {equal['clip_norm']:.3g}): max |Δ| / "
              f"max |ref| per leaf = {equal['max_rel_diff_unpadded']:.1e} (fb.clipped_grad, "
              f"{cfg.batch} rows), {equal['max_rel_diff_private_step']:.1e} (the private step's "
              f"gradient, {equal['real_rows']} real of {equal['padded_rows']} rows)", flush=True)

    t0 = time.perf_counter()
    variants = our_variants(cfg, net, params, x, y, shuffled, poisson)
    if peers.get("jax_privacy"):
        vmap_bytes = cfg.batch * net.num_params * 4
        if vmap_bytes > VMAP_LIMIT_BYTES:
            result["jax_privacy_skipped"] = (f"vmap would materialise B × P = "
                                             f"{vmap_bytes / 1e9:.0f} GB of per-example gradients")
            print(f"jax_privacy timing skipped: {result['jax_privacy_skipped']}")
        else:
            variants += jax_privacy_variants(cfg, net, params, x, y, shuffled)
    if peers.get("opacus"):
        variants += opacus_variants(cfg, x_np, y_np, shuffled, poisson)
    print(f"compiled and set up {len(variants)} variants in {time.perf_counter() - t0:.1f} s "
          f"(not timed); timing:", flush=True)
    samples = measure(variants, cfg.reps, log=lambda s: print(s, flush=True))
    ms, iqr, ratios = summarise(samples)
    machine["loadavg_end"] = list(os.getloadavg())
    goal = ratios["private/plain"]["median"]
    applies = cfg.sizes == FULL["sizes"] and cfg.batch == FULL["batch"]
    result.update(
        variants=[{"name": v.name, "label": v.label.strip(), "rows": v.rows, "steps": v.steps}
                  for v in variants],
        ms_per_step=ms, ms_iqr=iqr, ratios=ratios,
        samples_s=samples,
        goal={"ratio": goal, "max": GOAL, "met": goal <= GOAL, "applies": applies})
    print()
    for line in table(result):
        print(line)
    print(f"\nload average at the end {machine['loadavg_end'][0]:.2f}")
    print("\nwhere the private step's time goes (paired medians):")
    for k in ("clipped_b/plain", "plain_padded/plain", "private_no_noise/clipped_padded_nomask",
              "private_no_noise/plain", "private/private_no_noise"):
        print(f"  {k:42s} {ratios[k]['median']:.3f}")
    print(f"  (padded rows alone would scale the work by {cfg.capacity / cfg.batch:.2f})")
    for k in ("opacus/private", "jax_privacy/clipped_b", "jax_privacy_mb/clipped_b",
              "torch_plain/plain"):
        if k in ratios:
            print(f"  {k:42s} {ratios[k]['median']:.3f}")
    verdict = ("met " if goal <= GOAL else "MISS") if applies else "n/a "
    print(f"\ngoal: [{verdict}] private / plain {goal:.3f} ≤ {GOAL}"
          + ("" if applies else f" (the goal is set at {'-'.join(map(str, FULL['sizes']))}, "
                                f"B={FULL['batch']}: not evaluated here)"))
    if args.quick:
        print("--quick is a smoke run at tiny sizes: its timings are not a measurement.")
    write_outputs(args.json, args.markdown, result, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
