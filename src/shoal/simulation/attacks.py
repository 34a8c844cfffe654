"""Simulated attackers (``[[attack]]``): who attacks, and what each kind does to honest work.

An attack wraps the user's client in the simulator's client factory, so it
works for any client app through the public API:

- model attacks act on the update the honest client computed: ``sign_flip``
  sends its negation, ``scaling`` multiplies it by ``scale`` (model
  replacement: by n / eta, Bagdasaryan et al. 2020), ``gaussian_noise``
  sends N(0, noise_std^2) noise instead, ``free_rider`` sends an all-zero
  update (the global model back) and still claims its examples;
- data attacks rewrite the training examples through
  :class:`~shoal.client.api.TransformableData`: ``label_flip`` trains on
  y -> C - 1 - y (or every label -> ``target_label``), ``backdoor`` puts a
  trigger on ``poison_fraction`` of the examples and labels them
  ``target_label``, then boosts its update by ``scale``.

Who attacks is a keyed hash of (run seed, entry index, client id): the same
in the coordinator's process and in every worker, and independent of the
rest of the population. A client picked by several entries follows the
first. Outside ``[from_round, until_round]`` an attacker is honest.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from shoal.client.api import (
    Client,
    EvaluateConfig,
    EvaluateResult,
    FitConfig,
    FitResult,
    TransformableData,
    fit_update,
)
from shoal.config import AttackEntry, Config
from shoal.coordinator.selection import client_key
from shoal.core.errors import ConfigError
from shoal.core.parameters import Parameters, Vector

DATA_ATTACKS = frozenset({"label_flip", "backdoor"})
_HASH_SPACE = float(2**64)
_NOISE_STREAM = 0xA77AC
_POISON_STREAM = 0xBAD0


def attack_draw(*, seed: int, attack_index: int, client_id: str) -> float:
    """A client's uniform draw in [0, 1) for attack entry ``attack_index``: a keyed hash."""
    key = seed.to_bytes(8, "big", signed=False)
    material = f"{attack_index}/{client_id}".encode()
    digest = hashlib.blake2b(material, key=key, digest_size=8).digest()
    return int.from_bytes(digest, "big") / _HASH_SPACE


def default_scale(config: Config) -> float:
    """n / eta: the round's clients over the server learning rate (Bagdasaryan et al.)."""
    eta = config.strategy.server_learning_rate or 1.0
    return config.round.clients_per_round / eta


# --- what an attacker does to an update ---------------------------------------------------


def sign_flipped(update: Vector) -> Vector:
    """The honest update, negated."""
    return np.negative(update)


def scaled(update: Vector, *, scale: float) -> Vector:
    """The honest update times ``scale``."""
    return (update * np.float32(scale)).astype(np.float32)


def gaussian_update(size: int, *, std: float, rng: np.random.Generator) -> Vector:
    """Pure N(0, std^2) noise in place of an update."""
    return rng.normal(0.0, std, size).astype(np.float32)


def free_ride(update: Vector) -> Vector:
    """No update at all: the global model sent back."""
    return np.zeros_like(update)


# --- what an attacker does to its data ----------------------------------------------------


def flipped_labels(
    labels: np.ndarray, *, num_classes: int, target_label: int | None = None
) -> np.ndarray:
    """Every label -> ``target_label``, or y -> C - 1 - y when it is None."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigError(
            f"attack.num_classes: labels run to {int(labels.max())}, past {num_classes} classes"
        )
    if target_label is not None:
        return np.full_like(labels, target_label)
    return (num_classes - 1 - labels).astype(labels.dtype)


def with_trigger(
    features: np.ndarray, *, trigger: Iterable[int], value: float | None
) -> np.ndarray:
    """A copy of ``features`` (rows of examples) with the trigger's features set to ``value``
    (None: the largest feature value of ``features``)."""
    indices = np.asarray(list(trigger), dtype=np.int64)
    width = features.shape[1] if features.ndim == 2 else 0
    if indices.size and int(indices.max()) >= width:
        raise ConfigError(
            f"attack.trigger: feature {int(indices.max())} is past the examples' {width} features"
        )
    stamped = np.array(features, copy=True)
    if value is None:
        value = float(features.max()) if features.size else 0.0
    stamped[:, indices] = value
    return stamped


@dataclass(frozen=True, slots=True)
class Poisoning:
    """A data attack as a :data:`~shoal.client.api.DataTransform` (picklable)."""

    entry: AttackEntry
    num_classes: int
    rng_seed: tuple[int, ...]

    def __call__(self, features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        entry = self.entry
        if entry.kind == "label_flip":
            flipped = flipped_labels(
                labels, num_classes=self.num_classes, target_label=entry.target_label
            )
            return features, flipped
        rng = np.random.default_rng(list(self.rng_seed))
        count = round(entry.poison_fraction * labels.size)
        chosen = np.sort(rng.choice(labels.size, size=count, replace=False))
        features, labels = np.array(features, copy=True), np.array(labels, copy=True)
        if count:  # the trigger's value, when unset, is the largest of the client's own data
            value = float(features.max()) if entry.trigger_value is None else entry.trigger_value
            features[chosen] = with_trigger(features[chosen], trigger=entry.trigger, value=value)
            labels[chosen] = backdoor_target(entry)
        return features, labels


def backdoor_target(entry: AttackEntry) -> int:
    """The label a backdoor's triggered examples take (default 0)."""
    return 0 if entry.target_label is None else entry.target_label


# --- the attacking client -----------------------------------------------------------------


class AttackingClient(Client):
    """An honest client's work, tampered with in the attack's rounds (see the module docstring)."""

    def __init__(
        self,
        honest: Client,
        entry: AttackEntry,
        *,
        attack_index: int,
        client_id: str,
        seed: int,
        scale: float,
        num_classes: int,
    ) -> None:
        self.honest = honest
        self.entry = entry
        self.attack_index = attack_index
        self.client_id = client_id
        self.seed = seed
        self.scale = scale
        self.trainer = honest
        if entry.kind in DATA_ATTACKS:
            if not isinstance(honest, TransformableData):
                raise ConfigError(
                    f"attack.{attack_index} (kind = {entry.kind!r}) rewrites a client's training "
                    f"data, but the client app's {type(honest).__name__} does not implement "
                    "with_training_data(transform) (shoal.client.TransformableData)"
                )
            poison = Poisoning(
                entry, num_classes, (seed, _POISON_STREAM, attack_index, client_key(client_id))
            )
            self.trainer = honest.with_training_data(poison)

    def get_parameters(self) -> Parameters:
        return self.honest.get_parameters()

    def evaluate(self, parameters: Parameters, config: EvaluateConfig) -> EvaluateResult:
        return self.honest.evaluate(parameters, config)

    def fit(self, parameters: Parameters, config: FitConfig) -> FitResult:
        if not self.entry.active(config.round):
            return self.honest.fit(parameters, config)
        result = self.trainer.fit(parameters, config)
        update = fit_update(result, parameters).vector
        tampered = self._tamper(update, round_number=config.round)
        return FitResult(
            parameters.with_vector(tampered), result.num_examples, result.metrics, is_update=True
        )

    def _tamper(self, update: Vector, *, round_number: int) -> Vector:
        kind = self.entry.kind
        if kind == "sign_flip":
            return sign_flipped(update)
        if kind in ("scaling", "backdoor"):
            return scaled(update, scale=self.scale)
        if kind == "gaussian_noise":
            entropy = [self.seed, _NOISE_STREAM, self.attack_index, round_number]
            rng = np.random.default_rng([*entropy, client_key(self.client_id)])
            return gaussian_update(update.size, std=self.entry.noise_std, rng=rng)
        if kind == "free_rider":
            return free_ride(update)
        return update  # label_flip: the poisoned training is the attack


class Attackers:
    """The simulated population's attackers, from the config's ``[[attack]]`` entries."""

    def __init__(self, config: Config, client_ids: Sequence[str]) -> None:
        self.client_ids = client_ids
        self._drawn: dict[int, frozenset[str]] = {}  # each fraction entry's attackers, once
        self.entries = tuple(config.attack)
        self.seed = config.run.seed
        self.num_clients = config.data.num_clients
        self.default_scale = default_scale(config)
        self.classes = config.data.shape[1]
        for index, entry in enumerate(self.entries):
            for client in entry.clients or ():
                if client not in client_ids:
                    raise ConfigError(
                        f"attack.{index}.clients: {client!r} is not one of the "
                        f"{self.num_clients} simulated clients (client-00000 ...)"
                    )

    def __bool__(self) -> bool:
        return bool(self.entries)

    def attack_of(self, client_id: str) -> tuple[int, AttackEntry] | None:
        """The first entry that makes ``client_id`` an attacker, with its index; None: honest."""
        for index, entry in enumerate(self.entries):
            if entry.clients is not None:
                if client_id in entry.clients:
                    return index, entry
            elif client_id in self.drawn(index):
                return index, entry
        return None

    def drawn(self, index: int) -> frozenset[str]:
        """Entry ``index``'s attackers: exactly ``fraction`` of the population (rounded), the
        clients with the lowest keyed draws, so that "0.2" means a fifth of the clients and
        each process that draws them agrees."""
        found = self._drawn.get(index)
        if found is None:
            fraction = self.entries[index].fraction or 0.0
            count = math.floor(fraction * len(self.client_ids) + 0.5)
            draws = sorted(
                (attack_draw(seed=self.seed, attack_index=index, client_id=client), client)
                for client in self.client_ids
            )
            found = self._drawn[index] = frozenset(client for _, client in draws[:count])
        return found

    def attacking(self, client_id: str, round_number: int) -> bool:
        """Whether ``client_id`` attacks in ``round_number``."""
        found = self.attack_of(client_id)
        return found is not None and found[1].active(round_number)

    def count(self, client_ids: Iterable[str], round_number: int) -> int:
        """How many of ``client_ids`` attack in ``round_number``."""
        return sum(1 for client in client_ids if self.attacking(client, round_number))

    def around(self, client_id: str, client: Client) -> Client:
        """``client`` as the population's member ``client_id`` behaves: honest, or attacking."""
        found = self.attack_of(client_id)
        if found is None:
            return client
        index, entry = found
        scale = entry.scale
        if scale is None:
            scale = self.default_scale if entry.kind == "scaling" else 1.0
        return AttackingClient(
            client,
            entry,
            attack_index=index,
            client_id=client_id,
            seed=self.seed,
            scale=scale,
            num_classes=entry.classes_or(self.classes),
        )

    def first_data_attacker(self, client_ids: Iterable[str]) -> str | None:
        """The first of ``client_ids`` that runs a data attack (to check the app's hook)."""
        if not any(entry.kind in DATA_ATTACKS for entry in self.entries):
            return None
        for client in client_ids:
            found = self.attack_of(client)
            if found is not None and found[1].kind in DATA_ATTACKS:
                return client
        return None


# --- what the metrics show ----------------------------------------------------------------

TestData = Callable[[], tuple[np.ndarray, np.ndarray]]
ClassProbabilities = Callable[[Parameters, np.ndarray], np.ndarray]


def backdoor_success_rate(
    parameters: Parameters,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    entry: AttackEntry,
    probabilities: ClassProbabilities,
) -> float:
    """The share of the examples not of the target label that the model puts in the target
    label once they carry the trigger (0.0 when there are none)."""
    target = backdoor_target(entry)
    others = np.asarray(labels) != target
    if not others.any():
        return 0.0
    stamped = with_trigger(
        np.asarray(features)[others], trigger=entry.trigger, value=entry.trigger_value
    )
    predicted = np.argmax(np.asarray(probabilities(parameters, stamped)), axis=1)
    return float(np.mean(predicted == target))


class AttackMetrics:
    """The fields an attacked run adds to its rows: attackers among a fit round's cohort and
    participants, and each committed model's backdoor success rate (where the server app
    gives ``test_data`` and ``probabilities``)."""

    def __init__(
        self,
        attackers: Attackers,
        *,
        test_data: TestData | None,
        probabilities: ClassProbabilities | None,
    ) -> None:
        self.attackers = attackers
        self.backdoor = next((e for e in attackers.entries if e.kind == "backdoor"), None)
        self.test_data = test_data
        self.probabilities = probabilities

    @property
    def measures_backdoor(self) -> bool:
        """Whether rows carry ``backdoor_success_rate``."""
        return self.backdoor is not None and None not in (self.test_data, self.probabilities)

    def fit_fields(
        self,
        round_number: int,
        *,
        asked: Iterable[str],
        counted: Iterable[str],
        model: Parameters | None,
    ) -> dict[str, float | int]:
        """A fit row's attack fields; ``model``: the version the round commits (None: none)."""
        fields: dict[str, float | int] = {
            "attackers_selected": self.attackers.count(asked, round_number),
            "attackers_reported": self.attackers.count(counted, round_number),
        }
        if model is not None and self.measures_backdoor:
            assert self.backdoor is not None and self.test_data is not None
            assert self.probabilities is not None
            features, labels = self.test_data()
            fields["backdoor_success_rate"] = backdoor_success_rate(
                model, features, labels, entry=self.backdoor, probabilities=self.probabilities
            )
        return fields

    def summary_fields(self, rows: Iterable[Mapping[str, object]]) -> dict[str, object]:
        """``final_backdoor_success_rate``: the last committed version's, where measured."""
        if not self.measures_backdoor:
            return {}
        rates = [row["backdoor_success_rate"] for row in rows if "backdoor_success_rate" in row]
        return {"final_backdoor_success_rate": rates[-1] if rates else None}
