"""One spelling, the paper's: labeler / labeling / labeled, never labeller / labelling / labelled.

The exceptions are the names other programs read (docs/operations.md, "Names on the wire"): they
keep their published spelling so that no consumer breaks."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Wire names kept as published (docs/operations.md, "Names on the wire"); nothing else may be British.
WIRE_NAMES = re.compile(r"labelled_by|llm_labelled|already_labelled|[\"'`]labelled[\"'`]")
# This file must spell the British forms to look for them.
SELF = "tests/test_spelling.py"


def tracked_text_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [n for n in out.split() if n.endswith((".py", ".md", ".yml", ".yaml", ".toml", ".json"))]


def british_words(text: str) -> list[str]:
    """Words with a British form, once the wire names are blanked out.

    >>> british_words("the labeller labelled it; labeled_by, labelled_by")
    ['labeller', 'labelled']
    """
    return re.findall(r"\w*[Ll]abell(?:ed|ing|er)\w*", WIRE_NAMES.sub("", text))


def test_one_spelling() -> None:
    found = {}
    for name in tracked_text_files():
        if name == SELF:
            continue
        words = british_words((REPO / name).read_text(errors="replace"))
        if words:
            found[name] = sorted(set(words))
    assert not found, f"use labeler / labeling / labeled: {found}"
