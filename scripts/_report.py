"""What every benchmark script writes when asked: its result as JSON and its Markdown table."""

from __future__ import annotations

import json
from collections.abc import Callable

__all__ = ["write_outputs"]


def write_outputs(json_path: str | None, markdown_path: str | None, result: dict,
                  markdown: Callable[[dict], str]) -> None:
    """``result`` to ``json_path`` and ``markdown(result)`` to ``markdown_path`` (each if given)."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(markdown(result))
