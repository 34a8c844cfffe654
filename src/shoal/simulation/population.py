"""The simulated population: a client app's clients, named, placed in the population and sized.

Client ``i`` of ``n`` is ``client-0000i``; its app is given the context of
partition ``i`` of ``n``. The simulator times a device by the examples it
holds: the app's ``num_examples`` where the app says, else
``devices.nominal_examples`` (the count the client reports after training
is what weighs its update). :class:`AppClients` builds any client in any
process: executors send it to their workers by value (cloudpickle), so an
app defined in a notebook or a ``python -`` script runs in a process pool.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, overload

import cloudpickle

from shoal.client.api import Client
from shoal.client.app import ClientApp, ClientContext, add_search_path
from shoal.config import Config
from shoal.core.errors import ConfigError, DataError
from shoal.features import FeatureModule
from shoal.simulation.attacks import Attackers


def client_name(index: int) -> str:
    """The id of simulated client ``index``."""
    return f"client-{index:05d}"


def client_index(client_id: str) -> int:
    """The position of a simulated client in its population."""
    try:
        return int(client_id.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        raise DataError(f"not a simulated client id: {client_id!r}") from None


class ClientNames(Sequence[str]):
    """The ids of a population of ``count``, made when asked for: a million cost nothing.

    >>> names = ClientNames(3)
    >>> list(names), names.index("client-00002"), "client-00003" in names
    (['client-00000', 'client-00001', 'client-00002'], 2, False)
    """

    def __init__(self, count: int) -> None:
        self.size = count

    def __len__(self) -> int:
        return self.size

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...
    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [client_name(i) for i in range(*index.indices(self.size))]
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"client index {index} out of range for {self.size} clients")
        return client_name(index)

    def __iter__(self) -> Iterator[str]:
        return (client_name(index) for index in range(self.size))

    def __contains__(self, client_id: object) -> bool:
        if not isinstance(client_id, str):
            return False
        try:
            index = client_index(client_id)
        except DataError:
            return False
        return 0 <= index < self.size and client_name(index) == client_id

    def index(self, client_id: object, start: int = 0, stop: int | None = None) -> int:
        """The position of ``client_id`` (ValueError when it is not one of these names)."""
        if not isinstance(client_id, str) or client_id not in self:
            raise ValueError(f"{client_id!r} is not a client of this population")
        position = client_index(client_id)
        if position < start or (stop is not None and position >= stop):
            raise ValueError(f"{client_id!r} is not between positions {start} and {stop}")
        return position


class AppClients:
    """Builds simulated client ``client_id`` through the app; picklable, cheap to send.

    A client that ``[[attack]]`` makes an attacker comes wrapped in its attack
    (:mod:`shoal.simulation.attacks`), in whatever process builds it.
    """

    def __init__(
        self,
        app: ClientApp,
        config: Config,
        options: Mapping[str, str],
        features: FeatureModule | None = None,
    ) -> None:
        self.app = app
        self.config = config
        self.options = dict(options)
        self.features = features  # sent by value once per worker, compiled there once
        self.attackers = Attackers(config, ClientNames(config.data.num_clients))

    def context(self, client_id: str) -> ClientContext:
        index = client_index(client_id)
        count = self.config.data.num_clients
        if not 0 <= index < count:
            raise DataError(f"no client {client_id!r} in a population of {count}")
        return ClientContext(
            client_id=client_id,
            partition_index=index,
            num_partitions=count,
            options=self.options,
            seed=self.config.run.seed,
            config=self.config,
            features=self.features,
        )

    def __call__(self, client_id: str) -> Client:
        client = self.app(self.context(client_id))
        return self.attackers.around(client_id, client) if self.attackers else client


class Population:
    """The clients of a simulation; see the module docstring."""

    def __init__(
        self,
        app: ClientApp,
        config: Config,
        options: Mapping[str, str],
        features: FeatureModule | None = None,
    ) -> None:
        self.app = app
        self.config = config
        self.clients = AppClients(app, config, options, features)
        self.client_ids = ClientNames(config.data.num_clients)

    def num_train_examples(self, client_id: str) -> int:
        return self._counts(client_id)[0]

    def num_eval_examples(self, client_id: str) -> int:
        return self._counts(client_id)[1]

    @functools.lru_cache(maxsize=65536)  # noqa: B019 (one population per simulation)
    def _counts(self, client_id: str) -> tuple[int, int]:
        if self.app.num_examples is None:
            nominal = self.config.devices.nominal_examples
            return nominal, nominal
        train, evaluate = self.app.num_examples(self.clients.context(client_id))
        return int(train), int(evaluate)

    def check_attacks(self) -> None:
        """Build one data attacker here: an app without the data hook is refused now, in one
        line, rather than as a failure in every round of every worker."""
        client_id = self.clients.attackers.first_data_attacker(self.client_ids)
        if client_id is not None:
            self.clients(client_id)

    def first_client(self) -> Client:
        """Client 0, built in this process (for the initial model when the app gives none)."""
        return self.clients(self.client_ids[0])


def packed(
    clients: Callable[[str], Client], search_path: Sequence[str | Path]
) -> tuple[bytes, list[str]]:
    """The client factory by value, and the folders a worker must import the app from.

    A factory that wraps another (the simulator's attackers, planted canaries) names it as
    ``wrapped``: the user's app module under every layer goes by value.
    """
    inner: Any = clients
    while getattr(inner, "wrapped", None) is not None:
        inner = inner.wrapped
    targets = (
        (inner.app.client_fn, inner.app.num_examples) if isinstance(inner, AppClients) else (inner,)
    )
    for target in targets:
        _by_value(getattr(target, "__module__", None))
    try:
        blob = cloudpickle.dumps(clients)
    except Exception as exc:
        raise ConfigError(
            f"the client app cannot be sent to worker processes ({type(exc).__name__}: {exc}); "
            "set simulation.workers = 0 to run the clients in this process"
        ) from exc
    return blob, add_search_path(search_path)


def _by_value(module_name: str | None) -> None:
    """Send a user's app module by value: a worker may not be able to import it by name."""
    module = sys.modules.get(module_name or "")
    if module is None or module_name in ("__main__", None) or module_name.startswith("shoal."):
        return
    try:
        cloudpickle.register_pickle_by_value(module)
    except ValueError:  # not a plain module: pickled by reference, as usual
        return


def unpacked(blob: bytes, search_path: Sequence[str]) -> Callable[[str], Client]:
    """In a worker: the client factory that :func:`packed` sent."""
    add_search_path(search_path)
    clients: Callable[[str], Client] = cloudpickle.loads(blob)
    return clients
