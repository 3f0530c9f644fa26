"""The MNIST-1D paper's MLP recipe: ``fnbackprop train`` vs a plain PyTorch eager loop, same CPU.

Recipe (Greydanus 2020, the MLP baseline): 40-100-100-10, ReLU, Adam lr 1e-2, batch 100, 6000
steps (150 epochs of the 4000 training examples), on the same standardised mnist1d data. Both
sides draw a new permutation every epoch and use every example once per epoch.

* ours: ``python -m fnbackprop train --dataset mnist1d --hidden 100,100 ...`` as a subprocess,
  the default command otherwise (progress output aside: ``--quiet``), i.e. with its default
  checkpoints; "training" is ``summary.json``'s ``train_time_s`` (the compiled epochs only),
  "whole command" is the subprocess's wall time (interpreter start, imports, data, compile,
  training, per-epoch evaluation, outputs, checkpoints). The first run compiles with an empty
  JAX compilation cache ("cold"); the later runs find the compiled epoch in the cache ("warm").
  The same command with ``--checkpoint-every 0`` runs interleaved with it: the difference of
  the medians is what the default checkpoints cost.
* the per-layer diagnostics (gradient and δ norms): the compiled epoch of this recipe with and
  without them, interleaved in this process, paired median ratio.
* PyTorch: a plain eager loop (``nn.Sequential``, ``torch.optim.Adam``) in a subprocess of this
  script; "training" is the 6000 steps, "whole command" the subprocess's wall time.

Prints a side-by-side table with the ratios (ours / PyTorch) and both mean test accuracies
(run i of each side uses seed + i: the accuracy is compared over seeds, not one draw). Goals:
training ≤ 0.2x PyTorch's, whole command ≤ 0.6x, accuracy within 2 points of PyTorch's,
checkpoint overhead ≤ 5 % of the default command, diagnostics ≤ 5 % of a step.

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

from _report import cli_env

HIDDEN = (100, 100)
LR = 1e-2
BATCH = 100
N_TRAIN = 4000


def ours(steps: int, cache_dir: str, workdir: str, tag: str, checkpoints: bool = True,
         seed: int = 0) -> dict:
    epochs = steps // (N_TRAIN // BATCH)
    out = os.path.join(workdir, f"run-{tag}")
    cmd = [sys.executable, "-m", "fnbackprop", "train", "--dataset", "mnist1d",
           "--hidden", ",".join(map(str, HIDDEN)), "--activation", "relu", "--init", "he_normal",
           "--optimizer", "adam", "--lr", str(LR), "--schedule", "constant",
           "--batch-size", str(BATCH),
           "--epochs", str(epochs), "--no-augment", "--seed", str(seed), "--quiet", "--out", out]
    if not checkpoints:
        cmd[-2:-2] = ["--checkpoint-every", "0"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=cli_env(cache_dir), capture_output=True, text=True)
    whole = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"fnbackprop train failed ({p.returncode}): {p.stderr.strip()}")
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    return {"train_s": s["train_time_s"], "whole_s": whole, "compile_s": s["compile_time_s"],
            "accuracy": s["test_accuracy"], "command": " ".join(cmd[1:])}


def diagnostics_cost(rounds: int = 40) -> float:
    """The epoch with the per-layer diagnostics over the epoch without, paired median ratio."""
    import jax

    from fnbackprop import data as data_lib
    from fnbackprop.training import prepare as P
    from fnbackprop.training.config import make_config
    from fnbackprop.training.sampling import epoch_batches
    from fnbackprop.training.step import compile_epoch

    config = make_config(None, dict(dataset="mnist1d", hidden=HIDDEN, activation="relu",
                                    init="he_normal", optimizer="adam", lr=LR,
                                    schedule="constant", batch_size=BATCH, augment=False))
    prep = P.prepare(config, data_lib.load_dataset("mnist1d"), jax.devices()[:1])
    arrays, state = P.device_data(prep), P.initial_state(prep)
    b = epoch_batches(prep.batching, 0, 0)
    args = (state, b.idx, b.mask, arrays.x, arrays.y)
    on = compile_epoch(prep.spec, args)
    off = compile_epoch(prep.spec._replace(diagnostics=False), args)
    times = {"on": [], "off": []}
    for r in range(rounds):
        for name, exe in (("on", on), ("off", off)) if r % 2 else (("off", off), ("on", on)):
            t0 = time.perf_counter()
            for _ in range(5):
                jax.block_until_ready(exe(*args))
            times[name].append(time.perf_counter() - t0)
    return statistics.median(a / b for a, b in zip(times["on"], times["off"]))


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
    p = subprocess.run(cmd, env=cli_env(""), capture_output=True, text=True)
    whole = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"the PyTorch run failed: {p.stderr.strip()[-500:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["whole_s"] = whole
    return r


def accuracy(runs: list[dict]) -> str:
    """Mean test accuracy over the runs (seeds) and their standard error."""
    a = [r["accuracy"] for r in runs]
    se = statistics.stdev(a) / len(a) ** 0.5 if len(a) > 1 else float("nan")
    return f"{statistics.mean(a):.4f}±{se:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="runs of each side (median reported)")
    ap.add_argument("--steps", type=int, default=6000, help="training steps (multiple of 40)")
    ap.add_argument("--seed", type=int, default=0, help="first seed (run i of each side uses seed + i)")
    ap.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_worker:
        torch_worker(args.steps, args.seed)
        return

    print(f"MNIST-1D MLP recipe: 40-{'-'.join(map(str, HIDDEN))}-10 ReLU, Adam {LR:g}, batch {BATCH},"
          f" {args.steps} steps; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPU cores, Python {platform.python_version()}, load average "
          f"{os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as work:
        cache = os.path.join(work, "jax-cache")
        cold = ours(args.steps, cache, work, "cold", seed=args.seed)
        warm, bare = [], []
        for i in range(max(args.repeats, 1)):  # interleaved: default and no checkpoints
            seed = args.seed + i
            warm.append(ours(args.steps, cache, work, f"warm{i}", seed=seed))
            bare.append(ours(args.steps, cache, work, f"bare{i}", checkpoints=False, seed=seed))
        print(f"ours: {cold['command']}")
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    ours_train, ours_whole = med(warm, "train_s"), med(warm, "whole_s")
    ckpt = (ours_whole - med(bare, "whole_s")) / ours_whole
    diag = diagnostics_cost()
    torch_runs = [pytorch(args.steps, args.seed + i) for i in range(max(args.repeats, 1))]
    print()
    print(f"{'':38} {'fnbackprop':>12} {'PyTorch':>12} {'ratio':>8}  goal")
    rows = [("training time (s)", ours_train, "train_s", "≤ 0.2x"),
            ("whole command, warm cache (s)", ours_whole, "whole_s", "≤ 0.6x"),
            ("whole command, cold cache (s)", cold["whole_s"], "whole_s", "")]
    for label, v, key, goal in rows:
        if torch_runs[0] is None:
            print(f"{label:38} {v:12.2f}")
        else:
            t = med(torch_runs, key)
            print(f"{label:38} {v:12.2f} {t:12.2f} {v / t:7.3f}x  {goal}")
    print(f"{'compile, cold / warm cache (s)':38} {cold['compile_s']:6.2f}/{med(warm, 'compile_s'):5.2f}")
    print(f"{'test accuracy, mean over the seeds':38} {accuracy(warm):>12} "
          f"{accuracy(torch_runs) if torch_runs[0] is not None else '':>12} {'':8}  within 0.02")
    print(f"{'  per seed (ours; PyTorch)':38} "
          + ", ".join(f"{r['accuracy']:.4f}" for r in warm) + "; "
          + (", ".join(f"{r['accuracy']:.4f}" for r in torch_runs) if torch_runs[0] else ""))
    print(f"{'checkpoint overhead of the command':38} {100 * ckpt:11.1f}% "
          f"({ours_whole:.2f} s default vs {med(bare, 'whole_s'):.2f} s without)  ≤ 5 %")
    print(f"{'diagnostics (grad and δ norms) per step':38} {100 * (diag - 1):11.1f}%  ≤ 5 %")
    if torch_runs[0] is None:
        print("PyTorch is not installed (pip install torch): only our numbers are shown.")
    else:
        print(f"(times: medians of {len(warm)} runs each, seeds {args.seed}…{args.seed + len(warm) - 1}"
              f" on both sides; PyTorch {torch_runs[0]['torch']} with "
              f"{torch_runs[0]['threads']} threads; our cold run compiles with an empty JAX "
              f"cache; load average at the end {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
