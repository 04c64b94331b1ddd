"""Prices a call's token usage from a YAML price table (USD per 1M tokens).

Pure pricing: data in, `Decimal` out. The only I/O is reading the table file in `PriceTable.load`.
It must never use floats for money (YAML numbers are read from their text, exactly), never round a
cost, and never guess a price: a model the table does not cover is reported as unpriced.

A price set is input, cached_input, output, reasoning, audio_input, audio_output. Per model, a
`long_context` set applies to the whole call when its prompt exceeds `above` tokens, and `tiers`
(flex, priority, batch) override the standard set for calls the response says that tier served.
Every combination is worked out once, at load, so pricing a call is a few lookups and multiplications.

    PricingError (ValueError)   a bad table; the one-line message names the file, the line and the problem
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal, Inexact, InvalidOperation
from typing import Any, NamedTuple

import yaml

from proxy.record import Usage

__all__ = ["STANDARD_TIERS", "TIERS", "ModelPrice", "PriceTable", "PricingError", "Quote"]

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
_RATES = ("input", "cached_input", "output", "reasoning", "audio_input", "audio_output")
TIERS = ("flex", "priority", "batch")
# What a response's `service_tier` says when the call was served at standard prices.
STANDARD_TIERS = frozenset({None, "", "default", "auto", "scale"})


class PricingError(ValueError):
    """The price table cannot be used; the message names the file (and line) and the problem, in one line."""


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """One price set, USD per 1M tokens, with every default already applied.

    `long_context` is the set for a call whose prompt exceeds `above` tokens; `tiers` the sets of the
    service tiers the table prices, each with its own `long_context` already worked out.
    """

    name: str  # the table entry's name (or "default")
    input: Decimal
    cached_input: Decimal
    output: Decimal
    reasoning: Decimal
    audio_input: Decimal = None  # type: ignore[assignment]  # None: the text price, filled in below
    audio_output: Decimal = None  # type: ignore[assignment]
    long_context: ModelPrice | None = None
    above: int = 0
    tiers: tuple[tuple[str, ModelPrice], ...] = ()

    def __post_init__(self) -> None:
        if self.audio_input is None:
            object.__setattr__(self, "audio_input", self.input)
        if self.audio_output is None:
            object.__setattr__(self, "audio_output", self.output)

    def tier(self, name: str) -> ModelPrice | None:
        for tier, price in self.tiers:
            if tier == name:
                return price
        return None

    def peak(self) -> tuple[Decimal, Decimal]:
        """(highest prompt price, highest completion price) over every set: a call's worst case."""
        sets = [self, *(p for _, p in self.tiers)]
        sets += [p.long_context for p in sets if p.long_context is not None]
        return (max(max(p.input, p.cached_input, p.audio_input) for p in sets),
                max(max(p.output, p.reasoning, p.audio_output) for p in sets))


class Quote(NamedTuple):
    """A call's price and how it was arrived at."""

    cost: Decimal
    priced: bool
    entry: str | None = None  # the table entry that priced it
    tier: str | None = None  # the service tier whose prices applied; None: standard
    tier_fallback: bool = False  # the response named a tier the entry has no prices for: standard applied
    long_context: bool = False  # the prompt exceeded the entry's long-context threshold


_UNPRICED = Quote(_ZERO, False)


class PriceTable:
    """An immutable, validated price table with fast per-request model resolution."""

    __slots__ = ("_cache", "_default", "_exact", "_globs", "_matches", "source", "version")

    version: str  # first 16 hex chars of SHA-256 of the file's bytes (or of a canonical dump)
    source: str  # file path, or "<memory>"

    def __init__(self, source: str, version: str, models: dict[str, ModelPrice],
                 matches: dict[str, tuple[str, ...]], default: ModelPrice | None) -> None:
        self.source = source
        self.version = version
        self._exact = models
        self._matches = matches
        self._globs = [(re.compile(fnmatch.translate(pattern)).match, models[name])
                       for name, patterns in matches.items() for pattern in patterns]
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
        return cls.from_bytes(raw, source)

    @classmethod
    def from_bytes(cls, raw: bytes, source: str) -> PriceTable:
        """The table in a file's bytes; its version is their hash (what a file watcher compares)."""
        return cls._build(_parse_yaml(raw, source), source, hashlib.sha256(raw).hexdigest()[:16])

    @classmethod
    def from_mapping(cls, data: object, source: str = "<memory>") -> PriceTable:
        return cls._build(data, source, None)

    @classmethod
    def _build(cls, data: object, source: str, version: str | None) -> PriceTable:
        entries, default = _validate(data, source)
        models = {name: _model_price(name, entry) for name, entry in entries.items()}
        matches = {name: entry.match for name, entry in entries.items() if entry.match}
        default_price = _model_price("default", default) if default is not None else None
        table = cls(source, version or "", models, matches, default_price)
        if version is None:
            blob = json.dumps(table.describe(_canonical), separators=(",", ":"), ensure_ascii=False)
            table.version = hashlib.sha256(blob.encode()).hexdigest()[:16]
        return table

    # --- resolution ---------------------------------------------------------------------------------
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

    # --- pricing ------------------------------------------------------------------------------------
    def cost(self, model: str | None, usage: Usage, service_tier: str | None = None) -> tuple[Decimal, bool]:
        """(cost in USD, priced). Exact, never rounded; an unpriced model costs Decimal(0), False.

        A zero cost is `Decimal(0)` and no cost has a positive exponent, so `str(cost)` is a plain
        decimal ("0.0075", "100") for every cost of at least 0.000001 USD; below that Decimal's own
        str uses exponent form ("2E-8"), so store and display costs with `format(cost, "f")`.
        """
        entry = self.resolve(model)  # quote()'s choice, without building a Quote: this is the hot path
        if entry is None:
            return _ZERO, False
        price = entry
        if service_tier not in STANDARD_TIERS:
            price = entry.tier(service_tier) or entry  # type: ignore[arg-type]
        prompt = max(usage.prompt_tokens, 0)
        if price.long_context is not None and prompt > price.above:
            price = price.long_context
        return _price(price, usage, prompt), True

    def quote(self, model: str | None, usage: Usage, service_tier: str | None = None) -> Quote:
        """The cost of a call, with the entry, tier and long-context choice that made it."""
        entry = self.resolve(model)
        if entry is None:
            return _UNPRICED
        price, tier, fallback = entry, None, False
        if service_tier not in STANDARD_TIERS:
            found = entry.tier(service_tier)  # type: ignore[arg-type]  # not None: None is standard
            if found is None:
                fallback = True
            else:
                price, tier = found, service_tier
        prompt = max(usage.prompt_tokens, 0)
        long = price.long_context is not None and prompt > price.above
        if long:
            price = price.long_context  # type: ignore[assignment]
        return Quote(_price(price, usage, prompt), True, entry.name, tier, fallback, long)

    # --- inspection ---------------------------------------------------------------------------------
    def models(self) -> list[str]:
        """The table's entry names, in file order (not including `default`)."""
        return list(self._exact)

    def describe(self, text: Callable[[Decimal], str] | None = None) -> dict[str, Any]:
        """The table as JSON-ready data: every entry's effective prices as decimal strings."""
        show = text or _plain_text
        models = {}
        for name, price in self._exact.items():
            view = _describe(price, show)
            if name in self._matches:
                view["match"] = list(self._matches[name])
            models[name] = view
        default = _describe(self._default, show) if self._default is not None else None
        return {"models": models, "default": default}

    def __repr__(self) -> str:
        return f"PriceTable(source={self.source!r}, version={self.version!r}, models={len(self._exact)})"


def _price(p: ModelPrice, usage: Usage, prompt: int) -> Decimal:
    # Meters normalise usage to OpenAI's rules (cached and audio within prompt, reasoning and audio
    # within completion); clamping keeps a malformed report from producing a negative cost or charging
    # a token twice.
    cached = min(max(usage.cached_tokens, 0), prompt)
    completion = max(usage.completion_tokens, 0)
    reasoning = min(max(usage.reasoning_tokens, 0), completion)
    add, mul = _EXACT.add, _EXACT.multiply
    audio_in, audio_out = usage.audio_prompt_tokens, usage.audio_completion_tokens
    if audio_in > 0 or audio_out > 0:  # rare: keep the common case to the four text terms
        audio_in = min(max(audio_in, 0), prompt - cached)
        audio_out = min(max(audio_out, 0), completion - reasoning)
        total = add(mul(audio_in, p.audio_input), mul(audio_out, p.audio_output))
        prompt -= audio_in
        completion -= audio_out
    else:
        total = _ZERO
    total = add(total, add(add(mul(prompt - cached, p.input), mul(cached, p.cached_input)),
                           add(mul(completion - reasoning, p.output), mul(reasoning, p.reasoning))))
    usd = _EXACT.divide(total, _MILLION)
    # Normalised, so equal costs are equal strings in the ledger whatever the prices' written form.
    return _plain(usd.normalize(_EXACT)) if usd else _ZERO


# --- building the price sets -----------------------------------------------------------------------


def _model_price(name: str, e: _Entry) -> ModelPrice:
    """Every set of one entry. Layers are merged as written, then defaults filled, so a tier that
    sets only `output` moves `reasoning` with it. Above the threshold, a tier's own prices win over
    the model's long-context ones, unless the tier has a `long_context` of its own."""
    tiers = []
    for tier, t in e.tiers.items():
        long_layers = None
        if t.long_rates is not None:
            long_layers = [e.rates, e.long_rates or {}, t.rates, t.long_rates]
        elif e.long_rates is not None:
            long_layers = [e.rates, e.long_rates, t.rates]
        tiers.append((tier, _set(name, [e.rates, t.rates], long_layers, t.above or e.above)))
    long = [e.rates, e.long_rates] if e.long_rates is not None else None
    return _set(name, [e.rates], long, e.above, tuple(tiers))


def _set(name: str, layers: list[dict[str, Decimal]], long_layers: list[dict[str, Decimal]] | None,
         above: int, tiers: tuple[tuple[str, ModelPrice], ...] = ()) -> ModelPrice:
    long = ModelPrice(name=name, **_filled(long_layers)) if long_layers is not None else None
    return ModelPrice(name=name, **_filled(layers), long_context=long, above=above if long else 0, tiers=tiers)


def _filled(layers: list[dict[str, Decimal]]) -> dict[str, Decimal]:
    merged: dict[str, Decimal] = {}
    for layer in layers:
        merged.update(layer)
    given, out = merged["input"], merged.get("output", _ZERO)
    return {"input": given, "cached_input": merged.get("cached_input", given), "output": out,
            "reasoning": merged.get("reasoning", out), "audio_input": merged.get("audio_input", given),
            "audio_output": merged.get("audio_output", out)}


def _describe(p: ModelPrice, show: Callable[[Decimal], str]) -> dict[str, Any]:
    view: dict[str, Any] = {key: show(getattr(p, key)) for key in _RATES}
    if p.long_context is not None:
        view["long_context"] = {"above": p.above, **{k: show(getattr(p.long_context, k)) for k in _RATES}}
    if p.tiers:
        view["tiers"] = {tier: _describe(t, show) for tier, t in p.tiers}
    return view


def _canonical(number: Decimal) -> str:
    return str(number.normalize(_EXACT))


def _plain_text(number: Decimal) -> str:
    return format(number, "f")


def _plain(number: Decimal) -> Decimal:
    """The same value without a positive exponent (1E+3 -> 1000), so that its str has no exponent."""
    exponent = number.as_tuple().exponent
    return Decimal(int(number)) if isinstance(exponent, int) and exponent > 0 else number


# --- YAML reading ----------------------------------------------------------------------------------


class _Located(dict):  # type: ignore[type-arg]
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

_MODEL_KEYS = (*_RATES, "long_context", "tiers", "match")
_DEFAULT_KEYS = _MODEL_KEYS[:-1]
_TIER_KEYS = (*_RATES, "long_context")
_LONG_KEYS = ("above", *_RATES)


@dataclass(slots=True)
class _Entry:
    """One validated entry (or tier) as written: only the prices it sets."""

    rates: dict[str, Decimal]
    match: tuple[str, ...] = ()
    long_rates: dict[str, Decimal] | None = None
    above: int = 0  # 0: not set here
    tiers: dict[str, _Entry] = field(default_factory=dict)


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


def _validate(data: object, source: str) -> tuple[dict[str, _Entry], _Entry | None]:
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
    models: dict[str, _Entry] = {}
    for name, entry in entries.items():
        here = top.at(entries, name, f"model {name!r}")
        if not isinstance(name, str) or not name:
            raise here._replace(what="").error(f"model name {_show(name)} is not a non-empty string")
        models[name] = _entry(entry, here, _MODEL_KEYS)
    default = None
    if "default" in data:
        default = _entry(data["default"], top.at(data, "default", "'default'"), _DEFAULT_KEYS)
    return models, default


def _entry(entry: object, where: _Where, allowed: tuple[str, ...]) -> _Entry:
    _check_keys(entry, where, allowed, "entry must be a mapping of prices")
    assert isinstance(entry, Mapping)
    if "input" not in entry:
        raise where.error("missing required 'input' price")
    result = _Entry(_rates(entry, where))
    if "match" in entry:
        result.match = _match_list(entry["match"], where.at(entry, "match"))
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


def _tier(prices: object, where: _Where, model_above: int) -> _Entry:
    _check_keys(prices, where, _TIER_KEYS, "a tier must be a mapping of prices")
    assert isinstance(prices, Mapping)
    tier = _Entry(_rates(prices, where))
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
        raise where.error("sets no price (give at least one of: " + ", ".join(_RATES) + ")")
    return rates, above


def _check_keys(value: object, where: _Where, allowed: tuple[str, ...], not_mapping: str) -> None:
    if not isinstance(value, Mapping):
        raise where.error(f"{not_mapping}, got {_kind(value)}")
    for key in value:
        if key not in allowed:
            raise where.at(value, key).error(f"unknown key {_show(key)} (allowed: {', '.join(allowed)})")


def _rates(entry: Mapping[Any, Any], where: _Where) -> dict[str, Decimal]:
    return {key: _number(entry[key], where.at(entry, key), key) for key in _RATES if key in entry}


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
    return _plain(number.copy_abs())  # copy_abs turns -0 into 0


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
