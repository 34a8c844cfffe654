"""A deployed client's feature module: fetched from its coordinator, checked, and its app built
with it (see docs/portable-features.md).

A client app that turns raw records into features with the run's module
(``context.features``) cannot be built before the client knows the module.
:class:`FeatureSource` is how ``shoal client run`` hands the runtime its app
instead of a built client: once enrolled, the runtime asks the coordinator for
the run's module, checks it (the ABI, and the pin when the client has one), and
builds the client with it. Every task then names the module the coordinator
signed with the task's model version; a task naming another is refused unless
the source can fetch and check that one (a pinned client refuses any other).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from shoal.client.api import Client
from shoal.core.errors import ConfigError, MissingExtraError, SecurityError
from shoal.features import FeatureLimits, FeatureModule


@dataclass(frozen=True, slots=True)
class FeatureSource:
    """The app to build once the run's feature module is known, the limits a module runs
    within here, the module's sha256 this client accepts (None: the one the coordinator
    signs with each model version), and the client already built with the module it was
    built with (``prebuilt``: its own copy, or none), kept while the run's is that one."""

    build: Callable[[FeatureModule | None], Client]
    limits: FeatureLimits = field(default_factory=FeatureLimits)
    pinned: str | None = None
    prebuilt: tuple[FeatureModule | None, Client] | None = None

    def module(self, data: bytes | None, *, expected: str | None) -> FeatureModule | None:
        """The module of ``data``, the bytes downloaded for the module a task names
        (``expected``, which :meth:`refuses` let through; None: the task names none), checked:
        its sha256 against ``expected`` before a byte of it is compiled, then its ABI. A
        ``SecurityError`` names what is wrong."""
        if data is None:
            return None
        sha256 = hashlib.sha256(data).hexdigest()
        if sha256 != expected:
            named = "none" if expected is None else f"{expected[:16]}..."
            raise SecurityError(
                f"the coordinator's feature module has sha256 {sha256[:16]}..., and the task "
                f"names {named}"
            )
        try:  # compiled in a child process, within the compile limits
            return FeatureModule.from_bytes(data, limits=self.limits, isolated=True)
        except ConfigError as exc:
            raise SecurityError(f"the coordinator's feature module is refused: {exc}") from exc
        except (MissingExtraError, OSError) as exc:  # this client cannot run one at all
            raise SecurityError(f"this client cannot run a feature module: {exc}") from exc

    def refuses(self, sha256: str | None) -> str | None:
        """Why the module ``sha256`` (None: none) is refused before it is downloaded: it is
        not the one this client pins (None: it is not refused)."""
        if self.pinned is None or sha256 == self.pinned:
            return None
        named = "no feature module" if sha256 is None else f"the feature module {sha256[:16]}..."
        return f"the task names {named}, and this client pins {self.pinned[:16]}..."
