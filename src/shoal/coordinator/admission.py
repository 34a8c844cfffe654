"""Who may talk to the coordinator: signed requests from enrolled clients, enrollments by token.

:class:`Admission` answers the service's questions before any request is
acted on: is this request signed by an enrolled, active client, fresh, and
for this run (:meth:`Admission.authenticate`), and may this new client
enroll with this token (:meth:`Admission.admit`). Every no is a
:class:`Refused` carrying the reject code the client is answered with; the
service counts and logs it. The tokens listed in the config are stored in
the registry with their uses and expiry when the admission is made, and
redeemed there like issued ones. When the job requires attestation, the
enrollment and every check-in must also carry evidence, made for that
request, of an allowed build (:meth:`Admission.attest`, UNATTESTED
otherwise); it is checked before a token is redeemed or a sighting recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from shoal.core.errors import NotFoundError, ProtocolError, SecurityError
from shoal.governance.attestation import AttestationGate, AttestationRefused, Binding, Evidence
from shoal.registry import (
    ClientRecord,
    ClientRegistry,
    ClientStatus,
    EnrollmentTokens,
    ListedToken,
)
from shoal.transport import serde
from shoal.transport.messages import EnrollmentRequest, RejectCode
from shoal.transport.signing import ReplayGuard, RequestAuth, generate_client_key


class Refused(Exception):
    """A request that must be answered with ``code``; caught inside the service."""

    def __init__(self, code: RejectCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


@contextmanager
def malformed(*kinds: type[Exception]) -> Iterator[None]:
    """Refuse as MALFORMED what raises one of ``kinds`` (by default, a ``ProtocolError``)."""
    caught = kinds or (ProtocolError,)
    try:
        yield
    except caught as exc:
        raise Refused(RejectCode.MALFORMED, str(exc) or "an empty request") from exc


# Whether an id is enrolled is told to no one: an unknown id, one without a key and a request
# its key did not sign get one answer, after one signature check each.
_STAND_IN_KEY = generate_client_key()[1]
_NOT_ENROLLED = "no client is enrolled with this id and the key that signed the request"


class Admission:
    """Authenticates requests and admits enrollments for the run ``run_id``."""

    def __init__(
        self,
        clients: ClientRegistry,
        *,
        run_id: str,
        listed_tokens: Sequence[ListedToken],
        clock: Callable[[], float],
        attestation: AttestationGate | None = None,
    ) -> None:
        self.clients = clients
        self.attestation = attestation  # None: the job admits clients without attestation
        self.run_id = run_id
        self.clock = clock
        self.replay = ReplayGuard()
        self.tokens = EnrollmentTokens(clients.database)
        self.tokens.sync_listed(listed_tokens, now=self.now())

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def authenticate(self, message: Any, *, this_run: bool = False) -> RequestAuth:
        """The verified auth of an enrolled, active client's request; ``this_run`` also
        requires it to name our run."""
        return self.authenticate_client(message, this_run=this_run)[0]

    def authenticate_client(
        self, message: Any, *, this_run: bool = False
    ) -> tuple[RequestAuth, ClientRecord]:
        """The verified auth of an enrolled, active client's request, and its record (read
        once). Whether a client is enrolled, and whether it is suspended, is told only to a
        request its key signed: to anyone else, every id is UNKNOWN_CLIENT."""
        with malformed():
            auth = serde.decode_auth(message)
        try:
            record: ClientRecord | None = self.clients.get(auth.client_id)
        except NotFoundError:
            record = None
        key = None if record is None else record.public_key
        try:  # a stand-in key for an unknown id: the same work, and the same answer
            serde.verify_message(message, _STAND_IN_KEY if key is None else key)
        except (SecurityError, ProtocolError):
            key = None
        if record is None or key is None:
            raise Refused(RejectCode.UNKNOWN_CLIENT, _NOT_ENROLLED)
        if record.status is not ClientStatus.ACTIVE:
            raise Refused(RejectCode.SUSPENDED, f"the client is {record.status.value.lower()}")
        self._fresh(auth, key, this_run=this_run)
        return auth, record

    def authenticate_enrollment(
        self,
        message: Any,
        enrollment: EnrollmentRequest,
        *,
        before_token: Callable[[], None] | None = None,
    ) -> RequestAuth:
        """The verified auth of an enrollment, signed with the key it enrolls.

        ``before_token`` runs before a token is tried, and may refuse the request (a source
        that guessed too often, :mod:`shoal.coordinator.guesses`): an enrolled client that
        rejoins with its key tries none, and is not held up.

        The signature proves only that the sender holds that key, not that the
        client id is its: so before its nonce is remembered (see
        :class:`~shoal.transport.signing.ReplayGuard`), the id must be enrolled
        with that very key (a restart), or the token must be good for the id
        now (BAD_TOKEN). Only then is an id taken by another key refused
        (BAD_SIGNATURE): a sender without a token learns nothing of who is
        enrolled, and no one can use up a client's requests by naming it.
        """
        with malformed():
            auth = serde.decode_auth(message)
        key = enrollment.public_key
        self._verify(message, key)
        try:
            known: bytes | None = self.clients.get(auth.client_id).public_key
        except NotFoundError:
            known = None
        if known != key:
            if before_token is not None:
                before_token()
            try:
                self.tokens.check(
                    enrollment.enrollment_token, client_id=auth.client_id, now=self.now()
                )
            except SecurityError as exc:
                raise Refused(RejectCode.BAD_TOKEN, str(exc)) from exc
            if known is not None:
                raise Refused(
                    RejectCode.BAD_SIGNATURE,
                    f"client {auth.client_id!r} is enrolled with another public key",
                )
        self._fresh(auth, key, this_run=False)
        return auth

    def _verify(self, message: Any, public_key: bytes) -> None:
        try:
            serde.verify_message(message, public_key)
        except (SecurityError, ProtocolError) as exc:
            raise Refused(RejectCode.BAD_SIGNATURE, str(exc)) from exc

    def _fresh(self, auth: RequestAuth, public_key: bytes, *, this_run: bool) -> None:
        """Refuse a replayed or stale request (its signature verified with ``public_key``),
        and with ``this_run``, one that names another run."""
        try:
            self.replay.check(auth, key=public_key, now=self.clock())
        except SecurityError as exc:
            raise Refused(RejectCode.REPLAYED, str(exc)) from exc
        if this_run and auth.run_id != self.run_id:
            raise Refused(RejectCode.WRONG_ROUND, f"this coordinator runs {self.run_id}")

    def attest(
        self,
        auth: RequestAuth,
        public_key: bytes,
        evidence: Evidence | None,
        *,
        enrolled: bool | None = None,
    ) -> None:
        """Refuse (UNATTESTED) a request whose evidence is not of an allowed build, when required.

        The evidence must be made for this request: the binding is the
        client's id and key and the run and nonce it signed. The refusal of
        an ``enrolled`` client (None: look it up) bars it from selection
        until a check passes.
        """
        if self.attestation is None:
            return
        binding = Binding(auth.client_id, public_key, auth.run_id, auth.nonce)
        if enrolled is None:
            enrolled = self.is_enrolled(auth.client_id)
        try:
            self.attestation.check(evidence, binding, remember=enrolled)
        except AttestationRefused as exc:
            raise Refused(RejectCode.UNATTESTED, str(exc)) from exc

    def check_attested(self, client_id: str) -> None:
        """Refuse (UNATTESTED) a client whose latest attestation was refused, until one passes."""
        if self.attestation is None:
            return
        refusal = self.attestation.refused().get(client_id)
        if refusal is not None:
            raise Refused(RejectCode.UNATTESTED, f"its last check-in was refused: {refusal}")

    def is_enrolled(self, client_id: str) -> bool:
        """Whether the registry holds ``client_id`` (in any status)."""
        try:
            self.clients.get(client_id)
        except NotFoundError:
            return False
        return True

    def admit(self, client_id: str, token: str) -> None:
        """Let a client enroll: enrolled with a key (a restart), or with a token it redeems.

        A record without a key (enrolled by an operator, say) is no free
        identity: whoever claims it redeems a token like a new client.
        """
        try:
            if self.clients.get(client_id).public_key is not None:
                return  # re-enrolling is checked against its key: no token is used up
        except NotFoundError:
            pass
        try:
            self.tokens.redeem(token, client_id=client_id, now=self.now())
        except SecurityError as exc:
            raise Refused(RejectCode.BAD_TOKEN, str(exc)) from exc
