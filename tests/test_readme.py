"""The README's storage example runs as written, so the documented API stays true."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_storage_example_runs() -> None:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Storage API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "the storage section has no python example"
    exec(compile(match.group(1), "README.md", "exec"), {})
