"""Partitions: one client's share of the data each, taken by position or by id.

A :class:`Partition` knows its rows (positions in the data it was cut
from) and turns them into the ``(features, labels)`` numpy pair a model
trains on. :class:`Partitions` builds a partition only when it is taken, so
a client process that asks for its own index pays for that one alone.

>>> parts = Partitions(ids=["a", "b"], load=lambda index: ...)  # doctest: +SKIP
>>> x, y = parts["b"].to_numpy()  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from shoal.core.errors import DataError
from shoal.datasets.arrays import FloatArray, IndexArray, LabelArray

RowsLoader = Callable[[IndexArray], tuple[FloatArray, LabelArray]]


@dataclass(frozen=True, slots=True, eq=False)
class Partition:
    """One client's examples.

    ``rows`` are the positions of its examples in the source: the rows of the
    data given to :func:`~shoal.datasets.partition` (select them yourself,
    ``dataframe.iloc[part.rows]``, to keep the original format), or the rows
    of the client's own file. :meth:`to_numpy` loads them for a model.
    """

    index: int
    id: str
    rows: IndexArray
    loader: RowsLoader = field(repr=False)

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def to_numpy(self) -> tuple[FloatArray, LabelArray]:
        """``(features, labels)``: float32 features, int64 (or float32) labels, one row each."""
        return self.loader(self.rows)


class Partitions:
    """Partitions indexed by position (``0 .. n-1``) and by id.

    ``ids`` are the natural ids (a file's stem, a user id) or, for
    partitioners that only number their parts, the positions as text.
    ``load(index)`` builds partition ``index``; it is called on each access.
    """

    def __init__(self, *, ids: Sequence[str], load: Callable[[int], Partition]) -> None:
        self.ids = tuple(ids)
        if len(set(self.ids)) != len(self.ids):
            raise DataError(f"partition ids must be unique, got {len(self.ids)} ids with repeats")
        self._positions = {name: position for position, name in enumerate(self.ids)}
        self._load = load

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[Partition]:
        return (self._load(index) for index in range(len(self.ids)))

    def __getitem__(self, key: int | str) -> Partition:
        """The partition at position ``key`` (an int) or with id ``key`` (a str)."""
        return self._load(self.position(key))

    def __repr__(self) -> str:
        shown = ", ".join(repr(name) for name in self.ids[:5])
        more = ", ..." if len(self.ids) > 5 else ""
        return f"Partitions({len(self.ids)}: {shown}{more})"

    def position(self, key: int | str) -> int:
        """The position of partition ``key``; DataError if there is no such partition."""
        if isinstance(key, str):
            if key not in self._positions:
                raise DataError(f"no partition has id {key!r} ({len(self.ids)} partitions)")
            return self._positions[key]
        if isinstance(key, bool) or not isinstance(key, int):
            raise DataError(f"a partition is taken by int position or str id, got {key!r}")
        if not 0 <= key < len(self.ids):
            valid = f"0 to {len(self.ids) - 1}" if self.ids else "none"
            raise DataError(
                f"partition index {key} is out of range: {len(self.ids)} partitions ({valid})"
            )
        return key
