"""A client release for attestation tests: a user's app module, release keys, signed manifests."""

from __future__ import annotations

import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from shoal.governance import (
    ManifestAttester,
    SignedManifest,
    generate_release_key,
    load_release_private_key,
    release_statement,
    sign_manifest,
)

APP_SOURCE = '''"""A user's client app: the built-in digits model behind the public API."""

from shoal.apps import client_app


def client_fn(context):
    return client_app(context)
'''


@dataclass
class Release:
    """An app module in its own folder (on ``sys.path``) and the keys that sign its manifests."""

    folder: Path
    module: str

    @classmethod
    def make(cls, folder: Path) -> Release:
        """A fresh app module with a unique name, importable at once, and two release keys."""
        folder.mkdir(parents=True, exist_ok=True)
        module = f"user_app_{uuid.uuid4().hex[:12]}"  # never one a previous test imported
        (folder / f"{module}.py").write_text(APP_SOURCE)
        sys.path.insert(0, str(folder))
        for name in ("release", "untrusted"):
            generate_release_key(folder / f"{name}.key", folder / f"{name}.pub")
        return cls(folder, module)

    @property
    def app(self) -> str:
        return f"{self.module}:client_fn"

    @property
    def app_file(self) -> Path:
        return self.folder / f"{self.module}.py"

    @property
    def public_key(self) -> Path:
        return self.folder / "release.pub"

    def manifest(self, *, key: str = "release", label: str = "") -> SignedManifest:
        """A manifest of the code installed now, signed with the ``key`` release key."""
        private = load_release_private_key(self.folder / f"{key}.key")
        return sign_manifest(release_statement(self.app, label=label), private)

    def attester(self, manifest: SignedManifest) -> ManifestAttester:
        return ManifestAttester(manifest, app_spec=self.app)

    def close(self) -> None:
        if str(self.folder) in sys.path:
            sys.path.remove(str(self.folder))
