"""A server may not lower the reconstruction threshold below the safe floor.

With k neighbours a client's secrets have k + 1 holders; unless more than
half of them are needed, one server can collect a self-mask seed from one
half and the matching mask key from the other (Bell et al. 2020).
"""

from __future__ import annotations

import pytest

from shoal.config import parse_config
from shoal.coordinator.secure import SecureSettings
from shoal.core.errors import ConfigError, ProtocolError
from shoal.core.sharing import minimum_threshold, reconstruction_threshold
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


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.49])
def test_configuration_refuses_a_threshold_below_the_floor_in_one_line(fraction: float) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config({"secure_aggregation": {"reconstruction_threshold": fraction}})
    message = str(refused.value)
    assert message.startswith("secure_aggregation.reconstruction_threshold: ")
    assert "below the safe floor 0.5" in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"below the safe floor 0\.5"):
        SecureSettings(run_id="r", quantization=Quantization(), threshold_fraction=fraction)


@pytest.mark.parametrize("neighbours", range(40))
def test_the_default_threshold_is_the_floor_and_two_halves_cannot_both_reach_it(
    neighbours: int,
) -> None:
    holders = neighbours + 1
    floor = minimum_threshold(neighbours)
    assert reconstruction_threshold(degree=max(neighbours, 1), num_nodes=holders) == floor
    assert 2 * floor > holders  # disjoint holders cannot give both secrets
    assert floor <= holders
