"""Homomorphic rounds in the coordinator: add the silos' CKKS ciphertexts, never decrypt them.

A :class:`CkksRound` has the interface of :class:`~shoal.coordinator.secure.SecureRound`,
so the engine drives both the same way. Each silo's fit task carries an
:class:`EncryptionRequest`; its :class:`EncryptedUpdate` is checked against
its signed receipt and added to a running encrypted sum. When the target
count, every silo or the deadline is reached, the round asks the key holder
(:class:`RequestDecryption`) to decrypt the sum, and the answer
(``AggregateDecrypted``) finishes it. The coordinator holds only the public
context: it can add ciphertexts, not read them.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from shoal.coordinator.events import (
    Action,
    AggregateDecrypted,
    RequestDecryption,
    ScheduleDeadline,
    SendFitTask,
)
from shoal.core.errors import ProtocolError, SecurityError
from shoal.secure.ckks import EncryptedSum
from shoal.secure.homomorphic import (
    EncryptedUpdate,
    EncryptionRequest,
    decode_decrypted_sum,
)
from shoal.secure.keyholder import ContributionReceipt, verify_contribution
from shoal.secure.messages import ClientMessage, Stage, StaleMessage
from shoal.secure.server import Aborted, SecureSum, SumReady

CKKS = "ckks"
_STAGE = "encrypted_input"


class CkksStage(enum.Enum):
    """Where a homomorphic round stands."""

    COLLECTING = "collecting"
    DECRYPTING = "decrypting"
    DONE = "done"


class CkksRound:
    """One fit round under CKKS; see the module docstring."""

    protocol = CKKS

    def __init__(
        self,
        *,
        run_id: str,
        round_number: int,
        cohort: Sequence[str],
        vector_length: int,
        target: int,
        min_contributors: int,
        public_context: bytes,
        silo_keys: Mapping[str, bytes] | None,
        deadline_s: float,
    ) -> None:
        self.run_id = run_id
        self.round = round_number
        self.cohort = frozenset(cohort)
        self.vector_length = vector_length
        self.target = target
        self.min_contributors = min_contributors
        self.deadline_s = deadline_s
        self.stage = CkksStage.COLLECTING
        self._silo_keys = silo_keys
        self._public_context_sha256 = hashlib.sha256(public_context).hexdigest()
        self._sum = EncryptedSum(public_context)
        self._receipts: dict[str, ContributionReceipt] = {}
        self._gone: set[str] = set()

    @property
    def survivors_needed(self) -> int:
        """The fewest silos that must contribute for the round to give a sum."""
        return self.min_contributors

    def start(self, now: float, task: Callable[[str], SendFitTask]) -> list[Action]:
        request = EncryptionRequest(self.round, self.run_id, self._public_context_sha256)
        actions: list[Action] = [
            replace(task(client), secure=request) for client in sorted(self.cohort)
        ]
        # the encrypted input is the round's one stage: its deadline is that stage's
        return [*actions, ScheduleDeadline(self.round, now + self.deadline_s, Stage.MASKED_INPUT)]

    def message(
        self,
        client_id: str,
        message: ClientMessage | EncryptedUpdate,
        now: float,
        task: Callable[[str], SendFitTask],
    ) -> tuple[list[Action], SumReady | Aborted | None]:
        """Add a silo's ciphertext; raises StaleMessage, ProtocolError or SecurityError."""
        if not isinstance(message, EncryptedUpdate):
            raise ProtocolError(
                f"a homomorphic round takes encrypted updates, not {message.stage.label}"
            )
        if message.round != self.round or self.stage is not CkksStage.COLLECTING:
            raise StaleMessage(
                f"{client_id}'s encrypted update came after round {self.round} closed"
            )
        if client_id in self._receipts:
            raise ProtocolError(f"{client_id} already sent its encrypted update")
        if message.receipt.silo_id != client_id:
            raise SecurityError(f"{client_id} sent a receipt signed as {message.receipt.silo_id!r}")
        if message.ciphertext.length != self.vector_length + 2:
            raise ProtocolError(
                f"{client_id} sent {message.ciphertext.length} encrypted values, "
                f"expected {self.vector_length + 2}"
            )
        self._verify(client_id, message)
        self._sum.add(message.ciphertext)
        self._receipts[client_id] = message.receipt
        if len(self._receipts) >= self.target or self._receipts.keys() | self._gone >= self.cohort:
            return self._close()
        return [], None

    def dropped(
        self, client_id: str, now: float, task: Callable[[str], SendFitTask]
    ) -> tuple[list[Action], SumReady | Aborted | None]:
        if self.stage is not CkksStage.COLLECTING or client_id not in self.cohort:
            return [], None
        self._gone.add(client_id)
        if self._receipts.keys() | self._gone >= self.cohort:
            return self._close()
        return [], None

    def deadline(
        self, stage: Stage | None, now: float, task: Callable[[str], SendFitTask]
    ) -> tuple[list[Action], SumReady | Aborted | None]:
        if self.stage is not CkksStage.COLLECTING:
            return [], None
        return self._close()

    def decrypted(self, event: AggregateDecrypted) -> SumReady | Aborted | None:
        """The key holder's answer; an answer for another round or a second one is ignored."""
        if event.round != self.round or self.stage is not CkksStage.DECRYPTING:
            return None
        self.stage = CkksStage.DONE
        dropped = {_STAGE: len(self.cohort) - len(self._receipts)}
        if event.total is None:
            return Aborted(f"the key holder refused to decrypt: {event.error}", dropped)
        try:
            decoded = decode_decrypted_sum(event.total.astype("float64"))
        except ProtocolError as exc:
            return Aborted(str(exc), dropped)
        contributors = tuple(sorted(self._receipts))
        return SumReady(SecureSum(decoded, contributors, recovered=(), dropped=dropped))

    def _verify(self, client_id: str, message: EncryptedUpdate) -> None:
        if self._silo_keys is None:  # no key registry here: the key holder checks signatures
            if message.ciphertext.sha256() != message.receipt.ciphertext_sha256:
                raise SecurityError(f"the ciphertext from {client_id} does not match its receipt")
            return
        key = self._silo_keys.get(client_id)
        if key is None:
            raise SecurityError(f"{client_id} is not a registered silo of this consortium")
        verify_contribution(
            key, message.receipt, message.ciphertext, run_id=self.run_id, round=self.round
        )

    def _close(self) -> tuple[list[Action], SumReady | Aborted | None]:
        count = len(self._receipts)
        if count < self.min_contributors:
            self.stage = CkksStage.DONE
            dropped = {_STAGE: len(self.cohort) - count}
            return [], Aborted(
                f"{count} encrypted updates arrived, the key holder needs {self.min_contributors}",
                dropped,
            )
        self.stage = CkksStage.DECRYPTING
        receipts = tuple(self._receipts[client] for client in sorted(self._receipts))
        return [RequestDecryption(self.round, self._sum.result(), receipts)], None
