"""Code shown in the markdown files the stages and report.py write (examples, reports)."""

from __future__ import annotations

import re


def code_block(code: str, language: str = "python") -> list[str]:
    """The lines of a fenced block that holds `code` as it is: the fence is one backtick longer than the longest
    run of backticks inside (CommonMark), so that a text with fences of its own (a textbook, a model's completion
    that goes on in markdown) neither ends the block early nor turns the rest of the file into code."""
    longest = max((len(run) for run in re.findall(r"`+", code)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + language, code, fence]
