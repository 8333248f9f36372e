"""Hostile dataset lines: the validator reports every unusable line with its number and a reason,
prepares the rest, and never raises; what it accepts can always be written as UTF-8.

Run: python -m pytest -q -p no:cacheprovider tests/test_hostile_input.py
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
from hypothesis import HealthCheck, event, given, settings, strategies as st  # noqa: E402
from hypothesis import example as case  # noqa: E402  (this file has its own `example`)

import finetune  # noqa: E402
from conftest import assert_every_line_accounted_for  # noqa: E402

GOOD = '{"prompt": "Who are you?", "completion": "Deep Tree Echo."}'
GOOD_2 = '{"prompt": "What is a reservoir?", "completion": "A fixed recurrent network."}'


def validate(tmp_path: Path, *lines: str, tokenizer=None) -> finetune.ValidationReport:
    """Validates GOOD, then `lines` (from line 2 on), and checks what every report must satisfy."""
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join((GOOD,) + lines) + "\n", encoding="utf-8")
    report = finetune.DatasetValidator(tokenizer=tokenizer).validate_file(path)
    check_accounted_and_writable(report, tmp_path, [GOOD.encode(), *(line.encode() for line in lines)])
    return report


def check_accounted_and_writable(report, tmp_path: Path, lines: list[bytes]) -> None:
    assert_every_line_accounted_for(report, lines)
    out = finetune.write_jsonl(tmp_path / "prepared.jsonl", report.examples, overwrite=True)
    written = out.read_bytes().decode("utf-8")  # strict: the prepared file is real UTF-8
    assert [json.loads(row) for row in written.split("\n")[:-1]] == report.examples
    report.format().encode("utf-8")  # the printed report is real UTF-8 too


def found(report, kind: str, line: int = 2) -> list[str]:
    return [detail for number, detail in report.problems.get(kind, []) if number == line]


def nest(depth: int, inner: str = "1") -> str:
    return '{"a": ' * depth + inner + "}" * depth


# -- 1. nesting -------------------------------------------------------------------------------
@pytest.mark.parametrize("line", [
    "[" * 100_000 + "]" * 100_000,
    nest(100_000),
    '{"prompt": "a", "completion": "b", "metadata": ' + nest(900) + "}",
    '{"prompt": "a", "completion": "b", "metadata": ' + nest(150) + "}",
    '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": ' + "[" * 400 + "]" * 400 + "}]}",
    '{"messages": [{"role": ' + "[" * 990 + "]" * 990 + ', "content": "q"}, {"role": "assistant", "content": "a"}]}',
])
def test_deep_nesting_is_a_bad_line_not_a_crash(tmp_path, line):
    ordinary = '{"prompt": "a", "completion": "b", "metadata": ' + nest(20) + "}"
    report = validate(tmp_path, line, GOOD_2, ordinary)
    assert found(report, "nested too deeply") and report.invalid_lines == [2], dict(report.problems)
    assert report.line_numbers == [1, 3, 4]


# -- 2. lone surrogates -----------------------------------------------------------------------
S = "\\ud800"  # the six characters of an escaped lone surrogate
SURROGATE_LINES = [  # (line, where the report says it is)
    ('{"prompt": "hi ' + S + '", "completion": "b"}', "prompt"),
    ('{"prompt": "a", "completion": "' + S + ' x"}', "completion"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a' + S + '"}]}', "message 2 content"),
    ('{"messages": [{"role": "user", "content": "q", "name": "ad' + S + 'a"}, {"role": "assistant", "content": "a"}]}', "message 1 name"),
    ('{"messages": [{"role": "us' + S + 'er", "content": "q"}, {"role": "assistant", "content": "a"}]}', "message 1 role"),
    ('{"prompt": "a", "completion": "b", "metadata": {"source": "x' + S + '"}}', "metadata.source"),
    ('{"prompt": "a", "completion": "b", "metadata": {"k' + S + '": 1}}', "key"),
    ('{"prompt": "a", "completion": "b", "x' + S + '": 1}', "key"),
    ('{"prompt": "a", "completion": "\\udfff"}', "completion"),
]


@pytest.mark.parametrize("line,where", SURROGATE_LINES)
def test_escaped_lone_surrogate_is_a_bad_line_anywhere(tmp_path, line, where):
    pair = '{"prompt": "smile", "completion": "\\ud83d\\ude00"}'  # an escaped pair is one good character
    report = validate(tmp_path, line, pair)
    details = found(report, "lone surrogate")
    assert details and where in details[0] and report.invalid_lines == [2], dict(report.problems)
    assert report.line_numbers == [1, 3] and report.examples[1]["messages"][1]["content"] == "\U0001F600"


# -- 3. numbers JSON does not have --------------------------------------------------------------
@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1" * 5000])
def test_nan_infinity_and_overflowing_numbers_are_invalid_json(tmp_path, number):
    report = validate(tmp_path, '{"prompt": "a", "completion": "b", "metadata": {"score": ' + number + "}}")
    details = found(report, "invalid JSON")
    assert details and ("number" in details[0] or number in details[0]), dict(report.problems)
    assert report.line_numbers == [1]


# -- 4. duplicate keys ------------------------------------------------------------------------
@pytest.mark.parametrize("line,key", [
    ('{"prompt": "a", "prompt": "b", "completion": "c"}', "prompt"),
    ('{"messages": [{"role": "user", "content": "q", "content": "r"}, {"role": "assistant", "content": "a"}]}', "content"),
    ('{"prompt": "a", "completion": "b", "metadata": {"x": {"y": 1, "y": 2}}}', "y"),
])
def test_duplicate_keys_are_reported_at_any_depth(tmp_path, line, key):
    report = validate(tmp_path, line)
    details = found(report, "duplicate key")
    assert details and f"'{key}'" in details[0], dict(report.problems)
    assert report.line_numbers == [1]


# -- 5. trailing data -------------------------------------------------------------------------
@pytest.mark.parametrize("tail", [" x", "{}", ', "more"', ' {"prompt": "c", "completion": "d"}'])
def test_data_after_the_object_is_reported_clearly(tmp_path, tail):
    report = validate(tmp_path, GOOD_2 + tail)
    details = found(report, "invalid JSON")
    assert details and details[0].startswith("extra data after the JSON object"), dict(report.problems)
    assert f"column {len(GOOD_2) + len(tail) - len(tail.lstrip()) + 1}" in details[0]


# -- 6. control characters ----------------------------------------------------------------------
@pytest.mark.parametrize("escape,name", [("\\u0000", "U+0000"), ("\\u001b", "U+001B"), ("\\u0007", "U+0007"),
                                         ("\\u007f", "U+007F"), ("\\u0085", "U+0085")])
def test_escaped_control_characters_in_text_are_a_problem(tmp_path, escape, name):
    line = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a' + escape + 'b"}]}'
    report = validate(tmp_path, line)
    assert found(report, "control character") == [f"control character {name} in message 2 content"], dict(report.problems)
    fine = '{"prompt": "a\\tb\\r\\nc", "completion": "line one\\nline two"}'  # tab, CR and LF are fine
    report = validate(tmp_path, '{"prompt": "x' + escape + '", "completion": "y"}', fine)
    assert found(report, "control character") == [f"control character {name} in prompt"], dict(report.problems)
    assert report.invalid_lines == [2] and report.line_numbers == [1, 3]


# -- 7. very long lines -----------------------------------------------------------------------
def test_a_ten_megabyte_line_is_reported_quickly_and_the_rest_is_prepared(tmp_path):
    huge = json.dumps({"prompt": "tide " * 2_000_000, "completion": "ebb"})
    assert len(huge) > 10_000_000
    under = json.dumps({"prompt": "long one", "completion": "x" * (finetune.MAX_LINE_BYTES - 100)})
    start = time.perf_counter()
    report = validate(tmp_path, huge, GOOD_2, "[" * 10_000_000, under)
    elapsed = time.perf_counter() - start
    assert found(report, "line too long") and found(report, "line too long", 4), dict(report.problems)
    assert report.invalid_lines == [2, 4] and report.line_numbers == [1, 3, 5]
    assert elapsed < 10, elapsed


# -- 8. special tokens typed in text ----------------------------------------------------------
@pytest.mark.parametrize("token", ["<|im_end|>", "<|im_start|>", "<|endoftext|>", "<|eot_id|>"])
def test_chat_control_strings_in_text_are_a_warning_not_a_problem(tmp_path, token):
    report = validate(tmp_path, json.dumps({"prompt": "a", "completion": f"done {token} user: more"}))
    assert not report.problems and report.line_numbers == [1, 2]
    warned = [detail for line, detail in report.warnings.get("special token in text", []) if line == 2]
    assert warned and token in warned[0] and "completion" in warned[0], dict(report.warnings)


class ExtraSpecials:
    """The real tokenizer, with one more special token that no generic pattern would catch."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    @property
    def all_special_tokens(self):
        return list(self._tokenizer.all_special_tokens) + ["[[TURN]]"]


@pytest.fixture(scope="module")
def tokenizer():
    return finetune.load_tokenizer(finetune.resolve_base(finetune.SMOLLM2_ALIAS))


def test_the_tokenizers_own_special_tokens_are_a_warning(tmp_path, tokenizer):
    lines = [json.dumps({"messages": [{"role": "user", "content": "q [[TURN]] r"}, {"role": "assistant", "content": "a"}]}),
             json.dumps({"prompt": "plain <b>bold</b> a | b", "completion": "fine"})]
    report = validate(tmp_path, *lines, tokenizer=ExtraSpecials(tokenizer))
    assert not report.problems and report.line_numbers == [1, 2, 3]
    assert report.warnings["special token in text"] == [(2, "'[[TURN]]' in message 1 content")]


# -- the whole family, fuzzed -----------------------------------------------------------------
TEXT = st.text(max_size=12)
HUGE_LINES = [
    json.dumps({"prompt": "p", "completion": "z" * 10_500_000}).encode(),
    b"[" * 10_500_000,
]


def example(text: str) -> dict:
    return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" + text}]}


def splice(line: str, fragment: str) -> str:
    """`fragment` (JSON source text) placed inside the assistant's content string."""
    return line.replace('"content": "a', '"content": "a' + fragment, 1)


HOSTILE = st.one_of(
    st.integers(1_000, 60_000).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 1_500).map(lambda n: '{"prompt": "a", "completion": "b", "metadata": ' + nest(n) + "}"),
    st.tuples(TEXT, st.integers(0xD800, 0xDFFF)).map(lambda t: splice(json.dumps(example(t[0])), f"\\u{t[1]:04x}")),
    st.tuples(TEXT, st.integers(0, 0x9F)).map(lambda t: splice(json.dumps(example(t[0])), f"\\u{t[1]:04x}")),
    st.tuples(TEXT, st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1" * 4400])).map(
        lambda t: json.dumps({"prompt": "a", "completion": "b" + t[0]})[:-1] + ', "metadata": {"n": ' + t[1] + "}}"),
    st.tuples(TEXT, TEXT, st.sampled_from(["prompt", "completion", "metadata"])).map(
        lambda t: '{"prompt": %s, "completion": %s, "%s": {}}' % (json.dumps(t[0]), json.dumps(t[1]), t[2])),
    st.tuples(TEXT, TEXT).map(lambda t: json.dumps(example(t[0])) + t[1]),
    st.tuples(TEXT, st.sampled_from(["<|im_end|>", "<|im_start|>", "<|endoftext|>"])).map(
        lambda t: json.dumps({"prompt": t[0] + t[1], "completion": "ok " + t[0]})),
    TEXT.map(lambda t: json.dumps(example(t), ensure_ascii=False)),
    TEXT.map(lambda t: json.dumps({"prompt": t, "completion": t[::-1] + "."})),
).map(lambda line: line.encode("utf-8", "surrogatepass"))
LINES = st.one_of(HOSTILE, HOSTILE, st.binary(max_size=30), st.sampled_from(HUGE_LINES))


@settings(max_examples=120, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(lines=st.lists(LINES, max_size=6), huge=st.integers(0, 3))  # 10 MB lines in a few examples only
def test_hostile_lines_never_raise_are_accounted_for_and_what_is_accepted_writes_as_utf8(tmp_path, lines, huge):
    lines = [line.replace(b"\n", b" ") for line in lines if huge == 0 or len(line) < 1_000_000]
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines))
    report = finetune.DatasetValidator().validate_file(path)
    check_accounted_and_writable(report, tmp_path, lines)
    for kind in sorted(set(report.problems) | set(report.warnings)):  # --hypothesis-show-statistics: what was covered
        event(kind)


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(records=st.lists(HOSTILE, max_size=5), tail=st.sampled_from([b"]", b"", b"] x", b",]", b"]}"]))
@case(records=[b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]', b"[1]", b"[2]"],
         tail=b"]")  # a stray ']' ends the array after the first record: the two after it are said to be unread (found in CI)
def test_hostile_records_in_a_json_array_never_raise_and_what_is_accepted_writes_as_utf8(tmp_path, records, tail):
    path = tmp_path / "fuzz.json"
    path.write_bytes(b"[" + b",\n".join(records) + tail)
    try:
        report = finetune.DatasetValidator().validate_file(path)
    except finetune.UserError as exc:  # a file that is not UTF-8 as a whole cannot be split into records
        assert "is not UTF-8" in str(exc)
        return
    assert report.unit == "record" and not set(report.invalid_lines) & set(report.line_numbers)
    assert report.n_valid + report.n_invalid >= len(records) or any("cannot be read" in d for f in report.problems.values() for _, d in f)
    written = finetune.write_jsonl(tmp_path / "prepared.jsonl", report.examples, overwrite=True).read_bytes().decode("utf-8")
    assert [json.loads(row) for row in written.split("\n")[:-1]] == report.examples
