"""Topic patterns: the documented examples, invalid patterns, and properties against a reference."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from securebroker.authz import PatternError, PatternSet, PolicyError, TopicPattern, compile_pattern
from securebroker.authz.patterns import MAX_PATTERN_LENGTH, is_valid_topic
from securebroker.core.broker import NAME_RE
from securebroker.errors import ConfigError

BOUNDED = settings(
    max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def reference_match(pattern: list[str], topic: list[str]) -> bool:
    """The definition: literals and '*' take one segment, '#' takes zero or more."""
    if not pattern:
        return not topic
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return reference_match(rest, topic) or (bool(topic) and reference_match(pattern, topic[1:]))
    if not topic:
        return False
    return (head in ("*", topic[0])) and reference_match(rest, topic[1:])


# --------------------------------------------------------------------------------------------
# examples

CASES: list[tuple[str, str, bool]] = [
    # literals
    ("orders", "orders", True),
    ("orders", "orders.eu", False),
    ("orders.eu", "orders.eu", True),
    ("orders.eu", "orders", False),
    ("orders.eu", "orders-eu", False),
    ("Orders", "orders", False),
    ("orders", "Orders", False),
    ("a_b-C.9", "a_b-C.9", True),
    # '*' is exactly one segment
    ("*", "a", True),
    ("*", "a.b", False),
    ("orders.*", "orders.eu", True),
    ("orders.*", "orders", False),
    ("orders.*", "orders.eu.x", False),
    ("*.refunds", "eu.refunds", True),
    ("*.refunds", "refunds", False),
    ("*.refunds", "eu.payments.refunds", False),
    ("a.*.c", "a.b.c", True),
    ("a.*.c", "a.c", False),
    ("a.*.c", "a.b.b.c", False),
    ("*.*", "a.b", True),
    ("*.*", "a", False),
    # '#' at the end: zero or more
    ("orders.#", "orders", True),
    ("orders.#", "orders.eu", True),
    ("orders.#", "orders.eu.x", True),
    ("orders.#", "ordersx", False),
    ("orders.#", "order", False),
    ("orders.#", "x.orders", False),
    # '#' at the start
    ("#.refunds", "refunds", True),
    ("#.refunds", "eu.refunds", True),
    ("#.refunds", "eu.payments.refunds", True),
    ("#.refunds", "refunds.eu", False),
    ("#.refunds", "xrefunds", False),
    # '#' in the middle
    ("a.#.b", "a.b", True),
    ("a.#.b", "a.x.b", True),
    ("a.#.b", "a.x.y.b", True),
    ("a.#.b", "ab", False),
    ("a.#.b", "a", False),
    ("a.#.b", "b", False),
    ("a.#.b", "a.b.c", False),
    # '#' alone and repeated
    ("#", "a", True),
    ("#", "a.b.c", True),
    ("#.#", "a", True),
    ("#.#", "a.b.c", True),
    ("#.#.#", "a", True),
    ("#.a.#", "a", True),
    ("#.a.#", "x.a.y", True),
    ("#.a.#", "x.y", False),
    ("#.a.#.b.#", "a.b", True),
    ("#.a.#.b.#", "x.a.y.b.z", True),
    ("#.a.#.b.#", "b.a", False),
    ("#.a.#.a", "a.a", True),
    ("#.a.#.a", "a", False),
    ("#.a.#.a", "a.x.a.x", False),
    # mixed
    ("a.*.#", "a", False),
    ("a.*.#", "a.b", True),
    ("a.*.#", "a.b.c.d", True),
    ("#.*", "a", True),
    ("#.*", "a.b", True),
    ("*.#.*", "a", False),
    ("*.#.*", "a.b", True),
    ("*.#.*", "a.b.c", True),
    ("#.*.#", "a", True),
    # not valid topic names never match
    ("#", "", False),
    ("#", "a..b", False),
    ("#", ".a", False),
    ("#", "a.", False),
    ("#", "a b", False),
    ("#", "a\n", False),
    ("*", "a*", False),
    ("#.a.#.b", "a..b", False),
    ("#", "a" * (MAX_PATTERN_LENGTH + 1), False),
    ("#", "a" * MAX_PATTERN_LENGTH, True),
]


@pytest.mark.parametrize(("pattern", "topic", "expected"), CASES)
def test_examples(pattern: str, topic: str, expected: bool) -> None:
    assert compile_pattern(pattern).matches(topic) is expected
    # the examples agree with the reference definition (for valid topics)
    if is_valid_topic(topic):
        assert reference_match(pattern.split("."), topic.split(".")) is expected


INVALID: list[tuple[str, str]] = [
    ("", "is empty"),
    ("a..b", "segment 2 is empty"),
    (".a", "segment 1 is empty"),
    ("a.", "segment 2 is empty"),
    (".", "segment 1 is empty"),
    ("pay*", "wildcard in segment 'pay*'"),
    ("a.#b", "wildcard in segment '#b'"),
    ("a.b#", "wildcard in segment 'b#'"),
    ("**", "wildcard in segment '**'"),
    ("##", "wildcard in segment '##'"),
    ("*#", "wildcard in segment '*#'"),
    ("orders eu", "segment 'orders eu' may only contain"),
    ("orders/eu", "segment 'orders/eu' may only contain"),
    ("ordérs", "segment 'ordérs' may only contain"),
    ("a.>", "segment '>' may only contain"),
    ("a" * (MAX_PATTERN_LENGTH + 1), "256 characters long (at most 255)"),
]


@pytest.mark.parametrize(("text", "why"), INVALID)
def test_invalid_patterns(text: str, why: str) -> None:
    with pytest.raises(PatternError) as info:
        compile_pattern(text)
    message = str(info.value)
    assert why in message
    assert repr(text[:40]) in message
    assert isinstance(info.value, PolicyError)
    assert isinstance(info.value, ConfigError)
    assert info.value.code == ConfigError.code


def test_longest_pattern_is_accepted() -> None:
    text = ".".join(["a"] * 128)  # 255 characters
    assert len(text) == MAX_PATTERN_LENGTH
    assert compile_pattern(text).matches(text)


def test_non_string_is_rejected() -> None:
    with pytest.raises(PatternError, match="expected a string"):
        TopicPattern(42)  # type: ignore[arg-type]


def test_pattern_value_semantics() -> None:
    a, b = TopicPattern("orders.#"), TopicPattern("orders.#")
    assert a == b and hash(a) == hash(b)
    assert a != TopicPattern("orders.*")
    assert {a, b} == {a}
    assert a.text == "orders.#" and str(a) == "orders.#" and repr(a) == "TopicPattern('orders.#')"
    assert compile_pattern("orders.#") is compile_pattern("orders.#")
    assert compile_pattern("orders.eu").is_literal
    assert not compile_pattern("orders.*").is_literal
    assert a != "orders.#"


def test_pattern_set() -> None:
    patterns = PatternSet(["orders", "#.refunds", compile_pattern("a.*"), "orders"])
    assert len(patterns) == 3
    assert [p.text for p in patterns] == ["orders", "#.refunds", "a.*"]
    assert patterns.matches("orders")
    assert patterns.matches("eu.refunds")
    assert patterns.matches("a.b")
    assert not patterns.matches("orders.eu")
    assert not patterns.matches("a")
    assert patterns.first_match("refunds") == compile_pattern("#.refunds")
    assert patterns.first_match("nope") is None
    assert patterns == PatternSet(["orders", "#.refunds", "a.*"])
    assert hash(patterns) == hash(PatternSet(["orders", "#.refunds", "a.*"]))
    assert "'#.refunds'" in repr(patterns)
    assert not PatternSet([]).matches("orders")
    with pytest.raises(PatternError, match=re.escape("'a..b'")):
        PatternSet(["ok", "a..b"])


def test_many_hashes_do_not_backtrack_exponentially() -> None:
    # a regex engine would try C(n, k) ways to split the topic between the '#'s
    pattern = compile_pattern(".".join(["#", "a"] * 20) + ".#.b")
    topic = ".".join(["a"] * 120) + ".c"
    assert not pattern.matches(topic)
    assert compile_pattern("#.a.#.a.#.a.#.a.#.c").matches(topic)


# --------------------------------------------------------------------------------------------
# properties

topic_segments = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=7)
pattern_segments = st.lists(st.sampled_from(["a", "b", "c", "*", "#"]), min_size=1, max_size=7)


@BOUNDED
@given(pattern=pattern_segments, topic=topic_segments)
def test_matches_agrees_with_reference(pattern: list[str], topic: list[str]) -> None:
    compiled = compile_pattern(".".join(pattern))
    assert compiled.matches(".".join(topic)) is reference_match(pattern, topic)


@BOUNDED
@given(
    pattern=st.lists(st.sampled_from(["a", "*", "#"]), min_size=1, max_size=12),
    topic=st.lists(st.sampled_from(["a", "b"]), min_size=1, max_size=12),
)
def test_many_wildcards_agree_with_reference(pattern: list[str], topic: list[str]) -> None:
    compiled = compile_pattern(".".join(pattern))
    assert compiled.matches(".".join(topic)) is reference_match(pattern, topic)


@BOUNDED
@given(pattern=topic_segments, topic=topic_segments)
def test_pattern_without_wildcards_matches_only_itself(
    pattern: list[str], topic: list[str]
) -> None:
    compiled = compile_pattern(".".join(pattern))
    assert compiled.is_literal
    assert compiled.matches(".".join(pattern))
    assert compiled.matches(".".join(topic)) is (pattern == topic)


SEGMENT_CHARS = string.ascii_letters + string.digits + "_-"
valid_topics = st.lists(
    st.text(alphabet=SEGMENT_CHARS, min_size=1, max_size=10), min_size=1, max_size=10
).map(".".join)


@BOUNDED
@given(topic=valid_topics)
def test_hash_matches_every_topic(topic: str) -> None:
    assert NAME_RE.fullmatch(topic) and is_valid_topic(topic)
    assert compile_pattern("#").matches(topic)
    assert compile_pattern("#.#").matches(topic)
    assert compile_pattern(topic).matches(topic)


@BOUNDED
@given(topic=st.text(alphabet="ab.#* \n", max_size=12))
def test_invalid_topics_match_nothing(topic: str) -> None:
    if is_valid_topic(topic):
        return
    for text in ("#", "*", "#.a.#.b.#", "a.#", "#.*.#.*", "a"):
        assert not compile_pattern(text).matches(topic)


def reference_valid(text: str) -> bool:
    return 0 < len(text) <= MAX_PATTERN_LENGTH and all(
        seg in ("*", "#") or re.fullmatch(r"[A-Za-z0-9_-]+", seg) is not None
        for seg in text.split(".")
    )


@BOUNDED
@given(text=st.text(alphabet="ab-.*#/", max_size=10))
def test_compile_accepts_exactly_the_grammar(text: str) -> None:
    if reference_valid(text):
        assert compile_pattern(text).text == text
    else:
        with pytest.raises(PatternError):
            compile_pattern(text)


@BOUNDED
@given(pattern=pattern_segments, topics=st.lists(topic_segments, min_size=1, max_size=4))
def test_pattern_set_is_any(pattern: list[str], topics: list[list[str]]) -> None:
    texts = [".".join(pattern), *(".".join(t) for t in topics[1:])]
    patterns = PatternSet(texts)
    topic = ".".join(topics[0])
    expected = any(reference_match(t.split("."), topics[0]) for t in texts)
    assert patterns.matches(topic) is expected
    assert (patterns.first_match(topic) is not None) is expected
