"""Secure aggregation: the coordinator learns only the sum of the updates.

SecAgg+ (``client``, ``server`` and their ``messages``) masks each update so
that only the sum can be unmasked; ``ckks`` and ``keyholder`` aggregate
homomorphically across silos. The key holder's modules are imported from
their own paths (``shoal.secure.keyholder``, ``shoal.transport.keyholder_service``,
``shoal.secure.homomorphic``): they build on the transport package.
"""

from shoal.secure.ckks import (
    CkksParameters,
    ConsortiumKeys,
    EncryptedSum,
    EncryptedVector,
    decrypt_vector,
    encrypt_vector,
    generate_keys,
    sum_encrypted,
)
from shoal.secure.client import CLIENT_TRANSITIONS, ClientStage, Contribution, SecAggClient
from shoal.secure.crypto import KeyPair, Purpose, SessionContext, agree, expand_mask
from shoal.secure.graph import default_degree, neighbour_graph
from shoal.secure.loopback import LoopbackOutcome, reconstruction_threshold, run_loopback_round
from shoal.secure.messages import (
    AdvertiseKeysRequest,
    ClientMessage,
    KeysAdvertised,
    MaskedInput,
    MaskedInputRequest,
    PublicKeys,
    ServerRequest,
    SessionConfig,
    ShareKeysRequest,
    SharesSent,
    Stage,
    StaleMessage,
    UnmaskRequest,
    UnmaskShares,
)
from shoal.secure.quantization import DecodedSum, Quantization
from shoal.secure.serde import decode_message, encode_message, message_size
from shoal.secure.server import (
    SERVER_TRANSITIONS,
    Aborted,
    ClientDropped,
    MessageReceived,
    ScheduleStageDeadline,
    SecAggServer,
    SecureSum,
    SendRequest,
    StageDeadline,
    StageDeadlines,
    SumReady,
)
from shoal.secure.shamir import (
    PRIME,
    bytes_to_field,
    field_to_bytes,
    lagrange_at_zero,
    random_field_elements,
    reconstruct,
    share,
)

__all__ = [
    "CLIENT_TRANSITIONS",
    "PRIME",
    "SERVER_TRANSITIONS",
    "Aborted",
    "AdvertiseKeysRequest",
    "CkksParameters",
    "ClientDropped",
    "ClientMessage",
    "ClientStage",
    "ConsortiumKeys",
    "Contribution",
    "DecodedSum",
    "EncryptedSum",
    "EncryptedVector",
    "KeyPair",
    "KeysAdvertised",
    "LoopbackOutcome",
    "MaskedInput",
    "MaskedInputRequest",
    "MessageReceived",
    "PublicKeys",
    "Purpose",
    "Quantization",
    "ScheduleStageDeadline",
    "SecAggClient",
    "SecAggServer",
    "SecureSum",
    "SendRequest",
    "ServerRequest",
    "SessionConfig",
    "SessionContext",
    "ShareKeysRequest",
    "SharesSent",
    "Stage",
    "StageDeadline",
    "StageDeadlines",
    "StaleMessage",
    "SumReady",
    "UnmaskRequest",
    "UnmaskShares",
    "agree",
    "bytes_to_field",
    "decode_message",
    "decrypt_vector",
    "default_degree",
    "encode_message",
    "encrypt_vector",
    "expand_mask",
    "field_to_bytes",
    "generate_keys",
    "lagrange_at_zero",
    "message_size",
    "neighbour_graph",
    "random_field_elements",
    "reconstruct",
    "reconstruction_threshold",
    "run_loopback_round",
    "share",
    "sum_encrypted",
]
