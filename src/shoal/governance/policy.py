"""The policy engine: OPA's Rego, through ``regopy``, decides on every update that may count.

The bundled default policy (``default.rego`` beside this module) and the
job's own files are compiled once into a bundle; each decision is one query
of its ``deny`` entrypoint. A query takes a *batch* of updates as columns
(``input.l2_norm[i]`` is update i's norm): a round's updates are decided in
a few queries of up to :data:`CHUNK` each, which is what makes thousands of
decisions per second possible (``benchmarks/policy.py``); a batch of one is
the same query. A rule decides on each update alone (``input.count`` is the
query's batch, not the round's).

A rule denies update ``i`` by adding ``[i, code, detail]`` to ``deny``; an
update no rule denies is allowed. The engine fails closed: a query that
errs, or a ``deny`` entry that is not such a triple, denies the whole batch
with the code ``policy_error``.

>>> engine = PolicyEngine(bounds=PolicyBounds(max_l2_norm=100.0))
>>> [d.allowed for d in engine.decide(1, [facts_for("c1", l2_norm=1e30)])]
[False]
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regopy

from shoal.config import PolicySection
from shoal.core.errors import ConfigError
from shoal.core.limits import INT64_MAX

DEFAULT_POLICY = Path(__file__).with_name("default.rego")
PACKAGE = "shoal.policy"
ENTRYPOINT = "shoal/policy/deny"
_HANDOVER_S = 1.0  # the longest the caller waits for the query's thread to start
_ALONE_BELOW_S = 0.5e-3  # a query quicker than this runs before the caller's work, not beside
_PROBE_EVERY = 16  # of the queries beside the caller's work, one in this many runs alone
POLICY_ERROR = "policy_error"
CHUNK = 128
"""The most updates one query holds: rego-cpp builds ``deny`` in time that grows faster than
its size, so a round's thousands of updates go in queries of this many (benchmarks/policy.py)."""

_PACKAGE_LINE = re.compile(r"^\s*package\s+([\w.]+)", re.MULTILINE)
SUMMARIES = ("highest", "lowest", "distinct")
"""The summaries of the columns beside them in a policy's input (:meth:`PolicyEngine.input_of`)."""
_INPUT_FIELD = re.compile(rf"\binput\.(?:(?:{'|'.join(SUMMARIES)})\.)?(\w+)")
# ``input`` itself, or a summary, indexed otherwise than by a name: every column is read
_INPUT_OTHERWISE = re.compile(rf"\binput(?:\.(?:{'|'.join(SUMMARIES)}))?\b(?!\.\w)")
_COMMENT = re.compile(r"#[^\n]*")


@dataclass(frozen=True, slots=True)
class PolicyBounds:
    """The default policy's bounds (``data.shoal.bounds``): see :class:`PolicySection`."""

    max_l2_norm: float = 100.0
    max_relative_l2_norm: float = 10.0
    max_examples: int = 10_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateFacts:
    """What the policy knows of one update: its client, how it arrived, what it holds.

    ``status`` is the registry's (``active``, ``suspended``, ``retired``) or
    ``unknown`` for a client it does not hold; ``signature`` is ``verified``
    (the network service checked the request's Ed25519 signature),
    ``in_process`` (the simulator delivered it: there is no wire) or
    ``none``. A ``sealed`` update (inside SecAgg+ or CKKS) has no norm and
    no example count, only the bounds its protocol enforces, if any.
    """

    client_id: str
    status: str = "active"
    device_class: str | None = None
    app_version: str | None = None
    runtime_version: str | None = None
    model_architecture_version: str | None = None
    feature_extractor_version: str | None = None
    version_problems: tuple[str, ...] = ()
    signature: str = "none"
    remaining_epsilon: float | None = None
    sealed: bool = False
    l2_norm: float | None = None
    relative_l2_norm: float | None = None
    num_examples: int | None = None
    l2_norm_bound: float | None = None
    num_examples_bound: int | None = None

    def as_record(self) -> dict[str, Any]:
        """The facts as a JSON-ready mapping (what the decision log keeps)."""
        # every field is a scalar but one tuple of texts: a shallow copy (asdict deep-copies
        # each value, a tenth of a millisecond per decision)
        record = {name: getattr(self, name) for name in COLUMNS}
        record["version_problems"] = list(self.version_problems)
        return record


COLUMNS = tuple(f.name for f in dataclasses.fields(UpdateFacts))
NUMBER_COLUMNS = frozenset(
    {
        "remaining_epsilon",
        "l2_norm",
        "relative_l2_norm",
        "num_examples",
        "l2_norm_bound",
        "num_examples_bound",
    }
)
"""The columns whose values are numbers or null: summarized as ``input.highest`` and
``input.lowest``; every other column but ``client_id`` as ``input.distinct``."""


def facts_for(client_id: str, **facts: Any) -> UpdateFacts:
    """An active, verified client's update with ``facts`` (for tests and examples)."""
    return UpdateFacts(client_id=client_id, signature=facts.pop("signature", "verified"), **facts)


@dataclass(frozen=True, slots=True)
class Reason:
    """Why a policy denied an update: a stable ``code`` and a ``detail`` in words."""

    code: str
    detail: str

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}"


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's verdict on one update, with the facts it was taken on."""

    facts: UpdateFacts
    reasons: tuple[Reason, ...] = field(default=())

    @property
    def allowed(self) -> bool:
        return not self.reasons

    @property
    def client_id(self) -> str:
        return self.facts.client_id


class PolicyEngine:
    """The compiled policy (the default one unless ``builtin`` is False, plus ``files``).

    A file that does not compile, or that is not in package ``shoal.policy``,
    is a :class:`ConfigError` of one line naming the file and the error.
    """

    def __init__(
        self,
        *,
        bounds: PolicyBounds | None = None,
        files: Sequence[str | Path] = (),
        builtin: bool = True,
    ) -> None:
        self.bounds = bounds or PolicyBounds()
        sources = {str(DEFAULT_POLICY): DEFAULT_POLICY.read_text()} if builtin else {}
        for path in files:
            sources[str(path)] = _read_policy(Path(path))
        if not sources:
            raise ConfigError("a policy needs at least one file")
        self.files = tuple(sources)
        self.columns = _referenced_columns(sources.values())
        self.summaries = _referenced_summaries(sources.values())
        self._interpreter = regopy.Interpreter()
        self._interpreter.add_data_json(
            rego_json({"shoal": {"bounds": dataclasses.asdict(self.bounds)}})
        )
        for name, source in sources.items():
            _compile(self._interpreter, name, source)
        with _quiet_stdout():
            try:
                self._bundle = self._interpreter.build(None, [ENTRYPOINT])
            except regopy.RegoError as exc:
                raise ConfigError(f"the policy does not compile: {_rego_message(exc)}") from None
        if not self._bundle.ok():
            raise ConfigError("the policy does not compile into a bundle")
        self._thread: ThreadPoolExecutor | None = None  # for queries beside a caller's work
        self._last_query_s = self._last_meanwhile_s = 0.0  # the latest query beside it
        self._last_alone_s = 0.0  # the latest query with the caller waiting: its own time
        self._besides = 0  # queries beside the caller's work since the last alone
        self._warm = False  # whether a query alone was made, and its time not kept
        _LIVE.add(self)

    def close(self) -> None:
        """Free the compiled policy now (at exit, regopy could no longer free it itself)."""
        self.stop_querier()
        self.__dict__.pop("_bundle", None)
        self.__dict__.pop("_interpreter", None)

    def stop_querier(self) -> None:
        """End the engine's own thread (a run that is over needs it no more); the next query
        beside a caller's work starts another."""
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None

    def _querier(self) -> ThreadPoolExecutor:
        """The engine's own thread for queries beside the caller's work (made on first use)."""
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shoal-policy")
        return self._thread

    @classmethod
    def from_config(cls, section: PolicySection) -> PolicyEngine | None:
        """The engine of a job's ``[policy]`` (None when it is not enabled)."""
        if not section.enabled:
            return None
        bounds = PolicyBounds(
            max_l2_norm=section.max_l2_norm,
            max_relative_l2_norm=section.max_relative_l2_norm,
            max_examples=section.max_examples,
        )
        return cls(bounds=bounds, files=section.files)

    def decide(
        self,
        round_number: int,
        batch: Sequence[UpdateFacts],
        *,
        meanwhile: Callable[[], object] | None = None,
    ) -> list[Decision]:
        """The decision on each update of ``batch``, in order, in queries of up to ``CHUNK``.

        ``meanwhile``: work of the caller's that needs no decision, run on this thread while
        the first query runs on the engine's own (rego-cpp evaluates without Python's lock,
        so the two use two cores), or right after it where that query is quicker than the
        handover (:meth:`_alone_next`); its exception, if any, is raised once the query is
        done.
        """
        decisions: list[Decision] = []
        for start in range(0, len(batch), CHUNK):
            chunk = batch[start : start + CHUNK]
            decisions += self._decide(round_number, chunk, meanwhile if start == 0 else None)
        return decisions

    def _decide(
        self,
        round_number: int,
        batch: Sequence[UpdateFacts],
        meanwhile: Callable[[], object] | None = None,
    ) -> list[Decision]:
        found = self._query(self.input_of(round_number, batch), meanwhile)
        reasons: list[list[Reason]] = [[] for _ in batch]
        problem = None
        if isinstance(found, str):
            problem = found
        else:
            for entry in found:
                index = _denial_index(entry, len(batch))
                if index is None:
                    problem = f"a deny entry is not [index, code, detail]: {entry!r:.120}"
                    break
                reasons[index].append(Reason(entry[1], entry[2]))
        if problem is not None:
            failed = (Reason(POLICY_ERROR, problem),)
            return [Decision(facts, failed) for facts in batch]
        return [
            Decision(facts, tuple(sorted(found, key=lambda r: (r.code, r.detail))))
            for facts, found in zip(batch, reasons, strict=True)
        ]

    def input_of(self, round_number: int, batch: Sequence[UpdateFacts]) -> dict[str, Any]:
        """The policy's input for ``batch``: the columns its rules read, their summaries, and
        the round.

        The summaries let a rule ask once whether any update of the batch could break it
        before it looks at each (rego-cpp takes microseconds per update and rule, so a
        round's clean batch of 100 costs 3 ms unguarded, 0.15 ms guarded): ``highest`` and
        ``lowest`` hold each number column's largest and smallest number (null where it has
        none; NaN is no number), ``distinct`` each other column's distinct values in order of
        first appearance (but ``client_id``'s, which are all distinct). Like the columns, only
        the summaries the rules read are sent.
        """
        document: dict[str, Any] = {"round": round_number, "count": len(batch)}
        for column in self.columns:
            values = [getattr(facts, column) for facts in batch]
            document[column] = _REGO_VALUES.get(column, list)(values)
        # each summary as the rules read it: a policy that reads none is sent none
        for summary, columns in self.summaries.items():
            document[summary] = {
                column: _SUMMARIZE[summary](document[column]) for column in columns
            }
        return document

    def _query_beside(self, started: threading.Lock) -> Any:
        """The policy's query on the engine's thread, once it told the caller it started; the
        query's own time is kept for the next :meth:`_query` (see there)."""
        started.release()
        begun = time.perf_counter()
        try:
            return self._interpreter.query_bundle_entrypoint(self._bundle, ENTRYPOINT)
        finally:
            self._last_query_s = time.perf_counter() - begun

    def _alone_next(self) -> bool:
        """Whether the next query runs first, with the caller's work after it, rather than
        beside: when the latest query alone took less than handing a query to the engine's
        thread and back costs (two thread switches, in turns with the caller's work for
        Python's lock), and at every :data:`_PROBE_EVERY`-th query, to measure it again (a
        query beside the caller's work is timed with the wait for the lock, not alone)."""
        if self._last_alone_s < _ALONE_BELOW_S or self._besides >= _PROBE_EVERY:
            self._besides = 0
            return True
        return False

    def _query(
        self, document: Mapping[str, Any], meanwhile: Callable[[], object] | None = None
    ) -> list[Any] | str:
        """The ``deny`` entries for ``document``, or why the query failed; ``meanwhile`` runs
        on this thread during the query (see :meth:`decide`)."""
        # the input is built here: each value is a call into rego-cpp, which on the other
        # thread would wait for Python's lock after every one while ``meanwhile`` holds it
        self._interpreter.set_input(rego_input(document))
        if meanwhile is None:
            output = self._interpreter.query_bundle_entrypoint(self._bundle, ENTRYPOINT)
        elif self._alone_next():
            begun = time.perf_counter()
            output = self._interpreter.query_bundle_entrypoint(self._bundle, ENTRYPOINT)
            if self._warm:  # an engine's first query is cold (0.6 ms where the next is 0.2)
                self._last_alone_s = time.perf_counter() - begun
            self._warm = True
            meanwhile()
        else:
            self._besides += 1
            # one call into rego-cpp: it gives Python's lock up until the query is done
            started = threading.Lock()
            started.acquire()
            query = self._querier().submit(self._query_beside, started)
            if self._last_query_s > self._last_meanwhile_s:
                # the round waits for the query (it was the longer last time): hand Python's
                # lock over until it is in rego-cpp. Busy with ``meanwhile``, this thread would
                # take the lock back after each short release before the query's thread woke
                # to take it, and the query would start at a pause of ``meanwhile`` (0.5 ms
                # late at 100 clients) or at Python's forced switch (5 ms). When ``meanwhile``
                # is the longer, the round waits for it, and the handover would delay it.
                started.acquire(timeout=_HANDOVER_S)
            begun = time.perf_counter()
            try:
                meanwhile()
            finally:  # the interpreter is used by one thread at a time: wait for it
                self._last_meanwhile_s = time.perf_counter() - begun
                output = query.result()
        # read the result while ``output`` is referenced: it owns the memory behind it
        if not output.ok():
            return f"the policy query failed: {str(output).strip().splitlines()[0]:.200}"
        if not output.results:
            return []
        found = output.results[0].expressions[0]
        return found if isinstance(found, list) else f"deny is not a set: {found!r:.120}"


def _numbers(values: list[Any]) -> list[Any]:
    """Numbers as Rego takes them: an integer past 64 bits as a float (rego-cpp's input would
    wrap it around: 2**63 would read as -2**63)."""
    return [
        float(v) if type(v) is int and not -INT64_MAX - 1 <= v <= INT64_MAX else v for v in values
    ]


class _InputCalls:
    """rego-cpp's C calls that build an input document, value by value, as regopy declares
    them (``regopy.rego_shared``); None where this regopy does not have them."""

    def __init__(self, library: Any) -> None:
        self.new = library.regoNewInput
        self.int = library.regoInputInt
        self.float = library.regoInputFloat
        self.text = library.regoInputString
        self.flag = library.regoInputBoolean
        self.null = library.regoInputNull
        self.item = library.regoInputObjectItem
        self.object = library.regoInputObject
        self.array = library.regoInputArray


def _input_calls() -> _InputCalls | None:
    try:
        from regopy import rego_shared

        return _InputCalls(rego_shared.rego)
    except (ImportError, AttributeError):
        return None


_CALLS = _input_calls()


def rego_input(document: Mapping[str, Any]) -> regopy.Input:
    """``document`` as rego-cpp's input: what ``regopy.Input(document)`` makes, with rego-cpp's
    calls made straight (1.75x faster: regopy wraps each value's call in two Python calls and
    a check). Falls back to ``regopy.Input`` where regopy's calls are not where expected."""
    calls = _CALLS
    if calls is None:
        return regopy.Input(document)
    handle = calls.new()
    made = regopy.Input.__new__(regopy.Input)
    made._impl = handle  # freed with ``made`` (regopy's Input.__del__)
    if _add_value(calls, handle, document):
        raise regopy.RegoError("rego-cpp refused a value of the policy's input")
    return made


def _add_value(calls: _InputCalls, handle: Any, value: Any) -> int:
    """Push ``value`` onto the input under construction; nonzero if a call failed."""
    kind = type(value)
    if value is None:
        return int(calls.null(handle))
    if kind is float:
        return int(calls.float(handle, value))
    if kind is str:
        return int(calls.text(handle, value.encode()))
    if kind is bool:
        return int(calls.flag(handle, value))
    if kind is int:
        return int(calls.int(handle, value))
    failed = 0
    if kind is list or kind is tuple:  # a column: its texts, numbers and nulls inline
        null, number, text = calls.null, calls.float, calls.text
        for item in value:
            if item is None:
                failed |= null(handle)
            elif type(item) is float:
                failed |= number(handle, item)
            elif type(item) is str:
                failed |= text(handle, item.encode())
            else:
                failed |= _add_value(calls, handle, item)
        return failed | int(calls.array(handle, len(value)))
    if kind is dict:
        for key, item in value.items():
            failed |= _add_value(calls, handle, key) | _add_value(calls, handle, item)
            failed |= calls.item(handle)
        return failed | int(calls.object(handle, len(value)))
    # a subclass (numpy's float64, an enum of str...), as regopy takes it
    if value is True or value is False:
        return int(calls.flag(handle, value))
    if isinstance(value, int):
        return int(calls.int(handle, int(value)))
    if isinstance(value, float):
        return int(calls.float(handle, float(value)))
    if isinstance(value, str):  # its own characters, not its __str__ (an enum's name)
        return int(calls.text(handle, str.encode(value)))
    if isinstance(value, Mapping):
        return _add_value(calls, handle, dict(value))
    if isinstance(value, Sequence):
        return _add_value(calls, handle, list(value))
    raise TypeError(f"the policy's input cannot hold a {kind.__name__}")


def _highest(values: list[Any]) -> Any:
    numbers = [v for v in values if v is not None and v == v]  # NaN != NaN
    return max(numbers) if numbers else None


def _lowest(values: list[Any]) -> Any:
    numbers = [v for v in values if v is not None and v == v]
    return min(numbers) if numbers else None


def _distinct(values: list[Any]) -> list[Any]:
    """The distinct values in order of first appearance (a list value compared as a tuple)."""
    if values and isinstance(values[0], list):
        return [list(v) for v in dict.fromkeys(map(tuple, values))]
    return list(dict.fromkeys(values))


_SUMMARIZE: dict[str, Callable[[list[Any]], Any]] = {
    "highest": _highest,
    "lowest": _lowest,
    "distinct": _distinct,
}


def _lists(values: list[Any]) -> list[Any]:
    return [list(value) for value in values]


_REGO_VALUES: dict[str, Callable[[list[Any]], list[Any]]] = {
    **dict.fromkeys(NUMBER_COLUMNS, _numbers),
    "version_problems": _lists,
}


def _denial_index(entry: Any, size: int) -> int | None:
    if not (isinstance(entry, list) and len(entry) == 3):
        return None
    index, code, detail = entry
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < size:
        return None
    return index if isinstance(code, str) and code and isinstance(detail, str) else None


def _read_policy(path: Path) -> str:
    try:
        source = path.read_text()
    except OSError as exc:
        raise ConfigError(f"policy file {path}: cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"policy file {path}: is not UTF-8 text") from None
    match = _PACKAGE_LINE.search(source)
    package = match.group(1) if match else None
    if package != PACKAGE:
        raise ConfigError(
            f"policy file {path}: its package must be {PACKAGE}, got {package or 'none'}"
        )
    return source


def _compile(interpreter: Any, name: str, source: str) -> None:
    with _quiet_stdout():
        try:
            interpreter.add_module(name, source)
        except regopy.RegoError as exc:
            raise ConfigError(f"policy file {name}: {_rego_message(exc, source)}") from None


_ERROR = re.compile(r"\(error (\d+):")
_MESSAGE = re.compile(r"\(errormsg (\d+):")


def _rego_message(exc: Exception, source: str | None = None) -> str:
    """rego-cpp's first error as ``line L, column C: message``."""
    text = str(exc.args[0]) if exc.args else str(exc)
    message_at = _MESSAGE.search(text)
    if message_at is None:
        return text.strip().splitlines()[0] if text.strip() else "unknown error"
    start = message_at.end()
    message = text[start : start + int(message_at.group(1))]
    where = _ERROR.search(text)
    if where is not None and source is not None:
        rest = text[where.end() + int(where.group(1)) :]
        offset = re.match(r"\|(\d+)\|", rest)
        if offset is not None:
            before = source[: int(offset.group(1))]
            line, column = before.count("\n") + 1, len(before) - before.rfind("\n")
            return f"line {line}, column {column}: {message}"
    return message


def _referenced_columns(sources: Iterable[str]) -> tuple[str, ...]:
    """The input columns the policies read: a policy that reads ``input`` otherwise gets all."""
    texts = [_COMMENT.sub("", text) for text in sources]
    if any(_INPUT_OTHERWISE.search(text) for text in texts):
        return COLUMNS
    named = {name for text in texts for name in _INPUT_FIELD.findall(text)}
    return tuple(column for column in COLUMNS if column in named)


def _referenced_summaries(sources: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """The summaries the policies read (``input.highest.l2_norm``), each with its columns: the
    number columns for ``highest`` and ``lowest``, the others but ``client_id`` for
    ``distinct``, each of them where a policy indexes the summary otherwise than by name."""
    texts = [_COMMENT.sub("", text) for text in sources]
    read: dict[str, tuple[str, ...]] = {}
    for summary in SUMMARIES:
        allowed = [
            column
            for column in COLUMNS
            if (column in NUMBER_COLUMNS) == (summary != "distinct") and column != "client_id"
        ]
        everything = re.compile(rf"\binput\.{summary}\b(?!\.\w)")
        if any(everything.search(text) for text in texts):
            read[summary] = tuple(allowed)
            continue
        named = {name for text in texts for name in re.findall(rf"\binput\.{summary}\.(\w+)", text)}
        if named & set(allowed):
            read[summary] = tuple(column for column in allowed if column in named)
    return read


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """rego-cpp prints a compile error to the process's stdout too: keep it off the user's."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        sys.stdout.flush()
    try:
        saved = os.dup(_STDOUT)
    except OSError:  # no standard output at all
        yield
        return
    try:
        with open(os.devnull, "w") as sink:
            os.dup2(sink.fileno(), _STDOUT)
        yield
    finally:
        os.dup2(saved, _STDOUT)
        os.close(saved)


_STDOUT = 1  # the C++ library writes to the descriptor, whatever Python's sys.stdout is


def rego_json(value: Any) -> str:
    """``value`` (dicts, lists, texts, numbers, flags, None) as JSON text that rego-cpp reads.

    rego-cpp 1.x refuses a number whose exponent follows a mantissa without a fraction, which
    is how Python writes large and small floats (``1e+16``, ``1e-05``): such a bound made the
    whole policy fail to compile. Here each such number gets its fraction (``1.0e+16``).

    >>> rego_json({"bounds": {"max": 1e16, "min": 1e-05, "cap": 10}})
    '{"bounds":{"max":1.0e+16,"min":1.0e-05,"cap":10}}'
    """
    if isinstance(value, Mapping):
        fields = (f"{json.dumps(str(key))}:{rego_json(item)}" for key, item in value.items())
        return "{" + ",".join(fields) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(rego_json(item) for item in value) + "]"
    text = json.dumps(value, allow_nan=False)
    if isinstance(value, float):
        mantissa, exponent, power = text.partition("e")
        if exponent and "." not in mantissa:
            text = f"{mantissa}.0e{power}"
    return text


_LIVE: weakref.WeakSet[PolicyEngine] = weakref.WeakSet()


@atexit.register
def _close_live_engines() -> None:
    for engine in list(_LIVE):
        engine.close()
