"""Running what a document says: its fenced code blocks, its shell commands, in real processes."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHOAL = [sys.executable, "-m", "shoal"]


def environment() -> dict[str, str]:
    """This checkout's Shoal for child processes, whatever the environment has installed."""
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def fenced_blocks(text: str, language: str) -> list[str]:
    """The bodies of the ```language blocks of a Markdown text, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def shell_commands(block: str) -> list[list[str]]:
    """One argv per command of a shell block (continuations joined, comments and ``cd`` dropped);
    ``shoal`` and ``python`` become this interpreter."""
    commands = [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").split("\n")]
    return [as_local(command) for command in commands if command and command[0] != "cd"]


def as_local(command: list[str]) -> list[str]:
    if command[0] == "shoal":
        return [*SHOAL, *command[1:]]
    if command[0] == "python":
        return [sys.executable, *command[1:]]
    return command


def run(command: list[str], *, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=240
    )


@dataclass(frozen=True)
class Deployment:
    """How the processes of a deployment ended: exit codes in start order, and their output."""

    codes: list[int]
    output: str


def deploy(serve: list[str], clients: list[list[str]], *, cwd: Path) -> Deployment:
    """Start ``serve`` and the clients; wait until all have exited by themselves (4 min at most)."""
    names = ["coordinator", *(f"client-{index}" for index in range(len(clients)))]
    logs = [(cwd / f"{name}.log").open("w") for name in names]
    processes = [
        subprocess.Popen(command, cwd=cwd, env=environment(), stdout=log, stderr=log)
        for command, log in zip([serve, *clients], logs, strict=True)
    ]
    try:
        codes = [process.wait(timeout=240) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in logs:
            log.close()
    output = "\n".join(f"--- {name}\n" + (cwd / f"{name}.log").read_text() for name in names)
    return Deployment(codes, output)
