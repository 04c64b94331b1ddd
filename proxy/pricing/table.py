"""Prices a call's token usage from a YAML price table (USD per 1M tokens).

Pure pricing: data in, `Decimal` out. The only I/O is reading the table file in `PriceTable.load`.
It must never use floats for money (YAML numbers are read from their text, exactly), never round a
cost, and never guess a price: a model the table does not cover is reported as unpriced.

A price set is input, cached_input, output, reasoning, audio_input, audio_output. Per model, a
`long_context` set applies to the whole call when its prompt exceeds `above` tokens, and `tiers`
(flex, priority, batch) override the standard set for calls the response says that tier served.
Every combination is worked out once, at load, so pricing a call is a few lookups and multiplications.
Reading and validating the YAML is `proxy.pricing_yaml`'s part; its `PricingError` is importable from here.

    PricingError (ValueError)   a bad table; the one-line message names the file, the line and the problem
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from enum import Enum
from typing import Any, NamedTuple, TypedDict

from proxy.core.money import EXACT
from proxy.core.record import Usage
from proxy.pricing.schema import RATES, TIERS, Entry, PricingError, plain, read, validate

__all__ = ["STANDARD_TIERS", "TIERS", "ModelPrice", "PriceTable", "PricingError", "Quote"]

_DATE_SUFFIX = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8})$")
_ZERO = Decimal(0)
_MILLION = Decimal(1_000_000)
# Model names come from clients; only short ones are remembered, and the memory is emptied when full.
_CACHE_MAX = 1024
_CACHE_NAME_MAX = 200


class _Miss(Enum):
    MISS = "miss"  # not in the cache (a cached None is a model known to be unpriced)


_MISS = _Miss.MISS
# A media rate's default: "the text price", filled in by ModelPrice.__post_init__ (matched by identity, so
# a NaN from anywhere else is never taken for it).
_TEXT_PRICE = Decimal("NaN")
# What a response's `service_tier` says when the call was served at standard prices.
STANDARD_TIERS = frozenset({None, "", "default", "auto", "scale"})


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
    audio_input: Decimal = _TEXT_PRICE  # by default the text price, filled in below
    audio_output: Decimal = _TEXT_PRICE
    image_input: Decimal = _TEXT_PRICE
    image_output: Decimal = _TEXT_PRICE
    long_context: ModelPrice | None = None
    above: int = 0
    tiers: tuple[tuple[str, ModelPrice], ...] = ()
    max_output: int | None = None  # output tokens one choice of one call can reach at most (budgets reserve it)
    audio_minute: Decimal | None = None  # USD per minute of audio; None: usage in seconds is unpriced

    def __post_init__(self) -> None:
        for media, text in (("audio_input", "input"), ("audio_output", "output"), ("image_input", "input"),
                            ("image_output", "output")):
            if getattr(self, media) is _TEXT_PRICE:
                object.__setattr__(self, media, getattr(self, text))

    def tier(self, name: str) -> ModelPrice | None:
        for tier, price in self.tiers:
            if tier == name:
                return price
        return None


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
        return cls._build(*read(raw, source), source, hashlib.sha256(raw).hexdigest()[:16])

    @classmethod
    def from_mapping(cls, data: object, source: str = "<memory>") -> PriceTable:
        return cls._build(*validate(data, source), source, None)

    @classmethod
    def _build(cls, entries: dict[str, Entry], default: Entry | None, source: str,
               version: str | None) -> PriceTable:
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
            return remembered
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
        if usage.audio_seconds is not None:
            return _per_minute(entry, usage)
        price = entry
        if service_tier is not None and service_tier not in STANDARD_TIERS:
            price = entry.tier(service_tier) or entry
        prompt = max(usage.prompt_tokens, 0)
        if price.long_context is not None and prompt > price.above:
            price = price.long_context
        return _price(price, usage, prompt), True

    def quote(self, model: str | None, usage: Usage, service_tier: str | None = None) -> Quote:
        """The cost of a call, with the entry, tier and long-context choice that made it."""
        entry = self.resolve(model)
        if entry is None:
            return _UNPRICED
        if usage.audio_seconds is not None:
            cost, priced = _per_minute(entry, usage)
            return Quote(cost, priced, entry.name if priced else None)
        price, tier, fallback = entry, None, False
        if service_tier is not None and service_tier not in STANDARD_TIERS:
            found = entry.tier(service_tier)
            if found is None:
                fallback = True
            else:
                price, tier = found, service_tier
        prompt = max(usage.prompt_tokens, 0)
        long_price = price.long_context if prompt > price.above else None
        long = long_price is not None
        if long_price is not None:
            price = long_price
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


def _per_minute(entry: ModelPrice, usage: Usage) -> tuple[Decimal, bool]:
    """Usage in seconds of audio: priced per minute when the entry says how, else unpriced (never free)."""
    if entry.audio_minute is None:
        return _ZERO, False
    seconds = max(usage.audio_seconds or _ZERO, _ZERO)
    usd = EXACT.divide(EXACT.multiply(seconds, entry.audio_minute), Decimal(60))
    return (plain(usd.normalize(EXACT)) if usd else _ZERO), True


def _price(p: ModelPrice, usage: Usage, prompt: int) -> Decimal:
    # Meters normalise usage to OpenAI's rules (cached and audio within prompt, reasoning and audio
    # within completion); clamping keeps a malformed report from producing a negative cost or charging
    # a token twice.
    cached = min(max(usage.cached_tokens, 0), prompt)
    completion = max(usage.completion_tokens, 0)
    reasoning = min(max(usage.reasoning_tokens, 0), completion)
    add, mul = EXACT.add, EXACT.multiply
    audio_in, audio_out = usage.audio_prompt_tokens, usage.audio_completion_tokens
    image_in, image_out = usage.image_prompt_tokens, usage.image_completion_tokens
    total = _ZERO
    if audio_in > 0 or audio_out > 0:  # rare: keep the common case to the four text terms
        audio_in = min(max(audio_in, 0), prompt - cached)
        audio_out = min(max(audio_out, 0), completion - reasoning)
        total = add(mul(audio_in, p.audio_input), mul(audio_out, p.audio_output))
        prompt -= audio_in
        completion -= audio_out
    if image_in > 0 or image_out > 0:
        image_in = min(max(image_in, 0), prompt - cached)
        image_out = min(max(image_out, 0), completion - reasoning)
        total = add(total, add(mul(image_in, p.image_input), mul(image_out, p.image_output)))
        prompt -= image_in
        completion -= image_out
    total = add(total, add(add(mul(prompt - cached, p.input), mul(cached, p.cached_input)),
                           add(mul(completion - reasoning, p.output), mul(reasoning, p.reasoning))))
    usd = EXACT.divide(total, _MILLION)
    # Normalised, so equal costs are equal strings in the ledger whatever the prices' written form.
    return plain(usd.normalize(EXACT)) if usd else _ZERO


# --- building the price sets -----------------------------------------------------------------------


def _model_price(name: str, e: Entry) -> ModelPrice:
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
    return _set(name, [e.rates], long, e.above, tuple(tiers), e.max_output, e.audio_minute)


def _set(name: str, layers: list[dict[str, Decimal]], long_layers: list[dict[str, Decimal]] | None,
         above: int, tiers: tuple[tuple[str, ModelPrice], ...] = (), max_output: int | None = None,
         audio_minute: Decimal | None = None) -> ModelPrice:
    long = ModelPrice(name=name, **_filled(long_layers)) if long_layers is not None else None
    return ModelPrice(name=name, **_filled(layers), long_context=long, above=above if long else 0, tiers=tiers,
                      max_output=max_output, audio_minute=audio_minute)


class _Rates(TypedDict):
    """The eight rates of one price set, every default applied (ModelPrice's fields of the same names)."""

    input: Decimal
    cached_input: Decimal
    output: Decimal
    reasoning: Decimal
    audio_input: Decimal
    audio_output: Decimal
    image_input: Decimal
    image_output: Decimal


def _filled(layers: list[dict[str, Decimal]]) -> _Rates:
    merged: dict[str, Decimal] = {}
    for layer in layers:
        merged.update(layer)
    given, out = merged["input"], merged.get("output", _ZERO)
    return {"input": given, "cached_input": merged.get("cached_input", given), "output": out,
            "reasoning": merged.get("reasoning", out), "audio_input": merged.get("audio_input", given),
            "audio_output": merged.get("audio_output", out), "image_input": merged.get("image_input", given),
            "image_output": merged.get("image_output", out)}


def _describe(p: ModelPrice, show: Callable[[Decimal], str]) -> dict[str, Any]:
    view: dict[str, Any] = {key: show(getattr(p, key)) for key in RATES}
    if p.long_context is not None:
        view["long_context"] = {"above": p.above, **{k: show(getattr(p.long_context, k)) for k in RATES}}
    if p.tiers:
        view["tiers"] = {tier: _describe(t, show) for tier, t in p.tiers}
    if p.max_output is not None:
        view["max_output"] = p.max_output
    if p.audio_minute is not None:
        view["audio_minute"] = show(p.audio_minute)
    return view


def _canonical(number: Decimal) -> str:
    return str(number.normalize(EXACT))


def _plain_text(number: Decimal) -> str:
    return format(number, "f")
