"""The deterministic simulator: datasets, partitions, device fleets and the event loop."""

from shoal.simulation.attacks import (
    Attackers,
    AttackingClient,
    AttackMetrics,
    attack_draw,
    backdoor_success_rate,
)
from shoal.simulation.datasets import Dataset, DeviceData, SyntheticFederation, load_digits_split
from shoal.simulation.devices import Attempt, DeviceFleet
from shoal.simulation.executor import Job, Outcome, ProcessExecutor, SerialExecutor, make_executor
from shoal.simulation.partition import (
    partition_dirichlet,
    partition_iid,
    partition_power_law,
    partition_shards,
)
from shoal.simulation.population import AppClients, Population, client_index, client_name
from shoal.simulation.runner import Simulation, final_parameters, load_run_config
from shoal.simulation.unlearning import default_actor, unlearn

__all__ = [
    "AppClients",
    "AttackMetrics",
    "Attackers",
    "AttackingClient",
    "Attempt",
    "Dataset",
    "DeviceData",
    "DeviceFleet",
    "Job",
    "Outcome",
    "Population",
    "ProcessExecutor",
    "SerialExecutor",
    "Simulation",
    "SyntheticFederation",
    "attack_draw",
    "backdoor_success_rate",
    "client_index",
    "client_name",
    "default_actor",
    "final_parameters",
    "load_digits_split",
    "load_run_config",
    "make_executor",
    "partition_dirichlet",
    "partition_iid",
    "partition_power_law",
    "partition_shards",
    "unlearn",
]
