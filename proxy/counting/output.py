"""Completion tokens of a response, counted from the stream the client was sent.

`StreamOutput` is fed each parsed chunk (chat completion chunks, legacy completion chunks, Responses API
events, or a whole non-streamed chat completion) and keeps only the generated text, as lists of
fragments joined once when counted. Rules, derived from real gpt-4o streams whose usage is known:
- text content: exactly the tokens of the text, per choice (choices summed when n > 1);
- a refusal: its text + 1;
- a function call: its name + arguments + 7; a second call in the same turn (parallel calls) adds 8
  once, for the wrapper (one capture; approximate);
- visible reasoning text (`reasoning_content` / `reasoning` deltas, Responses reasoning text) is counted
  and reported as `reasoning_tokens`. A reasoning model that shows none gives a `lower_bound`.

Never raises on odd chunks: anything it cannot read is skipped.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import tiktoken

from proxy.counting.tally import Tally, TokenCount

__all__ = ["StreamOutput"]

REFUSAL = 1
TOOL_CALL = 7
PARALLEL_CALLS = 8
_RESPONSE = "response"  # the one call group of a Responses API stream


class _Call:
    __slots__ = ("args", "name")

    def __init__(self) -> None:
        self.name = ""
        self.args: list[str] = []


def _append(where: dict[Hashable, list[str]], key: Hashable, text: object) -> None:
    if isinstance(text, str) and text:
        where.setdefault(key, []).append(text)


def _key(value: object) -> Hashable:
    return value if isinstance(value, (str, int)) and not isinstance(value, bool) else None


class StreamOutput:
    """Accumulates a response's generated text from parsed chunks; `count` turns it into tokens."""

    __slots__ = (
        "_calls",
        "_content",
        "_last_call",
        "_legacy",
        "_notes",
        "_reasoning",
        "_refusal",
        "_responses",
        "_summary",
    )

    def __init__(self) -> None:
        self._content: dict[Hashable, list[str]] = {}
        self._refusal: dict[Hashable, list[str]] = {}
        self._reasoning: dict[Hashable, list[str]] = {}  # the model's full visible reasoning
        self._summary: dict[Hashable, list[str]] = {}  # Responses reasoning summaries: less than the reasoning
        self._calls: dict[tuple[Hashable, Hashable], _Call] = {}  # (choice or response, call)
        self._last_call: dict[Hashable, Hashable] = {}
        self._legacy: dict[Hashable, _Call] = {}  # `function_call` per choice
        self._responses = False
        self._notes: dict[str, None] = {}

    # --- feeding ---------------------------------------------------------------------------------------
    def feed(self, obj: object) -> None:
        """Take one parsed chunk, event or body; anything unrecognised is ignored."""
        if not isinstance(obj, dict):
            return
        kind = obj.get("type")
        if isinstance(kind, str) and kind.startswith("response."):
            self._event(kind, obj)
            return
        if obj.get("object") == "response" and isinstance(obj.get("output"), list):
            self._response_body(obj["output"])  # a non-streamed Responses API call
            return
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    self._choice(choice)

    def _choice(self, choice: Mapping[str, Any]) -> None:
        index = _key(choice.get("index", 0))
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            delta = choice.get("message")  # a non-streamed chat completion
        if isinstance(delta, dict):
            self._delta(index, delta)
        else:
            _append(self._content, index, choice.get("text"))  # legacy completions

    def _delta(self, index: Hashable, delta: Mapping[str, Any]) -> None:
        content = delta.get("content")
        if isinstance(content, list):  # some providers send parts
            for part in content:
                if isinstance(part, dict):
                    _append(self._content, index, part.get("text"))
        else:
            _append(self._content, index, content)
        _append(self._refusal, index, delta.get("refusal"))
        # Providers name visible reasoning differently; a few send both names with the same text.
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        _append(self._reasoning, index, reasoning)
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            for position, call in enumerate(calls):
                if isinstance(call, dict):
                    self._tool_call_delta(index, position, call)
        function = delta.get("function_call")
        if isinstance(function, dict):
            self._grow(self._legacy.setdefault(index, _Call()), function.get("name"), function.get("arguments"))
        if delta.get("audio"):
            self._notes["audio output not counted"] = None

    def _tool_call_delta(self, index: Hashable, position: int, call: Mapping[str, Any]) -> None:
        # OpenAI keys fragments by `index`; without one, an `id` starts a call and bare fragments continue it.
        key = _key(call.get("index"))
        if key is None:
            key = _key(call.get("id")) or self._last_call.get(index, position)
        self._last_call[index] = key
        function = call.get("function")
        if isinstance(function, dict):
            self._grow(self._calls.setdefault((index, key), _Call()), function.get("name"), function.get("arguments"))

    @staticmethod
    def _grow(call: _Call, name: object, arguments: object) -> None:
        if isinstance(name, str) and name and not call.name:
            call.name = name
        if isinstance(arguments, str) and arguments:
            call.args.append(arguments)

    def _event(self, kind: str, event: Mapping[str, Any]) -> None:
        self._responses = True
        if kind == "response.output_item.added":
            item = event.get("item")
            if isinstance(item, dict) and item.get("type") in ("function_call", "custom_tool_call"):
                key = _key(item.get("id")) or _key(event.get("output_index"))
                self._grow(self._calls.setdefault((_RESPONSE, key), _Call()), item.get("name"), None)
            return
        if kind.startswith("response.audio"):
            self._notes["audio output not counted"] = None
            return
        target = _EVENT_TARGETS.get(kind)
        if target is None:
            return
        where, field, is_done = target
        part = (_key(event.get("item_id")) or _key(event.get("output_index")),
                _key(event.get("content_index", event.get("summary_index"))))
        if where == "calls":
            call = self._calls.setdefault((_RESPONSE, part[0]), _Call())
            if not is_done or not call.args:  # a `.done` event repeats the whole; use it only if no deltas came
                self._grow(call, None, event.get(field))
            return
        store: dict[Hashable, list[str]] = getattr(self, where)
        if not is_done or part not in store:
            _append(store, part, event.get(field))

    def _response_body(self, output: list[Any]) -> None:
        """The `output` items of a whole Response: what its stream's events would have carried."""
        self._responses = True
        for position, item in enumerate(output):
            if not isinstance(item, dict):
                continue
            key = _key(item.get("id")) or position
            kind = item.get("type")
            if kind == "message":
                for index, part in enumerate(item.get("content") or ()):
                    if not isinstance(part, dict):
                        continue
                    if part.get("type") == "output_text":
                        _append(self._content, (key, index), part.get("text"))
                    elif part.get("type") == "refusal":
                        _append(self._refusal, (key, index), part.get("refusal"))
            elif kind in ("function_call", "custom_tool_call"):
                call = self._calls.setdefault((_RESPONSE, key), _Call())
                self._grow(call, item.get("name"), item.get("arguments", item.get("input")))
            elif kind == "reasoning":
                for field, store in (("content", self._reasoning), ("summary", self._summary)):
                    for index, part in enumerate(item.get(field) or ()):
                        if isinstance(part, dict):
                            _append(store, (key, index), part.get("text"))

    # --- counting --------------------------------------------------------------------------------------
    def count(
        self, encoding: tiktoken.Encoding, *, exact_encoding: bool = True, reasoning_model: bool = False,
    ) -> TokenCount:
        """Completion tokens of everything fed so far (callable more than once)."""
        tally = Tally(encoding, exact_encoding)
        for parts in self._content.values():
            tally.text("".join(parts))
        for parts in self._refusal.values():
            if tally.text("".join(parts)):
                tally.add(REFUSAL)
        reasoning = sum(tally.text("".join(parts)) for parts in self._reasoning.values())
        reasoning += sum(tally.text("".join(parts)) for parts in self._summary.values())
        self._count_calls(tally)
        if self._responses:
            tally.estimated("Responses API output framing assumed to be chat's")
        for note in self._notes:
            tally.estimated(note)
        lower_bound = reasoning_model and not self._reasoning
        if lower_bound:
            tally.estimated("hidden reasoning tokens not counted")
        return tally.result(lower_bound=lower_bound, reasoning_tokens=reasoning)

    def _count_calls(self, tally: Tally) -> None:
        per_turn: dict[Hashable, int] = {}
        for (turn, _), call in self._calls.items():
            _count_call(tally, call)
            per_turn[turn] = per_turn.get(turn, 0) + 1
        for calls in per_turn.values():
            if calls > 1:
                tally.add(PARALLEL_CALLS)
                tally.estimated("parallel tool calls estimated")
        for call in self._legacy.values():
            _count_call(tally, call)
            tally.estimated("function_call estimated")


def _count_call(tally: Tally, call: _Call) -> None:
    tally.text(call.name)
    tally.text("".join(call.args))
    tally.add(TOOL_CALL)


# event type -> (StreamOutput store, field holding the text, whether it is a `.done` event with the whole text)
_EVENT_TARGETS: dict[str, tuple[str, str, bool]] = {
    "response.output_text.delta": ("_content", "delta", False),
    "response.output_text.done": ("_content", "text", True),
    "response.refusal.delta": ("_refusal", "delta", False),
    "response.refusal.done": ("_refusal", "refusal", True),
    "response.function_call_arguments.delta": ("calls", "delta", False),
    "response.function_call_arguments.done": ("calls", "arguments", True),
    "response.custom_tool_call_input.delta": ("calls", "delta", False),
    "response.custom_tool_call_input.done": ("calls", "input", True),
    "response.reasoning_text.delta": ("_reasoning", "delta", False),
    "response.reasoning_text.done": ("_reasoning", "text", True),
    "response.reasoning_summary_text.delta": ("_summary", "delta", False),
    "response.reasoning_summary_text.done": ("_summary", "text", True),
}
