"""The simulated consortium of a homomorphic run: the silos' receipt keys and the key holder.

Each silo signs its encrypted contributions with its own Ed25519 key; the
key holder knows their public keys and alone holds the CKKS secret key. With
``secure_aggregation.key_holder`` unset, the simulation makes both in the
run folder (``silo-keys.json``, mode 0600, stands for keys each silo would
keep; ``key-holder/`` for the key holder's folder) and reuses them on
resume. With an address, it talks to a running ``shoal keyholder serve``
(whose silos must be those of ``secure_aggregation.silo_keys``). Either
way the coordinator is handed the public context only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from shoal.config import SecureAggregationSection
from shoal.coordinator.setup import connect_key_holder
from shoal.core.errors import ConfigError
from shoal.secure.ckks import EncryptedVector
from shoal.secure.keyholder import ContributionReceipt, KeyHolder, read_silo_keys
from shoal.transport.signing import generate_client_key

SILO_KEYS_FILE = "silo-keys.json"
KEY_HOLDER_FOLDER = "key-holder"


class Decryptor(Protocol):
    """What the simulation needs of a key holder, local or remote."""

    def public_context(self) -> bytes: ...

    def decrypt_aggregate(
        self,
        *,
        run_id: str,
        round: int,
        aggregate: EncryptedVector,
        receipts: Sequence[ContributionReceipt],
    ) -> npt.NDArray[np.float64]: ...


class Consortium:
    """The silos' signing keys and the key holder of one simulated run."""

    def __init__(self, out: Path, section: SecureAggregationSection, silos: Sequence[str]) -> None:
        keys_path = Path(section.silo_keys) if section.silo_keys else out / SILO_KEYS_FILE
        self.signing_keys, self.public_keys = _load_or_create_keys(keys_path, silos)
        missing = [silo for silo in silos if silo not in self.signing_keys]
        if missing:
            raise ConfigError(f"{keys_path} has no key for silos {missing[:5]}")
        self.key_holder: Decryptor = _key_holder(out, section, self.public_keys)
        self.public_context = self.key_holder.public_context()


def _key_holder(
    out: Path, section: SecureAggregationSection, public_keys: Mapping[str, bytes]
) -> Decryptor:
    if section.key_holder is None:
        folder = out / KEY_HOLDER_FOLDER
        if (folder / "manifest.json").exists():
            return KeyHolder.open(folder)
        return KeyHolder.init(folder, min_contributors=section.min_contributors, silos=public_keys)
    return connect_key_holder(section)


def _load_or_create_keys(
    path: Path, silos: Sequence[str]
) -> tuple[dict[str, bytes], dict[str, bytes]]:
    if not path.exists():
        create_silo_keys(path, silos)
    keys = read_silo_keys(path)
    missing = sorted(silo for silo, pair in keys.items() if pair.private is None)
    if missing:
        raise ConfigError(f"{path}: no private key for silos {missing} (a simulation plays them)")
    return (
        {silo: pair.private for silo, pair in keys.items() if pair.private is not None},
        {silo: pair.public for silo, pair in keys.items()},
    )


def create_silo_keys(path: Path, silos: Sequence[str]) -> None:
    """Write a new file of Ed25519 key pairs, one per silo, readable by its owner only."""
    pairs = {silo: generate_client_key() for silo in silos}
    text = json.dumps(
        {
            silo: {"private": private.hex(), "public": public.hex()}
            for silo, (private, public) in pairs.items()
        },
        indent=2,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text + "\n")
