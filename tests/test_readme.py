"""Every ``shoal`` command in the README works as written, or is covered by a named test.

The commands come from the README's fenced shell blocks and from its inline
code spans that start with ``shoal``. Each one is sorted by general rules,
so that a command added to the README is checked without touching this file:

- Every command it names exists, takes every option it mentions, and shows
  its ``--help``. A synopsis (``[--yes]``, ``list|show``, ``NAME``) gets
  only this check.
- A command that needs a live coordinator, a served key holder or other
  processes must be listed in :data:`NEEDS_PROCESSES`, with the test file
  that runs it; the file must exist and run it.
- An inline span that only names a command (``made by `shoal certs init```)
  is a mention: the help check is enough.
- Everything else runs as written, in a scratch folder that holds the
  repository's ``examples/`` and a run folder made first: a fenced block's
  commands in order, an inline command alone, each as a person at a
  terminal would (answering yes when asked to confirm). The placeholders
  the README uses for that run folder (``RUN``, ``ID``, ``V``, ``TEXT``)
  are filled in; ``shoal simulate`` gets ``--rounds 1`` and an ``--out``
  folder unless it gives them, the two options the README documents for
  that. A command with any other placeholder is a synopsis.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner, Result

from shoal.cli import app, models
from shoal.registry import ClientRegistry, open_database

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
SHELL_FENCES = {"sh", "bash", "shell", "console", "zsh"}
INLINE = re.compile(r"`(shoal [^`\n]+)`")
PLACEHOLDER = re.compile(r"(?<![\w.])[A-Z][A-Z0-9_]*(?!\w)")  # NAME, HOST:PORT, CONFIG.toml
SYNOPSIS_MARKS = ("[", "]", "|", "...", "(", ")", "…")
FILLED_IN = ("RUN", "ID", "V", "VERSION", "TEXT")  # what a run folder gives values to


@dataclass(frozen=True)
class Covered:
    """A command that cannot run here on its own, and the test file that runs it."""

    why: str
    test_file: str  # a file name, found anywhere under tests/
    evidence: str  # text in that file that shows it runs the command


NEEDS_PROCESSES: dict[tuple[str, ...], Covered] = {
    ("coordinator", "serve"): Covered(
        "serves until network clients finish its job",
        "test_network_processes.py",
        '"coordinator", "serve"',
    ),
    ("client", "run"): Covered(
        "needs a live coordinator", "test_network_processes.py", '"client", "run"'
    ),
    ("keyholder", "serve"): Covered(
        "serves decryptions until stopped", "test_keyholder_service.py", '"keyholder", "serve"'
    ),
    ("demo", "network"): Covered(
        "starts a coordinator and client processes", "test_network.py", '"demo", "network"'
    ),
}
SERVED_KEY_HOLDER = Covered(
    "a simulation that calls a served key holder (`shoal keyholder serve`)",
    "test_secure_simulation.py",
    "secure_aggregation.key_holder=",
)


@dataclass(frozen=True)
class Command:
    """One ``shoal`` command line of the README."""

    words: tuple[str, ...]  # after the program name
    where: str  # "block 3" or "inline"
    background: bool = False

    def __str__(self) -> str:
        return " ".join(["shoal", *self.words])

    @property
    def synopsis(self) -> bool:
        return any(mark in word for word in self.words for mark in SYNOPSIS_MARKS)


def shell_lines(block: str) -> Iterator[list[str]]:
    """The words of each command of a shell block: continuations joined, comments dropped."""
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            yield words


def as_command(words: list[str], where: str) -> Command | None:
    background = words[-1] == "&"
    words = words[:-1] if background else words
    if words[:3] == ["python", "-m", "shoal"]:
        words = ["shoal", *words[3:]]
    if not words or Path(words[0]).name != "shoal":
        return None
    return Command(tuple(words[1:]), where, background)


def readme_commands() -> list[Command]:
    text = README.read_text()
    found: list[Command] = []
    for number, match in enumerate(FENCE.finditer(text), start=1):
        if match.group(1) in SHELL_FENCES:
            for words in shell_lines(match.group(2)):
                command = as_command(words, f"block {number}")
                if command is not None:
                    found.append(command)
    prose = FENCE.sub("", text)
    for span in INLINE.findall(prose):
        command = as_command(shlex.split(span), "inline")
        if command is not None:
            found.append(command)
    return found


COMMANDS = readme_commands()


def named(command: Command) -> list[tuple[tuple[str, ...], list[str]]]:
    """The commands a line names, each with the words that follow it.

    A synopsis may offer alternatives after a group: ``models list|show NAME``
    or ``clients list [--status S] | show ID``.
    """
    node: Any = typer.main.get_command(app)
    path: list[str] = []
    words = list(command.words)
    while words and hasattr(node.commands.get(words[0]), "commands"):  # down the groups
        node = node.commands[words[0]]
        path.append(words.pop(0))
    if not words:
        return [(tuple(path), words)]
    found: list[tuple[tuple[str, ...], list[str]]] = []
    for alternative in " ".join(words).split("|"):
        parts = alternative.split()
        if parts and parts[0] in node.commands:
            found.append(((*path, parts[0]), parts[1:]))
        elif found:
            found[-1][1].extend(parts)  # a "|" between option values: (--silo ID | --simulated N)
        else:
            pytest.fail(f"{command}: {parts[0] if parts else '?'!r} is no command of {path}")
    return found


def click_command(path: tuple[str, ...]) -> Any:
    node: Any = typer.main.get_command(app)
    for name in path:
        node = node.commands[name]
    return node


def options_of(words: list[str]) -> set[str]:
    """The options mentioned among ``words`` (``[--yes]`` and ``--set=x`` included)."""
    found = set()
    for word in words:
        option = word.strip("[]()").split("=", 1)[0]
        if option.startswith("-") and option not in ("-", "--") and not option[1:2].isdigit():
            found.add(option)
    return found


def coverage(command: Command) -> Covered | None:
    """The entry of NEEDS_PROCESSES that covers ``command``, if it needs other processes."""
    for path, _ in named(command):
        if path in NEEDS_PROCESSES:
            return NEEDS_PROCESSES[path]
        if path == ("simulate",) and any("key_holder=" in word for word in command.words):
            return SERVED_KEY_HOLDER
    return None


def shoal(*args: str | Path) -> Result:
    return CliRunner(env={"COLUMNS": "120"}).invoke(app, [str(arg) for arg in args])


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_each_command_and_option_named_exists(command: Command) -> None:
    for path, words in named(command):
        node = click_command(path)
        taken = {option for param in node.params for option in param.opts + param.secondary_opts}
        unknown = options_of(words) - taken - {"--help"}
        assert not unknown, f"{command}: shoal {' '.join(path)} has no {sorted(unknown)}"
        result = shoal(*path, "--help")
        assert result.exit_code == 0, result.output


@pytest.mark.parametrize("command", [command for command in COMMANDS if coverage(command)], ids=str)
def test_commands_that_need_other_processes_are_run_by_a_named_test(command: Command) -> None:
    covered = coverage(command)
    assert covered is not None
    files = sorted((ROOT / "tests").rglob(covered.test_file))
    assert files, f"{command} ({covered.why}): no tests/**/{covered.test_file}"
    assert any(covered.evidence in path.read_text() for path in files), (
        f"{files[0]} does not run {command}: it lacks {covered.evidence!r}"
    )


def placeholders(command: Command) -> set[str]:
    return {found for word in command.words for found in PLACEHOLDER.findall(word)}


def kind(command: Command) -> str:
    """``processes`` (another test runs it), ``synopsis`` or ``mention`` (help only), ``runs``."""
    if coverage(command) is not None:
        return "processes"
    segments = named(command)
    if len(segments) > 1 or hasattr(click_command(segments[0][0]), "commands"):
        return "synopsis"  # alternatives, or a group, which only shows its help
    if command.where == "inline" and not segments[0][1]:
        return "mention"  # prose naming a command: "made by `shoal certs init`"
    if command.synopsis or placeholders(command) - set(FILLED_IN):
        return "synopsis"
    return "runs"


def test_commands_in_the_background_are_run_by_a_named_test() -> None:
    for command in COMMANDS:
        if command.background:
            assert kind(command) == "processes", (
                f"{command} runs in the background: add it to NEEDS_PROCESSES with the test "
                "that runs it"
            )


def scenarios() -> list[tuple[str, list[Command]]]:
    """What runs together: each fenced block's runnable commands in order, each inline one alone."""
    groups: dict[str, list[Command]] = {}
    for command in COMMANDS:
        if kind(command) == "runs" and not command.background:
            key = command.where if command.where != "inline" else f"inline: {command}"
            groups.setdefault(key, []).append(command)
    return list(groups.items())


SCENARIOS = scenarios()


def test_the_readme_has_commands_of_every_kind() -> None:
    kinds = {kind(command) for command in COMMANDS}
    assert kinds == {"processes", "mention", "synopsis", "runs"}
    assert any(command.where == "inline" for command in COMMANDS)
    assert len(SCENARIOS) >= 3


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder the README's RUN stands for: the embedded default, two rounds."""
    folder = tmp_path_factory.mktemp("readme") / "run"
    result = shoal("simulate", "-q", "--rounds", "2", "--set", "simulation.workers=0",
                   "--out", folder)  # fmt: skip
    assert result.exit_code == 0, result.output
    return folder


def fill_in(command: Command, *, sandbox: Path, run: Path, counter: Iterator[int]) -> list[str]:
    """The words as the user would type them here: the README's placeholders given values."""
    values = dict(zip(FILLED_IN, (str(run), "", "1", "1", "set by the README test"), strict=True))
    if "ID" in command.words:
        with open_database(None, folder=run / "registry") as database:
            values["ID"] = ClientRegistry(database).list(limit=1)[0].client_id
    words = [values.get(word, word) for word in command.words]
    if words[:1] == ["simulate"]:
        if not {"--rounds", "-r"} & set(words) and not any("run.rounds=" in w for w in words):
            words += ["--rounds", "1"]
        if not {"--out", "-o", "--resume"} & set(words):
            words += ["--out", str(sandbox / "runs" / f"run-{next(counter)}")]
    return words


@pytest.mark.slow
@pytest.mark.parametrize(("where", "commands"), SCENARIOS, ids=[key for key, _ in SCENARIOS])
def test_commands_run_as_written(
    where: str,
    commands: list[Command],
    run_folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    (sandbox / "examples").symlink_to(ROOT / "examples")
    run = sandbox / "run"
    shutil.copytree(run_folder, run)
    # worker processes must find Shoal from the sandbox too (PYTHONPATH=src is relative)
    monkeypatch.setattr(sys, "path", [os.path.abspath(entry) for entry in sys.path])
    if "PYTHONPATH" in os.environ:
        absolute = [os.path.abspath(entry) for entry in os.environ["PYTHONPATH"].split(os.pathsep)]
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(absolute))
    monkeypatch.chdir(sandbox)
    monkeypatch.setattr(models, "_interactive", lambda: True)  # a person, who answers yes
    counter = iter(range(1000))
    for command in commands:
        words = fill_in(command, sandbox=sandbox, run=run, counter=counter)
        result = CliRunner(env={"COLUMNS": "120"}).invoke(app, words, input="y\n")
        if "pip install 'shoal[" in result.stderr:
            pytest.skip(f"{command}: {result.stderr.strip()}")
        assert result.exit_code == 0, f"{command} ({where}) failed:\n{result.output}"
