"""What the benchmark scripts share: writing a result as JSON and its Markdown table, and the
environment of a ``fnbackprop`` command they time as a subprocess."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

__all__ = ["cli_env", "write_outputs"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_outputs(json_path: str | None, markdown_path: str | None, result: dict,
                  markdown: Callable[[dict], str]) -> None:
    """``result`` to ``json_path`` and ``markdown(result)`` to ``markdown_path`` (each if given)."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(markdown(result))


def cli_env(cache_dir: str) -> dict:
    """This process's environment for a ``python -m fnbackprop`` subprocess: this checkout first
    on the path, the JAX compilation cache in ``cache_dir`` (a fresh folder: a cold start), and
    the cache switch left at its default."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    env.pop("FNBACKPROP_COMPILE_CACHE", None)
    return env
