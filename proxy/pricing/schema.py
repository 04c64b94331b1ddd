"""Reads and validates a price table: YAML bytes, or a mapping already parsed, in; validated entries out.

`read()` parses a table file's bytes and validates them, `validate()` checks data parsed elsewhere. An
`Entry` holds only the prices an entry (or tier) sets, as written: `proxy.pricing` applies the defaults,
works out every price set and does the arithmetic. YAML numbers become exact `Decimal`s read from their
text, and every mapping keeps the lines of its keys, so each problem is reported with its file and line.

This module must never read a number through a float, never build anything a SafeLoader would not, and
never pass a table it has not checked in full: any problem is a `PricingError`, in one line.

    PricingError (ValueError)   a bad table; the one-line message names the file, the line and the problem
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, Inexact, InvalidOperation
from typing import Any, NamedTuple

import yaml

from proxy.core.errors import MeterproxyError
from proxy.core.money import EXACT

__all__ = ["RATES", "TIERS", "Entry", "PricingError", "plain", "read", "validate"]

RATES = ("input", "cached_input", "output", "reasoning", "audio_input", "audio_output", "image_input", "image_output")
TIERS = ("flex", "priority", "batch")


class PricingError(MeterproxyError, ValueError):
    """The price table cannot be used; the message names the file (and line) and the problem, in one line."""


def read(raw: bytes, source: str) -> tuple[dict[str, Entry], Entry | None]:
    """The validated entries (and `default`) of a table file's bytes; `source` names the file in errors."""
    return validate(_parse_yaml(raw, source), source)


def plain(number: Decimal) -> Decimal:
    """The same value without a positive exponent (1E+3 -> 1000), so that its str has no exponent."""
    exponent = number.as_tuple().exponent
    return Decimal(int(number)) if isinstance(exponent, int) and exponent > 0 else number


# --- YAML reading ----------------------------------------------------------------------------------


class _Located(dict[str, Any]):
    """A YAML mapping that remembers its own line and each key's (1-based), for error messages."""

    __slots__ = ("key_lines", "line")

    def __init__(self) -> None:
        super().__init__()
        self.line: int | None = None
        self.key_lines: dict[object, int] = {}


class _ExactLoader(yaml.SafeLoader):
    """SafeLoader that reads YAML floats as exact Decimals, rejects duplicate mapping keys and keeps
    the line of every mapping key."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # merged keys may legitimately be overridden
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # unhashable: the base class reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _construct_located_map(loader: _ExactLoader, node: yaml.MappingNode) -> Any:
    data = _Located()
    data.line = node.start_mark.line + 1
    yield data
    data.update(loader.construct_mapping(node))
    for key_node, _ in node.value:  # flattened by now: merged keys carry their anchor's line
        key = loader.construct_object(key_node)  # already built: a cache lookup
        data.key_lines[key] = key_node.start_mark.line + 1


def _construct_exact_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> object:
    text = str(loader.construct_scalar(node)).replace("_", "")
    lowered = text.lower()
    if lowered.endswith((".inf", ".nan")):
        return Decimal(lowered.replace(".inf", "Infinity").replace(".nan", "NaN"))
    try:
        return Decimal(text)
    except InvalidOperation:
        return text  # e.g. YAML 1.1 base-60 "1:30.5": left as text, rejected as non-numeric later


_ExactLoader.add_constructor("tag:yaml.org,2002:float", _construct_exact_float)
_ExactLoader.add_constructor("tag:yaml.org,2002:map", _construct_located_map)


def _parse_yaml(raw: bytes, source: str) -> object:
    try:
        return yaml.load(raw, Loader=_ExactLoader)  # a SafeLoader subclass: safe
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise PricingError(f"{source}: YAML error{where}: {_one_line(problem)}") from exc
    except yaml.YAMLError as exc:
        raise PricingError(f"{source}: YAML error: {_one_line(str(exc))}") from exc


# --- validation ------------------------------------------------------------------------------------

_MODEL_KEYS = (*RATES, "long_context", "tiers", "max_output", "audio_minute", "match")
_DEFAULT_KEYS = _MODEL_KEYS[:-1]
_TIER_KEYS = (*RATES, "long_context")
_LONG_KEYS = ("above", *RATES)


@dataclass(slots=True)
class Entry:
    """One validated entry (or tier) as written: only the prices it sets."""

    rates: dict[str, Decimal]
    match: tuple[str, ...] = ()
    long_rates: dict[str, Decimal] | None = None
    above: int = 0  # 0: not set here
    tiers: dict[str, Entry] = field(default_factory=dict)
    max_output: int | None = None  # the most output tokens one call (one choice) can produce
    audio_minute: Decimal | None = None  # USD per minute of audio, for usage reported in seconds


class _Where(NamedTuple):
    """Where a value sits: file, line (None when unknown, e.g. a mapping built in code), and what it is."""

    source: str
    line: int | None
    what: str

    def at(self, mapping: object, key: object, what: str | None = None) -> _Where:
        line = mapping.key_lines.get(key, self.line) if isinstance(mapping, _Located) else self.line
        return _Where(self.source, line, self.what if what is None else what)

    def error(self, problem: str) -> PricingError:
        line = f"line {self.line}: " if self.line is not None else ""
        what = f"{self.what}: " if self.what else ""
        return PricingError(f"{self.source}: {line}{what}{problem}")


def validate(data: object, source: str) -> tuple[dict[str, Entry], Entry | None]:
    """The validated entries (and `default`) of a table already parsed, e.g. a mapping built in code."""
    top = _Where(source, getattr(data, "line", None), "")
    if not isinstance(data, Mapping):
        raise top.error(f"top level must be a mapping with 'models' (and optionally 'default'), got {_kind(data)}")
    for key in data:
        if key not in ("models", "default"):
            raise top.at(data, key).error(f"unknown top-level key {_show(key)} (allowed: 'models', 'default')")
    if "models" not in data:
        raise top.error("missing top-level 'models' mapping")
    entries = data["models"]
    if not isinstance(entries, Mapping):
        raise top.at(data, "models").error(
            f"'models' must be a mapping of model name to prices, got {_kind(entries)}")
    models: dict[str, Entry] = {}
    for name, entry in entries.items():
        here = top.at(entries, name, f"model {name!r}")
        if not isinstance(name, str) or not name:
            raise here._replace(what="").error(f"model name {_show(name)} is not a non-empty string")
        models[name] = _entry(entry, here, _MODEL_KEYS)
    default = None
    if "default" in data:
        default = _entry(data["default"], top.at(data, "default", "'default'"), _DEFAULT_KEYS)
    return models, default


def _entry(entry: object, where: _Where, allowed: tuple[str, ...]) -> Entry:
    _check_keys(entry, where, allowed, "entry must be a mapping of prices")
    assert isinstance(entry, Mapping)
    if "input" not in entry:
        raise where.error("missing required 'input' price")
    result = Entry(_rates(entry, where))
    if "match" in entry:
        result.match = _match_list(entry["match"], where.at(entry, "match"))
    if "max_output" in entry:
        value = entry["max_output"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise where.at(entry, "max_output").error(
                f"'max_output' must be a whole number of tokens (0 or more), got {_show(value)}")
        result.max_output = value
    if "audio_minute" in entry:
        at = where.at(entry, "audio_minute")
        result.audio_minute = _number(entry["audio_minute"], at, "audio_minute")
        if _per_second(result.audio_minute) is None:
            raise at.error(
                f"'audio_minute' {_show(entry['audio_minute'])} is not an exact price per second "
                "(it is divided by 60 and a call's cost must be exact): give a price per minute whose "
                "last digits divide by 3, e.g. 0.006 or 0.0060 for $0.0001 a second")
    if "long_context" in entry:
        result.long_rates, result.above = _long_context(entry["long_context"], where.at(entry, "long_context"),
                                                        where.what, required=True)
    if "tiers" in entry:
        tiers = entry["tiers"]
        at = where.at(entry, "tiers")
        if not isinstance(tiers, Mapping):
            raise at.error(f"'tiers' must be a mapping of tier ({', '.join(TIERS)}) to prices, got {_kind(tiers)}")
        for tier, prices in tiers.items():
            if tier not in TIERS:
                raise at.at(tiers, tier).error(f"unknown tier {_show(tier)} (allowed: {', '.join(TIERS)})")
            result.tiers[tier] = _tier(prices, at.at(tiers, tier, f"{where.what}, tier {tier!r}"), result.above)
    return result


def _tier(prices: object, where: _Where, model_above: int) -> Entry:
    _check_keys(prices, where, _TIER_KEYS, "a tier must be a mapping of prices")
    assert isinstance(prices, Mapping)
    tier = Entry(_rates(prices, where))
    if "long_context" in prices:
        tier.long_rates, tier.above = _long_context(prices["long_context"], where.at(prices, "long_context"),
                                                    where.what, required=not model_above)
    return tier


def _long_context(value: object, where: _Where, owner: str, required: bool) -> tuple[dict[str, Decimal], int]:
    where = where._replace(what=f"{owner}, long_context")
    _check_keys(value, where, _LONG_KEYS, "'long_context' must be a mapping with 'above' and prices")
    assert isinstance(value, Mapping)
    above = 0
    if "above" in value:
        above = value["above"]
        if isinstance(above, bool) or not isinstance(above, int) or above <= 0:
            raise where.at(value, "above").error(
                f"'above' must be a positive whole number of prompt tokens, got {_show(above)}")
    elif required:
        raise where.error("missing 'above' (the prompt tokens beyond which these prices apply)")
    rates = _rates(value, where)
    if not rates:
        raise where.error("sets no price (give at least one of: " + ", ".join(RATES) + ")")
    return rates, above


def _check_keys(value: object, where: _Where, allowed: tuple[str, ...], not_mapping: str) -> None:
    if not isinstance(value, Mapping):
        raise where.error(f"{not_mapping}, got {_kind(value)}")
    for key in value:
        if key not in allowed:
            raise where.at(value, key).error(f"unknown key {_show(key)} (allowed: {', '.join(allowed)})")


def _rates(entry: Mapping[Any, Any], where: _Where) -> dict[str, Decimal]:
    return {key: _number(entry[key], where.at(entry, key), key) for key in RATES if key in entry}


def _per_second(per_minute: Decimal) -> Decimal | None:
    """`per_minute` / 60 if that is an exact decimal (then every number of seconds costs an exact sum)."""
    try:
        return EXACT.divide(per_minute, Decimal(60))
    except Inexact:
        return None


def _number(value: object, where: _Where, key: str) -> Decimal:
    problem = f"{key!r} price {_show(value)}"
    if isinstance(value, bool):
        raise where.error(f"{problem} is a boolean, not a number")
    if isinstance(value, Decimal):
        number = value
    elif isinstance(value, int):
        number = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise where.error(f"{problem} is not a finite number")
        number = Decimal(repr(value))  # the shortest text that round-trips: what the author wrote
    elif isinstance(value, str):
        try:
            number = Decimal(value.strip())
        except InvalidOperation:
            raise where.error(f"{problem} is not a number") from None
    else:
        raise where.error(f"{problem} is not a number (got {_kind(value)})")
    if not number.is_finite():
        raise where.error(f"{problem} is not a finite number")
    if number < 0:
        raise where.error(f"{problem} is negative")
    return plain(number.copy_abs())  # copy_abs turns -0 into 0


def _match_list(value: object, where: _Where) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise where.error(f"'match' must be a list of non-empty glob strings, got {_show(value)}")
    return tuple(value)


def _kind(value: object) -> str:
    return "nothing" if value is None else type(value).__name__


def _show(value: object) -> str:
    text = str(value) if isinstance(value, Decimal) else repr(value)  # repr escapes line breaks
    return text if len(text) <= 60 else text[:57] + "..."


def _one_line(text: str) -> str:
    return " ".join(text.split())
