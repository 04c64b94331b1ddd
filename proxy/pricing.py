"""Prices a call's token usage from a YAML price table (USD per 1M tokens).

Pure pricing: data in, `Decimal` out. The only I/O is reading the table file in `PriceTable.load`.
It must never use floats for money (YAML numbers are read from their text, exactly), never round a
cost, and never guess a price: a model the table does not cover is reported as unpriced.

    PricingError (ValueError)   a bad table; the one-line message names the file and the problem
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal, Inexact, InvalidOperation
from typing import Any

import yaml

from proxy.record import Usage

__all__ = ["ModelPrice", "PriceTable", "PricingError"]

_PRICE_KEYS = ("input", "cached_input", "output", "reasoning")
_MODEL_KEYS = frozenset((*_PRICE_KEYS, "match"))
_DEFAULT_KEYS = frozenset(_PRICE_KEYS)
_TOP_KEYS = ("models", "default")
_DATE_SUFFIX = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8})$")
_ZERO = Decimal(0)
_MILLION = Decimal(1_000_000)
# Products, sums and division by 10**6 of finite decimals are always exact, so an unbounded precision
# costs nothing and guarantees no digit is ever dropped; the traps turn any surprise into an error.
_EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN, traps=[Inexact, InvalidOperation])
# Model names come from clients; only short ones are remembered, and the memory is emptied when full.
_CACHE_MAX = 1024
_CACHE_NAME_MAX = 200
_MISS = object()


class PricingError(ValueError):
    """The price table cannot be used; the message names the file and the problem, in one line."""


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """One entry's prices, USD per 1M tokens, with every default already applied."""

    name: str  # the table entry's name (or "default")
    input: Decimal
    cached_input: Decimal
    output: Decimal
    reasoning: Decimal


class PriceTable:
    """An immutable, validated price table with fast per-request model resolution."""

    __slots__ = ("version", "source", "_exact", "_globs", "_default", "_cache")

    version: str  # first 16 hex chars of SHA-256 of the file's bytes (or of a canonical dump)
    source: str  # file path, or "<memory>"

    def __init__(self, source: str, version: str, models: dict[str, ModelPrice],
                 globs: list[tuple[Callable[[str], object], ModelPrice]], default: ModelPrice | None) -> None:
        self.source = source
        self.version = version
        self._exact = models
        self._globs = globs
        self._default = default
        self._cache: dict[str, ModelPrice | None] = {}

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PriceTable:
        source = os.fspath(path)
        try:
            with open(source, "rb") as f:
                raw = f.read()
        except OSError as exc:
            raise PricingError(f"{source}: cannot read price table: {exc.strerror or exc}") from exc
        data = _parse_yaml(raw, source)
        return cls._build(data, source, hashlib.sha256(raw).hexdigest()[:16])

    @classmethod
    def from_mapping(cls, data: object, source: str = "<memory>") -> PriceTable:
        return cls._build(data, source, None)

    @classmethod
    def _build(cls, data: object, source: str, version: str | None) -> PriceTable:
        models, matches, default = _validate(data, source)
        globs = [(re.compile(fnmatch.translate(pattern)).match, models[name])
                 for name, patterns in matches for pattern in patterns]
        if version is None:
            version = _canonical_version(models, matches, default)
        return cls(source, version, models, globs, default)

    def resolve(self, model: str | None) -> ModelPrice | None:
        """The entry pricing `model`: exact name, glob, date-stripped name, then `default`."""
        if not model:
            return self._default
        found = self._exact.get(model)
        if found is not None:
            return found
        remembered = self._cache.get(model, _MISS)  # one lookup: safe even if another thread clears it
        if remembered is not _MISS:
            return remembered  # type: ignore[return-value]
        found = self._search(model)
        if len(model) <= _CACHE_NAME_MAX:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[model] = found
        return found

    def _search(self, model: str) -> ModelPrice | None:
        found = self._by_glob(model)
        if found is None:
            base = _DATE_SUFFIX.sub("", model)
            if base != model:
                found = self._exact.get(base) or self._by_glob(base)
        return found or self._default

    def _by_glob(self, model: str) -> ModelPrice | None:
        for match, price in self._globs:
            if match(model):
                return price
        return None

    def cost(self, model: str | None, usage: Usage) -> tuple[Decimal, bool]:
        """(cost in USD, priced). Exact, never rounded; an unpriced model costs Decimal(0), False.

        A zero cost is `Decimal(0)` and no cost has a positive exponent, so `str(cost)` is a plain
        decimal ("0.0075", "100") for every cost of at least 0.000001 USD; below that Decimal's own
        str uses exponent form ("2E-8"), so store and display costs with `format(cost, "f")`.
        """
        price = self.resolve(model)
        if price is None:
            return _ZERO, False
        # Meters normalise usage to OpenAI's rules (cached within prompt, reasoning within
        # completion); clamping keeps a malformed report from producing a negative cost.
        prompt = max(usage.prompt_tokens, 0)
        cached = min(max(usage.cached_tokens, 0), prompt)
        completion = max(usage.completion_tokens, 0)
        reasoning = min(max(usage.reasoning_tokens, 0), completion)
        add, mul = _EXACT.add, _EXACT.multiply
        total = add(add(mul(prompt - cached, price.input), mul(cached, price.cached_input)),
                    add(mul(completion - reasoning, price.output), mul(reasoning, price.reasoning)))
        usd = _EXACT.divide(total, _MILLION)
        # Normalised, so equal costs are equal strings in the ledger whatever the prices' written form.
        return (_plain(usd.normalize(_EXACT)) if usd else _ZERO), True

    def models(self) -> list[str]:
        """The table's entry names, in file order (not including `default`)."""
        return list(self._exact)

    def __repr__(self) -> str:
        return f"PriceTable(source={self.source!r}, version={self.version!r}, models={len(self._exact)})"


# --- YAML reading ----------------------------------------------------------------------------------


class _ExactLoader(yaml.SafeLoader):
    """SafeLoader that reads YAML floats as exact Decimals and rejects duplicate mapping keys."""

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


def _parse_yaml(raw: bytes, source: str) -> object:
    try:
        return yaml.load(raw, Loader=_ExactLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise PricingError(f"{source}: YAML error{where}: {_one_line(problem)}") from exc
    except yaml.YAMLError as exc:
        raise PricingError(f"{source}: YAML error: {_one_line(str(exc))}") from exc


# --- validation ------------------------------------------------------------------------------------

_Matches = list[tuple[str, tuple[str, ...]]]


def _validate(data: object, source: str) -> tuple[dict[str, ModelPrice], _Matches, ModelPrice | None]:
    if not isinstance(data, Mapping):
        raise PricingError(f"{source}: top level must be a mapping with 'models' (and optionally "
                           f"'default'), got {_kind(data)}")
    for key in data:
        if key not in _TOP_KEYS:
            raise PricingError(f"{source}: unknown top-level key {_show(key)} (allowed: 'models', 'default')")
    if "models" not in data:
        raise PricingError(f"{source}: missing top-level 'models' mapping")
    entries = data["models"]
    if not isinstance(entries, Mapping):
        raise PricingError(f"{source}: 'models' must be a mapping of model name to prices, got {_kind(entries)}")
    models: dict[str, ModelPrice] = {}
    matches: _Matches = []
    for name, entry in entries.items():
        if not isinstance(name, str) or not name:
            raise PricingError(f"{source}: model name {_show(name)} is not a non-empty string")
        where = f"{source}: model {name!r}"
        models[name] = _price_entry(entry, name, where, _MODEL_KEYS)
        patterns = _match_list(entry["match"], where) if isinstance(entry, Mapping) and "match" in entry else ()
        if patterns:
            matches.append((name, patterns))
    default = None
    if "default" in data:
        default = _price_entry(data["default"], "default", f"{source}: 'default'", _DEFAULT_KEYS)
    return models, matches, default


def _price_entry(entry: object, name: str, where: str, allowed: frozenset[str]) -> ModelPrice:
    if not isinstance(entry, Mapping):
        raise PricingError(f"{where}: entry must be a mapping of prices, got {_kind(entry)}")
    for key in entry:
        if key not in allowed:
            allowed_text = ", ".join(k for k in (*_PRICE_KEYS, "match") if k in allowed)
            raise PricingError(f"{where}: unknown key {_show(key)} (allowed: {allowed_text})")
    if "input" not in entry:
        raise PricingError(f"{where}: missing required 'input' price")
    prices = {key: _price(entry[key], where, key) for key in _PRICE_KEYS if key in entry}
    output = prices.get("output", _ZERO)
    return ModelPrice(name=name, input=prices["input"], cached_input=prices.get("cached_input", prices["input"]),
                      output=output, reasoning=prices.get("reasoning", output))


def _price(value: object, where: str, key: str) -> Decimal:
    problem = f"{where}: {key!r} price {_show(value)}"
    if isinstance(value, bool):
        raise PricingError(f"{problem} is a boolean, not a number")
    if isinstance(value, Decimal):
        number = value
    elif isinstance(value, int):
        number = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise PricingError(f"{problem} is not a finite number")
        number = Decimal(repr(value))  # the shortest text that round-trips: what the author wrote
    elif isinstance(value, str):
        try:
            number = Decimal(value.strip())
        except InvalidOperation:
            raise PricingError(f"{problem} is not a number") from None
    else:
        raise PricingError(f"{problem} is not a number (got {_kind(value)})")
    if not number.is_finite():
        raise PricingError(f"{problem} is not a finite number")
    if number < 0:
        raise PricingError(f"{problem} is negative")
    return _plain(number.copy_abs())  # copy_abs turns -0 into 0


def _match_list(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise PricingError(f"{where}: 'match' must be a list of non-empty glob strings, got {_show(value)}")
    return tuple(value)


def _canonical_version(models: dict[str, ModelPrice], matches: _Matches, default: ModelPrice | None) -> str:
    def prices(p: ModelPrice) -> list[str]:
        return [str(getattr(p, k).normalize(_EXACT)) for k in _PRICE_KEYS]

    # Entry order is kept: it decides which glob wins.
    dump = {
        "models": [[name, prices(p)] for name, p in models.items()],
        "match": [[name, list(patterns)] for name, patterns in matches],
        "default": prices(default) if default is not None else None,
    }
    blob = json.dumps(dump, separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _plain(number: Decimal) -> Decimal:
    """The same value without a positive exponent (1E+3 -> 1000), so that its str has no exponent."""
    exponent = number.as_tuple().exponent
    return Decimal(int(number)) if isinstance(exponent, int) and exponent > 0 else number


def _kind(value: object) -> str:
    return "nothing" if value is None else type(value).__name__


def _show(value: object) -> str:
    text = str(value) if isinstance(value, Decimal) else repr(value)  # repr escapes line breaks
    return text if len(text) <= 60 else text[:57] + "..."


def _one_line(text: str) -> str:
    return " ".join(text.split())
