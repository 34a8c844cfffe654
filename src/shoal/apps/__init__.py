"""Ready-made client apps: what ``shoal client run --app MODULE:FACTORY`` loads."""

from shoal.apps.loading import AppOptions, load_app

__all__ = ["AppOptions", "load_app"]
