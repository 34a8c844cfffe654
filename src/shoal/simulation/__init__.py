"""The deterministic simulator: datasets, partitions, device fleets and the event loop."""

from shoal.simulation.datasets import Dataset, DeviceData, SyntheticFederation, load_digits_split
from shoal.simulation.devices import Attempt, DeviceFleet
from shoal.simulation.executor import Job, Outcome, ProcessExecutor, SerialExecutor, make_executor
from shoal.simulation.partition import (
    partition_dirichlet,
    partition_iid,
    partition_power_law,
    partition_shards,
)
from shoal.simulation.runner import Simulation, final_parameters, load_run_config
from shoal.simulation.scenario import DataScenario, Scenario, build_scenario

__all__ = [
    "Attempt",
    "DataScenario",
    "Dataset",
    "DeviceData",
    "DeviceFleet",
    "Job",
    "Outcome",
    "ProcessExecutor",
    "Scenario",
    "SerialExecutor",
    "Simulation",
    "SyntheticFederation",
    "build_scenario",
    "final_parameters",
    "load_digits_split",
    "load_run_config",
    "make_executor",
    "partition_dirichlet",
    "partition_iid",
    "partition_power_law",
    "partition_shards",
]
