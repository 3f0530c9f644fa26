"""The run folder knows what it is: a run's outputs, and the run they belong to.

A fresh run writes ``run.json`` first: its configuration and the fingerprint of its data (a hash
of the arrays it trains and tests on, :func:`fnbackprop.data.fingerprint`). Reusing the folder
(``resume``) compares both with the current run before anything is written, whether or not the
folder holds checkpoints: a changed flag or a changed data file is refused with one line naming
what differs, and the folder is left as it was.
"""

from __future__ import annotations

import json
import os
import tempfile

from fnbackprop import data as data_lib
from fnbackprop.training.checkpoint import CheckpointError
from fnbackprop.training.config import SAVING_FIELDS
from fnbackprop.training.outputs import write_json

__all__ = ["MANIFEST", "identity", "check_out", "check_same_run", "check_reuse", "claim"]

MANIFEST = "run.json"
"""The file in which a run folder records its run."""


def identity(config, ds) -> dict:
    """What makes a run the same run: its configuration (JSON, without the fields that only say
    how it is saved, :data:`~fnbackprop.training.config.SAVING_FIELDS`) and its data's
    fingerprint."""
    settings = {k: v for k, v in config.to_dict().items() if k not in SAVING_FIELDS}
    return {"config": settings, "data": data_lib.fingerprint(ds)}


def check_out(out, resume: bool) -> None:
    """Raises ``ValueError`` unless ``out`` can hold this run's outputs.

    ``out`` must be a folder or not exist yet, with a writable existing ancestor, and it must
    be empty unless ``resume``.
    """
    if out is None:
        if resume:
            raise ValueError("resume=True needs out= (the folder holding the checkpoints)")
        return
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"output folder {out!r} exists and is not a folder")
    parent = out
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"output folder {out!r} cannot be created: {parent!r} is a file")
    try:  # a real write (permissions, read-only file systems), leaving nothing behind
        os.rmdir(tempfile.mkdtemp(prefix=".fnbackprop-probe-", dir=parent))
    except OSError as e:
        raise ValueError(f"output folder {out!r} cannot be written: {parent!r} is not writable "
                         f"({e.strerror})") from None
    if not resume and os.path.isdir(out) and os.listdir(out):
        raise ValueError(
            f"output folder {out!r} is not empty; pass resume=True (--resume) to continue the run "
            "in it, or choose a new folder"
        )


def check_same_run(saved: dict, current: dict, where: str) -> None:
    """Raises :class:`~fnbackprop.training.checkpoint.CheckpointError` naming every setting (and
    the data) that differs between the run recorded in ``where`` and the current one."""
    old, new = saved.get("config") or {}, current["config"]
    diff = [f"{k}: {old.get(k)!r} → {v!r}" for k, v in new.items() if old.get(k) != v]
    if saved.get("data") != current["data"]:
        diff.append(f"data: fingerprint {str(saved.get('data'))[:12]}… → {current['data'][:12]}… "
                    "(the data file changed)")
    if diff:
        raise CheckpointError(
            f"cannot resume in {where}: it holds a run with other settings ({'; '.join(diff)}); "
            "use the same settings and data, or another folder (nothing was changed)")


def check_reuse(out: str, ident: dict) -> None:
    """Checks that the run recorded in ``out`` is the current one (``ident``); an empty or
    missing folder is fine (the run starts there).

    Raises:
      CheckpointError: ``out`` holds another run, or files but no readable ``run.json``.
    """
    path = os.path.join(out, MANIFEST)
    if not os.path.isdir(out) or not os.listdir(out):
        return
    try:
        with open(path) as f:
            saved = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"cannot resume in {out}: it is not empty and has no {MANIFEST}, "
                              "so it is not a fnbackprop run folder") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot resume in {out}: its {MANIFEST} cannot be read "
                              f"({' '.join(str(e).split())})") from None
    check_same_run(saved, ident, out)


def claim(out: str, ident: dict) -> None:
    """Creates ``out`` if needed and records the run in it (``run.json``), unless it is there."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, MANIFEST)
    if not os.path.exists(path):
        write_json(path, {"format": 1, **ident})
