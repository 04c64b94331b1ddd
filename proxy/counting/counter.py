"""The proxy's own token count of one call: the policy (encodings, reasoning models) and the result.

Used when a call carries no usage from the upstream (the figure is then `counted`), and for a sample of
calls that do (both figures are kept, to measure how far counts fall from the provider's). Counting is
CPU work: the caller runs `count_call` in a worker thread, never on the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from proxy.core.record import Usage
from proxy.counting import (
    StreamOutput,
    TokenCount,
    count_request,
    encoding_for,
    get_encoding,
    is_reasoning_model,
    verify,
)


@dataclass(frozen=True, slots=True)
class CountPolicy:
    default_encoding: str = "o200k_base"
    overrides: Mapping[str, str] = field(default_factory=dict)  # model glob -> encoding name
    reasoning_models: tuple[str, ...] = ()  # globs beyond the built-in OpenAI reasoning families

    def load(self) -> None:
        """Check the encodings' files now (start-up): a missing or corrupt file must fail here, not in a
        request. Each is built on first use, so a proxy that never counts keeps its memory."""
        verify()


@dataclass(frozen=True, slots=True)
class CallCount:
    prompt: TokenCount | None  # None: the request body could not be read, so the prompt is not counted
    completion: TokenCount | None

    def usage(self) -> Usage:
        prompt = self.prompt.tokens if self.prompt else 0
        completion = self.completion.tokens if self.completion else 0
        reasoning = min(self.completion.reasoning_tokens, completion) if self.completion else 0
        return Usage(prompt_tokens=prompt, completion_tokens=completion, reasoning_tokens=reasoning,
                     total_tokens=prompt + completion)

    @property
    def approximate(self) -> bool:
        return any(c.approximate for c in (self.prompt, self.completion) if c is not None)

    @property
    def lower_bound(self) -> bool:
        return self.prompt is None or bool(self.completion and self.completion.lower_bound)

    def note(self) -> str | None:
        notes: dict[str, None] = {}
        if self.prompt is None:
            notes["the request body was not readable JSON: its prompt is not counted"] = None
        for count in (self.prompt, self.completion):
            if count is not None:
                notes.update(dict.fromkeys(count.notes))
        if self.completion is not None and self.completion.lower_bound:
            notes["reasoning tokens are not in a stream: the completion count is a lower bound"] = None
        return "; ".join(notes)[:1000] or None


def count_call(policy: CountPolicy, path: str, model: str | None, request: Mapping[str, Any] | None,
               output: StreamOutput | None) -> CallCount:
    name, exact = encoding_for(model, policy.default_encoding, policy.overrides)
    encoding = get_encoding(name)
    prompt = count_request(path, request, encoding, exact_encoding=exact) if request is not None else None
    completion = None
    if output is not None:
        completion = output.count(encoding, exact_encoding=exact,
                                  reasoning_model=is_reasoning_model(model, policy.reasoning_models))
    return CallCount(prompt, completion)
