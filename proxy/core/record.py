"""The two values that travel between the parts: a call's token usage, and its ledger row.

Pure data. Meters produce a `Usage`; pricing turns it into a cost; the ledger stores a `CallRecord`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

UsageSource = Literal["upstream", "counted", "none"]


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one call, normalised to OpenAI's rules.

    `cached_tokens` is a subset of `prompt_tokens`; `reasoning_tokens` is a subset of
    `completion_tokens` (providers that report reasoning outside it are normalised on the way in).
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0
    audio_prompt_tokens: int = 0  # subsets of prompt / completion, priced at audio rates when the table has them
    audio_completion_tokens: int = 0
    image_prompt_tokens: int = 0  # subsets of prompt / completion, priced at image rates (gpt-image-1)
    image_completion_tokens: int = 0
    audio_seconds: Decimal | None = None  # usage reported as seconds of audio (whisper-1), priced per minute


_USAGE_FIELDS = tuple(f.name for f in dataclasses.fields(Usage))


@dataclass(slots=True)
class CallRecord:
    """One ledger row: everything known about one forwarded call."""

    request_id: str
    started_at: float  # unix seconds
    method: str
    endpoint: str  # the path, without the query string
    ended_at: float = 0.0
    key_id: str | None = None
    key_hint: str | None = None
    user: str | None = None
    session: str | None = None
    operation: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    requested_model: str | None = None
    model: str | None = None  # the model that served the call (response's), else the requested one
    stream: bool = False
    status: int = 0
    error: str | None = None
    latency_ms: float = 0.0
    ttfb_ms: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0
    usage_source: UsageSource = "none"
    priced: bool = False
    cost_usd: Decimal = Decimal(0)
    approximate: bool = False  # counted with an approximate tokenizer or estimate (non-OpenAI model, images)
    lower_bound: bool = False  # counted for a reasoning model: hidden reasoning tokens are not in a stream
    usage_note: str | None = None  # how a counted figure was made, what it left out
    counted_prompt_tokens: int | None = None  # our own count, kept beside the provider's when sampled
    counted_completion_tokens: int | None = None
    audio_prompt_tokens: int = 0
    audio_completion_tokens: int = 0
    image_prompt_tokens: int = 0  # priced, not stored: the ledger keeps image tokens inside prompt / completion
    image_completion_tokens: int = 0
    audio_seconds: Decimal | None = None  # priced, not stored
    service_tier: str | None = None  # the tier that served the call (the response's), for tier prices
    pricing_version: str | None = None  # the price table (content hash) that priced this row
    original_cost_usd: Decimal | None = None  # set by a re-pricing: the cost first recorded
    repriced_at: float | None = None

    def set_usage(self, usage: Usage, source: UsageSource) -> None:
        for name in _USAGE_FIELDS:
            setattr(self, name, getattr(usage, name))
        self.usage_source = source
