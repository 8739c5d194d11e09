"""The README's API example runs as written."""

import re
from pathlib import Path


def test_readme_example_runs():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"```python\n(import torch, torch\.nn as nn.*?)```", text, re.S).group(1)
    assert len(block.strip().splitlines()) <= 14
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - the documented example itself
    assert scope["memory"].step_count == 20
    assert (scope["memory"].state()["values"] >= 0).sum() > 0
