#!/usr/bin/env python
"""What a plain ``fnbackprop train --dataset NAME`` reaches: the per-dataset defaults over seeds.

For every dataset, the default command (``--quiet``, a fresh ``--out``) runs once with an empty
JAX compilation cache ("cold"), then once per seed with the cache that run filled ("warm"). The
test result (accuracy, or R² for regression) is read from each run's ``summary.json``; the times
are the subprocess's wall time (interpreter start, imports, data, compilation or cache reads,
training, evaluation, outputs, checkpoints).

Prints a Markdown table (the README's defaults table): the dataset, its defaults (from
``fb.TrainConfig``'s dataset defaults), the result per seed with its range and mean, and the
whole-command times.

Usage: ``python scripts/defaults_table.py [--datasets digits,mnist1d] [--seeds 0,1,2,3,4]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _report import ROOT, cli_env

sys.path.insert(0, ROOT)

DATASETS = ("digits", "breast_cancer", "diabetes", "mnist1d", "mnist1d_60k")


def run_once(dataset: str, seed: int, cache_dir: str, workdir: str) -> dict:
    """One default command; its test result and wall time."""
    out = os.path.join(workdir, f"{dataset}-{seed}-{time.monotonic_ns()}")
    cmd = [sys.executable, "-m", "fnbackprop", "train", "--dataset", dataset, "--seed", str(seed),
           "--out", out, "--quiet"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=cli_env(cache_dir), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()[-500:]}")
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    metric = "test_r2" if s.get("test_r2") is not None else "test_accuracy"
    return dict(metric=metric, value=s[metric], wall=wall, train=s["train_time_s"])


def describe(dataset: str) -> str:
    """The dataset's defaults as CLI-like settings."""
    import fnbackprop as fb

    c = fb.training.config.DATASET_DEFAULTS[dataset]
    parts = []
    if c.get("conv"):
        parts.append("conv " + ",".join(":".join(map(str, layer)) for layer in c["conv"]))
    if c.get("hidden"):
        parts.append("hidden " + ",".join(map(str, c["hidden"])))
    parts.append(c["activation"])
    parts.append(f"{c['optimizer']} {c['lr']:g}" + (f" {c['schedule']}" if "schedule" in c else ""))
    parts.append(f"batch {c['batch_size']}, {c['epochs']} epochs")
    if c.get("augment"):
        parts.append("augment")
    return ", ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--seeds", default="0,1,2,3,4")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in args.datasets.split(","):
            cache = os.path.join(tmp, f"cache-{dataset}")
            cold = run_once(dataset, seeds[0], cache, tmp)
            warm = [run_once(dataset, s, cache, tmp) for s in seeds]
            vals = [r["value"] for r in warm]
            pct = warm[0]["metric"] == "test_accuracy"
            fmt = (lambda v: f"{100 * v:.1f} %") if pct else (lambda v: f"{v:.3f}")
            result = (f"{fmt(min(vals))}–{fmt(max(vals))}, mean {fmt(statistics.mean(vals))} "
                      f"({', '.join(fmt(v) for v in vals)})")
            walls = [r["wall"] for r in warm]
            span = (f"{min(walls):.0f}" if round(min(walls)) == round(max(walls))
                    else f"{min(walls):.0f}–{max(walls):.0f}")
            times = (f"{span} s warm, {cold['wall']:.0f} s cold "
                     f"(training {statistics.median(r['train'] for r in warm):.1f} s)")
            label = "R²" if not pct else "accuracy"
            rows.append(f"| {dataset} | {describe(dataset)} | {label} {result} | {times} |")
            print(rows[-1], flush=True)
    print("\n| dataset | defaults | test result (seeds " + args.seeds + ") | whole command |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
