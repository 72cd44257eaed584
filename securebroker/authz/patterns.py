"""Topic patterns: which topics (and subscriptions) a policy rule covers.

Semantics
---------

* A **topic** name is one or more segments separated by dots; each segment is one or more of
  ``A-Z``, ``a-z``, ``0-9``, ``_`` and ``-`` (the broker's ``[A-Za-z0-9_-]+(\\.[A-Za-z0-9_-]+)*``),
  at most 255 characters in total. Subscription names follow the same grammar and are matched
  the same way.
* A **pattern** is one or more segments separated by dots, at most 255 characters in total.
  Each segment is one of:

  - a literal segment (same alphabet as topic segments), which matches exactly that segment;
    literals are case-sensitive (``Orders`` does not match ``orders``);
  - ``*``, which matches exactly one segment (never zero, never two);
  - ``#``, which matches zero or more segments.

* A wildcard must be the whole segment: ``pay*``, ``a.#b`` and ``**`` are invalid. Empty
  segments (``a..b``, ``.a``, ``a.``) and the empty pattern are invalid. Invalid patterns raise
  ``PatternError`` naming the pattern and the reason.
* ``#`` may appear anywhere in a pattern, and more than once (AMQP topic-exchange semantics).
  When ``#`` matches zero segments, the dot next to it disappears with it: ``#.refunds``
  matches ``refunds`` and ``eu.payments.refunds``; ``orders.#`` matches ``orders``,
  ``orders.eu`` and ``orders.eu.x``; ``a.#.b`` matches ``a.b`` and ``a.x.y.b``; ``#`` matches
  every topic. Adjacent ``#`` segments are equivalent to one (``#.#`` is ``#``).
* A pattern matches a topic when the pattern's segments, in order, account for *all* of the
  topic's segments: each literal and ``*`` consumes exactly one topic segment (a literal only
  an identical one), each ``#`` consumes a run of zero or more consecutive segments. There is
  no implicit prefix matching: ``orders`` matches only ``orders``, not ``orders.eu``.
* A string that is not a valid topic name (bad grammar or longer than 255 characters) matches
  no pattern, not even ``#``.

Matching runs on the hot path (on decision-cache misses), so each pattern is compiled once:
a pattern without wildcards is a string comparison; a pattern with at most one ``#`` run is an
anchored regular expression (linear in the topic); a pattern with several ``#`` runs uses an
iterative segment matcher (worst case proportional to segments x pattern segments, no
exponential backtracking).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator
from typing import Final

from securebroker.errors import ConfigError

__all__ = [
    "MAX_PATTERN_LENGTH",
    "PatternError",
    "PatternSet",
    "PolicyError",
    "TopicPattern",
    "compile_pattern",
    "is_valid_topic",
]

#: Longest pattern (and longest topic name a pattern can match), in characters.
MAX_PATTERN_LENGTH: Final = 255

_SEGMENT: Final = r"[A-Za-z0-9_-]+"
_SEGMENT_RE: Final = re.compile(_SEGMENT)
_TOPIC_RE: Final = re.compile(rf"{_SEGMENT}(?:\.{_SEGMENT})*")
_ONE: Final = "*"
_ANY: Final = "#"


class PolicyError(ConfigError):
    """A policy file or pattern is invalid; the message names the file, rule and field.

    Defined here (and re-exported by ``securebroker.authz.policy``) so patterns can raise it
    without an import cycle. It keeps ``ConfigError``'s code: policies are configuration.
    """


class PatternError(PolicyError):
    """A topic or subscription pattern is invalid; the message names the pattern and why."""


def is_valid_topic(name: str) -> bool:
    """True if ``name`` is a syntactically valid topic (or subscription) name."""
    return len(name) <= MAX_PATTERN_LENGTH and _TOPIC_RE.fullmatch(name) is not None


def _parse(text: str) -> tuple[str, ...]:
    """Validate ``text`` and return its segments (adjacent ``#`` collapsed to one)."""
    if not isinstance(text, str):
        raise PatternError(f"pattern {text!r} is invalid: expected a string")
    if not text:
        raise PatternError("pattern '' is invalid: it is empty")
    if len(text) > MAX_PATTERN_LENGTH:
        raise PatternError(
            f"pattern {text[:40]!r}... is invalid: it is {len(text)} characters long "
            f"(at most {MAX_PATTERN_LENGTH})"
        )
    segments: list[str] = []
    for position, segment in enumerate(text.split("."), start=1):
        if not segment:
            raise PatternError(
                f"pattern {text!r} is invalid: segment {position} is empty "
                "(no leading, trailing or doubled dots)"
            )
        if segment in (_ONE, _ANY):
            if segment == _ANY and segments and segments[-1] == _ANY:
                continue  # '#.#' is '#'
        elif _SEGMENT_RE.fullmatch(segment) is None:
            if _ONE in segment or _ANY in segment:
                raise PatternError(
                    f"pattern {text!r} is invalid: wildcard in segment {segment!r} "
                    "('*' and '#' must be a whole segment)"
                )
            raise PatternError(
                f"pattern {text!r} is invalid: segment {segment!r} may only contain "
                "letters, digits, '_' and '-'"
            )
        segments.append(segment)
    return tuple(segments)


def _regex(segments: tuple[str, ...]) -> re.Pattern[str]:
    """An anchored regex over ``'.' + topic``: every element carries its leading dot."""
    parts: list[str] = []
    for segment in segments:
        if segment == _ANY:
            parts.append(rf"(?:\.{_SEGMENT})*")
        elif segment == _ONE:
            parts.append(rf"\.{_SEGMENT}")
        else:
            parts.append(r"\." + re.escape(segment))
    return re.compile("".join(parts))


def _match_segments(pattern: tuple[str, ...], topic: list[str]) -> bool:
    """Glob matching over segments: ``#`` is a star, ``*`` any one segment.

    Greedy with backtracking to the most recent ``#`` only, which is complete for this
    language and runs in O(len(pattern) * len(topic)).
    """
    p = t = 0
    star = -1
    resume = 0
    n_pattern, n_topic = len(pattern), len(topic)
    while t < n_topic:
        if p < n_pattern and pattern[p] == _ANY:
            star, resume = p, t
            p += 1
        elif p < n_pattern and (pattern[p] == _ONE or pattern[p] == topic[t]):
            p += 1
            t += 1
        elif star >= 0:
            # let the last '#' swallow one more segment and retry from there
            resume += 1
            p, t = star + 1, resume
        else:
            return False
    while p < n_pattern and pattern[p] == _ANY:
        p += 1
    return p == n_pattern


class TopicPattern:
    """A compiled, validated topic pattern. Equal (and hashing equal) when the text is equal."""

    __slots__ = ("_regex", "_segments", "is_literal", "text")

    text: str
    #: True when the pattern has no wildcards (it matches exactly one topic: itself)
    is_literal: bool
    _segments: tuple[str, ...]
    _regex: re.Pattern[str] | None

    def __init__(self, text: str) -> None:
        segments = _parse(text)
        self.text = text
        self._segments = segments
        self.is_literal = _ONE not in segments and _ANY not in segments
        self._regex = None
        if not self.is_literal and segments.count(_ANY) <= 1:
            self._regex = _regex(segments)

    def matches(self, topic: str) -> bool:
        """True if ``topic`` (a topic or subscription name) matches this pattern."""
        if self.is_literal:
            return topic == self.text
        if len(topic) > MAX_PATTERN_LENGTH:
            return False
        if self._regex is not None:
            return self._regex.fullmatch("." + topic) is not None
        if _TOPIC_RE.fullmatch(topic) is None:
            return False
        return _match_segments(self._segments, topic.split("."))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TopicPattern):
            return self.text == other.text
        return NotImplemented

    def __hash__(self) -> int:
        return hash((TopicPattern, self.text))

    def __repr__(self) -> str:
        return f"TopicPattern({self.text!r})"

    def __str__(self) -> str:
        return self.text


@functools.lru_cache(maxsize=4096)
def compile_pattern(text: str) -> TopicPattern:
    """Validate and compile ``text``; raise ``PatternError`` naming the pattern and why."""
    return TopicPattern(text)


class PatternSet:
    """An ordered, de-duplicated set of patterns; ``matches`` is true if any pattern matches."""

    __slots__ = ("_literals", "_wildcards", "patterns")

    patterns: tuple[TopicPattern, ...]
    _literals: frozenset[str]
    _wildcards: tuple[TopicPattern, ...]

    def __init__(self, patterns: Iterable[TopicPattern | str]) -> None:
        compiled: dict[TopicPattern, None] = {}
        for item in patterns:
            pattern = item if isinstance(item, TopicPattern) else compile_pattern(item)
            compiled[pattern] = None
        self.patterns = tuple(compiled)
        self._literals = frozenset(p.text for p in self.patterns if p.is_literal)
        self._wildcards = tuple(p for p in self.patterns if not p.is_literal)

    def matches(self, topic: str) -> bool:
        if topic in self._literals:
            return True
        return any(pattern.matches(topic) for pattern in self._wildcards)

    def first_match(self, topic: str) -> TopicPattern | None:
        """The first pattern (in declaration order) that matches ``topic``, if any."""
        for pattern in self.patterns:
            if pattern.matches(topic):
                return pattern
        return None

    def __iter__(self) -> Iterator[TopicPattern]:
        return iter(self.patterns)

    def __len__(self) -> int:
        return len(self.patterns)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PatternSet):
            return self.patterns == other.patterns
        return NotImplemented

    def __hash__(self) -> int:
        return hash((PatternSet, self.patterns))

    def __repr__(self) -> str:
        return f"PatternSet({[p.text for p in self.patterns]!r})"
