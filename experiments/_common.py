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
into the output folder (default ``experiments/results/NAME``):

* ``results.json``: the experiment, mode, config, machine, :func:`provenance` (git commit and
  dirty flag, library versions, the command line), wall time, setup text, claims, the tables as
  displayed, and the raw numbers under ``"results"``. Non-finite numbers are ``null``
  (:func:`fnbackprop.training.outputs.json_ready`, the project's one rule); a table cell keeps its
  displayed text ("NaN", "inf").
* ``table.md``: rendered from exactly that payload (:func:`render_table_md`), so that the page
  can be checked against the JSON it came from.
* the PNG figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import subprocess
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
PAGE = EXPERIMENTS_DIR / "README.md"

if str(REPO_ROOT) not in sys.path:  # run as `python experiments/NAME.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))

import fnbackprop as fb  # noqa: E402
from fnbackprop.cli.args import Parser  # noqa: E402
from fnbackprop.data import standardize  # noqa: E402
from fnbackprop.training.outputs import json_ready  # noqa: E402

MODES = ("smoke", "quick", "full")
VERDICTS = ("supported", "partly supported", "not supported")
GENERATED_PATHS = ("experiments/results", "experiments/README.md")
"""What this tooling writes inside the checkout: changes there do not make the tree "dirty"
(they are the outputs, not the code that produced them)."""
VERSIONED = ("jax", "jaxlib", "numpy", "optax", "fnbackprop")


# --- results --------------------------------------------------------------------------------
@dataclasses.dataclass
class Table:
    """A markdown table: a caption, column headers and rows of cells (numbers or text).

    ``page``: whether the results page (``experiments/README.md``) shows it; ``table.md`` shows
    every table.
    """

    caption: str
    headers: list[str]
    rows: list[list[Any]]
    page: bool = True

    def displayed(self) -> dict:
        """The table as shown: every cell formatted by :func:`fmt` (the form ``results.json``
        keeps; the raw numbers are under ``"results"``)."""
        return {"caption": self.caption, "headers": [str(h) for h in self.headers],
                "rows": [[fmt(c) for c in row] for row in self.rows], "page": self.page}


@dataclasses.dataclass
class Claim:
    """A claim of the chapter and whether the measurements support it.

    ``verdict`` is computed from the measured numbers by the experiment (never hard-coded): one
    of :data:`VERDICTS`.
    """

    claim: str
    verdict: str
    evidence: str

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


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


def markdown_table(caption: str, headers: list[str], rows: list[list[str]]) -> str:
    """A captioned markdown table of already formatted cells."""
    lines = [f"**{caption}**", "", "| " + " | ".join(md_cell(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


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
    if v is None:
        return ""
    return str(v)


def pm(mean: float, std: float, digits: int = 3) -> str:
    """``mean ± std`` as text."""
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def hist(history: list[dict], key: str) -> np.ndarray:
    """One metric over the epochs of a ``fb.train`` history; missing/``None`` (non-finite) → NaN."""
    return np.asarray([np.nan if h.get(key) is None else h[key] for h in history], np.float64)


# --- provenance -----------------------------------------------------------------------------
def _git(root: Path, *args: str) -> str | None:
    """Output of ``git -C root ARGS``, or ``None`` when git fails or is missing."""
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def git_state(root: Path = REPO_ROOT) -> dict:
    """The checkout's commit and whether it differs from it.

    Returns:
      ``{"commit": full hash, "describe": "<short hash>[-dirty]", "dirty": bool,
      "dirty_paths": [...]}``; changes under :data:`GENERATED_PATHS` do not count. Outside a git
      checkout (or without git) ``commit``, ``describe`` and ``dirty`` are ``None``.
    """
    commit = (_git(root, "rev-parse", "HEAD") or "").strip()
    if not commit:
        return {"commit": None, "describe": None, "dirty": None, "dirty_paths": []}
    status = _git(root, "status", "--porcelain", "--", ".",
                  *(f":(top,exclude){p}" for p in GENERATED_PATHS))
    paths = [] if status is None else [line[3:] for line in status.splitlines() if line.strip()]
    dirty = None if status is None else bool(paths)
    return {"commit": commit, "describe": commit[:12] + ("-dirty" if dirty else ""),
            "dirty": dirty, "dirty_paths": paths[:20]}


def versions() -> dict:
    """Python, the installed jax, jaxlib, numpy and optax, and the imported fnbackprop."""
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        if name == "fnbackprop":  # the code imported (a checkout), not what pip installed
            out[name] = fb.__version__
            continue
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = getattr(sys.modules.get(name), "__version__", None)
    return out


def provenance(command: list[str], root: Path = REPO_ROOT) -> dict:
    """What produced a result: the command line, the git state, the versions and the time.

    Args:
      command: the command line as a list, e.g. ``["python", "experiments/run_all.py",
        "--quick"]`` (run from the checkout's root).
      root: the checkout.
    """
    return {"command": shlex.join(command), "git": git_state(root), "versions": versions(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def script_command(script: Path, argv: list[str]) -> list[str]:
    """``["python", "experiments/NAME.py", *argv]`` (the script relative to the checkout)."""
    try:
        script = script.resolve().relative_to(REPO_ROOT)
    except ValueError:
        pass
    return ["python", str(script), *argv]


def provenance_line(prov: dict) -> str:
    """One markdown sentence: command, commit (clean/dirty), versions."""
    g = prov["git"]
    if g["commit"] is None:
        where = "outside a git checkout (commit unknown)"
    else:
        state = ("with uncommitted changes" + (f" to {', '.join(g['dirty_paths'])}"
                                               if g["dirty_paths"] else "")
                 if g["dirty"] else "clean tree" if g["dirty"] is False else "tree state unknown")
        where = f"at commit `{g['commit'][:12]}` ({state})"
    v = prov["versions"]
    libs = ", ".join(f"{k} {v.get(k)}" for k in VERSIONED)
    return f"Produced by `{prov['command']}` {where}; Python {v['python']}, {libs}."


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
    """CPU, core count, accelerator (from ``jax.devices()``) and OS."""
    return {
        "cpu": _cpu_name(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "backend": jax.default_backend(),
        "devices": [f"{d.platform}:{getattr(d, 'device_kind', '?')}" for d in jax.devices()],
        "platform": platform.platform(),
    }


def machine_line(info: dict) -> str:
    """One line naming the machine, e.g. ``2-core CPU (…), no GPU``."""
    if info["backend"] == "cpu":
        acc = "no GPU"
    else:
        kinds = sorted({d.split(":", 1)[1] for d in info["devices"]})
        acc = f"{len(info['devices'])}× {', '.join(kinds)}"
    return f"{info['cpu_cores']}-core CPU ({info['cpu']}), {acc}"


# --- data -----------------------------------------------------------------------------------
DIGITS_SOURCE = '`fb.load_dataset("digits")`, its fixed test split'


def load_digits() -> fb.Dataset:
    """The digits data (8×8 images, 10 classes), standardised with the training statistics
    (:func:`fnbackprop.data.standardize`, as ``fb.train`` does)."""
    return standardize(fb.load_dataset("digits"))[0]


def train(data=None, **fields) -> fb.TrainResult:
    """``fb.train`` with a hand-built ``TrainConfig(**fields)`` and nothing written to disk.

    A hand-built config keeps its own values: only the fields left ``None`` (architecture,
    optimiser, lr, batch size, epochs) take the dataset's defaults, while regularisation (l1, l2,
    dropout, augment, early stopping, clipping) is off unless asked for. (``fb.train(dataset=NAME,
    **overrides)`` without a config would start from ``fb.default_config(NAME)``, which for some
    datasets switches regularisation on, e.g. dropout 0.5 for digits.)
    """
    if data is not None:
        fields = {**fields, "dataset": data.name}
    return fb.train(fb.TrainConfig(**fields), data=data)


# --- timing ---------------------------------------------------------------------------------
def block(tree):
    """Waits for every array in ``tree``."""
    return jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, tree)


def time_fn(fn, *args, repeats: int = 5, min_time: float = 0.05) -> float:
    """Median seconds per call of ``fn(*args)`` in the steady state.

    One call first (it compiles a ``jax.jit`` function and pays any first-call cost) is not
    timed; then each of ``repeats`` samples loops until it lasts at least ``min_time`` seconds.
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


def steady_epoch_time(epoch_times) -> float:
    """Median seconds of an ``fb.train`` epoch in the steady state: epochs 2.. (NaN with one).

    ``fb.train`` compiles ahead of time (``compile_time_s`` apart), yet its first epoch still
    pays first-call costs (buffers, thread pools) that later epochs do not; the median ignores
    a stray slow epoch on a shared machine.
    """
    et = np.asarray(epoch_times, np.float64)
    return float(np.median(et[1:])) if et.size > 1 else math.nan


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
    fig.savefig(out / filename, dpi=dpi, metadata={"Software": None})
    plt.close(fig)
    return filename


# --- outputs --------------------------------------------------------------------------------
def dumps(payload: dict) -> str:
    """``payload`` as indented JSON under the project's one rule (non-finite → ``null``);
    anything JSON cannot hold raises instead of being written as text."""
    return json.dumps(json_ready(payload), indent=1, allow_nan=False) + "\n"


def results_payload(module, mode: str, cfg: dict, report: Report, wall: float, info: dict,
                    prov: dict) -> dict:
    """Everything ``results.json`` holds for a finished run (see the module docstring)."""
    return {
        "experiment": module.NAME,
        "title": module.TITLE,
        "mode": mode,
        "config": cfg,
        "machine": info,
        "provenance": prov,
        "wall_time_s": wall,
        "setup": report.setup.strip(),
        "claims": [dataclasses.asdict(c) for c in report.claims],
        "tables": [t.displayed() for t in report.tables],
        "figures": [list(f) for f in report.figures],
        "notes": list(report.notes),
        "results": report.raw,
    }


def claims_markdown(claims: list[dict]) -> list[str]:
    """The claims as a markdown table: claim, verdict, evidence."""
    return (["| claim | verdict | evidence |", "|---|---|---|"]
            + [f"| {md_cell(c['claim'])} | **{c['verdict']}** | {md_cell(c['evidence'])} |"
               for c in claims])


def tables_markdown(payload: dict, prefix: str = "", page_only: bool = False) -> list[str]:
    """The tables, figures and notes of a results payload; figure paths get ``prefix``."""
    md = []
    for t in payload["tables"]:
        if t["page"] or not page_only:
            md += [markdown_table(t["caption"], t["headers"], t["rows"]), ""]
    for fname, caption in payload["figures"]:
        md += [f"![{caption}]({prefix}{fname})", "", f"*{caption}*", ""]
    if payload["notes"]:
        md += ["Notes:", ""] + [f"- {n}" for n in payload["notes"]] + [""]
    return md


def render_table_md(payload: dict) -> str:
    """``table.md`` of a results payload (every table)."""
    md = [f"# {payload['experiment']}: {payload['title']}", "",
          f"Mode `{payload['mode']}`; machine: {machine_line(payload['machine'])}; wall time "
          f"{payload['wall_time_s']:.1f} s (compilation included).", "",
          provenance_line(payload["provenance"]), "",
          "## Setup", "", payload["setup"], ""]
    if payload["claims"]:
        md += ["## Claims", ""] + claims_markdown(payload["claims"]) + [""]
    md += ["## Results", ""] + tables_markdown(payload)
    return "\n".join(md).rstrip("\n") + "\n"


def write_outputs(out: Path, payload: dict) -> None:
    """Writes ``results.json`` and ``table.md`` for a finished run."""
    text = dumps(payload)
    (out / "results.json").write_text(text)
    (out / "table.md").write_text(render_table_md(json.loads(text)))


# --- driver ---------------------------------------------------------------------------------
def build_parser(name: str, title: str) -> argparse.ArgumentParser:
    p = Parser(prog=f"experiments/{name}.py", description=title)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="the reduced size that run_all.py --quick runs (minutes on a 2-core CPU)")
    size.add_argument("--smoke", action="store_true",
                      help="a tiny size for the test suite (seconds); its numbers mean little")
    p.add_argument("--out", metavar="DIR", default=None,
                   help=f"output folder (default experiments/results/{name})")
    p.add_argument("--seed", type=int, default=0, help="base PRNG seed")
    return p


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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(module.NAME, module.TITLE).parse_args(argv)
    prov = provenance(script_command(Path(module.__file__), argv))
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
    write_outputs(out, results_payload(module, mode, cfg, report, wall, info, prov))
    print(f"[{module.NAME}] done in {wall:.1f} s; wrote {out / 'table.md'}", flush=True)
    for c in report.claims:
        print(f"[{module.NAME}] {c.verdict}: {c.claim} ({c.evidence})", flush=True)
    return 0
