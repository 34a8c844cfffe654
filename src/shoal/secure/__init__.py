"""Secure aggregation: the coordinator learns only the sum of the updates (issue in progress)."""

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
    "PRIME",
    "bytes_to_field",
    "field_to_bytes",
    "lagrange_at_zero",
    "random_field_elements",
    "reconstruct",
    "share",
]
