"""Benchmark of the replay guard's journal: what keeping each nonce on disk costs a check-in.

Two coordinators are built from one job (the built-in app, state folders in a
temporary directory), one client enrolled in each. The same check-in goes
through the real service handler (``CoordinatorService.CheckIn``, in process:
no socket, so that the figure is the work), the two taking turns:

- ``without``: the baseline, the coordinator's journal closed (the replay
  guard keeps its nonces in memory only, as before the journal);
- ``with``: the coordinator as ``shoal coordinator serve`` builds it, each
  accepted nonce appended to ``replay-nonces.bin`` (and the file rewritten
  with the live ones as it grows).

It also times a restart's load of a full journal (``--nonces`` nonces).
Prints one JSON object per measurement.

    python benchmarks/replay_journal.py --check-ins 5000 --nonces 100000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script, too
from benchmarks.attestation import client_on, interleaved_us, job
from shoal.coordinator.nonces import NonceJournal
from shoal.transport.signing import ReplayGuard, create_request_auth, generate_client_key


def restart_ms(folder: Path, nonces: int) -> float:
    """The time a coordinator's start takes to give a guard back ``nonces`` kept nonces."""
    guard = ReplayGuard(max_per_client=nonces)
    private, public = generate_client_key()
    journal = NonceJournal.open(folder, guard, now=time.time())
    now = time.time()
    for _ in range(nonces):
        auth = create_request_auth(
            private, client_id="c", run_id="r", round=1, payload_sha256="00" * 32, timestamp=now
        )
        guard.check(auth, key=public, now=now)
    journal.close()
    started = time.perf_counter()
    NonceJournal.open(folder, ReplayGuard(max_per_client=nonces), now=now).close()
    return (time.perf_counter() - started) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check-ins", type=int, default=5000)
    parser.add_argument("--nonces", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shoal-journal-bench-") as name:
        folder = Path(name)
        without, kept = (
            job(folder / "without", attested=False),
            job(folder / "with", attested=False),
        )
        try:
            assert without.nonces is not None
            without.nonces.close()  # the guard in memory only
            for parts in (without, kept):  # one client sends them all, within the window
                parts.service.admission.replay.max_per_client = 2 * args.check_ins
            without_us, with_us = interleaved_us(
                [client_on(without, None), client_on(kept, None)], args.check_ins
            )
            print(json.dumps({"benchmark": "replay_journal", "what": "check_in",
                              "check_ins": args.check_ins,
                              "without_us": round(without_us, 1),
                              "with_us": round(with_us, 1),
                              "ratio": round(with_us / without_us, 3)}))  # fmt: skip
        finally:
            without.close()
            kept.close()
        (folder / "restart").mkdir()
        load_ms = restart_ms(folder / "restart", args.nonces)
        size = (folder / "restart" / "replay-nonces.bin").stat().st_size
        print(json.dumps({"benchmark": "replay_journal", "what": "restart",
                          "nonces": args.nonces, "journal_bytes": size,
                          "load_ms": round(load_ms, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
