"""Data-parallel training throughput vs number of devices, side by side in one run.

Trains the same network on the same data with 1, 2, 4, ... devices (``fb.train(devices=k,
parallel=...)``) and prints steps/s, the speed-up over one device, and the final training loss
(which must agree across device counts). On a CPU the "devices" are simulated
(``--xla_force_host_platform_device_count``) and share the same cores, so there the numbers are
only a correctness demo, not a scaling measurement; run it on a multi-GPU machine for that
(``scripts/gpu_check.sh`` does).

Usage::

    python scripts/bench_parallel.py [--parallel sharding|pmap] [--dataset mnist1d]
        [--hidden 512,512] [--batch-size 256] [--epochs 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if "--cpu-devices" in sys.argv:  # must precede the JAX import
    n = sys.argv[sys.argv.index("--cpu-devices") + 1]
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={n}")

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fnbackprop as fb  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parallel", choices=("sharding", "pmap"), default="sharding")
    p.add_argument("--dataset", default="mnist1d")
    p.add_argument("--hidden", default="512,512")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="simulate this many CPU devices (a correctness demo only)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    n_all = jax.device_count()
    counts = [k for k in (1, 2, 4, 8, 16) if k <= n_all]
    kw = dict(dataset=a.dataset, hidden=tuple(int(h) for h in a.hidden.split(",")),
              batch_size=a.batch_size, epochs=a.epochs, checkpoint_every=0, dropout=0.0,
              augment=False)
    rows = []
    for k in counts:
        r = fb.train(devices=k, parallel=a.parallel, **kw)
        s = r.summary
        steps = s["steps_per_epoch"] * s["epochs_run"]
        rows.append({"devices": k, "steps_per_s": steps / s["train_time_s"],
                     "train_time_s": s["train_time_s"], "compile_time_s": s["compile_time_s"],
                     "final_train_loss": s["final_train_loss"]})
    base = rows[0]["steps_per_s"]
    kind = jax.devices()[0].device_kind
    print(f"data parallel ({a.parallel}) on {n_all} × {kind}; {a.dataset} MLP hidden {a.hidden}, "
          f"global batch {a.batch_size}, {a.epochs} epochs")
    print(f"{'devices':>7} {'steps/s':>9} {'speed-up':>9} {'compile s':>10} {'final train loss':>18}")
    for r in rows:
        r["speedup"] = r["steps_per_s"] / base
        print(f"{r['devices']:>7} {r['steps_per_s']:>9.1f} {r['speedup']:>9.2f} "
              f"{r['compile_time_s']:>10.2f} {r['final_train_loss']:>18.8f}")
    if jax.devices()[0].platform == "cpu":
        print("(simulated CPU devices share the same cores: a correctness demo, not scaling)")
    losses = [r["final_train_loss"] for r in rows]
    spread = (max(losses) - min(losses)) / abs(losses[0])
    print(f"final training loss agrees across device counts to rel {spread:.1e}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"parallel": a.parallel, "device_kind": kind, "rows": rows,
                       "loss_rel_spread": spread}, f, indent=2)
    return 0 if spread <= 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
