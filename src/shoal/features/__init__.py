"""Portable features: one WebAssembly module, checked against the ``shoal-features`` ABI and
run in a sandbox, computes every client's features with the same bits (see
docs/portable-features.md)."""

from shoal.features.manifest import (
    ABI_VERSION,
    MANIFEST_SECTION,
    FeatureManifest,
    read_manifest,
    with_manifest,
)
from shoal.features.module import FeatureLimits, FeatureModule

__all__ = [
    "ABI_VERSION",
    "MANIFEST_SECTION",
    "FeatureLimits",
    "FeatureManifest",
    "FeatureModule",
    "read_manifest",
    "with_manifest",
]
