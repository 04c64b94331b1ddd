"""The result of a count (`TokenCount`) and the running tally the counters build it with.

Pure data and arithmetic; no parsing of requests or streams here.
"""

from __future__ import annotations

from dataclasses import dataclass

import tiktoken

from proxy.counting.encodings import count_text

__all__ = ["Tally", "TokenCount"]


@dataclass(frozen=True, slots=True)
class TokenCount:
    """Tokens counted locally, and how far to trust them.

    `approximate`: some part was estimated (a stand-in encoding, images, tool definitions, unknown
    framing); `notes` say which. `lower_bound`: the model reasons in tokens no stream shows, so the
    true figure is higher. `reasoning_tokens`: visible reasoning text counted (included in `tokens`).
    """

    tokens: int
    approximate: bool = False
    lower_bound: bool = False
    reasoning_tokens: int = 0
    notes: tuple[str, ...] = ()


class Tally:
    """A count in progress: tokens so far, whether any part was estimated, and why (notes kept once each)."""

    __slots__ = ("_notes", "approximate", "encoding", "exact_encoding", "tokens")

    def __init__(self, encoding: tiktoken.Encoding, exact_encoding: bool = True) -> None:
        self.encoding = encoding
        self.exact_encoding = exact_encoding
        self.tokens = 0
        self.approximate = False
        self._notes: dict[str, None] = {}  # an ordered set

    def text(self, text: object) -> int:
        """Count a string (anything else counts 0); a stand-in encoding makes the tally approximate."""
        if not isinstance(text, str) or not text:
            return 0
        found = count_text(self.encoding, text)
        self.tokens += found
        if not self.exact_encoding:
            self.estimated(f"{self.encoding.name} stands in for the model's own tokenizer")
        return found

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def estimated(self, note: str) -> None:
        """Mark the tally approximate, saying why."""
        self.approximate = True
        self._notes[note] = None

    def result(self, *, lower_bound: bool = False, reasoning_tokens: int = 0) -> TokenCount:
        return TokenCount(
            tokens=max(self.tokens, 0),
            approximate=self.approximate,
            lower_bound=lower_bound,
            reasoning_tokens=reasoning_tokens,
            notes=tuple(self._notes),
        )
