"""CKKS across silos over real gRPC on 127.0.0.1: a key holder apart, silos that pin its context."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.client.api import (
    Client,
    EvaluateConfig,
    EvaluateResult,
    FitConfig,
    FitResult,
    fit_update,
)
from shoal.client.runtime import Backoff, ClientRuntime, load_or_create_enrollment
from shoal.config import Config, parse_config
from shoal.coordinator.server import build, serve
from shoal.core import ConfigError, Parameters, SecurityError
from shoal.registry import BlobStore, ModelRegistry, blob_location, registry_location
from shoal.secure.homomorphic import EncryptionRequest, SiloCredentials
from shoal.secure.keyholder import PUBLIC_CONTEXT, KeyHolder
from shoal.simulation.consortium import create_silo_keys
from shoal.transport.grpc_link import GrpcLink
from shoal.transport.keyholder_service import serve_keyholder
from shoal.transport.signing import generate_client_key
from support.jobs import digits_client, network_job
from support.links import RecordingLink, Upload

pytest.importorskip("tenseal")
pytestmark = pytest.mark.timeout(180)

TOKEN = "consortium-token"
RUN = "run-banks"
SILOS = ["bank-a", "bank-b", "bank-c"]
HE_TOLERANCE = 1e-3  # CKKS error ~1e-8, the key holder's flooding noise std 1.5e-5


class Recording(Client):
    """A silo's model that keeps each round's update and example count, as trained."""

    def __init__(
        self, inner: Client, kept: dict[tuple[str, int], tuple[np.ndarray, int]], name: str
    ):
        self.inner, self.kept, self.name = inner, kept, name

    def get_parameters(self) -> Parameters:
        return self.inner.get_parameters()

    def fit(self, parameters: Parameters, config: FitConfig) -> FitResult:
        result = self.inner.fit(parameters, config)
        update = fit_update(result, parameters).vector.astype(np.float64)
        self.kept[(self.name, config.round)] = (update, result.num_examples)
        return result

    def evaluate(self, parameters: Parameters, config: EvaluateConfig) -> EvaluateResult:
        return self.inner.evaluate(parameters, config)


def job(tmp_path: Path, key_holder: str | None, silo_keys: Path, *, rounds: int = 2) -> Config:
    secure: dict[str, Any] = {
        "protocol": "ckks",
        "silo_keys": str(silo_keys),
        "min_contributors": 2,
    }
    if key_holder is not None:
        secure["key_holder"] = key_holder
    return parse_config(
        network_job(
            tmp_path,
            run_id=RUN,
            token=TOKEN,
            clients=len(SILOS),
            per_round=len(SILOS),
            run={"rounds": rounds, "seed": 5},
            # bank-c reports its refusal: no round waits for it until the deadline
            round={"quorum": 0.6, "deadline_s": 60},
            secure_aggregation=secure,
        )
    )


def consortium(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The silos' receipt keys, the key holder's folder, and another consortium's context."""
    keys = tmp_path / "silo-keys.json"
    create_silo_keys(keys, SILOS)
    public = {
        silo: bytes.fromhex(pair["public"]) for silo, pair in json.loads(keys.read_text()).items()
    }
    KeyHolder.init(tmp_path / "key-holder", min_contributors=2, silos=public)
    KeyHolder.init(tmp_path / "other", min_contributors=2, silos=public)
    return keys, tmp_path / "key-holder", tmp_path / "other" / PUBLIC_CONTEXT


def test_silos_train_over_grpc_and_the_coordinator_sees_only_ciphertexts(tmp_path: Path) -> None:
    keys, holder_folder, foreign_context = consortium(tmp_path)
    kept: dict[tuple[str, int], tuple[np.ndarray, int]] = {}
    plaintext: list[Upload] = []
    rounds: list[dict[str, Any]] = []

    with serve_keyholder(holder_folder, address="127.0.0.1:0", insecure=True) as holder:
        config = job(tmp_path, holder.address, keys)

        async def main() -> None:
            runtimes: list[ClientRuntime] = []
            links: list[GrpcLink] = []
            tasks: list[asyncio.Task[None]] = []

            def on_ready(port: int, first_round: int) -> None:
                for index, silo in enumerate(SILOS):
                    enrollment = load_or_create_enrollment(
                        tmp_path / silo, generate_client_key, client_id=silo
                    )
                    # bank-c was handed another consortium's context: it refuses to encrypt
                    context = (
                        foreign_context if silo == "bank-c" else holder_folder / PUBLIC_CONTEXT
                    )
                    credentials = SiloCredentials.load(silo, public_context=context, silo_keys=keys)
                    inner = digits_client(index, len(SILOS))
                    link = RecordingLink(f"127.0.0.1:{port}", plaintext, enrollment_token=TOKEN)
                    runtime = ClientRuntime(
                        Recording(inner, kept, silo),
                        link,
                        enrollment,
                        backoff=Backoff(0.01, 0.1),
                        seed=index,
                        silo=credentials,
                    )
                    links.append(link)
                    runtimes.append(runtime)
                    tasks.append(asyncio.create_task(runtime.run()))

            try:
                await asyncio.wait_for(
                    serve(config, insecure=True, on_round=rounds.append, on_ready=on_ready),
                    timeout=120,
                )
            finally:
                for runtime in runtimes:
                    runtime.stop()
                await asyncio.gather(*tasks)
                for link in links:
                    await link.close()

        asyncio.run(main())

    assert plaintext == []  # no silo ever uploaded its update in the clear
    fit = [row for row in rounds if row["phase"] == "fit"]
    assert [row["round"] for row in fit] == [1, 2]
    for row in fit:
        assert row["committed"], row["abort_reason"]
        assert row["secure_aggregation"] == "ckks"
        assert row["reported"] == 2  # bank-a and bank-b: bank-c refused the foreign context
        # a round starts once a quorum (two silos) has checked in: on a loaded machine round 1
        # can start before bank-c's first check-in, without it
        assert row["secure_dropped"] == {"encrypted_input": row["selected"] - 2}
    assert fit[-1]["selected"] == 3  # by round 2 bank-c is in: asked, it refused

    state = Path(config.coordinator.state_dir)
    database = registry_location(state, None).open()
    try:
        models = ModelRegistry(database, BlobStore(blob_location(state, None)))
        versions = {record.round: models.load(RUN, record.version) for record in models.list(RUN)}
    finally:
        database.close()
    for round_number in (1, 2):  # FedAvg: the new model is the old plus the weighted mean
        contributions = [kept[(silo, round_number)] for silo in ("bank-a", "bank-b")]
        weights = sum(n for _, n in contributions)
        mean = sum(n * update for update, n in contributions) / weights
        before = versions[round_number - 1].vector.astype(np.float64)
        after = versions[round_number].vector.astype(np.float64)
        assert np.max(np.abs(after - before - mean)) < HE_TOLERANCE


def test_a_networked_homomorphic_job_needs_a_key_holder_apart(tmp_path: Path) -> None:
    keys, _, _ = consortium(tmp_path)
    with pytest.raises(ConfigError, match="never holds the secret key"):
        build(job(tmp_path, None, keys))


def test_a_silo_refuses_a_context_it_did_not_pin_and_a_key_that_is_not_its_own(
    tmp_path: Path,
) -> None:
    keys, _, foreign_context = consortium(tmp_path)
    with pytest.raises(ConfigError, match="no private key for silo 'bank-z'"):
        SiloCredentials.load("bank-z", public_context=foreign_context, silo_keys=keys)
    with pytest.raises(ConfigError, match="cannot read the public context"):
        SiloCredentials.load("bank-a", public_context=tmp_path / "missing", silo_keys=keys)
    pinned = SiloCredentials.load("bank-a", public_context=foreign_context, silo_keys=keys)
    request = EncryptionRequest(
        round=1, run_id=RUN, public_context_sha256=hashlib.sha256(b"another").hexdigest()
    )
    with pytest.raises(SecurityError, match="refusing to encrypt"):
        pinned.answer(request, np.zeros(4), num_examples=1, loss=0.0)
    enrollment = load_or_create_enrollment(tmp_path / "a", generate_client_key, client_id="bank-a")
    with pytest.raises(ConfigError, match="holds the enrollment of 'bank-a'"):
        load_or_create_enrollment(tmp_path / "a", generate_client_key, client_id="bank-b")
    with pytest.raises(ConfigError, match="a client id is 1 to 128 ASCII"):
        load_or_create_enrollment(tmp_path / "b", generate_client_key, client_id="bank a")
    assert enrollment.client_id == "bank-a"
