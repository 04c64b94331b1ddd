"""Prompt tokens of a request body, counted locally: chat, legacy completions, embeddings, Responses.

Chat framing follows OpenAI's cookbook rule for current models: 3 tokens per message, 1 more for a
`name`, 3 to prime the reply. It reproduces the API's `prompt_tokens` exactly for plain text messages.
Everything the API renders in ways it does not publish (tool definitions, response schemas, images,
tool calls in history, the Responses API's items) is estimated and flagged.

Pure functions: a parsed JSON body in, a `TokenCount` out. They never raise on a malformed body (the
upstream will reject it); what they cannot read is noted and flagged approximate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tiktoken

from proxy.counting.images import REMOTE_IMAGE_SIZE, data_url_image_size, image_tokens
from proxy.counting.tally import Tally, TokenCount
from proxy.counting.tools import render_functions, schema_text, tool_functions

__all__ = [
    "count_chat_prompt", "count_completion_prompt", "count_embedding_input", "count_request",
    "count_responses_input",
]

PER_MESSAGE = 3  # <|start|>{role}<|message|> ... <|end|>, less the role itself
PER_NAME = 1
REPLY_PRIMING = 3  # <|start|>assistant<|message|>
TOOL_CALL = 7  # per function call beyond its name and arguments (same rule as the output side)
# The tools block costs its text + 2 as its own message; appended to an existing system message it saves
# that message's framing (the cookbook's findings for older models, carried over).
TOOLS_ALONE, TOOLS_IN_SYSTEM = 2, -1


def count_chat_prompt(
    body: Mapping[str, Any], encoding: tiktoken.Encoding, *, exact_encoding: bool = True,
) -> TokenCount:
    """Prompt tokens of a /v1/chat/completions body."""
    tally = Tally(encoding, exact_encoding)
    model = body.get("model") if isinstance(body.get("model"), str) else None
    messages = body.get("messages")
    if not isinstance(messages, list):
        tally.estimated("no messages list")
        messages = []
    for message in messages:
        _chat_message(tally, message, model)
    tally.add(REPLY_PRIMING)
    has_system = any(isinstance(m, dict) and m.get("role") in ("system", "developer") for m in messages)
    _tools(tally, body.get("tools"), has_system)
    _tools(tally, body.get("functions"), has_system)
    _schema(tally, body.get("response_format"))
    return tally.result()


def count_completion_prompt(
    body: Mapping[str, Any], encoding: tiktoken.Encoding, *, exact_encoding: bool = True,
) -> TokenCount:
    """Prompt tokens of a legacy /v1/completions body: `prompt` (and `suffix`) as text or token arrays."""
    tally = Tally(encoding, exact_encoding)
    _text_or_tokens(tally, body.get("prompt"), "prompt")
    tally.text(body.get("suffix"))
    return tally.result()


def count_embedding_input(
    body: Mapping[str, Any], encoding: tiktoken.Encoding, *, exact_encoding: bool = True,
) -> TokenCount:
    """Tokens of a /v1/embeddings `input`: a string, strings, a token array or token arrays. No framing."""
    tally = Tally(encoding, exact_encoding)
    _text_or_tokens(tally, body.get("input"), "input")
    return tally.result()


def count_responses_input(
    body: Mapping[str, Any], encoding: tiktoken.Encoding, *, exact_encoding: bool = True,
) -> TokenCount:
    """Prompt tokens of a /v1/responses body: `instructions`, `input` items, tools, `text.format`.

    Always approximate: the Responses API's framing is not published; the chat rule is assumed.
    """
    tally = Tally(encoding, exact_encoding)
    tally.estimated("Responses API framing assumed to be chat's")
    model = body.get("model") if isinstance(body.get("model"), str) else None
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        _framed(tally, "developer", instructions)
    items = body.get("input")
    if isinstance(items, str):
        _framed(tally, "user", items)
    elif isinstance(items, list):
        for item in items:
            _responses_item(tally, item, model)
    for key in ("previous_response_id", "conversation", "prompt"):
        if body.get(key):
            tally.estimated(f"stored context ({key}) not counted")
    tally.add(REPLY_PRIMING)
    _tools(tally, body.get("tools"), isinstance(instructions, str))
    text = body.get("text")
    _schema(tally, text.get("format") if isinstance(text, dict) else None)
    return tally.result()


def count_request(
    path: str, body: Mapping[str, Any], encoding: tiktoken.Encoding, *, exact_encoding: bool = True,
) -> TokenCount | None:
    """The prompt count for an endpoint path (`/v1/chat/completions`, ...); None for other endpoints."""
    path = path.rstrip("/")
    if path.endswith("/chat/completions"):
        return count_chat_prompt(body, encoding, exact_encoding=exact_encoding)
    if path.endswith("/completions"):
        return count_completion_prompt(body, encoding, exact_encoding=exact_encoding)
    if path.endswith("/embeddings"):
        return count_embedding_input(body, encoding, exact_encoding=exact_encoding)
    if path.endswith("/responses"):
        return count_responses_input(body, encoding, exact_encoding=exact_encoding)
    return None


# --- chat -------------------------------------------------------------------------------------------------


def _chat_message(tally: Tally, message: object, model: str | None) -> None:
    if not isinstance(message, dict):
        tally.estimated("a message is not an object")
        return
    tally.add(PER_MESSAGE)
    role = message.get("role")
    tally.text(role)
    name = message.get("name")
    if isinstance(name, str) and name:
        tally.text(name)
        tally.add(PER_NAME)
    _content(tally, message.get("content"), model)
    tally.text(message.get("refusal"))
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            _function_call(tally, function)
    _function_call(tally, message.get("function_call"))
    if role in ("tool", "function"):
        tally.estimated("tool results estimated")
    if message.get("audio"):
        tally.estimated("audio not counted")


def _function_call(tally: Tally, function: object) -> None:
    if not isinstance(function, dict):
        return
    tally.text(function.get("name"))
    tally.text(function.get("arguments"))
    tally.add(TOOL_CALL)
    tally.estimated("tool calls in history estimated")


def _content(tally: Tally, content: object, model: str | None) -> None:
    if isinstance(content, str):
        tally.text(content)
    elif isinstance(content, list):
        for part in content:
            _part(tally, part, model)
    elif content is not None:
        tally.estimated("unreadable message content")


def _part(tally: Tally, part: object, model: str | None) -> None:
    if isinstance(part, str):
        tally.text(part)
        return
    if not isinstance(part, dict):
        tally.estimated("unreadable content part")
        return
    kind = part.get("type")
    if kind in ("text", "input_text", "output_text"):
        tally.text(part.get("text"))
    elif kind == "refusal":
        tally.text(part.get("refusal"))
    elif kind in ("image_url", "input_image"):
        _image(tally, part, model)
    elif kind in ("input_audio", "audio"):
        tally.estimated("audio not counted")
    elif kind in ("file", "input_file"):
        tally.estimated("files not counted")
    else:
        tally.estimated(f"content part {str(kind)[:40]!r} not counted")


def _image(tally: Tally, part: Mapping[str, Any], model: str | None) -> None:
    # chat: {"image_url": {"url", "detail"}}; Responses: {"image_url": "...", "detail"} or {"file_id"}
    holder = part.get("image_url")
    url = holder.get("url") if isinstance(holder, dict) else holder
    detail = holder.get("detail") if isinstance(holder, dict) else part.get("detail")
    size = data_url_image_size(url) if isinstance(url, str) and url.startswith("data:") else None
    if size is None:
        size = REMOTE_IMAGE_SIZE
        tally.estimated("image size unknown (remote or unreadable): priced as 1024x1024")
    tally.add(image_tokens(model, size, detail if isinstance(detail, str) else None))
    tally.estimated("images estimated")


def _tools(tally: Tally, tools: object, has_system: bool) -> None:
    functions, skipped = tool_functions(tools)
    if skipped:
        tally.estimated("built-in tool definitions not counted")
    if not functions:
        return
    tally.text(render_functions(functions))
    tally.add(TOOLS_IN_SYSTEM if has_system else TOOLS_ALONE)
    tally.estimated("tool definitions estimated")


def _schema(tally: Tally, response_format: object) -> None:
    text = schema_text(response_format)
    if text is not None:
        tally.text(text)
        tally.estimated("response_format schema estimated")


# --- completions and embeddings ---------------------------------------------------------------------------


def _text_or_tokens(tally: Tally, value: object, field: str) -> None:
    """A string, a list of strings, a token array, or a list of token arrays (token arrays count as is)."""
    if isinstance(value, str):
        tally.text(value)
    elif isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            tally.add(len(value))
            return
        for entry in value:
            if isinstance(entry, str):
                tally.text(entry)
            elif isinstance(entry, list):
                tally.add(len(entry))
            else:
                tally.estimated(f"unreadable {field} entry")
    elif value is not None:
        tally.estimated(f"unreadable {field}")


# --- Responses API ----------------------------------------------------------------------------------------


def _framed(tally: Tally, role: str, text: str) -> None:
    tally.add(PER_MESSAGE)
    tally.text(role)
    tally.text(text)


def _responses_item(tally: Tally, item: object, model: str | None) -> None:
    if not isinstance(item, dict):
        tally.estimated("an input item is not an object")
        return
    kind = item.get("type", "message")
    if kind == "message":
        tally.add(PER_MESSAGE)
        tally.text(item.get("role"))
        _content(tally, item.get("content"), model)
    elif kind in ("function_call", "custom_tool_call"):
        _function_call(tally, {"name": item.get("name"), "arguments": item.get("arguments", item.get("input"))})
    elif kind in ("function_call_output", "custom_tool_call_output"):
        tally.add(PER_MESSAGE)
        output = item.get("output")
        _content(tally, output, model)
        tally.estimated("tool results estimated")
    elif kind == "reasoning":
        tally.estimated("reasoning items not counted")
    else:
        tally.estimated(f"input item {str(kind)[:40]!r} not counted")
