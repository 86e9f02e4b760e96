"""How hard a chat request looks, before anything is called: a deterministic score and a tier.

``auto`` (common/routing/virtual.py) sends simple prompts to small (cheap, local) models and hard ones
to large (capable) ones. The classifier is a table of signals, each a small pure function of the
request that adds points; the sum is the score, and the score's band is the tier:

    signal      points  when
    length      0-3     estimated tokens of all messages: <300 → 0, <1,500 → 1, <6,000 → 2, more → 3
    code        1-2     2: a fenced block or lines that read as code; 1: programming words only
    math        1-2     2: LaTeX or proof/calculus vocabulary; 1: an arithmetic expression
    reasoning   1-2     analyse / design / step by step / trade-off / debug …: 1 for one kind, 2 for more
    tools       1       the request offers tools (the model must plan calls)
    images      1       an image part in any message
    depth       1-2     user turns: 4+ → 1, 10+ → 2
    schema      1       a ``json_schema`` response format (structured output to satisfy)

    score 0-1 → small      2-3 → medium      4+ → large

The code, math and reasoning signals read the last 16,000 characters of the user turns (where the
question usually is; a longer prompt already scores on length), so a 4 MB body costs milliseconds.
Same request, same tier: no randomness, no model call, no I/O. Extend by adding a row to
:data:`SIGNALS`; tests/unit/test_routing_classifier.py holds the table of prompts → tiers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from common.registry import Tier
from common.types import ChatRequest

TIER_ORDER: tuple[Tier, ...] = ("small", "medium", "large")
MEDIUM_FROM = 2   # scores from here are medium ...
LARGE_FROM = 4    # ... and from here large

SCAN_CHARS = 16_000  # the code / math / reasoning signals read the last this many characters of user text
_LENGTH_BANDS = ((300, 0), (1_500, 1), (6_000, 2))  # (tokens below, points); above the last: 3
_CHARS_PER_TOKEN = 4

# Every pattern runs over up to the whole body (megabytes): none may backtrack more than a bounded
# amount per position (no unbounded ``\s*`` at line starts, bounded digit runs); tests time them.
_CODE_BLOCK = re.compile(r"```|^[ \t]*(def |class |import |from [\w.]{1,100} import |#include|function |"
                         r"const |let |public |private |SELECT |INSERT |UPDATE |fn |func |package )|"
                         r"[;{}][ \t]*$", re.MULTILINE)
_CODE_WORDS = re.compile(r"\b(python|javascript|typescript|java|golang|rust|sql|regex|bash|function|"
                         r"compile[rd]?|stack ?trace|exception|api|algorithm|unit tests?)\b|\bc\+\+",
                         re.IGNORECASE)
_MATH_HARD = re.compile(r"\\(frac|int|sum|prod|lim|sqrt|begin\{)|\$\$|\b(prove|proof|theorem|lemma|"
                        r"integral|derivative|differentiate|integrate|eigen\w*|matri(x|ces)|"
                        r"probability|polynomial|irrational)\b", re.IGNORECASE)
_ARITHMETIC = re.compile(r"\b\d{1,12}(\.\d{1,12})?[ \t]{0,3}[-+*/^×÷][ \t]{0,3}\d")
_REASONING = {
    "analysis": re.compile(r"\banaly[sz]\w*|\bevaluate|\bassess", re.IGNORECASE),
    "design": re.compile(r"\b(design|architect\w*|plan a|strategy)\b", re.IGNORECASE),
    "steps": re.compile(r"step[- ]by[- ]step|\bexplain (why|how)|\breason\w*", re.IGNORECASE),
    "tradeoff": re.compile(r"trade[- ]?offs?|\bcompare|\bpros and cons", re.IGNORECASE),
    "fixing": re.compile(r"\b(debug\w*|refactor\w*|optimi[sz]\w*|root cause)", re.IGNORECASE),
}


@dataclass(frozen=True)
class Complexity:
    """The classifier's verdict: the total score, its tier and the points of each signal that fired."""

    score: int
    tier: Tier
    signals: dict[str, int]


def _all_text(request: ChatRequest) -> str:
    return "\n".join(m.text() for m in request.messages)


def _task_text(request: ChatRequest) -> str:
    """What the caller asks (user turns; a long system prompt is context, not difficulty), at most its
    last :data:`SCAN_CHARS` characters: the patterns cost about a microsecond per character, and a
    prompt longer than that scores on length already."""
    return "\n".join(m.text() for m in request.messages if m.role == "user")[-SCAN_CHARS:]


def _length(request: ChatRequest) -> int:
    tokens = len(_all_text(request)) // _CHARS_PER_TOKEN
    return next((points for below, points in _LENGTH_BANDS if tokens < below), 3)


def _code(request: ChatRequest) -> int:
    text = _task_text(request)
    if _CODE_BLOCK.search(text):
        return 2
    return 1 if _CODE_WORDS.search(text) else 0


def _math(request: ChatRequest) -> int:
    text = _task_text(request)
    if _MATH_HARD.search(text):
        return 2
    return 1 if _ARITHMETIC.search(text) else 0


def _reasoning(request: ChatRequest) -> int:
    text = _task_text(request)
    kinds = sum(1 for pattern in _REASONING.values() if pattern.search(text))
    return min(kinds, 2)


def _tools(request: ChatRequest) -> int:
    return 1 if request.tools else 0


def _images(request: ChatRequest) -> int:
    return 1 if needs_vision(request) else 0


def _depth(request: ChatRequest) -> int:
    turns = sum(1 for m in request.messages if m.role == "user")
    return 2 if turns >= 10 else 1 if turns >= 4 else 0


def _schema(request: ChatRequest) -> int:
    return 1 if (request.response_format or {}).get("type") == "json_schema" else 0


SIGNALS: dict[str, Callable[[ChatRequest], int]] = {
    "length": _length, "code": _code, "math": _math, "reasoning": _reasoning, "tools": _tools,
    "images": _images, "depth": _depth, "schema": _schema,
}


def needs_vision(request: ChatRequest) -> bool:
    """Whether any message carries an image (every ingress turns images into ``image_url`` parts)."""
    return any(isinstance(m.content, list) and any(p.get("type") == "image_url" for p in m.content)
               for m in request.messages)


def tier_of(score: int) -> Tier:
    return "large" if score >= LARGE_FROM else "medium" if score >= MEDIUM_FROM else "small"


def classify(request: ChatRequest) -> Complexity:
    """Score ``request`` by :data:`SIGNALS`; the same request always gets the same verdict."""
    points = {name: signal(request) for name, signal in SIGNALS.items()}
    fired = {name: p for name, p in points.items() if p}
    score = sum(fired.values())
    return Complexity(score, tier_of(score), fired)
