"""Every command shown in README.md and docs/*.md parses, and the cheap ones run (issue 25).

Each `pixelrepa ...` line of a fenced bash block (also `torchrun ... -m pixelrepa.cli.main ...`,
`python -m pixelrepa ...`, with `\\` continuations joined and `# comments` dropped) goes through
the CLI's own argparse parser (`pixelrepa.cli.main.build_parser`) without running the command;
argparse exits with SystemExit on any error, which fails the test naming the file and line.
The commands that cost nothing to run for real are run: `pixelrepa info --list`, `pixelrepa info
--preset X` and `pixelrepa train ... --dry-run` (in a temporary folder, where a `--config FILE`
the page does not ship is written as an empty set of changes). docs/results/ is not read: its
pages record the commands that produced measured results.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from pixelrepa.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*```")
SHELLS = {"bash", "sh", "shell", "console"}
MODULES = {"pixelrepa", "pixelrepa.cli.main"}
LAUNCHERS = {"srun", "env", "time", "nohup", "exec"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def shell_blocks(text: str):
    """(first line number, lines) of each fenced bash block; other blocks are skipped whole."""
    inside_other = False
    inside, start, lines = False, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            if inside:
                yield start, lines
                inside = False
            elif inside_other:
                inside_other = False
            else:
                language = line.strip()[3:].strip().split(" ")[0].lower()
                if language in SHELLS:
                    inside, start, lines = True, number + 1, []
                else:
                    inside_other = True
            continue
        if inside:
            lines.append(line)
    assert not inside and not inside_other, f"unclosed ``` block in a page (from line {start})"


def logical_lines(start: int, lines: list[str]):
    """(line number, text) with backslash continuations joined."""
    pending, first = "", start
    for offset, line in enumerate(lines):
        if not pending:
            first = start + offset
        stripped = line.rstrip()
        if stripped.endswith("\\") and not stripped.lstrip().startswith("#"):
            pending += stripped[:-1] + " "
            continue
        yield first, pending + line
        pending = ""
    if pending:
        yield first, pending


def commands_of(line: str) -> list[list[str]]:
    """The pixelrepa argument lists in one shell line (split at ; && || |, comments dropped)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    tokens = list(lexer)
    found, command = [], []
    for token in tokens + [";"]:
        if token and set(token) <= set(";&|()<>"):
            argv = pixelrepa_argv(command)
            if argv is not None:
                found.append(argv)
            command = []
        else:
            command.append(token)
    return found


def pixelrepa_argv(tokens: list[str]) -> list[str] | None:
    """The arguments after `pixelrepa` / `-m pixelrepa.cli.main`, or None for another command."""
    for i, token in enumerate(tokens[:-1]):
        if token == "-m" and tokens[i + 1] in MODULES:
            return tokens[i + 2:]
    rest = list(tokens)
    while rest and ASSIGNMENT.match(rest[0]):  # VAR=value pixelrepa ...
        rest = rest[1:]
    if rest and rest[0] in LAUNCHERS and "pixelrepa" in rest:  # srun [options] pixelrepa ...
        rest = rest[rest.index("pixelrepa"):]
    if rest and rest[0] == "pixelrepa":
        return rest[1:]
    return None


def documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for page in PAGES:
        name = page.relative_to(ROOT).as_posix()
        for start, lines in shell_blocks(page.read_text()):
            for number, line in logical_lines(start, lines):
                for argv in commands_of(line):
                    found.append((f"{name}:{number}", argv))
    return found


COMMANDS = documented_commands()


def test_pages_show_commands():
    pages = {where.split(":")[0] for where, _ in COMMANDS}
    assert "README.md" in pages
    assert len(COMMANDS) >= 30, COMMANDS


def test_extraction_handles_torchrun_continuations_and_comments():
    text = ("```bash\n"
            "torchrun --nproc_per_node 8 -m pixelrepa.cli.main train --preset PixelREPA-B/16 \\\n"
            "    --out runs/b16   # a comment\n"
            "pixelrepa info --list  # every preset\n"
            "echo x && pixelrepa info --preset JiT-B/16\n"
            "srun --ntasks-per-node 8 pixelrepa train --dry-run\n"
            "```\n```python\npixelrepa info --nope\n```\n")
    found = [argv for start, lines in shell_blocks(text) for _, line in logical_lines(start, lines)
             for argv in commands_of(line)]
    assert found == [["train", "--preset", "PixelREPA-B/16", "--out", "runs/b16"], ["info", "--list"],
                     ["info", "--preset", "JiT-B/16"], ["train", "--dry-run"]]


def cheap(argv: list[str]) -> bool:
    if argv[:1] == ["info"]:
        return "--list" in argv or "--preset" in argv
    return argv[:1] == ["train"] and "--dry-run" in argv


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_documented_command_parses(where, argv):
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `pixelrepa {shlex.join(argv)}` does not parse:\n{stderr.getvalue()}")


@pytest.mark.parametrize("where,argv", [c for c in COMMANDS if cheap(c[1])],
                         ids=[where for where, argv in COMMANDS if cheap(argv)])
def test_cheap_documented_command_runs(where, argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "--config" in argv:
        config = Path(argv[argv.index("--config") + 1])
        if not config.exists():
            config.parent.mkdir(parents=True, exist_ok=True)
            config.write_text("" if config.suffix == ".toml" else "{}")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    assert code == 0, f"{where}: `pixelrepa {shlex.join(argv)}` exited {code}:\n{err.getvalue()}"
    assert out.getvalue().strip(), f"{where}: `pixelrepa {shlex.join(argv)}` printed nothing"
