"""The runbooks and the README cannot drift from the tool: every `migrator ...` command line they show is parsed by
the command line itself (click's own parsing of the exact options and values, without running anything).

A line is taken from a fenced code block (a line that runs `migrator`, its comment cut off) or from an inline code
span in the prose. A synopsis (`[--json]`, `--pause | --resume`, `--buckets auto|ranges|hashes`, `--tables S.T ...`)
is checked option by option, each value alternative on its own; a placeholder (an upper-case word such as N, FILE or
MB/S, or `<table>`) stands for a value of the option's type.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from migrator.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "runbooks").glob("*.md"))]
_RUNS = re.compile(r"(?:^|[\s/])migrator\s+(\S.*)$")
_PLACEHOLDER = re.compile(r"^(?:[A-Z][A-Z0-9./_-]*|<[^>]+>)$")


def command_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, the arguments after `migrator`) of every command line the document shows."""
    found: list[tuple[int, str]] = []
    prose: list[str] = []
    in_block = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
            prose.append("")
            continue
        if not in_block:
            prose.append(line)
            continue
        prose.append("")
        code = re.split(r"\s#", line, maxsplit=1)[0].strip()
        m = _RUNS.search(code)
        if m:
            found.append((number, m.group(1)))
    text = "\n".join(prose)
    for m in re.finditer(r"`([^`]+)`", text):
        span = " ".join(m.group(1).split())
        run = _RUNS.search(span)
        if run:
            found.append((text.count("\n", 0, m.start()) + 1, run.group(1)))
    return found


def _option(command: click.Command, token: str) -> click.Parameter:
    for param in command.params:
        if token in (*param.opts, *param.secondary_opts):
            return param
    raise AssertionError(f"`{command.name}` has no option {token}")


def _takes_value(param: click.Parameter) -> bool:
    return isinstance(param, click.Option) and not param.is_flag and not param.count


def _sample(param: click.Parameter) -> str:
    """A value of the option's type, for a placeholder."""
    kind = param.type
    if isinstance(kind, click.Choice):
        return str(kind.choices[0])
    if isinstance(kind, click.types.IntParamType):
        return "2"
    if isinstance(kind, click.types.FloatParamType):
        return "1.5"
    return "x"


def _values(param: click.Parameter, token: str) -> list[str]:
    if _PLACEHOLDER.match(token):
        return [_sample(param)]
    return token.split("|") if "|" in token else [token]


def _parse(path: list[str], rest: list[str]) -> None:
    """Parse `migrator <path> <rest>` as click does before running it (types, choices, unknown options, extra
    arguments); raises click's own error."""
    context = None
    command: click.Command = main
    tokens = list(path)
    while isinstance(command, click.Group):
        options = []
        while tokens and tokens[0].startswith("-"):
            options.append(tokens.pop(0))
            if _takes_value(_option(command, options[-1])):
                options.append(tokens.pop(0))
        name = tokens.pop(0)
        context = command.make_context(command.name or "migrator", [*options, name], parent=context)
        sub = command.commands.get(name)
        assert sub is not None, f"no command {name}"
        command = sub
    command.make_context(command.name or "", rest, parent=context)


def _resolve(tokens: list[str]) -> tuple[list[str], click.Command, list[str]]:
    """(the group options and command names, with placeholders filled in; the command; the rest)."""
    command: click.Command = main
    path: list[str] = []
    i = 0
    while isinstance(command, click.Group):
        while tokens[i].startswith("-"):
            param = _option(command, tokens[i])
            path.append(tokens[i])
            if _takes_value(param):
                path.append(_values(param, tokens[i + 1])[0])
                i += 1
            i += 1
        sub = command.commands.get(tokens[i])
        assert sub is not None, f"no command {tokens[i]!r}"
        path.append(tokens[i])
        command = sub
        i += 1
    return path, command, tokens[i:]


def check(args: str) -> None:
    synopsis = any(mark in args for mark in ("[", "]", " | ", "...")) or re.search(r"\S\|\S", args)
    tokens = [t for t in shlex.split(args.replace("[", " ").replace("]", " ")) if t not in ("|", "...")]
    path, command, rest = _resolve(tokens)
    if not synopsis:
        filled, i = [], 0
        while i < len(rest):
            filled.append(rest[i])
            if rest[i].startswith("-") and _takes_value(_option(command, rest[i])):
                filled.append(_values(_option(command, rest[i]), rest[i + 1])[0])
                i += 1
            i += 1
        _parse(path, filled)
        return
    for i, token in enumerate(rest):
        if not token.startswith("-"):
            continue
        param = _option(command, token)
        for value in _values(param, rest[i + 1]) if _takes_value(param) else [None]:
            _parse(path, [token] if value is None else [token, value])


CASES = [(path, number, args) for path in DOCUMENTS for number, args in command_lines(path)]


def test_the_documents_show_command_lines() -> None:
    """The extraction is not vacuous: it finds the runbooks' and the README's commands, code blocks and prose."""
    by_document = {path.name: [args for p, _, args in CASES if p == path] for path in DOCUMENTS}
    assert len(CASES) > 80
    assert "00-rehearsal.md" in by_document and len(by_document["00-rehearsal.md"]) >= 5
    assert "sync --until-caught-up" in by_document["01-delta-migration.md"]
    assert any(a.startswith("--config rehearsal.toml rehearse") for a in by_document["README.md"])


@pytest.mark.parametrize(("path", "number", "args"), CASES,
                         ids=[f"{p.name}:{n}" for p, n, _ in CASES])
def test_every_command_line_of_the_runbooks_and_the_readme_is_accepted_by_the_cli(
        path: Path, number: int, args: str) -> None:
    try:
        check(args)
    except click.ClickException as exc:
        pytest.fail(f"{path.name}:{number}: `migrator {args}`: {exc.format_message()}")


@pytest.mark.parametrize("args", ["copy --workers four", "cutover --override lagg", "sync --folow",
                                  "verify --buckets auto|range", "rehearse --workload pacs extra",
                                  "objects sink"])
def test_a_wrong_command_line_is_refused(args: str) -> None:
    with pytest.raises((click.ClickException, AssertionError)):
        check(args)
