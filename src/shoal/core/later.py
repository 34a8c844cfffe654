"""Work whose result is taken later: done here at once, or elsewhere while this process goes on.

An :data:`Offload` takes a function and its arguments and gives back a :class:`Later`, whose
``result()`` is the function's value (or raises its error). :func:`here` runs the function at
once, in this process; a simulation's pool runs it in a worker that the round leaves idle
(:meth:`shoal.simulation.executor.ProcessExecutor.later`), so that the round's own work
goes on beside it. Either way the value is the same, bit for bit: the function and its
arguments are the same, and every process holds its BLAS to one thread.

>>> later = here(sum, [1, 2, 3])
>>> later.result()
6
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Later(Protocol[T_co]):
    """A value on its way; ``result()`` waits for it (it may raise the work's error)."""

    def result(self) -> T_co: ...


class Offload(Protocol):
    """Starts ``function(*args)`` here or elsewhere; its value comes from the returned
    :class:`Later`. The function and its arguments must pickle (the function by name)."""

    def __call__(self, function: Callable[..., T], /, *args: Any) -> Later[T]: ...


@dataclass(frozen=True, slots=True)
class Ready(Generic[T]):
    """A value that is here already."""

    value: T

    def result(self) -> T:
        return self.value


@dataclass(frozen=True, slots=True)
class Part(Generic[T]):
    """Item ``index`` of a tuple on its way (``whole``), which may carry several values."""

    whole: Later[tuple[Any, ...]]
    index: int

    def result(self) -> T:
        value: T = self.whole.result()[self.index]
        return value


def here(function: Callable[..., T], /, *args: Any) -> Later[T]:
    """The :data:`Offload` that does the work at once, in this process (its error is raised
    here and now)."""
    return Ready(function(*args))


def at_once(value: T | Later[T]) -> T | Later[T]:
    """``value``'s own value where it is :class:`Ready`; a value still on its way as it is."""
    return value.value if isinstance(value, Ready) else value
