"""Ready-made apps, written with the same public API as a user's (``shoal.client.app``)."""

from shoal.apps.builtin import DataScenario, client_app, scenario_of, server_app

__all__ = ["DataScenario", "client_app", "scenario_of", "server_app"]
