"""Reading token usage out of OpenAI-compatible response bodies and stream events.

Pure functions: parsed JSON in, `Usage` out. No I/O, no logging, no pricing. Whatever an upstream
sends, they raise nothing but `UnreadableUsage`, and they never invent a count: a detail that is
absent is 0, a total that is absent is prompt + completion.

Two naming schemes are read:
- chat completions, legacy completions, embeddings: ``prompt_tokens`` / ``completion_tokens`` /
  ``prompt_tokens_details.cached_tokens`` / ``completion_tokens_details.reasoning_tokens``;
- the Responses API: ``input_tokens`` / ``output_tokens`` / ``input_tokens_details.cached_tokens`` /
  ``output_tokens_details.reasoning_tokens``.
Provider variants are normalised to OpenAI's rules (cached within prompt, reasoning within
completion): DeepSeek's top-level ``prompt_cache_hit_tokens``, Azure DeepSeek's top-level
``reasoning_tokens`` with null details, and xAI's reasoning counted outside ``completion_tokens``.
Audio tokens (``prompt_tokens_details.audio_tokens``, ``completion_tokens_details.audio_tokens``) are
read as subsets of prompt and completion, like cached and reasoning tokens. Counts this module has no field
for (cache writes, Groq timings, xAI cost ticks) are ignored.

Exceptions::

    ValueError
    └── UnreadableUsage   a usage object is present but cannot be trusted
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, NamedTuple

from proxy.core.errors import MeterproxyError
from proxy.core.record import Usage

__all__ = ["UnreadableUsage", "chat_usage", "image_usage", "parse_usage", "responses_usage", "served_model",
           "transcription_usage"]


class UnreadableUsage(MeterproxyError, ValueError):
    """a usage object is present but malformed (wrong types, negative numbers, ...)"""


class _Names(NamedTuple):
    prompt: str
    completion: str
    prompt_details: str
    completion_details: str


# No call has spent a trillion tokens: a larger count is garbage, and must not reach the ledger, whose
# SQLite columns (and sums over them) are 64-bit integers that 2**63 would overflow.
MAX_TOKENS = 10**12

_CHAT = _Names("prompt_tokens", "completion_tokens", "prompt_tokens_details", "completion_tokens_details")
_RESPONSES = _Names("input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details")


def parse_usage(raw: object) -> Usage | None:
    """Normalise one usage object in either naming scheme; None when `raw` is None."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise UnreadableUsage(f"usage is {type(raw).__name__}, not an object")
    names = _names_of(raw)
    prompt = _count(raw, names.prompt)
    completion = _count(raw, names.completion)
    prompt_details = _details(raw, names.prompt_details)
    completion_details = _details(raw, names.completion_details)
    cached = _first_count((prompt_details, "cached_tokens"), (raw, "prompt_cache_hit_tokens"))
    reasoning = _first_count((completion_details, "reasoning_tokens"), (raw, "reasoning_tokens"))
    audio_prompt = _count(prompt_details, "audio_tokens")
    audio_completion = _count(completion_details, "audio_tokens")
    reported_total = _count_or_none(raw, "total_tokens")
    total = prompt + completion if reported_total is None else reported_total
    if cached > prompt:
        raise UnreadableUsage(f"cached tokens ({cached}) exceed prompt tokens ({prompt})")
    if reasoning and total == prompt + completion + reasoning:
        # xAI counts reasoning beside completion (its total says so): fold it in, so completion holds
        # all billed output and reasoning stays a subset of it, as with OpenAI.
        completion += reasoning
    if reasoning > completion:
        raise UnreadableUsage(f"reasoning tokens ({reasoning}) exceed completion tokens ({completion})")
    if audio_prompt > prompt:
        raise UnreadableUsage(f"audio prompt tokens ({audio_prompt}) exceed prompt tokens ({prompt})")
    if audio_completion > completion:
        raise UnreadableUsage(f"audio completion tokens ({audio_completion}) exceed completion tokens ({completion})")
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        reasoning_tokens=reasoning,
        total_tokens=total,
        audio_prompt_tokens=audio_prompt,
        audio_completion_tokens=audio_completion,
    )


def chat_usage(obj: object) -> Usage | None:
    """Usage of a chat completion or chunk, a legacy completion or chunk, or an embeddings body.

    Older Groq streams carry it only under ``x_groq.usage``.
    """
    if not isinstance(obj, dict):
        return None
    raw = obj.get("usage")
    if raw is None:
        groq = obj.get("x_groq")
        if isinstance(groq, dict):
            raw = groq.get("usage")
    return parse_usage(raw)


def responses_usage(obj: object) -> Usage | None:
    """Usage of a Responses API `Response`, or of a stream event wrapping one under ``response``."""
    response = _response_of(obj)
    if response is None:
        return None
    return parse_usage(response.get("usage"))


def image_usage(obj: object) -> Usage | None:
    """Usage of an image generation (gpt-image-1): a body, or a stream event, with ``usage`` in the
    Responses naming; ``input_tokens_details.image_tokens`` are input images. Output tokens are image
    tokens unless ``output_tokens_details`` splits them into text and image tokens."""
    if not isinstance(obj, dict) or obj.get("usage") is None:
        return None
    raw = obj["usage"]
    base = parse_usage(raw)
    assert base is not None and isinstance(raw, dict)
    image_in = _count(_details(raw, "input_tokens_details"), "image_tokens")
    out_details = _details(raw, "output_tokens_details")
    image_out = _count(out_details, "image_tokens") if out_details else base.completion_tokens
    if image_in > base.prompt_tokens or image_out > base.completion_tokens:
        raise UnreadableUsage("image tokens exceed input or output tokens")
    return Usage(prompt_tokens=base.prompt_tokens, completion_tokens=base.completion_tokens,
                 cached_tokens=base.cached_tokens, total_tokens=base.total_tokens, image_prompt_tokens=image_in,
                 image_completion_tokens=image_out)


def transcription_usage(obj: object) -> Usage | None:
    """Usage of an audio transcription (gpt-4o-transcribe): ``{"type": "tokens", "input_tokens",
    "input_token_details": {"audio_tokens", "text_tokens"}, "output_tokens", "total_tokens"}``, in the body or
    in a stream's ``transcript.text.done`` event; or ``{"type": "duration", "seconds"}`` (whisper-1), read
    into `audio_seconds` with no tokens."""
    if not isinstance(obj, dict) or obj.get("usage") is None:
        return None
    raw = obj["usage"]
    if isinstance(raw, dict) and raw.get("type") == "duration":
        seconds = raw.get("seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= 10**7:
            raise UnreadableUsage(f"duration usage has seconds {str(seconds)[:40]!r}, not a number of seconds")
        return Usage(audio_seconds=Decimal(str(seconds)))
    base = parse_usage(raw)
    assert base is not None and isinstance(raw, dict)
    details = _details(raw, "input_token_details") or _details(raw, "input_tokens_details")
    audio = _count(details, "audio_tokens")
    if audio > base.prompt_tokens:
        raise UnreadableUsage(f"audio tokens ({audio}) exceed input tokens ({base.prompt_tokens})")
    return Usage(prompt_tokens=base.prompt_tokens, completion_tokens=base.completion_tokens,
                 cached_tokens=base.cached_tokens, total_tokens=base.total_tokens, audio_prompt_tokens=audio)


def served_model(obj: object) -> str | None:
    """The model a body or chunk says served the call; None when it is missing or empty.

    Azure's first chunk has ``"model": ""``, so an empty name means "not said here", not a model.
    """
    if not isinstance(obj, dict):
        return None
    model = obj.get("model")
    if isinstance(model, str) and model:
        return model
    response = obj.get("response")
    if isinstance(response, dict):
        model = response.get("model")
        if isinstance(model, str) and model:
            return model
    return None


def _response_of(obj: object) -> dict[str, Any] | None:
    if not isinstance(obj, dict):
        return None
    if "response" in obj:
        # A stream event envelope: its own keys (type, sequence_number, ...) hold no usage.
        inner = obj["response"]
        return inner if isinstance(inner, dict) else None
    return obj


def _names_of(raw: dict[str, Any]) -> _Names:
    if raw.get(_CHAT.prompt) is not None:
        return _CHAT
    if raw.get(_RESPONSES.prompt) is not None:
        return _RESPONSES
    raise UnreadableUsage("usage has neither prompt_tokens nor input_tokens")


def _details(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UnreadableUsage(f"{name} is {type(value).__name__}, not an object")
    return value


def _first_count(*places: tuple[dict[str, Any], str]) -> int:
    """The first of several alternative fields that is present; 0 when none is."""
    for where, name in places:
        found = _count_or_none(where, name)
        if found is not None:
            return found
    return 0


def _count(where: dict[str, Any], name: str) -> int:
    found = _count_or_none(where, name)
    return 0 if found is None else found


def _count_or_none(where: dict[str, Any], name: str) -> int | None:
    value = where.get(name)
    if value is None:
        return None
    # bool is an int subclass, but `true` is no token count.
    if isinstance(value, int) and not isinstance(value, bool):
        count = value
    elif isinstance(value, float) and value.is_integer():
        count = int(value)
    else:
        raise UnreadableUsage(f"{name} is not a whole number: {_short_repr(value)}")
    if count < 0:
        raise UnreadableUsage(f"{name} is negative: {_short_repr(value)}")
    if count > MAX_TOKENS:
        raise UnreadableUsage(f"{name} is more than {MAX_TOKENS}: {_short_repr(value)}")
    return count


def _short_repr(value: object) -> str:
    # Upstream values can be huge or nested: name the type rather than print them.
    if isinstance(value, str):
        return repr(value[:20]) + ("..." if len(value) > 20 else "")
    if isinstance(value, float) or isinstance(value, int) and -10**20 < value < 10**20:
        return repr(value)
    return type(value).__name__  # a huge int's digits (up to 4300 of them) say nothing more
