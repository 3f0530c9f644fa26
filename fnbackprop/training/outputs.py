"""What a run writes: the per-epoch metrics, the summary, hashes, plots; every file atomically.

``metrics.jsonl`` has one line per epoch (:func:`epoch_entry`), ``summary.json`` the result
(:func:`summary`). Non-finite numbers are written as ``null`` (JSON has no NaN): one rule,
:func:`json_ready`, for every file the project writes.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
from typing import Any

import jax
import numpy as np

__all__ = [
    "params_sha256",
    "json_ready",
    "write_atomic",
    "write_json",
    "write_history",
    "epoch_entry",
    "summary",
]


def params_sha256(params) -> str:
    """SHA-256 of the parameters' bytes, leaf by leaf in tree order (``jax.tree_util``)."""
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(params):
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()


def json_ready(v: Any) -> Any:
    """``v`` with NumPy/JAX scalars and arrays as Python numbers and lists, non-finite floats as
    ``None``, tuples as lists."""
    if isinstance(v, dict):
        return {k: json_ready(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_ready(x) for x in v]
    if isinstance(v, (np.ndarray, jax.Array)):
        return json_ready(np.asarray(v).tolist())
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer, int)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return f if math.isfinite(f) else None
    return v


def write_atomic(path: str, text: str) -> None:
    """Writes ``text`` to a temporary file beside ``path``, then renames it over ``path``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
    """``obj`` (see :func:`json_ready`) as indented JSON, atomically."""
    write_atomic(path, json.dumps(json_ready(obj), indent=2) + "\n")


def write_history(out: str, history) -> None:
    """``metrics.jsonl``: one JSON line per epoch."""
    write_atomic(os.path.join(out, "metrics.jsonl"),
                 "".join(json.dumps(json_ready(h)) + "\n" for h in history))


def epoch_entry(epoch: int, evals: dict, stats, lr: float, seconds: float,
                diagnostics: bool = True) -> dict:
    """One line of ``metrics.jsonl``.

    Args:
      epoch: 1-based epoch number.
      evals: ``{"train_loss": ..., "test_accuracy": ..., ...}`` at the end of the epoch.
      stats: the epoch's :class:`fnbackprop.training.step.EpochStats` (on the host).
      lr: the schedule's value at the epoch's first step.
      seconds: the epoch's wall time (training steps only).
      diagnostics: include what the steps measured on the training data (the batch loss, the
        gradient and δ norms).
    """
    ok, n = int(stats.ok_steps), int(stats.examples)
    entry = {"epoch": epoch, **evals}
    if diagnostics:
        entry["train_batch_loss"] = float(stats.loss_sum) / n if n else math.nan
        entry["grad_norm"] = [float(v) / ok if ok else math.nan for v in stats.grad_norm]
        entry["delta_norm"] = [float(v) / n if n else math.nan for v in stats.delta_sum]
    return json_ready({**entry, "skipped_steps": int(stats.skipped),
                       "steps": ok + int(stats.skipped), "lr": float(lr),
                       "epoch_time_s": seconds})


def summary(*, config: dict, task: str, final: dict, history, fields: dict) -> dict:
    """``summary.json``: the final evaluation, the run's facts (``fields``) and its config.

    Args:
      config: the configuration as JSON (:meth:`fnbackprop.TrainConfig.to_dict`).
      task: ``"classification"`` or ``"regression"``.
      final: ``{"test": (loss, metric), "train": ..., "val": ...}`` of the returned parameters
        (``train`` and ``val`` when they were evaluated).
      history: the per-epoch entries.
      fields: everything else to record (times, sizes, devices, ...).
    """
    metric = "accuracy" if task == "classification" else "r2"
    out = {"dataset": config["dataset"], "task": task,
           f"test_{metric}": final["test"][1], "test_loss": final["test"][0]}
    if "train" in final:
        out["final_train_loss"], out[f"final_train_{metric}"] = final["train"]
    if "val" in final:
        out["val_loss"], out[f"val_{metric}"] = final["val"]
    out.update({
        "epochs_run": len(history),
        "skipped_steps": sum(h["skipped_steps"] for h in history),
        **fields,
        "jax_version": jax.__version__,
        "finished_at": datetime.datetime.now().isoformat(timespec="seconds"),
        "config": config,
    })
    return json_ready(out)
