"""``shoal coordinator serve``, ``shoal client run``, ``shoal demo network``: Shoal on a network."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from shoal.cli.app import app, user_errors
from shoal.cli.dashboard import announce
from shoal.cli.simulate import console, format_row, print_header, round_notes, statistics_line
from shoal.client.api import Client
from shoal.client.app import (
    ClientContext,
    app_search_path,
    load_client_app,
    parse_options,
    run_features,
    with_config_folder,
)
from shoal.client.features import FeatureSource
from shoal.client.runtime import ClientRuntime, RunPin, load_or_create_enrollment
from shoal.config import MAX_CLIENTS, Config, load_config
from shoal.core.errors import ConfigError, RunError, ShoalError
from shoal.core.limits import MAX_PORT, split_host_port
from shoal.core.serving import raise_open_files_limit
from shoal.dashboard import DEFAULT_HOST, DEFAULT_PORT, TOKEN_ENV, open_dashboard
from shoal.features import FeatureModule
from shoal.governance import ManifestAttester, SignedManifest
from shoal.governance.model_signing import PinnedKey
from shoal.privacy.client import PrivacyFloor

coordinator_app = typer.Typer(help="Run the network coordinator.", no_args_is_help=True)
client_app = typer.Typer(help="Run a client against a coordinator.", no_args_is_help=True)
demo_app = typer.Typer(help="Self-contained demonstrations.", no_args_is_help=True)
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(client_app, name="client")
app.add_typer(demo_app, name="demo")


@coordinator_app.command("serve")
@user_errors
def serve_command(
    config_path: Annotated[Path, typer.Option("--config", "-c", help="The job's TOML config.")],
    insecure: Annotated[
        bool,
        typer.Option("--insecure", help="Serve without TLS (refused unless given explicitly)."),
    ] = False,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config value (section.key=value).")
    ] = None,
    dashboard: Annotated[
        bool,
        typer.Option("--dashboard", help="Serve the run's live dashboard beside the coordinator."),
    ] = False,
    dashboard_host: Annotated[
        str,
        typer.Option(
            "--dashboard-host", help="The dashboard's address; any but loopback needs a token."
        ),
    ] = DEFAULT_HOST,
    dashboard_port: Annotated[
        int,
        typer.Option(
            "--dashboard-port", min=0, max=MAX_PORT, help="The dashboard's port (0: any free)."
        ),
    ] = DEFAULT_PORT,
    dashboard_token: Annotated[
        str | None,
        typer.Option(
            "--dashboard-token",
            envvar=TOKEN_ENV,
            show_envvar=True,
            help="Require this token to see the dashboard.",
        ),
    ] = None,
) -> None:
    """Serve a training job to network clients until it is done (SIGTERM stops it gracefully).

    With --dashboard the run's live page, as `shoal dashboard` serves it, is
    served from this process while the coordinator runs.
    """
    from shoal.coordinator.server import serve

    config = with_config_folder(load_config(config_path, overrides or []), config_path)
    viewer = None
    if dashboard:  # bound before the coordinator opens anything: a refused address stops here
        viewer = open_dashboard(
            config.coordinator.state_dir,
            host=dashboard_host,
            port=dashboard_port,
            token=dashboard_token or None,
            registry_url=config.coordinator.registry_url,
            run_id=config.coordinator.run_id,
            options="dashboard-",
        ).start()
        announce(viewer, console)

    def on_round(row: dict[str, Any]) -> None:
        console.print(format_row(row))
        for failure in round_notes(row):
            console.print(failure)
        if row.get("secure_aggregation"):
            dropped = ", ".join(
                f"{stage} {n}" for stage, n in row.get("secure_dropped", {}).items() if n
            )
            recovered = f"recovered {row.get('recovered', 0)}"
            console.print(
                f"      {row['secure_aggregation']}: {recovered}, dropped {dropped or 'none'}"
            )
        line = privacy_line(row)
        if line is not None:
            console.print(line)

    def on_ready(port: int, first_round: int) -> None:
        console.print(f"coordinator listening on {config.coordinator.listen} (port {port})")
        console.print(f"run folder: {config.coordinator.state_dir}")
        public = Path(config.coordinator.state_dir) / "model-signing.pub"
        console.print(f"model-signing key: {public} (clients pin it)")
        if config.secure_aggregation.enabled:
            console.print(f"secure aggregation: {config.secure_aggregation.protocol}")
        if config.privacy.enabled:
            budget = config.privacy.epsilon
            limit = "no limit" if budget is None else f"budget epsilon {budget:g}"
            console.print(f"differential privacy: {config.privacy.placement}, {limit}")
        if first_round > 1:
            console.print(f"resuming run {config.run.name} at round {first_round}")
        print_header()  # here, not before serving: a config error comes with no round table

    raise_open_files_limit()  # each connection is a file descriptor
    try:
        parts = asyncio.run(
            serve(
                config,
                insecure=insecure,
                on_round=on_round,
                on_ready=on_ready,
                search_path=app_search_path(config),
            )
        )
    finally:
        if viewer is not None:
            viewer.close()
    if parts.stop_reason is not None:
        console.print(f"training stopped: {escape(parts.stop_reason)}")
    if parts.run.nothing_committed is not None:
        raise RunError(f"{parts.run.nothing_committed} (run folder {config.coordinator.state_dir})")
    if parts.summary is not None:  # a statistics run: what it counted, as its summary says
        counted = statistics_line(parts.summary, folder=Path(config.coordinator.state_dir))
        if counted is not None:
            console.print(f"statistics: {escape(counted)}")


def privacy_line(row: dict[str, Any]) -> str | None:
    """What a fit round under DP spent, as a line under its row; None without DP."""
    if row["phase"] != "fit" or row.get("epsilon") is None:
        return None
    spent = f"epsilon {row['epsilon']:.4f} (delta {row['delta']:.3g})"
    if not row["committed"]:
        spent += ", nothing spent this round"
    noise = f"noise multiplier {row['noise_multiplier']:.4g}"
    return f"      privacy: {spent}, {noise}, clip norm {row['clip_norm']:.4g}"


def _coordinator_address(address: str) -> str:
    """``--coordinator`` as given, once it is a HOST:PORT a client can connect to (gRPC would
    take port 99999 modulo 65536 and retry a portless one forever, saying nothing)."""
    try:
        _, port = split_host_port(address)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if port == 0:
        raise typer.BadParameter(f"port 0 names no coordinator, got {address!r}")
    return address


@client_app.command("run")
@user_errors
def client_run_command(
    coordinator: Annotated[
        str,
        typer.Option(
            "--coordinator", help="HOST:PORT of the coordinator.", callback=_coordinator_address
        ),
    ],
    state_dir: Annotated[Path, typer.Option("--state-dir", help="Where the enrollment is kept.")],
    config_path: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="The job's TOML config (its \\[app], \\[features] and \\[client] sections).",
        ),
    ] = None,
    app_spec: Annotated[
        str | None,
        typer.Option("--app", help="MODULE:ATTRIBUTE of the client app (default: \\[app] client)."),
    ] = None,
    partition_index: Annotated[
        int | None,
        typer.Option(
            "--partition-index", min=0, max=MAX_CLIENTS - 1, help="This client's share of the data."
        ),
    ] = None,
    num_partitions: Annotated[
        int | None,
        typer.Option(
            "--num-partitions",
            min=1,
            max=MAX_CLIENTS,
            help="How many shares (default: data.num_clients).",
        ),
    ] = None,
    token: Annotated[str, typer.Option("--token", help="The enrollment token.")] = "",
    ca: Annotated[
        Path | None, typer.Option("--ca", help="The deployment CA to pin (ca.pem).")
    ] = None,
    certificate: Annotated[
        Path | None,
        typer.Option(
            "--cert",
            metavar="FILE",
            help="This client's certificate, for a coordinator with mutual TLS "
            "(client.pem of `shoal clients enroll --mtls`); with --key.",
        ),
    ] = None,
    certificate_key: Annotated[
        Path | None,
        typer.Option("--key", metavar="FILE", help="The private key of --cert (client.key)."),
    ] = None,
    coordinator_key: Annotated[
        Path | None,
        typer.Option(
            "--coordinator-key",
            metavar="FILE",
            show_default="[client] coordinator_key, else model-signing.pub beside --ca",
            help="The coordinator's model-signing public key to pin (PEM).",
        ),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option("--insecure", help="Connect without TLS, and without a pinned model key."),
    ] = False,
    options: Annotated[
        list[str] | None, typer.Option("--option", help="key=value passed to the app (repeatable).")
    ] = None,
    max_tasks: Annotated[
        int | None, typer.Option("--max-tasks", min=1, help="Stop after N tasks.")
    ] = None,
    client_id: Annotated[
        str | None,
        typer.Option("--client-id", help="A named identity for a new enrollment (a silo's name)."),
    ] = None,
    public_context: Annotated[
        Path | None,
        typer.Option("--public-context", help="A CKKS consortium's public context (a silo)."),
    ] = None,
    silo_keys: Annotated[
        Path | None,
        typer.Option("--silo-keys", help="The silo's receipt key (a `keyholder silo-keys` file)."),
    ] = None,
    manifest: Annotated[
        Path | None,
        typer.Option(
            "--manifest",
            help="The signed release manifest to attest with (`shoal attest manifest`).",
        ),
    ] = None,
) -> None:
    """Enroll, then check in, train and upload until the run finishes (or N tasks).

    The client app is the job config's \\[app] client (or --app); it is told
    --partition-index, --num-partitions and the --option values. The device
    state it reports (a ClientApp's device_state) goes with the enrollment
    and every check-in; without one, every fact is reported unknown. A silo of a
    homomorphic (CKKS) consortium also gives --public-context and --silo-keys:
    it encrypts its updates under that context only. With --manifest, every
    enrollment and check-in attests the code installed here against it. With
    the job's \\[features] module on this machine, the app computes with that
    copy and no other; else with the module each task names, from the
    coordinator, checked against the sha256 signed with the task's model.
    """
    from shoal.secure.homomorphic import SiloCredentials
    from shoal.transport.certs import CertificateFiles, load_channel_credentials
    from shoal.transport.grpc_link import GrpcLink
    from shoal.transport.signing import generate_client_key

    if ca is None and not insecure:
        raise ConfigError("--ca: a client pins the deployment's CA; or pass --insecure explicitly")
    if (public_context is None) != (silo_keys is None):
        raise ConfigError("--public-context and --silo-keys: a silo needs both, or neither")
    if (certificate is None) != (certificate_key is None):
        raise ConfigError("--cert and --key: mutual TLS needs the certificate and its key")
    if certificate is not None and ca is None:
        raise ConfigError("--cert: mutual TLS is TLS: give the deployment's CA with --ca")
    config = with_config_folder(load_config(config_path), config_path)
    spec = app_spec or config.app.client
    pinned = pinned_coordinator_key(coordinator_key, config.client.coordinator_key, ca, insecure)
    app = load_client_app(spec, search_path=app_search_path(config))
    attester = None if manifest is None else _manifest_attester(manifest, spec)
    enrollment = load_or_create_enrollment(state_dir, generate_client_key, client_id=client_id)
    context = ClientContext(
        client_id=enrollment.client_id,
        partition_index=partition_index,
        num_partitions=(
            num_partitions
            if num_partitions is not None or partition_index is None
            else config.data.num_clients
        ),
        options={**config.app.options, **parse_options(options or [])},
        seed=config.run.seed,
        config=config,
    )
    app.report_device_state(context)  # a provider that cannot answer is refused before enrolling
    source = _feature_source(config, lambda module: app(replace(context, features=module)))
    if source.prebuilt is None:
        console.print(
            "the job's feature module is not on this machine: the coordinator's is used "
            + ("(as pinned by features.sha256)" if source.pinned else "(as signed with its model)")
        )
    elif source.prebuilt[0] is not None:
        local = source.prebuilt[0]
        console.print(
            f"feature module {escape(local.name)} {escape(local.version)} "
            f"(sha256 {local.sha256[:16]}...), pinned"
        )
    silo = None
    if public_context is not None and silo_keys is not None:
        silo = SiloCredentials.load(
            enrollment.client_id, public_context=public_context, silo_keys=silo_keys
        )
    own = None if certificate is None or certificate_key is None else (certificate, certificate_key)
    credentials = (
        None
        if ca is None
        else load_channel_credentials(ca, CertificateFiles(*own) if own else None)
    )

    def on_event(line: str) -> None:
        console.print(escape(line))

    if pinned is None:
        console.print(
            "[yellow]warning:[/yellow] no coordinator key is pinned (--insecure): "
            "global models are NOT verified"
        )
    else:
        console.print(f"pinned coordinator key {pinned.key_id}")

    async def main() -> None:
        link = GrpcLink(coordinator, credentials=credentials, enrollment_token=token)
        runtime = ClientRuntime(
            source,  # the app, built once the run's feature module is fetched and checked
            link,
            enrollment,
            device_state=lambda: app.report_device_state(context),  # fresh at every check-in
            silo=silo,
            on_event=on_event,
            privacy_floor=PrivacyFloor.of(config),
            coordinator_key=pinned,
            # the job's run and model (the coordinator names its model by run.name); without
            # --config, the first signed task's
            trains_for=(
                None if config_path is None else RunPin(config.coordinator.run_id, config.run.name)
            ),
            attester=attester,
        )
        try:
            await runtime.run(max_tasks=max_tasks)
        finally:
            await link.close()

    asyncio.run(main())


def _feature_source(
    config: Config, build: Callable[[FeatureModule | None], Client]
) -> FeatureSource:
    """How a deployed client gets its feature module: the coordinator's, checked against
    ``[features] sha256``, else against the job's own ``[features] module`` when this machine
    has it (the client then computes with no other), else the one signed with each task.

    The app is built now, before the client enrolls (an app that fails is one line, at
    once), with the job's own module, or with none when the job names none; only a client
    whose job names a module it does not have waits for the coordinator's to build it."""
    section = config.features
    limits = section.limits()
    local = None
    if section.module is not None and Path(section.module).exists():
        local = run_features(config)  # checked against features.sha256 when it pins one
    elif section.module is not None or section.sha256 is not None:  # the coordinator's, later
        return FeatureSource(build, limits=limits, pinned=section.sha256)
    try:
        client = build(local)
    except ShoalError:
        raise
    except Exception as exc:  # the user's factory: one clear line, not a traceback
        raise ConfigError(f"the client app failed: {type(exc).__name__}: {exc}") from exc
    pinned = section.sha256 or (None if local is None else local.sha256)
    return FeatureSource(build, limits=limits, pinned=pinned, prebuilt=(local, client))


def pinned_coordinator_key(
    option: Path | None, configured: str | None, ca: Path | None, insecure: bool
) -> PinnedKey | None:
    """The key a client pins: --coordinator-key, else [client] coordinator_key, else the
    deployment's model-signing.pub beside --ca; none only with --insecure."""
    from shoal.governance.model_signing import PUBLIC_KEY_FILE, load_public_key

    if option is not None:
        return load_public_key(option)
    if configured is not None:
        return load_public_key(configured)
    if ca is not None and (ca.parent / PUBLIC_KEY_FILE).exists():
        return load_public_key(ca.parent / PUBLIC_KEY_FILE)
    if insecure:
        return None
    raise ConfigError(
        "--coordinator-key: a client pins the coordinator's model-signing key "
        f"({PUBLIC_KEY_FILE} from `shoal certs init` or `shoal coordinator key`); "
        "or pass --insecure explicitly"
    )


def _manifest_attester(path: Path, app_spec: str) -> ManifestAttester:
    """The attester of a shipped manifest; a warning when this install does not match it."""
    signed = SignedManifest.read(path)
    if signed.statement.app != app_spec:
        raise ConfigError(
            f"--manifest {path} is the manifest of {signed.statement.app}, not of {app_spec}"
        )
    attester = ManifestAttester(signed, app_spec=app_spec)
    statement = signed.statement.components
    differ = [name for name, sha in attester.measured().items() if statement[name].sha256 != sha]
    if differ:
        console.print(
            f"[yellow]warning:[/] the installed {' and '.join(differ)} code does not match "
            f"{escape(str(path))}: an attesting coordinator will refuse this client"
        )
    return attester


@demo_app.command("network")
@user_errors
def demo_network_command(
    clients: Annotated[
        int, typer.Option("--clients", "-n", min=2, max=256, help="Client processes.")
    ] = 10,
    rounds: Annotated[int, typer.Option("--rounds", "-r", min=1, help="Training rounds.")] = 5,
    port: Annotated[
        int, typer.Option("--port", min=1, max=MAX_PORT, help="Coordinator port on 127.0.0.1.")
    ] = 50071,
    secure: Annotated[
        bool, typer.Option("--secure", help="Aggregate with SecAgg+: the coordinator sees sums.")
    ] = False,
) -> None:
    """A coordinator with TLS and N client processes on 127.0.0.1, training on digits."""
    from shoal.transport.certs import init_certificates

    with tempfile.TemporaryDirectory(prefix="shoal-demo-") as folder:
        base = Path(folder)
        init_certificates(base / "certs")
        config = base / "job.toml"
        token = secrets.token_urlsafe(16)  # a secret of its own, as a deployment's would be
        config.write_text(
            _demo_config(
                base, clients=clients, rounds=rounds, port=port, secure=secure, token=token
            )
        )
        shoal = [sys.executable, "-m", "shoal"]
        coordinator = subprocess.Popen([*shoal, "coordinator", "serve", "--config", str(config)])
        workers = [
            subprocess.Popen(
                [
                    *shoal,
                    "client",
                    "run",
                    "--coordinator",
                    f"127.0.0.1:{port}",
                    "--config",
                    str(config),
                    "--state-dir",
                    str(base / f"client-{index}"),
                    "--token",
                    token,
                    "--ca",
                    str(base / "certs" / "ca.pem"),
                    "--partition-index",
                    str(index),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            for index in range(clients)
        ]
        try:
            code = coordinator.wait()
        finally:
            for worker in workers:
                worker.terminate()
            for worker in workers:
                worker.wait()
        if code != 0:
            raise typer.Exit(code)


def _demo_config(
    base: Path, *, clients: int, rounds: int, port: int, secure: bool, token: str
) -> str:
    target = max(2, min(10, clients * 4 // 5))
    plain = f"""
[run]
rounds = {rounds}
[round]
clients_per_round = {target}
over_selection = 1.0
quorum = 0.8
deadline_s = 30
[client]
epochs = 2
batch_size = 16
learning_rate = 0.2
[evaluation]
every = 2
clients = {target}
[data]
num_clients = {clients}
[coordinator]
listen = "127.0.0.1:{port}"
state_dir = "{base / "state"}"
certificates = "{base / "certs"}"
enrollment_tokens = [{{ token = "{token}", max_uses = {clients} }}]
retry_after_s = 0.5
linger_s = 5
"""
    return plain + _DEMO_SECURE if secure else plain


_DEMO_SECURE = """
[secure_aggregation]
protocol = "secagg+"
advertise_keys_s = 10
share_keys_s = 10
unmask_s = 10
"""
