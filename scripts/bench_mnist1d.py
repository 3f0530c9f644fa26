"""The MNIST-1D paper's MLP recipe: ``fnbackprop train`` vs a plain PyTorch eager loop, same CPU.

Recipe (Greydanus 2020, the MLP baseline): 40-100-100-10, ReLU, Adam lr 1e-2, batch 100, 6000
steps (150 epochs of the 4000 training examples), on the same standardised mnist1d data. Both
sides draw a new permutation every epoch and use every example once per epoch.

* ours: ``python -m fnbackprop train --dataset mnist1d --hidden 100,100 ...`` as a subprocess;
  "training" is ``summary.json``'s ``train_time_s`` (the compiled epochs only), "whole command"
  is the subprocess's wall time (interpreter start, imports, data, compile, training,
  per-epoch evaluation, outputs). The first run compiles with an empty JAX compilation cache
  ("cold"); the later runs find the compiled epoch in the cache ("warm").
* PyTorch: a plain eager loop (``nn.Sequential``, ``torch.optim.Adam``) in a subprocess of this
  script; "training" is the 6000 steps, "whole command" the subprocess's wall time.

Prints a side-by-side table with the ratios (ours / PyTorch) and both test accuracies. Goals:
training ≤ 0.2x PyTorch's, whole command ≤ 0.6x, accuracy ≥ 68 %.

PyTorch is optional (``pip install torch``); without it only our numbers are printed.

Usage: ``python scripts/bench_mnist1d.py [--repeats 3] [--steps 6000]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIDDEN = (100, 100)
LR = 1e-2
BATCH = 100
N_TRAIN = 4000


def _env(cache_dir: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    env.pop("FNBACKPROP_COMPILE_CACHE", None)
    return env


def ours(steps: int, cache_dir: str, workdir: str, tag: str) -> dict:
    epochs = steps // (N_TRAIN // BATCH)
    out = os.path.join(workdir, f"run-{tag}")
    cmd = [sys.executable, "-m", "fnbackprop", "train", "--dataset", "mnist1d",
           "--hidden", ",".join(map(str, HIDDEN)), "--activation", "relu", "--init", "he_normal",
           "--optimizer", "adam", "--lr", str(LR), "--batch-size", str(BATCH),
           "--epochs", str(epochs), "--no-augment", "--checkpoint-every", "0", "--quiet",
           "--out", out]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=_env(cache_dir), capture_output=True, text=True)
    whole = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"fnbackprop train failed ({p.returncode}): {p.stderr.strip()}")
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    return {"train_s": s["train_time_s"], "whole_s": whole, "compile_s": s["compile_time_s"],
            "accuracy": s["test_accuracy"], "command": " ".join(cmd[1:])}


def torch_worker(steps: int, seed: int) -> None:
    """The PyTorch side, run in its own process; prints one JSON line."""
    import numpy as np
    import torch
    from torch import nn

    from fnbackprop import data as data_lib

    ds, _, _ = data_lib.standardize(data_lib.load_dataset("mnist1d"))
    torch.manual_seed(seed)
    x = torch.from_numpy(np.array(ds.x_train))
    y = torch.from_numpy(np.asarray(ds.y_train).astype(np.int64))
    x_test = torch.from_numpy(np.array(ds.x_test))
    y_test = torch.from_numpy(np.asarray(ds.y_test).astype(np.int64))
    sizes = (x.shape[1], *HIDDEN, 10)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    n = x.shape[0]
    t0 = time.perf_counter()
    step = 0
    while step < steps:
        perm = torch.randperm(n)
        for i in range(0, n - BATCH + 1, BATCH):
            idx = perm[i:i + BATCH]
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            step += 1
            if step == steps:
                break
    train_s = time.perf_counter() - t0
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(json.dumps({"train_s": train_s, "accuracy": acc, "threads": torch.get_num_threads(),
                      "torch": torch.__version__}))


def pytorch(steps: int, seed: int) -> dict | None:
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    cmd = [sys.executable, os.path.abspath(__file__), "--torch-worker", "--steps", str(steps),
           "--seed", str(seed)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=_env(""), capture_output=True, text=True)
    whole = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"the PyTorch run failed: {p.stderr.strip()[-500:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["whole_s"] = whole
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="runs of each side (median reported)")
    ap.add_argument("--steps", type=int, default=6000, help="training steps (multiple of 40)")
    ap.add_argument("--seed", type=int, default=0, help="PyTorch seed")
    ap.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_worker:
        torch_worker(args.steps, args.seed)
        return

    print(f"MNIST-1D MLP recipe: 40-{'-'.join(map(str, HIDDEN))}-10 ReLU, Adam {LR:g}, batch {BATCH},"
          f" {args.steps} steps; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPU cores, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as work:
        cache = os.path.join(work, "jax-cache")
        runs = [ours(args.steps, cache, work, str(i)) for i in range(max(args.repeats, 1) + 1)]
        print(f"ours: {runs[0]['command']}")
        cold, warm = runs[0], runs[1:]
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    ours_train, ours_whole, ours_acc = med(warm, "train_s"), med(warm, "whole_s"), warm[0]["accuracy"]
    torch_runs = [pytorch(args.steps, args.seed + i) for i in range(max(args.repeats, 1))]
    print()
    print(f"{'':34} {'fnbackprop':>12} {'PyTorch':>12} {'ratio':>8}  goal")
    if torch_runs[0] is None:
        print("PyTorch is not installed (pip install torch): only our numbers are shown.")
        print(f"{'training time (s)':34} {ours_train:12.2f}")
        print(f"{'whole command, warm cache (s)':34} {ours_whole:12.2f}")
        print(f"{'whole command, cold cache (s)':34} {cold['whole_s']:12.2f}")
        print(f"{'compile, cold cache (s)':34} {cold['compile_s']:12.2f}")
        print(f"{'test accuracy':34} {ours_acc:12.4f}")
        return
    t_train, t_whole = med(torch_runs, "train_s"), med(torch_runs, "whole_s")
    t_acc = statistics.median(r["accuracy"] for r in torch_runs)
    print(f"{'training time (s)':34} {ours_train:12.2f} {t_train:12.2f} "
          f"{ours_train / t_train:7.3f}x  ≤ 0.2x")
    print(f"{'whole command, warm cache (s)':34} {ours_whole:12.2f} {t_whole:12.2f} "
          f"{ours_whole / t_whole:7.3f}x  ≤ 0.6x")
    print(f"{'whole command, cold cache (s)':34} {cold['whole_s']:12.2f} {t_whole:12.2f} "
          f"{cold['whole_s'] / t_whole:7.3f}x  ≤ 0.6x")
    print(f"{'compile, cold / warm cache (s)':34} {cold['compile_s']:6.2f}/{med(warm, 'compile_s'):5.2f}")
    print(f"{'test accuracy':34} {ours_acc:12.4f} {t_acc:12.4f} {'':8}  ≥ 0.68")
    print(f"(medians of {len(warm)} runs each; PyTorch {torch_runs[0]['torch']} with "
          f"{torch_runs[0]['threads']} threads; our cold run compiles with an empty JAX cache)")


if __name__ == "__main__":
    main()
