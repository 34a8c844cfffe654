"""Without ``shoal[datasets]``: the package imports, CSV folders work, the rest names the extra."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from shoal.core.errors import MissingExtraError, ShoalError
from shoal.datasets import partition

EXTRA_MODULES = ("flwr_datasets", "datasets", "pandas", "pyarrow")


@pytest.mark.parametrize("missing", ["flwr_datasets.partitioner", "datasets"])
def test_partition_without_the_extra_names_it(
    monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # an import of it now fails
    with pytest.raises(MissingExtraError) as caught:
        partition((np.zeros((4, 2)), np.arange(4)), partitioner="iid", num_partitions=2)
    # without datasets, flwr-datasets fails first unless a test already imported it
    assert re.fullmatch(
        r"Partitioning with flwr-datasets needs the '(flwr-datasets|datasets)' package: "
        r"install it with pip install 'shoal\[datasets\]'",
        str(caught.value),
    )
    assert isinstance(caught.value, ImportError)
    assert isinstance(caught.value, ShoalError)


CORE_ONLY = """
import importlib.abc, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}")
        return None

sys.meta_path.insert(0, Refuse())
import numpy as np
from shoal.datasets import partition, partition_folder

x, y = partition_folder({folder!r})["a"].to_numpy()
assert x.shape == (2, 2) and y.tolist() == [0, 1]
try:
    partition((np.zeros((4, 2)), np.arange(4)), partitioner="iid", num_partitions=2)
except ImportError as exc:
    print(exc)
print(sorted(name for name in sys.modules if name.split(".")[0] in {blocked!r}))
"""


def test_the_core_install_reads_csv_and_names_the_extra_for_the_rest(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("x1,x2,label\n1,2,0\n3,4,1\n", encoding="utf-8")
    script = CORE_ONLY.format(blocked=set(EXTRA_MODULES), folder=str(tmp_path))
    source = Path(__file__).resolve().parents[2] / "src"
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(source)},
        timeout=120,
    )
    assert result.stdout.splitlines() == [
        "Partitioning with flwr-datasets needs the 'flwr-datasets' package: "
        "install it with pip install 'shoal[datasets]'",
        "[]",
    ]
