"""Shared harness of the experiment scripts.

Every experiment is a module ``experiments/NAME.py`` with

* ``NAME`` and ``TITLE``;
* ``CONFIGS``: ``{"smoke": {...}, "quick": {...}, "full": {...}}`` (smoke: the tiny size the
  test suite runs; quick: the size ``run_all.py --quick`` runs on a 2-core CPU; full: the size
  for a GPU machine);
* ``run(cfg, out) -> Report``: does the work, saves its figures into ``out`` and returns the
  tables, claims and raw numbers;
* ``main(argv=None)``: ``return _common.main(sys.modules[__name__], argv)``.

:func:`main` parses ``[--quick | --smoke] [--out DIR] [--seed S]``, runs the experiment and writes
``table.md`` (setup, machine, tables, claims, figures), ``results.json`` (the raw numbers, the
config and the machine) and the PNG figures into the output folder (default
``experiments/results/NAME``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import jax  # noqa: E402
import numpy as np  # noqa: E402

EXPERIMENTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = EXPERIMENTS_DIR.parent
RESULTS_DIR = EXPERIMENTS_DIR / "results"

if str(REPO_ROOT) not in sys.path:  # run as `python experiments/NAME.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))

import fnbackprop as fb  # noqa: E402

MODES = ("smoke", "quick", "full")


# --- results --------------------------------------------------------------------------------
@dataclasses.dataclass
class Table:
    """A markdown table: a caption, column headers and rows of cells (numbers or text)."""

    caption: str
    headers: list[str]
    rows: list[list[Any]]

    def markdown(self) -> str:
        lines = [f"**{self.caption}**", "", "| " + " | ".join(md_cell(h) for h in self.headers) + " |",
                 "|" + "|".join("---" for _ in self.headers) + "|"]
        for row in self.rows:
            lines.append("| " + " | ".join(md_cell(fmt(c)) for c in row) + " |")
        return "\n".join(lines)


@dataclasses.dataclass
class Claim:
    """A claim of the chapter and whether the measurements support it.

    ``verdict`` is computed from the measured numbers by the experiment (never hard-coded):
    "supported", "not supported" or "partly supported".
    """

    claim: str
    verdict: str
    evidence: str


@dataclasses.dataclass
class Report:
    """What an experiment returns: its setup text, tables, figures, claims and raw numbers."""

    setup: str
    tables: list[Table] = dataclasses.field(default_factory=list)
    figures: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (file, caption)
    claims: list[Claim] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    raw: dict = dataclasses.field(default_factory=dict)


def md_cell(text: str) -> str:
    """Escapes the characters that would break a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def fmt(v: Any) -> str:
    """Formats a table cell: floats with 3–4 significant digits, NaN/inf spelled out."""
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 1e5 or a < 1e-3:
            return f"{v:.2e}"
        if a >= 100:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        return f"{v:.3g}" if a < 1 else f"{v:.3f}".rstrip("0").rstrip(".")
    return str(v)


def pm(mean: float, std: float, digits: int = 3) -> str:
    """``mean ± std`` as text."""
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def to_jsonable(v: Any) -> Any:
    """Converts arrays and numpy scalars to lists/floats; NaN/±inf become "NaN"/"Infinity"."""
    if isinstance(v, dict):
        return {str(k): to_jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [to_jsonable(x) for x in v]
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return to_jsonable(dataclasses.asdict(v))
    if isinstance(v, (jax.Array, np.ndarray)):
        return to_jsonable(np.asarray(v).tolist())
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "Infinity" if v > 0 else "-Infinity"
        return v
    if v is None or isinstance(v, str):
        return v
    return str(v)


# --- machine --------------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """CPU, core count, accelerator (from ``jax.devices()``), and library versions."""
    devices = jax.devices()
    import jaxlib

    info = {
        "cpu": _cpu_name(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "backend": jax.default_backend(),
        "devices": [f"{d.platform}:{getattr(d, 'device_kind', '?')}" for d in devices],
        "jax": jax.__version__,
        "jaxlib": getattr(jaxlib, "__version__", "?"),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "fnbackprop": getattr(fb, "__version__", "?"),
    }
    try:
        import optax

        info["optax"] = optax.__version__
    except ImportError:
        pass
    return info


def machine_line(info: dict) -> str:
    """One line naming the machine, e.g. ``2-core CPU (…), no GPU; jax 0.10.2``."""
    if info["backend"] == "cpu":
        acc = "no GPU"
    else:
        kinds = sorted({d.split(":", 1)[1] for d in info["devices"]})
        acc = f"{len(info['devices'])}× {', '.join(kinds)}"
    return (f"{info['cpu_cores']}-core CPU ({info['cpu']}), {acc}; jax {info['jax']}, "
            f"jaxlib {info['jaxlib']}, Python {info['python']}")


# --- data -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Split:
    """Standardised arrays (statistics of the training part only)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    source: str


def load_digits() -> Split:
    """The digits data (8×8 images, 10 classes), standardised with training statistics.

    Uses ``fb.load_dataset("digits")`` (its fixed test split) when the library has it, else
    scikit-learn's ``load_digits`` with a fixed 80/20 split (seed 0).
    """
    if hasattr(fb, "load_dataset"):
        ds = fb.load_dataset("digits")
        xtr, ytr, xte, yte = ds.x_train, ds.y_train, ds.x_test, ds.y_test
        source = "fb.load_dataset('digits')"
    else:
        from sklearn.datasets import load_digits as _ld

        d = _ld()
        rng = np.random.default_rng(0)
        perm = rng.permutation(len(d.target))
        n_test = len(perm) // 5
        te, tr = perm[:n_test], perm[n_test:]
        xtr, ytr, xte, yte = d.data[tr], d.target[tr], d.data[te], d.target[te]
        source = "sklearn.datasets.load_digits, 80/20 split (seed 0)"
    xtr = np.asarray(xtr, np.float64)
    xte = np.asarray(xte, np.float64)
    mu = xtr.mean(axis=0)
    sd = xtr.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    return Split(
        ((xtr - mu) / sd).astype(np.float32), np.asarray(ytr, np.int32),
        ((xte - mu) / sd).astype(np.float32), np.asarray(yte, np.int32), 10, source,
    )


def train(data=None, **fields):
    """``fb.train`` with a hand-built ``TrainConfig(**fields)`` and nothing written to disk.

    A hand-built config keeps its own values: only the fields left ``None`` (architecture,
    optimiser, lr, batch size, epochs) take the dataset's defaults, while regularisation (l1, l2,
    dropout, augment, early stopping, clipping) is off unless asked for. (``fb.train(dataset=NAME,
    **overrides)`` without a config would start from ``fb.default_config(NAME)``, which for some
    datasets switches regularisation on, e.g. dropout 0.5 for digits.)
    """
    try:
        from fnbackprop.training import TrainConfig
    except ImportError:  # pragma: no cover - the training module is missing
        raise RuntimeError("this experiment needs fnbackprop.train") from None
    fn = getattr(fb, "train", None)
    if fn is None:
        from fnbackprop.training import train as fn
    if data is not None:
        fields = {**fields, "dataset": data.name}
    config = TrainConfig(**fields)
    return fn(config, data=data)


def hist(history: list[dict], key: str) -> np.ndarray:
    """One metric over the epochs of a ``fb.train`` history; missing/``None`` (non-finite) → NaN."""
    out = []
    for h in history:
        v = h.get(key)
        out.append(np.nan if v is None else v)
    return np.asarray(out, dtype=np.float64)


def require(*names: str) -> None:
    """Raises ``RuntimeError`` naming the missing ``fb.*`` functions (modules not yet present)."""
    missing = [n for n in names if not hasattr(fb, n)]
    if missing:
        raise RuntimeError(
            f"this experiment needs fnbackprop.{', fnbackprop.'.join(missing)}, "
            "which this version of the library does not have"
        )


# --- timing ---------------------------------------------------------------------------------
def block(tree):
    """Waits for every array in ``tree``."""
    return jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, tree)


def time_fn(fn, *args, repeats: int = 5, min_time: float = 0.05) -> float:
    """Median seconds per call of an already-compiled ``fn(*args)`` (after one warm-up call).

    Each of ``repeats`` samples loops until it lasts at least ``min_time`` seconds.
    """
    block(fn(*args))
    samples = []
    for _ in range(repeats):
        n = 0
        t0 = time.perf_counter()
        while True:
            block(fn(*args))
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        samples.append(dt / n)
    return float(np.median(samples))


# --- figures --------------------------------------------------------------------------------
def figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.6):
    """A pyplot figure and axes sized for small PNGs."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    return fig, axes


def save_figure(fig, out: Path, filename: str, dpi: int = 80) -> str:
    """Saves ``fig`` as ``out/filename`` (a small PNG), closes it and returns the filename."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out / filename, dpi=dpi)
    plt.close(fig)
    return filename


# --- driver ---------------------------------------------------------------------------------
def build_parser(name: str, title: str) -> argparse.ArgumentParser:
    from fnbackprop.cli.args import Parser as _Parser

    p = _Parser(prog=f"experiments/{name}.py", description=title)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="the reduced size that run_all.py --quick runs (minutes on a 2-core CPU)")
    size.add_argument("--smoke", action="store_true",
                      help="a tiny size for the test suite (seconds); its numbers mean little")
    p.add_argument("--out", metavar="DIR", default=None,
                   help=f"output folder (default experiments/results/{name})")
    p.add_argument("--seed", type=int, default=0, help="base PRNG seed")
    return p


def write_outputs(module, mode: str, cfg: dict, report: Report, out: Path, wall: float,
                  info: dict) -> None:
    """Writes ``results.json`` and ``table.md`` for a finished run."""
    payload = {
        "experiment": module.NAME,
        "title": module.TITLE,
        "mode": mode,
        "config": cfg,
        "machine": info,
        "wall_time_s": wall,
        "claims": [dataclasses.asdict(c) for c in report.claims],
        "results": report.raw,
    }
    with open(out / "results.json", "w") as f:
        json.dump(to_jsonable(payload), f, indent=1)
    md = [f"# {module.NAME}: {module.TITLE}", "",
          f"Mode `{mode}`; machine: {machine_line(info)}; wall time {wall:.1f} s.", "",
          "## Setup", "", report.setup.strip(), ""]
    if report.claims:
        md += ["## Claims", "", "| claim | verdict | evidence |", "|---|---|---|"]
        md += [f"| {md_cell(c.claim)} | **{c.verdict}** | {md_cell(c.evidence)} |" for c in report.claims]
        md.append("")
    md += ["## Results", ""]
    for t in report.tables:
        md += [t.markdown(), ""]
    for fname, caption in report.figures:
        md += [f"![{caption}]({fname})", "", f"*{caption}*", ""]
    if report.notes:
        md += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    (out / "table.md").write_text("\n".join(md))


def enable_compilation_cache() -> str | None:
    """Turns on JAX's persistent compilation cache (``$FNBACKPROP_JAX_CACHE``; "off" disables).

    Many runs of an experiment compile the same program (e.g. ``fb.train`` with another seed);
    the cache compiles it once. Results are bit-identical with or without it. Default folder:
    ``<tmp>/fnbackprop-jax-cache``; ``run_all.py`` gives every run a fresh, empty one.
    """
    import tempfile

    where = os.environ.get("FNBACKPROP_JAX_CACHE", os.path.join(tempfile.gettempdir(),
                                                                "fnbackprop-jax-cache"))
    if where.lower() == "off":
        return None
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return where


def main(module, argv=None) -> int:
    """Command-line entry of an experiment module (see the module docstring)."""
    args = build_parser(module.NAME, module.TITLE).parse_args(argv)
    enable_compilation_cache()
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    cfg = dict(module.CONFIGS[mode])
    cfg["seed"] = args.seed
    out = Path(args.out) if args.out else RESULTS_DIR / module.NAME
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    print(f"[{module.NAME}] mode={mode} out={out} machine: {machine_line(info)}", flush=True)
    t0 = time.perf_counter()
    report = module.run(cfg, out)
    wall = time.perf_counter() - t0
    write_outputs(module, mode, cfg, report, out, wall, info)
    print(f"[{module.NAME}] done in {wall:.1f} s; wrote {out / 'table.md'}", flush=True)
    for c in report.claims:
        print(f"[{module.NAME}] {c.verdict}: {c.claim} ({c.evidence})", flush=True)
    return 0
