"""Runs every experiment, each in its own process, and writes a summary.

Usage::

    python experiments/run_all.py --quick            # the 2-core CPU size (< 10 minutes)
    python experiments/run_all.py                    # full size (for a GPU machine)
    python experiments/run_all.py --only vanishing_gradients,optimizers --out DIR

Each experiment writes into ``OUT/NAME`` (default ``experiments/results/NAME``); this script
writes ``OUT/run_all.json`` and ``OUT/SUMMARY.md`` (per experiment: wall time, exit status and
the claims with their verdicts). Every run gets one fresh JAX compilation cache (shared by the
experiments, deleted at the end), so the total time includes every compilation. Exit status: 0
when every experiment succeeded, 1 otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

EXPERIMENTS = (
    "gradient_equivalence",
    "gd_sgd_minibatch",
    "vanishing_gradients",
    "exploding_gradients",
    "regularization",
    "initialization",
    "per_example_cost",
    "optimizers",
)


def build_parser():
    import _common  # noqa: F401  (puts the checkout on sys.path)
    from fnbackprop.cli.args import Parser as _Parser

    p = _Parser(prog="experiments/run_all.py", description="Run every experiment.")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the 2-core CPU size")
    size.add_argument("--smoke", action="store_true", help="tiny sizes (seconds each)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output folder (default experiments/results)")
    p.add_argument("--only", default=None,
                   help=f"comma-separated subset of: {', '.join(EXPERIMENTS)}")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    names = EXPERIMENTS
    if args.only:
        names = tuple(n.strip() for n in args.only.split(",") if n.strip())
        bad = [n for n in names if n not in EXPERIMENTS]
        if bad:
            sys.stderr.write(f"run_all.py: error: unknown experiment(s) {', '.join(bad)}; "
                             f"allowed: {', '.join(EXPERIMENTS)}\n")
            return 2
    out = Path(args.out) if args.out else HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    mode = ["--quick"] if args.quick else ["--smoke"] if args.smoke else []
    cache = tempfile.mkdtemp(prefix="fnbackprop-jax-cache-")
    env = dict(os.environ, FNBACKPROP_JAX_CACHE=cache)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE.parent)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    summary = {"mode": mode[0][2:] if mode else "full", "experiments": {}}
    t_all = time.perf_counter()
    try:
        for name in names:
            cmd = [sys.executable, str(HERE / f"{name}.py"), *mode, "--out", str(out / name)]
            print(f"=== {name}: {' '.join(cmd[1:])}", flush=True)
            t0 = time.perf_counter()
            rc = subprocess.call(cmd, env=env)
            dt = time.perf_counter() - t0
            rec = {"exit_status": rc, "wall_time_s": dt}
            res = out / name / "results.json"
            if rc == 0 and res.exists():
                with open(res) as f:
                    rec["claims"] = json.load(f).get("claims", [])
            summary["experiments"][name] = rec
            print(f"=== {name}: exit {rc} in {dt:.1f} s", flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    total = time.perf_counter() - t_all
    summary["total_wall_time_s"] = total
    from _common import machine_info, machine_line

    info = machine_info()
    summary["machine"] = info
    with open(out / "run_all.json", "w") as f:
        json.dump(summary, f, indent=1)
    lines = [f"# Experiments: {summary['mode']} run", "",
             f"Machine: {machine_line(info)}. Total wall time {total:.0f} s.", "",
             "| experiment | exit | wall time (s) | claims supported / partly / not |", "|---|---|---|---|"]
    for name, rec in summary["experiments"].items():
        cl = rec.get("claims", [])
        counts = [sum(c["verdict"] == v for c in cl) for v in ("supported", "partly supported", "not supported")]
        lines.append(f"| [{name}]({name}/table.md) | {rec['exit_status']} | {rec['wall_time_s']:.0f} | "
                     f"{counts[0]} / {counts[1]} / {counts[2]} |")
    lines.append("")
    for name, rec in summary["experiments"].items():
        if rec.get("claims"):
            lines += [f"## {name}", ""]
            lines += [f"- **{c['verdict']}**: {c['claim']} — {c['evidence']}" for c in rec["claims"]]
            lines.append("")
    (out / "SUMMARY.md").write_text("\n".join(lines))
    print(f"=== all done in {total:.1f} s; summary in {out / 'SUMMARY.md'}", flush=True)
    return 0 if all(r["exit_status"] == 0 for r in summary["experiments"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
