"""Finds or builds the separate virtual environment in which benchmarks run Flower beside Shoal.

Flower 1.42 pins protobuf 6 and Ray 2.55, while Shoal uses protobuf 7 and
Ray 2.60: the two cannot share one environment. A benchmark that compares
with Flower therefore runs Flower's side (a script under
``benchmarks/flower/``) as a subprocess with the interpreter of another
environment, and reads the one JSON object it prints.

That interpreter is, in order: ``--flower-python``, the environment variable
``SHOAL_FLOWER_PYTHON``, or ``.bench/flower-venv`` in the repository (git
ignores it), which is created on first use with ``python -m venv`` and
``pip install "flwr[simulation]==1.42.*"`` from the package index.
``--skip-flower`` measures Shoal alone, where that environment cannot be
built.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FLOWER_SCRIPTS = Path(__file__).resolve().parent / "flower"
DEFAULT_VENV = ROOT / ".bench" / "flower-venv"
ENVIRONMENT_VARIABLE = "SHOAL_FLOWER_PYTHON"
REQUIREMENT = "flwr[simulation]==1.42.*"
EXPECTED_VERSION = "1.42."


class FlowerUnavailable(RuntimeError):
    """Flower's environment could not be found, built or run; the message says what to do."""


def add_flower_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--flower-python",
        type=Path,
        default=None,
        help=f"the Python of an environment with {REQUIREMENT} (default: "
        f"${ENVIRONMENT_VARIABLE}, else {DEFAULT_VENV.relative_to(ROOT)}, built if missing)",
    )
    parser.add_argument(
        "--skip-flower",
        action="store_true",
        help="measure Shoal alone (no Flower figures, no ratio to Flower)",
    )


def flower_python(args: argparse.Namespace) -> Path | None:
    """The interpreter that runs Flower, built if needed; None under ``--skip-flower``."""
    if args.skip_flower:
        return None
    named = args.flower_python or os.environ.get(ENVIRONMENT_VARIABLE)
    if named:
        python = Path(named)
        if not python.is_file():
            raise FlowerUnavailable(f"Flower's Python {python} does not exist")
        return python
    python = DEFAULT_VENV / "bin" / "python"
    if not python.is_file():
        build_venv(DEFAULT_VENV)
    return python


def build_venv(folder: Path) -> None:
    """Create ``folder`` as a virtual environment holding Flower (takes a minute or two)."""
    print(f"building Flower's environment in {folder} ({REQUIREMENT})", file=sys.stderr)
    steps = (
        [sys.executable, "-m", "venv", str(folder)],
        [str(folder / "bin" / "python"), "-m", "pip", "install", "--quiet", REQUIREMENT],
    )
    for command in steps:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            reason = _last_line(done.stderr) or f"exit status {done.returncode}"
            raise FlowerUnavailable(
                f"could not build Flower's environment ({' '.join(command[-2:])}: {reason}); "
                "pass --skip-flower to measure Shoal alone, or --flower-python"
            )


def run_flower(python: Path, script: str, arguments: list[str]) -> dict[str, Any]:
    """Run ``benchmarks/flower/<script>`` with Flower's Python; its last line of JSON."""
    command = [str(python), str(FLOWER_SCRIPTS / script), *arguments]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        reason = _last_line(done.stderr) or f"exit status {done.returncode}"
        raise FlowerUnavailable(f"Flower's side failed ({script}): {reason}")
    try:
        report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise FlowerUnavailable(f"Flower's side ({script}) printed no JSON") from None
    version = str(report.get("flower_version", ""))
    if not version.startswith(EXPECTED_VERSION):
        raise FlowerUnavailable(
            f"{python} runs Flower {version or '(unknown)'}; these figures are for "
            f"{EXPECTED_VERSION}x ({REQUIREMENT})"
        )
    return report


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
