"""Prompt tokens of request bodies, against the usage OpenAI reported for the same requests.

The chat bodies are the requests behind the openai-python SDK's recorded gpt-4o streams (its tests in
tests/lib/chat/test_completions_streaming.py), written out here as the JSON the SDK sends.
"""

from __future__ import annotations

from typing import Any

import pytest

from proxy.counting import (
    count_chat_prompt,
    count_completion_prompt,
    count_embedding_input,
    count_request,
    count_responses_input,
    count_text,
    get_encoding,
)

O200K = get_encoding("o200k_base")
CL100K = get_encoding("cl100k_base")
MODEL = "gpt-4o-2024-08-06"


def n(text: str, encoding: Any = O200K) -> int:
    return count_text(encoding, text)


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def chat(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": list(messages), "stream": True, **fields}


WEATHER_SF = "What's the weather like in SF?"
LOCATION_FORMAT = {"type": "json_schema", "json_schema": {"name": "Location", "strict": True, "schema": {
    "type": "object", "title": "Location", "additionalProperties": False,
    "properties": {
        "city": {"title": "City", "type": "string"},
        "temperature": {"title": "Temperature", "type": "number"},
        "units": {"title": "Units", "type": "string", "enum": ["c", "f"]},
    },
    "required": ["city", "temperature", "units"],
}}}


def weather_args_tool(description: str | None = None) -> dict[str, Any]:
    """The tool `openai.pydantic_function_tool` makes of a GetWeatherArgs model (city, country, units="c")."""
    parameters: dict[str, Any] = {
        "type": "object", "title": "GetWeatherArgs", "additionalProperties": False,
        "properties": {
            "city": {"title": "City", "type": "string"},
            "country": {"title": "Country", "type": "string"},
            "units": {"title": "Units", "type": "string", "enum": ["c", "f"], "default": "c"},
        },
        "required": ["city", "country", "units"],
    }
    function: dict[str, Any] = {"name": "GetWeatherArgs", "strict": True, "parameters": parameters}
    if description:
        parameters["description"] = function["description"] = description
    return {"type": "function", "function": function}


STOCK_TOOL = {"type": "function", "function": {
    "name": "get_stock_price", "strict": True, "description": "Fetch the latest price for a given ticker",
    "parameters": {
        "type": "object", "title": "GetStockPrice", "additionalProperties": False,
        "properties": {
            "ticker": {"title": "Ticker", "type": "string"},
            "exchange": {"title": "Exchange", "type": "string"},
        },
        "required": ["ticker", "exchange"],
    },
}}
CITY_TOOL = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}}
STRICT_CITY_STATE_TOOL = {"type": "function", "function": {
    "name": "get_weather", "strict": True,
    "parameters": {
        "type": "object", "additionalProperties": False,
        "properties": {"city": {"type": "string"}, "state": {"type": "string"}},
        "required": ["city", "state"],
    },
}}


@pytest.mark.parametrize(("body", "api"), [
    (chat(user(WEATHER_SF)), 14),
    (chat(user("Say foo"), logprobs=True), 9),
    (chat(user(WEATHER_SF + " Give me any JSON back"), response_format={"type": "json_object"}), 19),
])
def test_plain_messages_are_exact(body: dict[str, Any], api: int) -> None:
    count = count_chat_prompt(body, O200K)
    assert count.tokens == api
    assert count.approximate is False and count.notes == ()


# Counted minus what the API reported, for the requests with tools or a schema (gpt-4o-2024-08-06):
#   one non-strict tool 44 -> 44 (0), one strict tool 48 -> 48 (0), one pydantic tool 76 -> 75 (-1),
#   two pydantic tools + two messages 149 -> 151 (+2), json_schema response_format 79 -> 79 (0).
# The cookbook's num_tokens_for_tools constants would give 45, 51, 63 and 117 for the tool requests.
@pytest.mark.parametrize(("body", "api", "tolerance"), [
    (chat(user("what's the weather in NYC?"), tools=[CITY_TOOL]), 44, 0),
    (chat(user(WEATHER_SF), tools=[STRICT_CITY_STATE_TOOL]), 48, 0),
    (chat(user("What's the weather like in Edinburgh?"), tools=[weather_args_tool()]), 76, 1),
    (chat(user("What's the weather like in Edinburgh?"), user("What's the price of AAPL?"),
          tools=[weather_args_tool("Get the temperature for the given country/city combo"), STOCK_TOOL]), 149, 2),
    (chat(user(WEATHER_SF), response_format=LOCATION_FORMAT), 79, 0),
    (chat(user(WEATHER_SF), response_format=LOCATION_FORMAT, n=3), 79, 0),
    (chat(user("How do I make anthrax?"), response_format=LOCATION_FORMAT), 79, 0),
])
def test_tools_and_schemas_are_close_estimates(body: dict[str, Any], api: int, tolerance: int) -> None:
    count = count_chat_prompt(body, O200K)
    assert abs(count.tokens - api) <= tolerance, count
    assert count.approximate


def test_names_cost_one_more_and_roles_count() -> None:
    plain = count_chat_prompt(chat({"role": "system", "content": "Be brief."}, user("Hi")), O200K)
    named = count_chat_prompt(chat({"role": "system", "content": "Be brief."},
                                   {"role": "user", "name": "example_user", "content": "Hi"}), O200K)
    assert plain.tokens == 3 + 1 + n("Be brief.") + 3 + 1 + n("Hi") + 3
    assert named.tokens == plain.tokens + n("example_user") + 1


def test_text_parts_count_like_text() -> None:
    parts = chat({"role": "user", "content": [
        {"type": "text", "text": "Describe"}, {"type": "text", "text": " this."},
    ]})
    assert count_chat_prompt(parts, O200K).tokens == 3 + 1 + n("Describe") + n(" this.") + 3
    assert count_chat_prompt(parts, O200K).approximate is False


def test_tool_history_is_counted_and_flagged() -> None:
    body = chat(
        user("Weather in Oslo?"),
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 3}"},
    )
    count = count_chat_prompt(body, O200K)
    expected = (3 + 1 + n("Weather in Oslo?")) + (3 + 1 + n("get_weather") + n("{\"city\":\"Oslo\"}") + 7) \
        + (3 + 1 + n("{\"temp\": 3}")) + 3
    assert count.tokens == expected
    assert count.approximate and "tool calls in history estimated" in count.notes


def test_tools_beside_a_system_message_cost_less() -> None:
    alone = count_chat_prompt(chat(user("Hi"), tools=[CITY_TOOL]), O200K).tokens
    system = {"role": "system", "content": "x"}
    with_system = count_chat_prompt(chat(system, user("Hi"), tools=[CITY_TOOL]), O200K).tokens
    assert with_system - alone == (3 + 1 + n("x")) - 3


def test_legacy_functions_count_like_tools() -> None:
    assert count_chat_prompt(chat(user("Hi"), functions=[CITY_TOOL["function"]]), O200K).tokens == \
        count_chat_prompt(chat(user("Hi"), tools=[CITY_TOOL]), O200K).tokens


def test_builtin_and_unreadable_parts_are_noted() -> None:
    body = chat({"role": "user", "content": [
        {"type": "text", "text": "Listen"},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "file", "file": {"file_id": "file-1"}},
    ]}, tools=[{"type": "web_search"}])
    count = count_chat_prompt(body, O200K)
    assert count.tokens == 3 + 1 + n("Listen") + 3
    assert {"audio not counted", "files not counted", "built-in tool definitions not counted"} <= set(count.notes)


@pytest.mark.parametrize("body", [{}, {"messages": "hi"}, {"messages": [None, 3, {"content": {"x": 1}}]}])
def test_malformed_bodies_do_not_raise(body: dict[str, Any]) -> None:
    assert count_chat_prompt(body, O200K).approximate


# --- completions, embeddings ------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "tokens"), [
    ("Say this is a test", n("Say this is a test")),
    (["Say this", "is a test"], n("Say this") + n("is a test")),
    ([1212, 318, 257, 1332], 4),
    ([[1212, 318], [257, 1332, 13]], 5),
    ([], 0),
])
def test_completion_prompts_and_embedding_inputs(value: Any, tokens: int) -> None:
    assert count_completion_prompt({"model": "gpt-3.5-turbo-instruct", "prompt": value}, O200K).tokens == tokens
    assert count_embedding_input({"model": "text-embedding-3-small", "input": value}, O200K).tokens == tokens


def test_embedding_input_matches_the_api_example() -> None:
    # OpenAI's API reference example for text-embedding-ada-002 reports prompt_tokens 8.
    body = {"model": "text-embedding-ada-002", "input": "The food was delicious and the waiter..."}
    count = count_embedding_input(body, CL100K)
    assert (count.tokens, count.approximate) == (8, False)


def test_completion_suffix_counts() -> None:
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": "def add(a, b):", "suffix": "    return c"}
    assert count_completion_prompt(body, CL100K).tokens == n("def add(a, b):", CL100K) + n("    return c", CL100K)


# --- Responses API ----------------------------------------------------------------------------------------


def test_responses_input_uses_chat_framing_and_is_flagged() -> None:
    body = {"model": "gpt-4.1", "instructions": "You are a helpful assistant.", "input": "Hello!"}
    count = count_responses_input(body, O200K)
    assert count.tokens == (3 + 1 + n("You are a helpful assistant.")) + (3 + 1 + n("Hello!")) + 3
    assert count.approximate


def test_responses_items() -> None:
    body = {"model": "gpt-4.1", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "reasoning", "id": "rs_1", "encrypted_content": "gAAA"},
    ], "previous_response_id": "resp_0",
        "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}],
        "text": {"format": {"type": "json_schema", "name": "W", "schema": {"type": "object"}}}}
    count = count_responses_input(body, O200K)
    tools_text = ("# Tools\n\n## functions\n\nnamespace functions {\n\n"
                  "type get_weather = () => any;\n\n} // namespace functions")
    expected = (3 + 1 + n("Weather?")) + (n("get_weather") + n("{}") + 7) + (3 + n("sunny")) + 3 \
        + n(tools_text) + 2 + n("{\"type\":\"object\"}")
    assert count.tokens == expected
    assert {"reasoning items not counted", "stored context (previous_response_id) not counted"} <= set(count.notes)


@pytest.mark.parametrize(("path", "body", "tokens"), [
    ("/v1/chat/completions", chat(user(WEATHER_SF)), 14),
    ("/v1/completions/", {"prompt": [1, 2, 3]}, 3),
    ("/openai/v1/embeddings", {"input": [[1, 2]]}, 2),
    ("/v1/responses", {"input": "Hi"}, 3 + 1 + 1 + 3),
])
def test_count_request_dispatches_by_path(path: str, body: dict[str, Any], tokens: int) -> None:
    count = count_request(path, body, O200K)
    assert count is not None and count.tokens == tokens


def test_count_request_ignores_other_endpoints() -> None:
    assert count_request("/v1/models", {}, O200K) is None
