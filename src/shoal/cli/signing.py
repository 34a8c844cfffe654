"""``shoal models verify``, ``shoal models features`` and ``shoal coordinator key``: checking
signed model versions.

The coordinator signs every version it commits (see
:mod:`shoal.governance.model_signing`); ``shoal coordinator key`` prints or
exports its public key, for clients to pin, and ``shoal models verify``
checks a stored version against it: the weights must hash to the recorded
sha256, and the signature must be the key's over the version's facts. ``shoal models
features`` writes the feature module a version was trained with, once the same checks hold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from shoal.cli.app import user_errors
from shoal.cli.models import _version_or_head, _version_record, _write_file, models_app
from shoal.cli.network import coordinator_app
from shoal.cli.operator import (
    AsJson,
    BlobUrl,
    RegistryUrl,
    StateDir,
    _console,
    _database,
    _print_json,
)
from shoal.config import load_config
from shoal.coordinator.records import run_signer
from shoal.core.errors import IntegrityError, ModelError, NotFoundError, SecurityError
from shoal.core.folders import writable_folder
from shoal.core.parameters import Parameters
from shoal.features import read_manifest
from shoal.governance.model_signing import (
    PUBLIC_KEY_FILE,
    PinnedKey,
    load_public_key,
    public_pem,
    write_public_key,
)
from shoal.preprocessing import Scaler
from shoal.registry import BlobStore, ModelRecord, ModelRegistry, blob_location
from shoal.registry.location import DEFAULT_STATE_DIR

PublicKeyFile = Annotated[
    Path | None,
    typer.Option(
        "--public-key",
        metavar="FILE",
        show_default="--state-dir/model-signing.pub",
        help="The coordinator's public key (PEM) the version's signature is checked against.",
    ),
]


@models_app.command("verify")
@user_errors
def verify_model(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Model name.")],
    version: Annotated[str, typer.Argument(metavar="VERSION", help="Version number, or head.")],
    public_key: PublicKeyFile = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    registry: RegistryUrl = None,
    blobs: BlobUrl = None,
    as_json: AsJson = False,
) -> None:
    """Check a stored version: its weights' sha256 and the coordinator's signature on it.

    Exits 0 with one line when both hold; non-zero with the reason when the
    blob was tampered with, the version is unsigned, or the signature is not
    the key's. A `shoal simulate` run folder is checked with --state-dir RUN.
    """
    number = _version_or_head(version)
    with _database(state_dir, registry, read_only=True) as database:  # "no registry" first
        pinned = load_public_key(public_key or state_dir / PUBLIC_KEY_FILE)
        models = ModelRegistry(database, BlobStore(blob_location(state_dir, blobs)))
        record = _version_record(models, name, number)
        sha256 = _stored_sha256(models, record)
    _check(pinned, record, sha256)
    assert record.signed is not None  # _check refuses an unsigned version
    if as_json:
        _print_json(
            {
                "name": name,
                "version": record.version,
                "round": record.round,
                "run_id": record.signed.run_id,
                "sha256": sha256,
                "key_id": pinned.key_id,
                "valid": True,
            }
        )
        return
    _console().print(
        f"{name} version {record.version} (round {record.round}, run {record.signed.run_id}): "
        f"signature valid, key {pinned.key_id}, sha256 {sha256}",
        markup=False,
        soft_wrap=True,
    )


@models_app.command("features")
@user_errors
def export_features(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Model name.")],
    version: Annotated[
        str,
        typer.Argument(
            metavar="VERSION",
            help="Version number, or head for the version new rounds build on.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", metavar="FILE", help="The .wasm file to write.")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing FILE.")] = False,
    public_key: PublicKeyFile = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    registry: RegistryUrl = None,
    blobs: BlobUrl = None,
    as_json: AsJson = False,
) -> None:
    """Write the feature module a version was trained with to FILE: the version's signature
    checked against the coordinator's key (it covers the weights and the module's sha256),
    and the module against that sha256. What serves the model then computes the same
    features its clients did."""
    record, data = _signed_input(
        name,
        version,
        out=out,
        force=force,
        source=_Source(public_key, state_dir, registry, blobs),
        recorded=lambda record: record.features_sha256,
        none="records no feature module (its signature covers none)",
    )
    sha256 = record.features_sha256
    manifest = read_manifest(data)
    _write_file(out, lambda handle: handle.write(data))
    if as_json:
        _print_json(
            {
                "name": name,
                "version": record.version,
                "out": str(out),
                "features_sha256": sha256,
                "features": {"name": manifest.name, "version": manifest.version},
                "inputs": list(manifest.inputs),
                "outputs": list(manifest.outputs),
            }
        )
        return
    _console().print(
        f"wrote the feature module {manifest.name} {manifest.version} of {name} version "
        f"{record.version} ({len(manifest.inputs)} inputs, {len(manifest.outputs)} features) "
        f"to {out}",
        markup=False,
    )


@models_app.command("scaler")
@user_errors
def export_scaler(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Model name.")],
    version: Annotated[
        str,
        typer.Argument(
            metavar="VERSION",
            help="Version number, or head for the version new rounds build on.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", metavar="FILE", help="The JSON file to write.")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing FILE.")] = False,
    public_key: PublicKeyFile = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    registry: RegistryUrl = None,
    blobs: BlobUrl = None,
    as_json: AsJson = False,
) -> None:
    """Write the scaler a version's tasks carried (\\[preprocessing]) to FILE, as JSON
    ({"mean": [...], "scale": [...]}): the version's signature checked against the
    coordinator's key (it covers the weights and the scaler's sha256), and the scaler against
    that sha256. What serves the model then standardizes its inputs as its clients did."""
    record, data = _signed_input(
        name,
        version,
        out=out,
        force=force,
        source=_Source(public_key, state_dir, registry, blobs),
        recorded=lambda record: record.preprocessing_sha256,
        none=(
            "records no scaler (its signature covers none: trained without [preprocessing], "
            "or before Shoal signed scalers)"
        ),
    )
    sha256 = record.preprocessing_sha256
    scaler = Scaler.parse(data.decode())
    _write_file(out, lambda handle: handle.write(data))  # the signed bytes, as they are
    if as_json:
        _print_json(
            {
                "name": name,
                "version": record.version,
                "out": str(out),
                "preprocessing_sha256": sha256,
                "features": scaler.features,
            }
        )
        return
    _console().print(
        f"wrote the scaler of {name} version {record.version} ({scaler.features} features) "
        f"to {out}",
        markup=False,
    )


@dataclass(frozen=True, slots=True)
class _Source:
    """Where a command reads the registry, and the key it checks signatures with."""

    public_key: Path | None
    state_dir: Path
    registry: str | None
    blobs: str | None


def _signed_input(
    name: str,
    version: str,
    *,
    out: Path,
    force: bool,
    source: _Source,
    recorded: Callable[[ModelRecord], str | None],
    none: str,
) -> tuple[ModelRecord, bytes]:
    """A version and the blob of what its signature covers beside its weights (its feature
    module or its scaler: the sha256 ``recorded`` reads of it): the signature checked first,
    so that a row whose sha256 was taken out is a signature failure, never "none" (``none``
    says what the version records when its signature covers nothing)."""
    number = _version_or_head(version)
    if out.exists() and not force:
        raise ModelError(f"{out} exists: refusing to overwrite it (pass --force)")
    state_dir = source.state_dir
    with _database(state_dir, source.registry, read_only=True) as database:
        pinned = load_public_key(source.public_key or state_dir / PUBLIC_KEY_FILE)
        models = ModelRegistry(database, BlobStore(blob_location(state_dir, source.blobs)))
        record = _version_record(models, name, number)
        _check(pinned, record, _stored_sha256(models, record))  # what the version signs
        sha256 = recorded(record)
        if sha256 is None:
            raise NotFoundError(f"version {record.version} of {name!r} {none}")
        return record, models.blobs.get(sha256)  # checked against the sha256 it is stored by


def _stored_sha256(models: ModelRegistry, record: ModelRecord) -> str:
    """The sha256 of the weights as stored now (recomputed, never the recorded one)."""
    try:
        return Parameters.from_bytes(models.blobs.get(record.blob)).sha256()
    except IntegrityError as exc:
        raise SecurityError(
            f"tampered blob: version {record.version} of {record.name!r}: {exc}"
        ) from exc


def _check(pinned: PinnedKey, record: ModelRecord, sha256: str) -> None:
    if sha256 != record.sha256:
        raise SecurityError(
            f"tampered blob: the stored weights of version {record.version} of {record.name!r} "
            f"hash to {sha256[:16]}..., the version records {record.sha256[:16]}..."
        )
    pinned.verify(
        record.signed,
        name=record.name,
        version=record.version,
        round=record.round,
        sha256=sha256,
        features=record.features_sha256,
        preprocessing=record.preprocessing_sha256,
    )


@coordinator_app.command("key")
@user_errors
def coordinator_key(
    config_path: Annotated[Path, typer.Option("--config", "-c", help="The job's TOML config.")],
    out: Annotated[
        Path | None,
        typer.Option("--out", metavar="FILE", help="Also write the public key (PEM) to FILE."),
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config value (section.key=value).")
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Print the public key the coordinator signs model versions with, for clients to pin.

    The key is coordinator.signing_key, the deployment's model-signing.key
    beside its certificates, or the state folder's own (made here if the
    coordinator has not started yet).
    """
    config = load_config(config_path, overrides or [])
    state_dir = writable_folder(config.coordinator.state_dir, what="coordinator.state_dir")
    signer = run_signer(config, state_dir)
    public = signer.private_key.public_key()
    if out is not None:
        write_public_key(out, public)
    pem = public_pem(public).decode()
    if as_json:
        _print_json({"key_id": signer.key_id, "public_key": pem, "out": str(out) if out else None})
        return
    typer.echo(pem, nl=False)
    typer.echo(f"key id {signer.key_id}" + ("" if out is None else f", written to {out}"), err=True)
