"""A server may not lower the reconstruction threshold below the safe floor.

With k neighbours a client's secrets have k + 1 holders; unless more than
half of them are needed, one server can collect a self-mask seed from one
half and the matching mask key from the other (Bell et al. 2020).
"""

from __future__ import annotations

import pytest

from shoal.core.errors import ProtocolError
from shoal.secure.client import SecAggClient
from shoal.secure.consistency import IdentityKey
from shoal.secure.messages import AdvertiseKeysRequest, SessionConfig
from shoal.secure.quantization import Quantization


@pytest.mark.parametrize(("neighbours", "threshold"), [(7, 1), (7, 4), (2, 1), (19, 10)])
def test_a_client_refuses_a_threshold_below_the_floor(neighbours: int, threshold: int) -> None:
    session = SessionConfig("run", 1, neighbours + 1, 8, threshold, Quantization())
    client = SecAggClient(round=1, identity=IdentityKey.generate())
    request = AdvertiseKeysRequest(1, session, 1, frozenset(range(2, neighbours + 2)))
    with pytest.raises(ProtocolError, match="floor"):
        client.handle(request)
