"""Every command's help reads as paragraphs at any terminal width, lists only options the command reads, and says
what predict's unknown_score is as the artifact records it."""

from __future__ import annotations

import inspect
import re

import pytest
import typer.main
from typer.testing import CliRunner

from finegrain.cli import app


def _leaf_commands(command, path=()):
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from _leaf_commands(sub, (*path, name))
    else:
        yield path, command


COMMANDS = dict(_leaf_commands(typer.main.get_command(app)))


def _description(output: str) -> list[str]:
    """The rendered lines between the usage block and the first panel (arguments, options)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("Usage:"))
    while lines[start].strip():  # the usage block may wrap over several lines
        start += 1
    end = next(i for i, line in enumerate(lines) if line.lstrip().startswith("╭"))
    return [line.rstrip() for line in lines[start:end]]


def _line_starts(doc: str) -> list[str]:
    """Where the docstring means a line to begin: each paragraph's first line and each indented (example) line."""
    starts = []
    for paragraph in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = paragraph.splitlines()
        starts += [lines[0].strip()] + [line.strip() for line in lines[1:] if re.match(r"\s+\S", line)]
    return [s for s in starts if s]


@pytest.mark.parametrize("columns", [60, 200])
@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_help_reads_as_paragraphs_at_any_width(path, columns):
    """A rendered description line either begins a paragraph (or an example line) of the docstring, or continues
    the line above because its first word did not fit there: no line is cut short inside a sentence."""
    r = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": str(columns)})
    assert r.exit_code == 0, r.output
    assert max(len(line) for line in r.output.splitlines()) <= columns
    doc = COMMANDS[path].callback.__doc__
    starts = _line_starts(doc)
    lines = _description(r.output)
    for above, line in zip(lines, lines[1:]):
        text = line.strip()
        if not text or not above.strip() or any(s.startswith(text[:40]) for s in starts):
            continue
        first_word = text.split()[0]
        gap = re.search(re.escape(above.split()[-1]) + r"([ \t]*)" + re.escape(first_word), doc)  # spaces written
        assert len(above) + max(1, len(gap.group(1)) if gap else 1) + len(first_word) > columns - 1, (
            f"{' '.join(path)} --help at {columns} columns breaks a line early:\n{above}\n{line}")
