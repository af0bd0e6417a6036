"""The README's command lines as a shell reads them, for the tests and benchmarks that run them as printed."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def command_lines(readme: Path = README) -> list[str]:
    """Every line of ``readme``, a line that ends in a backslash joined with the next (one space between)."""
    lines: list[str] = []
    pending = ""
    for line in readme.read_text().splitlines():
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        lines.append(pending + line.strip() if pending else line)
        pending = ""
    return lines


def readme_command(start: str, readme: Path = README) -> str:
    """The first command line of ``readme`` that starts with ``start`` (continued lines joined), without its trailing
    comment."""
    for line in command_lines(readme):
        if line.startswith(start):
            return line.split("  #")[0].strip()
    raise ValueError(f"{readme.name} has no command starting with {start!r}")
