"""The benchmarks that compare with Flower: its figures come from its own environment, or none.

``benchmarks/secagg.py`` and ``benchmarks/aggregation.py`` run Flower's side
as a subprocess with another interpreter. These tests stand a stub in for
that interpreter (a script that answers as Flower's side would), so they
check the plumbing without Flower: the arguments it gets, the ratio, the
version check, ``--skip-flower``, and the one line a missing Flower gives.
The last test runs Flower's real side when ``.bench/flower-venv`` exists.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
FLOWER_VENV_PYTHON = ROOT / ".bench" / "flower-venv" / "bin" / "python"
SMALL_SECAGG = ["--params", "1000", "--repeats", "2", "--flower-repeats", "1"]


def printed_ratio(flower_s: float, round_s: float) -> object:
    """What the report's ratio may be, recomputed from its round: the ratio is rounded to
    0.1 from the unrounded round (0.05 off at most), the round to 1 us (off by up to 0.5 us,
    which moves the ratio by ``ratio * 0.5 us / round``: 0.02 for a 7 ms round)."""
    ratio = flower_s / round_s
    return pytest.approx(ratio, abs=0.05 + ratio * 0.5e-6 / round_s + 1e-9)


def run_benchmark(script: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    environment.pop("SHOAL_FLOWER_PYTHON", None)
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *arguments],
        capture_output=True,
        text=True,
        env=environment,
        timeout=240,
        check=False,
    )


def stub_flower(folder: Path, answer: dict[str, Any]) -> Path:
    """An executable that records its arguments and prints ``answer``, as Flower's side would."""
    stub = folder / "python"
    record = folder / "arguments.txt"
    stub.write_text(f"#!/bin/sh\necho \"$@\" >> {record}\necho '{json.dumps(answer)}'\n")
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    return stub


FLOWER_ROUND = {
    "flower_version": "1.42.0",
    "round_s": 2.5,
    "codec_s": 0.5,
    "rounds_s": [2.5, 2.7],
    "bytes_sent": 805_000.0,
    "bytes_received": 407_000.0,
    "max_error": 6e-6,
}


def test_skipping_flower_prints_shoal_and_its_baseline_but_no_ratio() -> None:
    done = run_benchmark(
        "secagg.py", "--clients", "5", "--degree", "4", *SMALL_SECAGG, "--skip-flower"
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["flower_skipped"] == "--skip-flower"
    ratios = {"flower_s", "flower_round_s", "speedup_vs_flower", "speedup_vs_flower_with_codec"}
    assert not ratios & set(report)
    assert report["ratio_to_plaintext_mean"] > 0
    assert report["stages"][0] == "advertise_keys" and report["stages"][-1] == "unmask"
    assert report["max_error"] < 1e-3


def test_flower_gets_the_same_setting_and_the_ratio_leaves_out_its_codec(tmp_path: Path) -> None:
    stub = stub_flower(tmp_path, FLOWER_ROUND)
    done = run_benchmark(
        "secagg.py", "--clients", "6", "--degree", "4", *SMALL_SECAGG, "--flower-python", str(stub)
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    # degree 4 is 5 shares in Flower's count, which includes the client itself
    arguments = (tmp_path / "arguments.txt").read_text().split()
    assert arguments[0].endswith("benchmarks/flower/secagg_round.py")
    assert arguments[arguments.index("--shares") + 1] == "5"
    assert arguments[arguments.index("--clients") + 1] == "6"
    assert arguments[arguments.index("--params") + 1] == "1000"
    assert report["flower_shares"] == 5 and report["flower_s"] == 2.0
    # the ratios are rounded to 0.1 from the unrounded round, the report's round to 1 us
    assert report["speedup_vs_flower"] == printed_ratio(2.0, report["round_s"])
    assert report["speedup_vs_flower_with_codec"] == printed_ratio(2.5, report["round_s"])


def test_flowers_simulation_engine_is_timed_on_request(tmp_path: Path) -> None:
    stub = stub_flower(tmp_path, FLOWER_ROUND)
    setting = ["--clients", "6", "--degree", "4", *SMALL_SECAGG, "--flower-python", str(stub)]
    done = run_benchmark("secagg.py", *setting, "--flower-simulation")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    calls = (tmp_path / "arguments.txt").read_text().splitlines()
    assert [("--engine simulation" in call) for call in calls] == [False, True]
    assert report["flower_simulation_s"] == 2.5
    assert report["speedup_vs_flower_simulation"] == printed_ratio(2.5, report["round_s"])


def test_settings_flower_cannot_run_are_measured_without_it(tmp_path: Path) -> None:
    stub = stub_flower(tmp_path, FLOWER_ROUND)
    done = run_benchmark(
        "secagg.py", "--clients", "8", "--degree", "5", *SMALL_SECAGG, "--flower-python", str(stub)
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert "cannot run 6 shares" in report["flower_skipped"]  # its ring wants an odd count
    assert "speedup_vs_flower" not in report
    assert not (tmp_path / "arguments.txt").exists()


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (None, "Flower's Python /nonexistent/python does not exist"),
        ({**FLOWER_ROUND, "flower_version": "1.41.0"}, "runs Flower 1.41.0"),
        ({}, "printed no JSON"),
    ],
)
def test_a_missing_or_wrong_flower_is_one_line(
    tmp_path: Path, answer: dict[str, Any] | None, message: str
) -> None:
    flower_python = "/nonexistent/python"
    if answer is not None:
        flower_python = str(stub_flower(tmp_path, answer))
        if not answer:  # a Flower that prints nothing at all
            Path(flower_python).write_text("#!/bin/sh\nexit 0\n")
    setting = ["--clients", "5", "--degree", "4", *SMALL_SECAGG]
    done = run_benchmark("secagg.py", *setting, "--flower-python", flower_python)
    assert done.returncode == 1
    assert message in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr


def test_aggregation_measures_flower_and_the_finite_check_in_the_same_run(tmp_path: Path) -> None:
    stub = stub_flower(
        tmp_path, {"flower_version": "1.42.0", "seconds": 0.5, "max_abs_error_vs_float64": 1e-7}
    )
    common = ["--num-updates", "3", "--num-parameters", "2000", "--repeats", "1"]
    done = run_benchmark("aggregation.py", *common, "--flower-python", str(stub))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    arguments = (tmp_path / "arguments.txt").read_text().split()
    assert arguments[0].endswith("benchmarks/flower/fedavg_aggregate.py")
    assert arguments[arguments.index("--num-updates") + 1] == "3"
    assert report["speedup_vs_flower"] == pytest.approx(0.5 / report["seconds"])
    per_million = report["finite_check_seconds"] / 6000 * 1e9
    assert report["finite_check_ms_per_million_values"] == pytest.approx(per_million)
    alone = run_benchmark("aggregation.py", *common, "--skip-flower")
    assert alone.returncode == 0, alone.stderr
    assert "speedup_vs_flower" not in json.loads(alone.stdout)


@pytest.mark.slow
@pytest.mark.skipif(not FLOWER_VENV_PYTHON.is_file(), reason="Flower's environment is not built")
def test_flowers_own_secagg_round_runs_and_sums_correctly() -> None:
    done = subprocess.run(
        [str(FLOWER_VENV_PYTHON), str(BENCHMARKS / "flower" / "secagg_round.py"),
         "--clients", "5", "--shares", "3", "--params", "200", "--repeats", "1"],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["flower_version"].startswith("1.42.")
    assert report["neighbours"] == 2 and report["threshold"] == 2
    assert report["max_error"] < 1e-4  # Flower's quantization: 2^22 levels over [-8, 8]
    assert report["bytes_sent"] > 8 * 200  # its masked vector travels as int64
