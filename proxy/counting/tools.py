"""Estimates of the hidden prompt text OpenAI builds from tool definitions and structured-output schemas.

OpenAI renders function tools into the prompt as TypeScript-like declarations inside a
`namespace functions { ... }` block, not as JSON. The rendering here is our reconstruction: descriptions
and titles as `//` comments, defaults after the property. Fitted on four captured gpt-4o requests, it is
exact for plain schemas and 1-2 tokens off for pydantic-generated ones; every count is still an estimate.
A `json_schema` response format was seen to cost exactly the compact JSON of its schema.

Pure functions over parsed JSON; nothing here raises on odd input (unknown shapes render as `any`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = ["render_functions", "schema_text", "tool_functions"]

_MAX_DEPTH = 8  # nested objects and $ref chains are rendered this deep, then `any`


def tool_functions(tools: object) -> tuple[list[Mapping[str, Any]], int]:
    """The function definitions among chat (`{"type": "function", "function": {...}}`), Responses
    (`{"type": "function", "name": ...}`) or legacy `functions` entries; and how many other tools were skipped."""
    functions: list[Mapping[str, Any]] = []
    skipped = 0
    if not isinstance(tools, list):
        return functions, skipped
    for tool in tools:
        if not isinstance(tool, dict):
            skipped += 1
        elif isinstance(tool.get("function"), dict):
            functions.append(tool["function"])
        elif tool.get("type", "function") == "function" and isinstance(tool.get("name"), str):
            functions.append(tool)
        else:
            skipped += 1  # built-in tools (web_search, file_search, custom, mcp, ...)
    return functions, skipped


def render_functions(functions: list[Mapping[str, Any]]) -> str:
    """The prompt text of a list of function definitions."""
    lines = ["# Tools", "", "## functions", "", "namespace functions {", ""]
    for function in functions:
        params = function.get("parameters")
        params = params if isinstance(params, dict) else {}
        for comment in (function.get("description"), params.get("description"), params.get("title")):
            if isinstance(comment, str) and comment:
                lines.append(f"// {comment}")
        name = function.get("name")
        name = name if isinstance(name, str) else ""
        defs = params.get("$defs") or params.get("definitions") or {}
        body = _properties(params, defs, 0)
        if body:
            lines += [f"type {name} = (_: {{", body, "}) => any;"]
        else:
            lines.append(f"type {name} = () => any;")
        lines.append("")
    lines.append("} // namespace functions")
    return "\n".join(lines)


def _properties(schema: Mapping[str, Any], defs: Mapping[str, Any], depth: int) -> str:
    props = schema.get("properties")
    if not isinstance(props, dict):
        return ""
    required = schema.get("required")
    required = required if isinstance(required, list) else []
    indent = "  " * depth
    lines = []
    for key, prop in props.items():
        prop = prop if isinstance(prop, dict) else {}
        description = prop.get("description")
        if isinstance(description, str) and description:
            lines.append(f"{indent}// {description}")
        optional = "" if key in required else "?"
        line = f"{indent}{key}{optional}: {_type(prop, defs, depth)},"
        comment = _trailing_comment(prop)
        lines.append(f"{line} // {comment}" if comment else line)
    return "\n".join(lines)


def _trailing_comment(prop: Mapping[str, Any]) -> str:
    parts = []
    title = prop.get("title")
    if isinstance(title, str) and title:
        parts.append(title)
    if "default" in prop:
        parts.append(f"default: {_json(prop['default'])}")
    return " ".join(parts)


def _type(schema: object, defs: Mapping[str, Any], depth: int) -> str:
    if not isinstance(schema, dict) or depth > _MAX_DEPTH:
        return "any"
    ref = schema.get("$ref")
    if isinstance(ref, str):
        return _type(defs.get(ref.rsplit("/", 1)[-1]), defs, depth + 1)
    if "const" in schema:
        return _json(schema["const"])
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return " | ".join(_json(value) for value in enum)
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            return " | ".join(_type(option, defs, depth + 1) for option in options)
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(_type({**schema, "type": k}, defs, depth) for k in kind)
    if kind == "array":
        return f"{_type(schema.get('items'), defs, depth + 1)}[]"
    if kind == "object":
        body = _properties(schema, defs, depth + 1)
        return f"{{\n{body}\n{'  ' * depth}}}" if body else "object"
    if kind == "integer":
        return "number"
    return kind if kind in ("string", "number", "boolean", "null") else "any"


def schema_text(response_format: object) -> str | None:
    """The prompt text a structured-output format adds: the compact JSON of its schema; None for none.

    Takes chat's `response_format` (`{"type": "json_schema", "json_schema": {"schema": ...}}`) or the
    Responses API's `text.format` (`{"type": "json_schema", "schema": ...}`). `json_object` adds nothing
    (seen on a capture), so it gives None too.
    """
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return None
    holder = response_format.get("json_schema")
    schema = (holder if isinstance(holder, dict) else response_format).get("schema")
    if not isinstance(schema, dict):
        return None
    return _json(schema)


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
