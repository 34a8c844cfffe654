"""A run's feature module over real gRPC: a served coordinator records it with every signed
version and ships it; deployed clients build their app with it, and refuse any other.

Each client is a :class:`ClientRuntime` over a real channel on 127.0.0.1 that pins the
coordinator's model-signing key and builds the example app (``examples/portable-features``)
from a :class:`FeatureSource`, as ``shoal client run`` does for a job whose module is not
on its machine: the module comes from the coordinator (a client with its own copy, pinned,
is the TLS deployment of tests/test_examples_apps.py). The attacks: a coordinator (or a
network peer) that serves another module than the one it signed; a client that pins another
module; a client whose results claim another module than the run's (feature skew); a resume
with another module.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shoal.client.app import ClientContext, load_attribute
from shoal.client.features import FeatureSource
from shoal.client.link import FetchFeatures, Submitted, SubmitUpdate
from shoal.client.runtime import ClientRuntime
from shoal.config import Config, parse_config
from shoal.core.errors import ConfigError
from shoal.features import FeatureModule, with_manifest
from shoal.registry import BlobStore, ClientRegistry, ModelRecord, ModelRegistry
from shoal.registry.location import blob_location, registry_location
from shoal.tasks import RejectReason, RejectSubmission
from shoal.transport.grpc_link import GrpcLink
from support.jobs import network_job, serve_to_digits_clients

pytest.importorskip("wasmtime")
pytestmark = pytest.mark.timeout(180)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "portable-features"
TOKEN = "portable-features"
RUN = "phones"
CLIENTS = 3


@pytest.fixture(autouse=True)
def _own_app_module() -> Iterator[None]:
    """The example's ``app.py`` is imported as ``app``, as other examples' are: forgotten
    before and after."""
    sys.modules.pop("app", None)
    yield
    sys.modules.pop("app", None)


def job(
    tmp_path: Path,
    *,
    rounds: int = 2,
    quorum: float = 1.0,
    deadline_s: float = 60,
    protocol: str = "none",
    **sections: dict[str, Any],
) -> Config:
    secure = {} if protocol == "none" else {"secure_aggregation": {"protocol": protocol}}
    return parse_config(
        network_job(
            tmp_path,
            run_id=RUN,
            token=TOKEN,
            clients=CLIENTS,
            per_round=CLIENTS,
            run={"name": RUN, "rounds": rounds},
            round={"quorum": quorum, "deadline_s": deadline_s},
            client={"epochs": 1, "batch_size": 32, "learning_rate": 0.5},
            features={"module": str(EXAMPLE / "features.wat")},
            app={"client": "app:client_fn", "server": "app:server_app"},
            **secure,
            **sections,
        )
    )


@dataclasses.dataclass(frozen=True, slots=True)
class SkewedSource(FeatureSource):
    """A client build that computes with its own stale copy of the feature set (the same
    names and version, other bits), whatever module its tasks name; it says so honestly."""

    def module(self, data: bytes | None, *, expected: str | None) -> FeatureModule | None:
        return other_module()


def sources(
    config: Config, pinned: dict[int, str] | None = None, skewed: frozenset[int] = frozenset()
) -> Callable[[int, int], Any]:
    """Client ``index``'s app as ``shoal client run`` hands it over: built once the module is
    known; ``pinned[index]`` is a module's sha256 that client accepts alone; a client in
    ``skewed`` computes with another build of the module."""
    client_fn = load_attribute("app:client_fn", search_path=[EXAMPLE])

    def source(index: int, clients: int) -> FeatureSource:
        def build(module: FeatureModule | None) -> Any:
            context = ClientContext(
                client_id=f"phone-{index}",
                partition_index=index,
                num_partitions=clients,
                config=config,
                features=module,
            )
            return client_fn(context)

        kind = SkewedSource if index in skewed else FeatureSource
        return kind(build, pinned=(pinned or {}).get(index))

    return source


class TamperingLink(GrpcLink):
    """A real gRPC link that changes what it carries: the feature module it downloads
    (``module``: what a hostile coordinator or peer serves instead), and the module its
    uploads claim (``claims``); it keeps each upload's answer."""

    def __init__(
        self, *args: Any, module: bytes | None = None, claims: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.module = module
        self.claims = claims
        self.answers: list[Submitted] = []
        self.fetched = 0

    async def _fetch_features(self, enrollment: Any, request: FetchFeatures) -> bytes | None:
        self.fetched += 1
        real = await super()._fetch_features(enrollment, request)
        return real if self.module is None else self.module

    async def _submit_update(self, enrollment: Any, request: SubmitUpdate) -> Submitted:
        if self.claims is not None:
            request = dataclasses.replace(request, features_sha256=self.claims)
        answer = await super()._submit_update(enrollment, request)
        self.answers.append(answer)
        return answer


def other_module() -> FeatureModule:
    """A valid module with the example's manifest, computing something else (a skewed build
    of the same feature set: the same names and version, other bits)."""
    example = FeatureModule.load(EXAMPLE / "features.wat")
    wat = (EXAMPLE / "features.wat").read_text().replace("(f64.const -0.5)", "(f64.const -0.25)", 1)
    assert wat != (EXAMPLE / "features.wat").read_text()
    import wasmtime

    skewed = with_manifest(bytes(wasmtime.wat2wasm(wat)), example.manifest)
    module = FeatureModule.from_bytes(skewed)
    assert module.sha256 != example.sha256 and module.manifest == example.manifest
    return module


def serve(
    tmp_path: Path,
    config: Config,
    *,
    links: dict[int, dict[str, Any]] | None = None,
    pinned: dict[int, str] | None = None,
    skewed: frozenset[int] = frozenset(),
) -> tuple[list[dict[str, Any]], list[ClientRuntime], list[TamperingLink]]:
    """The rows of ``config`` served to the example's clients, their runtimes and links
    (``links[i]``: how client ``i``'s link tampers; ``pinned[i]``: the module it pins)."""
    rows: list[dict[str, Any]] = []
    runtimes: list[ClientRuntime] = []
    made: list[TamperingLink] = []

    def link_of(index: int, address: str) -> TamperingLink:
        link = TamperingLink(
            address, credentials=None, enrollment_token=TOKEN, **(links or {}).get(index, {})
        )
        made.append(link)
        return link

    asyncio.run(
        serve_to_digits_clients(
            tmp_path,
            config,
            clients=CLIENTS,
            token=TOKEN,
            on_round=rows.append,
            client_of=sources(config, pinned, skewed),
            search_path=[EXAMPLE],
            link_of=link_of,
            pin_key=True,
            runtimes_out=runtimes,
            timeout_s=120,
        )
    )
    return rows, runtimes, made


def versions(tmp_path: Path) -> list[ModelRecord]:
    """Every version of the run's model in the coordinator's registry."""
    state = tmp_path / "state"
    database = registry_location(state, None).open()
    try:
        return ModelRegistry(database, BlobStore(blob_location(state, None))).list(RUN)
    finally:
        database.close()


def extractor_versions(tmp_path: Path) -> list[str | None]:
    """The feature extractor version each enrolled client reported."""
    database = registry_location(tmp_path / "state", None).open()
    try:
        return [
            record.device.feature_extractor_version for record in ClientRegistry(database).list()
        ]
    finally:
        database.close()


def test_served_clients_fetch_the_run_module_and_every_version_records_it(
    tmp_path: Path,
) -> None:
    config = job(tmp_path)
    module = FeatureModule.load(EXAMPLE / "features.wat")
    rows, runtimes, _ = serve(tmp_path, config)
    fits = [row for row in rows if row["phase"] == "fit"]
    assert [row["committed"] for row in fits] == [True, True]
    assert all(row["reported"] == CLIENTS for row in fits)
    # each client built its app with the coordinator's module, the one its job names
    assert {runtime.features.sha256 for runtime in runtimes if runtime.features} == {module.sha256}
    assert all(runtime.tasks_done >= 2 for runtime in runtimes)
    recorded = versions(tmp_path)
    assert [record.features_sha256 for record in recorded] == [module.sha256] * 3
    assert all(record.signed is not None for record in recorded)
    # the versioning matrix's feature_extractor component: the module's version, reported
    assert extractor_versions(tmp_path) == [module.version] * CLIENTS


def test_clients_without_the_module_meet_a_feature_extractor_requirement(
    tmp_path: Path,
) -> None:
    """A job that requires feature extractor 1.0.0: clients that do not have the module yet
    report the version of the run's (its manifest, read, not compiled), are selected, and
    then compute with the module their task names (before, none was ever selected)."""
    require = {"require": [{"component": "feature_extractor", "minimum": "1.0.0"}]}
    config = job(tmp_path, rounds=1, versions=require)
    rows, runtimes, _ = serve(tmp_path, config)
    [fit] = [row for row in rows if row["phase"] == "fit"]
    assert fit["committed"] and fit["reported"] == CLIENTS
    assert extractor_versions(tmp_path) == ["1.0.0"] * CLIENTS
    assert all(runtime.tasks_done == 1 for runtime in runtimes)


def test_a_client_refuses_a_module_other_than_the_one_signed_with_the_model(
    tmp_path: Path,
) -> None:
    """The coordinator signs the version with the run's module; what client 0 downloads is
    another (a hostile coordinator, or a peer on the path): it never trains with it."""
    config = job(tmp_path, rounds=1, quorum=0.6, deadline_s=6)
    rows, runtimes, _ = serve(tmp_path, config, links={0: {"module": other_module().wasm}})
    [fit] = [row for row in rows if row["phase"] == "fit"]
    assert fit["committed"] and fit["reported"] == CLIENTS - 1
    assert runtimes[0].tasks_done == 0  # refused at every task: the module is not the signed one


def test_a_client_that_pins_another_module_trains_with_none_of_the_runs(
    tmp_path: Path,
) -> None:
    """Client 1 pins a module (its job's ``[features] sha256``, or its own copy of the
    module) that is not the run's: it refuses every task before it downloads the module, says
    why, and the run goes on with the others."""
    config = job(tmp_path, rounds=1, quorum=0.6, deadline_s=6)
    rows, runtimes, links = serve(tmp_path, config, pinned={1: other_module().sha256})
    [fit] = [row for row in rows if row["phase"] == "fit"]
    assert fit["committed"] and fit["reported"] == CLIENTS - 1
    assert runtimes[1].tasks_done == 0 and runtimes[1].features is None
    # it asked for its pinned module once (to say its version: the run has another), and
    # refused each task by the sha256 it names, never downloading the run's module
    assert links[1].fetched == 1
    assert sum(fit["failures"].values()) >= 1, fit["failures"]  # its refusal, at once


def test_the_coordinator_refuses_results_computed_with_another_module(tmp_path: Path) -> None:
    """Client 2 claims another module than the run's (a stale or skewed feature build): its
    update is refused before a byte of its payload is read, and the round goes on."""
    config = job(tmp_path, rounds=1, quorum=0.6, deadline_s=6)
    skewed = other_module().sha256
    rows, _, links = serve(tmp_path, config, links={2: {"claims": skewed}})
    [fit] = [row for row in rows if row["phase"] == "fit"]
    assert fit["committed"] and fit["reported"] == CLIENTS - 1
    refused = [answer for answer in links[2].answers if answer is not None]
    assert refused, "the skewed client's update was not refused"
    for answer in refused:
        assert isinstance(answer, RejectSubmission)
        assert answer.reason is RejectReason.INVALID_UPDATE
        assert answer.detail.startswith("incompatible: feature skew")


@pytest.mark.parametrize("protocol", ["none", "secagg+"])
def test_a_client_computing_with_another_build_of_the_module_is_refused_once(
    tmp_path: Path, protocol: str
) -> None:
    """Client 2 bundles a stale build of the feature set and computes with it: its results
    are refused, in a plain round and in a secure one (where its masked input would be summed
    unseen), and its round fails for it at once: it is not asked again to compute with the
    same module (before, it trained and uploaded over a thousand times in one round)."""
    config = job(tmp_path, rounds=1, quorum=0.6, deadline_s=20, protocol=protocol)
    rows, runtimes, links = serve(tmp_path, config, skewed=frozenset({2}))
    [fit] = [row for row in rows if row["phase"] == "fit"]
    assert fit["committed"] and fit["reported"] == CLIENTS - 1
    assert runtimes[2].features is not None
    assert runtimes[2].features.sha256 == other_module().sha256
    assert len(links[2].answers) <= 1  # plain: its one refused upload; secure: none went


def test_a_run_does_not_resume_with_another_module(tmp_path: Path) -> None:
    config = job(tmp_path, rounds=1)
    serve(tmp_path, config)
    skewed = tmp_path / "skewed.wasm"
    skewed.write_bytes(other_module().wasm)
    again = config.model_copy(
        update={
            "features": config.features.model_copy(update={"module": str(skewed)}),
            "run": config.run.model_copy(update={"rounds": 2}),
        }
    )
    with pytest.raises(ConfigError, match="trained with the feature module"):
        serve(tmp_path, again)
