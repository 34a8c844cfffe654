"""Data people already have, cut into client partitions: arrays, DataFrames, datasets, files.

- :func:`partition` splits in-memory data (a ``(features, labels)`` pair of
  numpy arrays, a mapping of column name to array, a pandas DataFrame or a
  Hugging Face ``datasets.Dataset``) with the partitioners of flwr-datasets
  (IID, Dirichlet, shards, pathological, natural id, linear and
  exponential sizes) or with a flwr-datasets ``Partitioner`` you built. It
  needs the extra: ``pip install 'shoal[datasets]'``.
- :func:`partition_folder` makes one client of each CSV or Parquet file in a
  folder (CSV on the core install; Parquet needs the extra).

Both return :class:`Partitions`, taken by position or id; a
:class:`Partition` gives a model its numpy ``(features, labels)``. A client
app calls them in each client process:
``partition(data, ...)[context.partition_index].to_numpy()``; the same seed
gives the same partitions in every process.

Shoal's own partitioners (:mod:`shoal.simulation.partition`) stay for what
this package cannot do: they run on the core install with no extra (the
embedded default run, ``make run``, uses them), work on index counts and
label arrays alone without an Arrow table or a multi-second ``datasets``
import, and serve the simulator's generated federations, whose devices
(``SyntheticFederation``) are generated lazily one by one for populations
too large to hold as one dataset. Use this package for your own data.

This package sits just above :mod:`shoal.core` in the layer order: it
imports only ``shoal.core`` and third-party packages.
"""

from shoal.datasets.folder import partition_folder
from shoal.datasets.memory import partition
from shoal.datasets.partitioners import PARTITIONERS
from shoal.datasets.partitions import Partition, Partitions

__all__ = [
    "PARTITIONERS",
    "Partition",
    "Partitions",
    "partition",
    "partition_folder",
]
