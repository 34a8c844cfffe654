"""The policy engine: the bundled default policy's rules, users' files, failing closed."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import regopy
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.config import parse_config
from shoal.core import ConfigError
from shoal.governance import POLICY_ERROR, PolicyBounds, PolicyEngine, UpdateFacts
from shoal.governance import policy as policy_module
from shoal.governance.policy import CHUNK, COLUMNS, facts_for, rego_input


@functools.cache
def default_engine() -> PolicyEngine:
    """The bundled default with its default bounds, compiled once."""
    return PolicyEngine()


def codes(facts: UpdateFacts, engine: PolicyEngine | None = None) -> list[str]:
    [decision] = (engine or default_engine()).decide(1, [facts])
    return [reason.code for reason in decision.reasons]


def test_an_ordinary_update_is_allowed() -> None:
    assert codes(facts_for("c1", l2_norm=2.0, relative_l2_norm=1.1, num_examples=120)) == []
    assert codes(facts_for("c1", signature="in_process", l2_norm=2.0)) == []


def test_an_empty_batch_needs_no_query() -> None:
    assert default_engine().decide(1, []) == []


@pytest.mark.parametrize(
    ("facts", "code", "detail"),
    [
        (
            facts_for("c1", l2_norm=1.8e31),
            "l2_norm_above_bound",
            "l2 norm 1.8e+31 above the bound 100",
        ),
        (facts_for("c1", l2_norm=100.5), "l2_norm_above_bound", "above the bound 100"),
        (
            facts_for("c1", relative_l2_norm=10.5),
            "relative_l2_norm_above_bound",
            "l2 norm 10.5 times the round's median, above 10",
        ),
        (
            facts_for("c1", num_examples=2**63 - 1),
            "examples_above_cap",
            "9223372036854775807 examples above the cap 10000000",
        ),
        (facts_for("c1", num_examples=2**64 + 5), "examples_above_cap", "above the cap"),
        (facts_for("c1", status="suspended"), "client_not_active", "client c1 is suspended"),
        (facts_for("c1", status="unknown"), "client_not_active", "client c1 is unknown"),
        (facts_for("c1", signature="none"), "signature_unverified", "signature is none"),
        (
            facts_for("c1", version_problems=("app version 1.0 is below the minimum 2.0",)),
            "versions_incompatible",
            "app version 1.0 is below the minimum 2.0",
        ),
        (facts_for("c1", remaining_epsilon=0.0), "privacy_budget_spent", "remaining epsilon 0"),
        (facts_for("c1", remaining_epsilon=-0.5), "privacy_budget_spent", "remaining epsilon"),
    ],
)
def test_each_default_rule_denies_with_its_code_and_detail(
    facts: UpdateFacts, code: str, detail: str
) -> None:
    [decision] = default_engine().decide(3, [facts])
    assert not decision.allowed
    [reason] = decision.reasons
    assert reason.code == code and detail in reason.detail


def test_the_bounds_themselves_are_allowed() -> None:
    at_the_bounds = facts_for(
        "c1", l2_norm=100.0, relative_l2_norm=10.0, num_examples=10_000_000, remaining_epsilon=0.1
    )
    assert codes(at_the_bounds) == []


@pytest.mark.parametrize(
    ("bound", "above", "within"), [(1e16, 2e16, 5e15), (1e300, 1e301, 1e299), (1e-05, 2e-05, 0.0)]
)
def test_a_bound_python_writes_with_an_exponent_compiles_and_holds(
    bound: float, above: float, within: float
) -> None:
    # Python writes these as 1e+16 and 1e-05, which rego-cpp refused: the policy did not compile
    engine = PolicyEngine(bounds=PolicyBounds(max_l2_norm=bound))
    batch = [facts_for("c1", l2_norm=above), facts_for("c2", l2_norm=within)]
    over, under = engine.decide(1, batch)
    assert [reason.code for reason in over.reasons] == ["l2_norm_above_bound"]
    assert under.allowed


def test_an_update_breaking_several_rules_has_every_reason_in_code_order() -> None:
    facts = facts_for("c1", status="retired", l2_norm=1e6, relative_l2_norm=1e5, num_examples=2**40)
    assert codes(facts) == [
        "client_not_active",
        "examples_above_cap",
        "l2_norm_above_bound",
        "relative_l2_norm_above_bound",
    ]


def test_a_sealed_update_is_judged_on_what_can_be_known() -> None:
    sealed = facts_for("c1", sealed=True, l2_norm_bound=40.0, num_examples_bound=1000)
    assert codes(sealed) == []  # no norm, no examples: those rules have nothing to test
    assert codes(facts_for("c1", sealed=True, status="suspended")) == ["client_not_active"]


@settings(max_examples=40, deadline=None)
@given(
    norms=st.lists(st.floats(0, 1e40, allow_nan=False), min_size=1, max_size=30),
    examples=st.lists(st.integers(1, 2**64), min_size=1, max_size=30),
)
def test_a_batch_decides_each_update_as_alone_and_as_python_would(
    norms: list[float], examples: list[int]
) -> None:
    size = min(len(norms), len(examples))
    batch = [facts_for(f"c{i}", l2_norm=norms[i], num_examples=examples[i]) for i in range(size)]
    decisions = default_engine().decide(1, batch)
    assert [d.client_id for d in decisions] == [f.client_id for f in batch]
    for facts, decision in zip(batch, decisions, strict=True):
        expected = sorted(
            ["l2_norm_above_bound"] * (facts.l2_norm > 100)  # type: ignore[operator]
            + ["examples_above_cap"] * (facts.num_examples > 10_000_000)  # type: ignore[operator]
        )
        assert [reason.code for reason in decision.reasons] == expected
        # in a batch of one, the same decision (rego-cpp's max() over a column is not to be
        # trusted: it compares numbers as text, so no rule may lean on it)
        assert default_engine().decide(1, [facts]) == [decision]


def test_the_bounds_come_from_the_config() -> None:
    section = parse_config(
        {"policy": {"max_l2_norm": 1.0, "max_relative_l2_norm": 2.0, "max_examples": 5}}
    ).policy
    engine = PolicyEngine.from_config(section)
    assert engine is not None and engine.bounds == PolicyBounds(1.0, 2.0, 5)
    assert codes(facts_for("c1", l2_norm=1.5, num_examples=6), engine) == [
        "examples_above_cap",
        "l2_norm_above_bound",
    ]
    assert PolicyEngine.from_config(parse_config({"policy": {"enabled": False}}).policy) is None


DEVICE_RULE = """package shoal.policy

import rego.v1

deny contains [i, "device_class_refused", sprintf("device class %v may not train", [c])] if {
\tsome i
\tc := input.device_class[i]
\tc == "emulator"
}

deny contains [i, "test_client", "test clients never count"] if {
\tsome i
\tclient := input.client_id[i]  # bound first: see the README's note on rego-cpp
\tstartswith(client, "test-")
}
"""


def test_a_users_file_adds_its_rules_to_the_default(tmp_path: Path) -> None:
    (tmp_path / "devices.rego").write_text(DEVICE_RULE)
    engine = PolicyEngine(files=[tmp_path / "devices.rego"])
    batch = [
        facts_for("c1", device_class="emulator"),
        facts_for("test-7", device_class="phone"),
        facts_for("c3", device_class="phone", l2_norm=1e9),
        facts_for("c4", device_class="phone"),
    ]
    assert [[r.code for r in d.reasons] for d in engine.decide(1, batch)] == [
        ["device_class_refused"],
        ["test_client"],
        ["l2_norm_above_bound"],  # the default still applies
        [],
    ]
    assert codes(facts_for("c1", device_class="emulator")) == []  # without the file: allowed


def test_only_the_columns_the_rules_read_are_sent(tmp_path: Path) -> None:
    assert "device_class" not in default_engine().columns and "l2_norm" in default_engine().columns
    (tmp_path / "devices.rego").write_text(DEVICE_RULE)
    assert "device_class" in PolicyEngine(files=[tmp_path / "devices.rego"]).columns
    (tmp_path / "any.rego").write_text(
        'package shoal.policy\nimport rego.v1\ndeny contains [0, "x", "y"] if input[k] == 7\n'
    )
    assert PolicyEngine(files=[tmp_path / "any.rego"]).columns == COLUMNS


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "package shoal.policy\nimport rego.v1\ndeny contains x if {\n  x := \n}\n",
            "bad.rego: line 4, column 5: Invalid assignment operator",
        ),
        ("package other\nimport rego.v1\nx := 1\n", "bad.rego: its package must be shoal.policy"),
        ("import rego.v1\n", "its package must be shoal.policy, got none"),
    ],
)
def test_a_file_that_does_not_compile_is_one_line_naming_it(
    tmp_path: Path, source: str, message: str, capfd: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.rego"
    path.write_text(source)
    with pytest.raises(ConfigError) as raised:
        PolicyEngine(files=[path])
    text = str(raised.value)
    assert message in text and str(path) in text and "\n" not in text
    assert capfd.readouterr().out == ""  # rego-cpp's own report kept off the user's stdout


def test_a_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"policy file .*nope.rego: cannot be read"):
        PolicyEngine(files=[tmp_path / "nope.rego"])


@pytest.mark.parametrize(
    "rule",
    [
        'deny contains "blocked" if input.count > 0',  # not [index, code, detail]
        'deny contains [7, "x", "y"] if input.count > 0',  # no update 7 in a batch of 2
        'deny contains [0, "", "y"] if input.count > 0',  # no code
    ],
)
def test_a_malformed_denial_fails_closed(tmp_path: Path, rule: str) -> None:
    (tmp_path / "odd.rego").write_text(f"package shoal.policy\nimport rego.v1\n{rule}\n")
    engine = PolicyEngine(files=[tmp_path / "odd.rego"])
    decisions = engine.decide(1, [facts_for("a"), facts_for("b")])
    assert [[r.code for r in d.reasons] for d in decisions] == [[POLICY_ERROR]] * 2
    assert "not [index, code, detail]" in decisions[0].reasons[0].detail


def test_a_rule_set_that_conflicts_fails_closed(tmp_path: Path) -> None:
    (tmp_path / "conflict.rego").write_text(
        "package shoal.policy\nimport rego.v1\n"
        "verdict := 1 if input.count > 0\nverdict := 2 if input.count > 0\n"
        'deny contains [0, "v", "v"] if verdict == 1\n'
    )
    engine = PolicyEngine(files=[tmp_path / "conflict.rego"])
    [decision] = engine.decide(1, [facts_for("a")])
    assert [r.code for r in decision.reasons] == [POLICY_ERROR]


def test_a_round_larger_than_one_query_is_decided_in_chunks_in_order() -> None:
    count = 2 * CHUNK + 7
    batch = [facts_for(f"c{i}", l2_norm=1e9 if i % 50 == 49 else 1.0) for i in range(count)]
    decisions = default_engine().decide(1, batch)
    assert [d.client_id for d in decisions] == [f"c{i}" for i in range(count)]
    assert [i for i, d in enumerate(decisions) if not d.allowed] == list(range(49, count, 50))


def test_the_input_summarizes_each_column_it_sends(tmp_path: Path) -> None:
    (tmp_path / "all.rego").write_text(
        'package shoal.policy\nimport rego.v1\ndeny contains [0, "x", "y"] if {\n'
        "  some c\n  input.highest[c] == input.lowest[c]\n  input.distinct[c] == []\n}\n"
    )
    engine = PolicyEngine(files=[tmp_path / "all.rego"])  # reads every summary
    batch = [
        facts_for("c1", l2_norm=3.0, num_examples=2**64 + 5, status="suspended"),
        facts_for("c2", l2_norm=float("nan"), num_examples=7, version_problems=("old app",)),
        facts_for("c3", l2_norm=None, signature="none"),
        facts_for("c4", l2_norm=-1.0, version_problems=("old app",)),
    ]
    document = engine.input_of(5, batch)
    assert document["highest"]["l2_norm"] == 3.0 and document["lowest"]["l2_norm"] == -1.0
    assert document["highest"]["num_examples"] == float(2**64 + 5)  # as Rego takes it
    assert document["lowest"]["num_examples"] == 7
    assert document["highest"]["remaining_epsilon"] is None  # no number in the column
    assert document["distinct"]["status"] == ["suspended", "active"]
    assert document["distinct"]["signature"] == ["verified", "none"]
    assert document["distinct"]["version_problems"] == [[], ["old app"]]
    assert document["distinct"]["sealed"] == [False]
    assert "client_id" not in document["distinct"]  # every one differs
    assert set(document["highest"]) | set(document["distinct"]) | {"client_id"} == set(COLUMNS)
    decisions = engine.decide(1, batch)  # every summary goes into rego-cpp's input too
    assert [[r.code for r in d.reasons] for d in decisions][1:] == [
        ["versions_incompatible"],  # and a NaN norm is no number: nothing to bound
        ["signature_unverified"],
        ["versions_incompatible"],
    ]
    # the default is sent the summaries its guards read, and no other
    assert default_engine().summaries == {
        "highest": ("l2_norm", "relative_l2_norm", "num_examples"),
        "lowest": ("remaining_epsilon",),
        "distinct": ("status", "version_problems", "signature"),
    }
    plain = PolicyEngine(files=[tmp_path / "all.rego"], builtin=False)
    (tmp_path / "none.rego").write_text(DEVICE_RULE)
    assert PolicyEngine(files=[tmp_path / "none.rego"], builtin=False).summaries == {}
    assert set(plain.input_of(1, batch)) >= {"highest", "lowest", "distinct"}


def test_a_rule_that_reads_a_summary_gets_its_column(tmp_path: Path) -> None:
    (tmp_path / "phones.rego").write_text(
        'package shoal.policy\nimport rego.v1\ndeny contains [i, "emulator", "no"] if {\n'
        '  "emulator" in input.distinct.device_class\n'
        '  some i\n  input.device_class[i] == "emulator"\n}\n'
    )
    engine = PolicyEngine(files=[tmp_path / "phones.rego"])
    assert "device_class" in engine.columns
    batch = [facts_for("c1", device_class="phone"), facts_for("c2", device_class="emulator")]
    assert [d.allowed for d in engine.decide(1, batch)] == [True, False]
    (tmp_path / "any.rego").write_text(
        'package shoal.policy\nimport rego.v1\ndeny contains [0, "x", "y"] if {\n'
        "  some c\n  input.highest[c] == 7\n}\n"
    )
    assert PolicyEngine(files=[tmp_path / "any.rego"]).columns == COLUMNS


UNGUARDED_DEFAULT = """package shoal.policy

import rego.v1

bounds := data.shoal.bounds

deny contains [i, "signature_unverified", sprintf("the request's signature is %v", [s])] if {
\tsome i
\ts := input.signature[i]
\tnot s in {"verified", "in_process"}
}

deny contains [i, "client_not_active", sprintf("client %v is %v", [input.client_id[i], s])] if {
\tsome i
\ts := input.status[i]
\ts != "active"
}

deny contains [i, "versions_incompatible", concat("; ", problems)] if {
\tsome i
\tproblems := input.version_problems[i]
\tcount(problems) > 0
}

deny contains [i, "privacy_budget_spent", sprintf("remaining epsilon %v", [e])] if {
\tsome i
\te := input.remaining_epsilon[i]
\tis_number(e)
\te <= 0
}

deny contains [i, "l2_norm_above_bound", sprintf("l2 norm %v above the bound %v", [n, b])] if {
\tb := bounds.max_l2_norm
\tsome i
\tn := input.l2_norm[i]
\tis_number(n)
\tn > b
}

deny contains [
\ti, "relative_l2_norm_above_bound",
\tsprintf("l2 norm %v times the round's median, above %v", [r, b]),
] if {
\tb := bounds.max_relative_l2_norm
\tsome i
\tr := input.relative_l2_norm[i]
\tis_number(r)
\tr > b
}

deny contains [i, "examples_above_cap", sprintf("%v examples above the cap %v", [n, b])] if {
\tb := bounds.max_examples
\tsome i
\tn := input.num_examples[i]
\tis_number(n)
\tn > b
}
"""


@functools.cache
def unguarded_engine(tmp: Path) -> PolicyEngine:
    (tmp / "unguarded.rego").write_text(UNGUARDED_DEFAULT)
    return PolicyEngine(files=[tmp / "unguarded.rego"], builtin=False)


_NUMBERS = st.one_of(st.none(), st.floats(-1e3, 1e40, allow_nan=False), st.integers(0, 2**64))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.fixed_dictionaries(
            {
                "status": st.sampled_from(["active", "active", "suspended", "unknown"]),
                "signature": st.sampled_from(["verified", "in_process", "none"]),
                "version_problems": st.sampled_from([(), (), ("app 1.0 below 2.0",)]),
                "remaining_epsilon": st.one_of(st.none(), st.floats(-1, 5, allow_nan=False)),
                "l2_norm": _NUMBERS,
                "relative_l2_norm": _NUMBERS,
                "num_examples": st.one_of(st.none(), st.integers(0, 2**65)),
            }
        ),
        min_size=1,
        max_size=40,
    )
)
def test_the_guards_change_no_decision_of_the_default(
    tmp_path_factory: pytest.TempPathFactory, rows: list[dict[str, object]]
) -> None:
    """The default's guards only skip work: on any batch it decides as the same rules
    without them, reason for reason."""
    reference = unguarded_engine(tmp_path_factory.getbasetemp())
    batch = [facts_for(f"c{i}", **row) for i, row in enumerate(rows)]
    assert default_engine().decide(2, batch) == reference.decide(2, batch)


class _Status(str):
    """A text whose ``__str__`` is not its characters (as an enum of texts has)."""

    __slots__ = ()

    def __str__(self) -> str:
        return "Status.ACTIVE"


def test_the_input_rego_cpp_gets_is_what_regopy_would_make() -> None:
    document = {
        "round": 3,
        "big": 2**62,
        "negative": -7,
        "ratio": 0.1,
        "huge": 1.8e31,
        "numpy": np.float64(2.5),
        "texts": ["a", "é", ""],
        "status": _Status("active"),
        "flags": [True, False],
        "nothing": None,
        "nested": {"problems": [[], ["old app"]], "pair": (1, "x")},
    }
    interpreter = regopy.Interpreter()
    interpreter.set_input(rego_input(document))
    ours = str(interpreter.query("x := input"))
    interpreter.set_input(regopy.Input(document))
    assert ours == str(interpreter.query("x := input"))
    with pytest.raises(TypeError, match="cannot hold a set"):
        rego_input({"ids": {1, 2}})


def test_without_regopys_calls_the_input_is_regopys_own(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = [facts_for("c1", l2_norm=1e9), facts_for("c2", l2_norm=1.0)]
    expected = default_engine().decide(1, batch)
    monkeypatch.setattr(policy_module, "_CALLS", None)
    assert isinstance(rego_input({"a": 1}), regopy.Input)
    assert default_engine().decide(1, batch) == expected
