"""Answer quality of OpenAI-compatible LLM responses, without labels.

The response extractor (:mod:`canary.observe.extract`) hands every parsed JSON body or SSE
event of a response to one :class:`AnswerState`, which follows the answer's first choice
(``choices[i]`` with ``index`` 0) and keeps a bounded summary of it:

* ``finish_reason:VALUE``: 1 when the answer's last ``finish_reason`` is VALUE, else 0
  (``finish_reason:length`` is truncation by ``max_tokens``; an answer whose stream ended
  without any finish_reason is 0 for every VALUE).
* ``output_tokens``: ``usage.completion_tokens`` when the response reports it, else (streams
  only) the number of events that carried answer text.
* ``empty_answer``: 1 when the answer's text is empty or whitespace only (an answer that calls
  a tool is not empty).
* ``repetition``: the share of the answer's word n-grams that repeat an earlier n-gram of the
  same answer, in [0, 1]; absent for an answer of fewer than ``n`` words.
* ``refusal``: 1 when one of the refusal patterns matches within the answer's first
  ``refusal_within`` characters.

A response without a ``choices`` list (not an LLM answer) gives none of these: the values are
absent, not 0. Everything is incremental and bounded: the text kept is at most
``max(keep_answer_chars, refusal_within)`` characters, and the repetition score covers the
answer's first ``max_chars`` characters, so its n-gram set holds at most ``max_chars / 2``
hashes whatever the length of the answer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Final

from canary.config import AnswersConfig
from canary.signals import (
    EMPTY_ANSWER,
    FINISH_REASON_PREFIX,
    OUTPUT_TOKENS,
    REFUSAL,
    REPETITION,
    Signal,
)

__all__ = [
    "ANSWER_SIGNALS",
    "DEFAULT_MAX_CHARS",
    "DEFAULT_NGRAM",
    "DEFAULT_REFUSAL_PATTERNS",
    "DEFAULT_REFUSAL_WITHIN",
    "MAX_WORD_CHARS",
    "AnswerPlan",
    "AnswerRules",
    "AnswerState",
    "compile_refusal",
]

ANSWER_SIGNALS: Final = (OUTPUT_TOKENS, EMPTY_ANSWER, REPETITION, REFUSAL)

_DEFAULTS: Final = AnswersConfig()  # the rollout file's defaults, defined there once
DEFAULT_REFUSAL_PATTERNS: Final = tuple(_DEFAULTS.refusal_patterns)
DEFAULT_REFUSAL_WITHIN: Final = _DEFAULTS.refusal_within  # characters: a refusal opens the answer
DEFAULT_NGRAM: Final = _DEFAULTS.repetition_ngram
DEFAULT_MAX_CHARS: Final = _DEFAULTS.max_chars
# A run of non-space characters longer than this (code, a URL, text without spaces) is scored
# as words of this many characters, so the text held back between chunks stays bounded.
MAX_WORD_CHARS: Final = 64
_PUNCT: Final = "\"'“”‘’`.,;:!?()[]{}<>*_#-–—…"


def compile_refusal(patterns: Sequence[str]) -> re.Pattern[str] | None:
    """One case-insensitive regex matching any of ``patterns`` (None for no patterns).

    Raises ``ValueError`` naming the first pattern that is not a valid regular expression.
    """
    for i, p in enumerate(patterns):
        try:
            re.compile(p)
        except re.error as exc:
            raise ValueError(
                f"refusal_patterns[{i}] {p!r} is not a regular expression: {exc}"
            ) from None
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)


class AnswerRules:
    """A rollout's answer-quality settings, compiled once per (re)load.

    Parameters
    ----------
    refusal_patterns
        Regular expressions (Python syntax, matched case-insensitively) of a refusal.
    refusal_within
        Characters at the start of the answer the patterns are searched in.
    repetition_ngram
        Words per n-gram of the repetition score.
    max_chars
        Characters at the start of the answer the repetition score covers.
    """

    __slots__ = ("max_chars", "ngram", "refusal", "refusal_within")

    def __init__(
        self,
        *,
        refusal_patterns: Sequence[str] = DEFAULT_REFUSAL_PATTERNS,
        refusal_within: int = DEFAULT_REFUSAL_WITHIN,
        repetition_ngram: int = DEFAULT_NGRAM,
        max_chars: int = DEFAULT_MAX_CHARS,
    ) -> None:
        if repetition_ngram < 1:
            raise ValueError(f"repetition_ngram must be at least 1, got {repetition_ngram!r}")
        if max_chars < 1:
            raise ValueError(f"max_chars must be positive, got {max_chars!r}")
        if refusal_within < 1:
            raise ValueError(f"refusal_within must be positive, got {refusal_within!r}")
        self.refusal = compile_refusal(refusal_patterns)
        self.refusal_within = refusal_within
        self.ngram = repetition_ngram
        self.max_chars = max_chars

    @classmethod
    def from_config(cls, config: AnswersConfig | None) -> AnswerRules:
        """Rules from a rollout's ``answers:`` section (the defaults when it has none)."""
        if config is None:
            return cls()
        return cls(
            refusal_patterns=config.refusal_patterns,
            refusal_within=config.refusal_within,
            repetition_ngram=config.repetition_ngram,
            max_chars=config.max_chars,
        )


class AnswerPlan:
    """What one rollout measures of its answers; shared by every :class:`AnswerState`."""

    __slots__ = ("finish_keys", "keep", "rules", "want")

    def __init__(
        self, rules: AnswerRules, signals: Iterable[Signal], keep_answer_chars: int = 0
    ) -> None:
        if keep_answer_chars < 0:
            raise ValueError(f"keep_answer_chars must be >= 0, got {keep_answer_chars!r}")
        self.rules = rules
        signals = tuple(signals)
        want = {s.key for s in signals if s.key in ANSWER_SIGNALS}
        self.want = frozenset(want)
        # (signal key, finish_reason value) for every finish_reason:VALUE signal
        self.finish_keys = tuple(
            (s.key, s.arg) for s in signals if s.key.startswith(FINISH_REASON_PREFIX)
        )
        keep = keep_answer_chars
        if REFUSAL in want and rules.refusal is not None:
            keep = max(keep, rules.refusal_within)
        self.keep = keep

    @property
    def active(self) -> bool:
        """True when anything about the answers is measured or kept."""
        return bool(self.want or self.finish_keys or self.keep)


class AnswerState:
    """The bounded summary of one response's answer, built event by event."""

    __slots__ = (
        "_kept",
        "_kept_len",
        "_plan",
        "_scored",
        "_seen",
        "_tail",
        "_window",
        "answered",
        "chunks",
        "completion_tokens",
        "finish_reason",
        "ngrams",
        "nonblank",
        "repeats",
        "tool",
    )

    def __init__(self, plan: AnswerPlan) -> None:
        self._plan = plan
        self.answered = False  # a choices entry for the first answer was seen
        self.finish_reason: str | None = None
        self.completion_tokens: float | None = None
        self.chunks = 0  # events (or bodies) that carried answer text
        self.nonblank = False
        self.tool = False  # the answer calls a tool (tool_calls / function_call)
        self._kept: list[str] = []
        self._kept_len = 0
        self._scored = 0  # characters fed to the repetition score
        self._tail = ""  # an unfinished word at the end of the text scored so far
        self._window: list[str] = []  # the last n-1 words
        self._seen: set[int] | None = set() if REPETITION in plan.want else None
        self.ngrams = 0
        self.repeats = 0

    # -- input ----------------------------------------------------------------------------------

    def event(self, obj: object) -> None:
        """Take one parsed SSE event or JSON body of an OpenAI-compatible response."""
        if type(obj) is not dict:
            return
        usage = obj.get("usage")
        if type(usage) is dict:
            tokens = usage.get("completion_tokens")
            if type(tokens) is int and tokens >= 0:
                self.completion_tokens = float(tokens)
        choices = obj.get("choices")
        if type(choices) is not list:
            return
        for choice in choices:  # with n > 1, an event carries another answer's delta first
            if type(choice) is dict and choice.get("index", 0) in (0, None):
                break
        else:
            return
        self.answered = True
        reason = choice.get("finish_reason")
        if type(reason) is str:
            self.finish_reason = reason
        part = choice.get("delta")  # a chat stream
        if type(part) is not dict:
            part = choice.get("message")  # a chat body
        if type(part) is dict:
            text = part.get("content")
            if part.get("tool_calls") or part.get("function_call"):
                self.tool = True
        else:
            text = choice.get("text")  # /v1/completions, stream or body
        if type(text) is str and text:
            self.text(text)

    def text(self, text: str) -> None:
        """Take the next piece of the answer's text."""
        self.chunks += 1
        if not self.nonblank and not text.isspace():
            self.nonblank = True
        plan = self._plan
        room = plan.keep - self._kept_len
        if room > 0:
            piece = text[:room]
            self._kept.append(piece)
            self._kept_len += len(piece)
        if self._seen is not None:
            room = plan.rules.max_chars - self._scored
            if room > 0:
                piece = text[:room]
                self._scored += len(piece)
                self._words(piece)

    def _words(self, text: str) -> None:
        if self._tail:
            text = self._tail + text
        words = text.split()
        if words and not text[-1].isspace():
            tail = words.pop()  # may continue in the next piece
            while len(tail) > MAX_WORD_CHARS:
                words.append(tail[:MAX_WORD_CHARS])
                tail = tail[MAX_WORD_CHARS:]
            self._tail = tail
        else:
            self._tail = ""
        if words:
            self._score(words)

    def _score(self, words: list[str]) -> None:
        """Count the n-grams ending at each of ``words`` (complete words, in order)."""
        if len(words) > 2:
            self._score_many(words)
            return
        # A streamed token or two: a plain loop is cheapest.
        window = self._window
        seen = self._seen
        assert seen is not None
        n = self._plan.rules.ngram
        for word in words:
            if len(word) > MAX_WORD_CHARS:  # rare
                self._score_many([word])
                continue
            w = word.strip(_PUNCT).lower()
            if not w:
                continue
            window.append(w)
            if len(window) < n:
                continue
            h = hash(tuple(window))
            del window[0]  # keep the last n - 1 words
            self.ngrams += 1
            if h in seen:
                self.repeats += 1
            else:
                seen.add(h)

    def _score_many(self, words: list[str]) -> None:
        if max(map(len, words)) > MAX_WORD_CHARS:  # cut as the held-back tail is cut
            m = MAX_WORD_CHARS
            words = [w[i : i + m] for w in words for i in range(0, len(w), m)]
        normal = [x for w in words if (x := w.strip(_PUNCT).lower())]
        n = self._plan.rules.ngram
        seq = self._window + normal
        k = len(seq) - n + 1  # n-grams ending in this batch
        if k > 0:
            seen = self._seen
            assert seen is not None
            before = len(seen)
            # An n-gram is new exactly when it grows the set (earlier in this batch included).
            seen.update(map(hash, zip(*[seq[i:] for i in range(n)], strict=False)))
            self.ngrams += k
            self.repeats += k - (len(seen) - before)
        self._window = seq[max(len(seq) - n + 1, 0) :]  # the last n - 1 words

    # -- output ---------------------------------------------------------------------------------

    @property
    def kept_text(self) -> str:
        """The answer's first characters (as many as the plan keeps)."""
        kept = self._kept
        if len(kept) > 1:
            self._kept = kept = ["".join(kept)]
        return kept[0] if kept else ""

    def finish(self, signals: dict[str, float], stream: bool) -> None:
        """Add this answer's values to ``signals`` (nothing when no answer was seen)."""
        if not self.answered:
            return
        plan = self._plan
        want = plan.want
        if self._tail and self._seen is not None:
            tail, self._tail = self._tail, ""
            self._score([tail])
        for key, value in plan.finish_keys:
            signals[key] = 1.0 if self.finish_reason == value else 0.0
        if OUTPUT_TOKENS in want:
            if self.completion_tokens is not None:
                signals[OUTPUT_TOKENS] = self.completion_tokens
            elif stream:
                signals[OUTPUT_TOKENS] = float(self.chunks)
        if EMPTY_ANSWER in want:
            signals[EMPTY_ANSWER] = 0.0 if self.nonblank or self.tool else 1.0
        if REPETITION in want and self.ngrams:
            signals[REPETITION] = self.repeats / self.ngrams
        if REFUSAL in want:
            rx = plan.rules.refusal
            hit = rx is not None and rx.search(self.kept_text, 0, plan.rules.refusal_within)
            signals[REFUSAL] = 1.0 if hit else 0.0
