"""Tests for the price features beyond the basic set: audio, long context, service tiers; the line numbers
of table errors; audio tokens read from usage; the service tier read by meters; the shipped tier prices."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from proxy.core.record import Usage
from proxy.metering.meters import ChatMeter, ResponsesMeter
from proxy.metering.usage import UnreadableUsage, parse_usage
from proxy.pricing.table import PriceTable, PricingError, Quote
from tests.support.paths import SHIPPED_PRICING as SHIPPED

TABLE_YAML = """\
models:
  voice:
    input: 2
    cached_input: 1
    output: 8
    audio_input: 40
    audio_output: 80
  big:
    input: 2.50
    cached_input: 0.25
    output: 15
    long_context: {above: 1000, input: 5, cached_input: 0.5, output: 22.5}
    tiers:
      flex: {input: 1.25, cached_input: 0.125, output: 7.5}
      priority: {input: 5, output: 30}
      batch: {input: 1, long_context: {input: 2}}
  plain:
    input: 1
    output: 2
    reasoning: 3
    tiers:
      flex: {output: 1}
  tierlong:
    input: 1
    output: 2
    tiers:
      priority: {input: 2, long_context: {above: 100, input: 4}}
"""


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> PriceTable:
    path = tmp_path_factory.mktemp("prices") / "prices.yaml"
    path.write_text(TABLE_YAML, encoding="utf-8")
    return PriceTable.load(path)


def U(prompt: int = 0, completion: int = 0, cached: int = 0, reasoning: int = 0, audio_in: int = 0,
      audio_out: int = 0) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached, reasoning_tokens=reasoning,
                 total_tokens=prompt + completion, audio_prompt_tokens=audio_in, audio_completion_tokens=audio_out)


QUOTES = [
    # (model, usage, service_tier, USD, tier applied, fallback, long context) - worked by hand, per 1M tokens:
    # 500 text x 2 + 200 cached x 1 + 300 audio x 40 + 350 text x 8 + 50 reasoning x 8 + 100 audio x 80 = 24400
    ("voice", U(1000, 500, cached=200, reasoning=50, audio_in=300, audio_out=100), None, "0.0244", None, False, False),
    ("voice", U(1000, 500), None, "0.006", None, False, False),  # no audio: 2000 + 4000
    # audio cannot exceed the uncached prompt: 800 audio x 40 + 200 cached x 1 = 32200, never a negative text part
    ("voice", U(1000, 0, cached=200, audio_in=900), None, "0.0322", None, False, False),
    ("voice", U(0, 100, reasoning=80, audio_out=50), None, "0.00224", None, False, False),  # 20x80 + 80x8
    # long context: at the threshold still standard; above it the whole call at long prices
    ("big", U(1000, 10, cached=100), None, "0.002425", None, False, False),  # 900x2.5 + 100x.25 + 10x15
    ("big", U(1001, 10, cached=1), None, "0.0052255", None, False, True),  # 1000x5 + 1x.5 + 10x22.5
    ("big", U(1000, 10, cached=100), "flex", "0.0012125", "flex", False, False),  # 900x1.25 + 100x.125 + 75
    ("big", U(2000), "flex", "0.0025", "flex", False, True),  # flex's own prices win over long context
    # priority sets input and output; cached stays the entry's; reasoning follows priority's output
    ("big", U(1000, 10, cached=100, reasoning=4), "priority", "0.004825", "priority", False, False),
    # long priority: cached from long context (0.5), input and output priority's: 1000x5 + 1000x.5 + 10x30
    ("big", U(2000, 10, cached=1000), "priority", "0.0058", "priority", False, True),
    ("big", U(1000, 10, cached=100), "batch", "0.001075", "batch", False, False),  # 900x1 + 100x.25 + 150
    ("big", U(2000, 10, cached=1000), "batch", "0.002725", "batch", False, True),  # batch's long: 2, .5, 22.5
    # what means standard, and a tier the entry lacks (standard, flagged)
    ("big", U(1000), "default", "0.0025", None, False, False),
    ("big", U(1000), "auto", "0.0025", None, False, False),
    ("big", U(1000), "scale", "0.0025", None, False, False),
    ("big", U(1000), "", "0.0025", None, False, False),
    ("big", U(1000), "fast", "0.0025", None, True, False),
    ("big", U(1000), "Flex", "0.0025", None, True, False),
    # a tier that sets output only: a reasoning price written for the entry stays (100 + 20x1 + 30x3)
    ("plain", U(100, 50, reasoning=30), "flex", "0.00021", "flex", False, False),
    ("plain", U(100, 50, reasoning=30), "batch", "0.00023", None, True, False),
    # a tier with a long context of its own (the model has none)
    ("tierlong", U(100), "priority", "0.0002", "priority", False, False),
    ("tierlong", U(101), "priority", "0.000404", "priority", False, True),
    ("tierlong", U(101), None, "0.000101", None, False, False),
]


@pytest.mark.parametrize(("model", "usage", "tier", "usd", "applied", "fallback", "long"), QUOTES)
def test_quote(table: PriceTable, model: str, usage: Usage, tier: str | None, usd: str, applied: str | None,
               fallback: bool, long: bool) -> None:
    quote = table.quote(model, usage, tier)
    assert quote == Quote(Decimal(usd), True, model, applied, fallback, long)
    assert table.cost(model, usage, service_tier=tier) == (Decimal(usd), True)


def test_old_cost_call_still_works(table: PriceTable) -> None:
    assert table.cost("big", U(2000)) == (Decimal("0.01"), True)  # long context applies without a tier too
    assert table.cost("nope", U(2000), "flex") == (Decimal(0), False)
    assert table.quote("nope", U(10), "flex") == Quote(Decimal(0), False)


def test_describe_shows_effective_prices_as_decimal_strings(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(TABLE_YAML + "  ft:\n    input: 0.10\n    match: ['ft:*']\ndefault: {input: 9}\n")
    view = PriceTable.load(path).describe()
    json.dumps(view)  # JSON-ready
    big = view["models"]["big"]
    assert big["input"] == "2.50" and big["reasoning"] == "15" and big["audio_input"] == "2.50"
    assert big["long_context"] == {"above": 1000, "input": "5", "cached_input": "0.5", "output": "22.5",
                                   "reasoning": "22.5", "audio_input": "5", "audio_output": "22.5",
                                   "image_input": "5", "image_output": "22.5"}
    assert big["tiers"]["priority"]["cached_input"] == "0.25" and big["tiers"]["priority"]["reasoning"] == "30"
    assert big["tiers"]["batch"]["long_context"]["input"] == "2"
    assert view["models"]["ft"]["match"] == ["ft:*"] and "tiers" not in view["models"]["ft"]
    assert view["default"]["input"] == "9"


def test_mapping_version_follows_tier_and_long_context_prices() -> None:
    def version(extra: dict[str, object]) -> str:
        return PriceTable.from_mapping({"models": {"m": {"input": "1", **extra}}}).version

    base = version({})
    flex = version({"tiers": {"flex": {"input": "0.5"}}})
    assert len({base, flex, version({"tiers": {"flex": {"input": "0.6"}}}),
                version({"long_context": {"above": 10, "input": "2"}}),
                version({"long_context": {"above": 11, "input": "2"}}), version({"audio_input": "3"})}) == 6
    assert version({"tiers": {"flex": {"input": 0.50}}}) == flex


# --- validation: every problem in one line, with its line number ------------------------------------

HEAD = "models:\n  m:\n    input: 1\n"  # the entry under test starts on line 2; its next key is line 4

BAD = [
    (HEAD + "    tiers:\n      flex: {input: -1}\n", ["line 5", "model 'm', tier 'flex'", "'input' price -1 is negative"]),
    (HEAD + "    tiers:\n      flex: {inptu: 1}\n", ["line 5", "tier 'flex'", "unknown key 'inptu'"]),
    (HEAD + "    tiers:\n      flex: {match: [x]}\n", ["line 5", "unknown key 'match'"]),
    (HEAD + "    tiers:\n      flx: {input: 1}\n", ["line 5", "unknown tier 'flx'", "flex, priority, batch"]),
    (HEAD + "    tiers:\n      default: {input: 1}\n", ["line 5", "unknown tier 'default'"]),
    (HEAD + "    tiers: [flex]\n", ["line 4", "'tiers' must be a mapping", "got list"]),
    (HEAD + "    tiers:\n      flex: 3\n", ["line 5", "tier 'flex'", "must be a mapping", "got int"]),
    (HEAD + "    tiers:\n      flex:\n        output: abc\n", ["line 6", "'output' price 'abc' is not a number"]),
    (HEAD + "    tiers:\n      priority:\n        long_context: {input: 2}\n",
     ["line 6", "tier 'priority', long_context", "missing 'above'"]),
    (HEAD + "    long_context: {input: 2}\n", ["line 4", "model 'm', long_context", "missing 'above'"]),
    (HEAD + "    long_context: {above: 0, input: 2}\n", ["line 4", "'above' must be a positive whole number", "0"]),
    (HEAD + "    long_context: {above: -5, input: 2}\n", ["line 4", "'above' must be", "-5"]),
    (HEAD + "    long_context: {above: 1.5, input: 2}\n", ["line 4", "'above' must be", "1.5"]),
    (HEAD + "    long_context: {above: true, input: 2}\n", ["line 4", "'above' must be", "True"]),
    (HEAD + "    long_context: {above: '100', input: 2}\n", ["line 4", "'above' must be", "'100'"]),
    (HEAD + "    long_context:\n      above: 100\n", ["line 4", "long_context", "sets no price"]),
    (HEAD + "    long_context:\n      above: 100\n      input: 2\n      ouput: 3\n", ["line 7", "unknown key 'ouput'"]),
    (HEAD + "    long_context:\n      above: 100\n      input: -2\n", ["line 6", "'input' price -2 is negative"]),
    (HEAD + "    long_context: 272000\n", ["line 4", "'long_context' must be a mapping", "got int"]),
    (HEAD + "    audio_input: -40\n", ["line 4", "'audio_input' price -40 is negative"]),
    (HEAD + "    audio_output: lots\n", ["line 4", "'audio_output' price 'lots' is not a number"]),
    (HEAD + "    audio_output: .nan\n", ["line 4", "'audio_output' price NaN is not a finite"]),
    (HEAD + "  n:\n    input: 2\n    output: -3\n", ["line 6", "model 'n'", "'output' price -3 is negative"]),
    (HEAD + "    colour: red\n", ["line 4", "model 'm'", "unknown key 'colour'"]),
    ("models:\n  m: {input: -1}\n", ["line 2", "model 'm'", "is negative"]),
    ("models: {}\nprices: {}\n", ["line 2", "unknown top-level key 'prices'"]),
    ("models: {}\ndefault:\n  input: 1\n  tiers: {flex: {output: x}}\n", ["line 4", "'default', tier 'flex'"]),
    ("models: {}\ndefault:\n  input: 1\n  match: ['*']\n", ["line 4", "'default'", "unknown key 'match'"]),
]


@pytest.mark.parametrize(("text", "words"), BAD)
def test_bad_table_names_file_line_and_problem(tmp_path: Path, text: str, words: list[str]) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PricingError) as caught:
        PriceTable.load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: line ") and "\n" not in message
    for word in words:
        assert word in message


def test_mapping_errors_have_no_line() -> None:
    with pytest.raises(PricingError) as caught:
        PriceTable.from_mapping({"models": {"m": {"input": 1, "tiers": {"flex": {"input": -1}}}}}, "upload")
    assert str(caught.value) == "upload: model 'm', tier 'flex': 'input' price -1 is negative"


def test_merge_keys_and_tier_defaults(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text("models:\n  a: &a {input: 1, output: 4, tiers: {batch: {input: 0.5}}}\n"
                    "  b: {<<: *a, output: 6}\n  c:\n    input: 1\n    tiers: {batch: {}}\n")
    table = PriceTable.load(path)
    assert table.quote("b", U(1000, 1000), "batch") == Quote(Decimal("0.0065"), True, "b", "batch")
    assert table.quote("c", U(1000), "batch") == Quote(Decimal("0.001"), True, "c", "batch")  # known, no fallback


# --- usage: audio tokens --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "audio_in", "audio_out"),
    [
        ({"prompt_tokens": 100, "completion_tokens": 50, "prompt_tokens_details": {"audio_tokens": 30},
          "completion_tokens_details": {"audio_tokens": 20, "reasoning_tokens": 10}}, 30, 20),
        ({"prompt_tokens": 100, "completion_tokens": 50, "prompt_tokens_details": {"cached_tokens": 0,
          "audio_tokens": 0}}, 0, 0),
        ({"prompt_tokens": 100, "completion_tokens": 50}, 0, 0),
        ({"prompt_tokens": 100, "completion_tokens": 50, "prompt_tokens_details": None}, 0, 0),
        ({"input_tokens": 40, "output_tokens": 9, "input_tokens_details": {"audio_tokens": 12},
          "output_tokens_details": {"audio_tokens": 3}}, 12, 3),
    ],
)
def test_usage_reads_audio_tokens(raw: dict[str, object], audio_in: int, audio_out: int) -> None:
    usage = parse_usage(raw)
    assert usage is not None
    assert (usage.audio_prompt_tokens, usage.audio_completion_tokens) == (audio_in, audio_out)


@pytest.mark.parametrize(
    "raw",
    [
        {"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"audio_tokens": 11}},
        {"prompt_tokens": 10, "completion_tokens": 5, "completion_tokens_details": {"audio_tokens": 6}},
        {"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"audio_tokens": -1}},
        {"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"audio_tokens": "3"}},
    ],
)
def test_impossible_audio_counts_are_unreadable(raw: dict[str, object]) -> None:
    with pytest.raises(UnreadableUsage):
        parse_usage(raw)


# --- meters: the service tier the response names ---------------------------------------------------------


def test_chat_body_service_tier() -> None:
    meter = ChatMeter()
    meter.on_response_headers(200, "application/json")
    meter.on_chunk(json.dumps({"model": "gpt-5", "service_tier": "flex", "choices": [],
                               "usage": {"prompt_tokens": 3, "completion_tokens": 1}}).encode())
    meter.on_end()
    assert meter.service_tier == "flex" and meter.usage is not None


def test_chat_stream_service_tier_last_wins_and_absent_stays_none() -> None:
    meter = ChatMeter()
    meter.on_response_headers(200, "text/event-stream")
    chunks = [{"model": "gpt-5", "service_tier": "default", "choices": []},
              {"model": "gpt-5", "choices": []},  # no tier said here: the one said before stands
              {"model": "gpt-5", "service_tier": "priority", "choices": [],
               "usage": {"prompt_tokens": 3, "completion_tokens": 1}}]
    for chunk in chunks:
        meter.on_chunk(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    meter.on_chunk(b"data: [DONE]\n\n")
    meter.on_end()
    assert meter.service_tier == "priority"
    plain = ChatMeter()
    plain.on_response_headers(200, "application/json")
    plain.on_chunk(b'{"model": "m", "service_tier": null, "choices": []}')
    plain.on_end()
    assert plain.service_tier is None


def test_responses_stream_service_tier_is_the_completed_one() -> None:
    meter = ResponsesMeter()
    meter.on_response_headers(200, "text/event-stream")
    events = [("response.created", {"type": "response.created", "response": {"model": "gpt-5", "service_tier": "auto",
                                                                           "usage": None}}),
              ("response.completed", {"type": "response.completed", "response": {
                  "model": "gpt-5", "service_tier": "flex", "usage": {"input_tokens": 5, "output_tokens": 2}}})]
    for name, data in events:
        meter.on_chunk(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
    meter.on_end()
    assert meter.service_tier == "flex"


def test_service_tier_is_cut_to_a_sane_length() -> None:
    meter = ChatMeter()
    meter.on_response_headers(200, "application/json")
    meter.on_chunk(json.dumps({"model": "m", "service_tier": "x" * 10_000, "choices": []}).encode())
    meter.on_end()
    assert meter.service_tier == "x" * 32


# --- the shipped table's tier and long-context prices ------------------------------------------------------


@pytest.fixture(scope="module")
def shipped() -> PriceTable:
    return PriceTable.load(SHIPPED)


@pytest.mark.parametrize(
    ("model", "usage", "tier", "usd"),
    [
        # gpt-5.4 above 272k prompt tokens: 5 / 0.50 / 22.50 for the whole call
        ("gpt-5.4", U(300_000, 1000, cached=100_000), None, "1.0725"),  # 200k x 5 + 100k x .5 + 1k x 22.5
        ("gpt-5.4", U(272_000, 1000), None, "0.695"),  # at the threshold: 272k x 2.5 + 1k x 15
        ("gpt-5.5-2026-01-01", U(1_000_000), None, "10"),
        ("gpt-5.6", U(300_000, 1_000_000), None, "32.4"),  # 300k x 8 + 1M x 30
        ("gpt-5.4-pro", U(300_000, 1000), None, "18.27"),  # 300k x 60 + 1k x 270
        ("gpt-5", U(1_000_000, 1_000_000, cached=500_000), "flex", "5.34375"),  # .3125 + .03125 + 5
        ("gpt-5", U(1_000_000, 1_000_000), "priority", "22.5"),
        ("gpt-4o-2024-08-06", U(1_000_000, 1_000_000), "priority", "21.25"),
        ("gpt-4o", U(1_000_000, 1_000_000), "batch", "6.25"),
        ("gpt-4o", U(1_000_000), "flex", "2.5"),  # no flex price listed: standard
        ("o4-mini", U(1_000_000, 0, cached=1_000_000), "flex", "0.138"),
        ("text-embedding-3-small", U(1_000_000), "batch", "0.01"),
    ],
)
def test_shipped_tier_and_long_context_prices(shipped: PriceTable, model: str, usage: Usage, tier: str | None,
                                              usd: str) -> None:
    assert shipped.cost(model, usage, tier) == (Decimal(usd), True)


def test_shipped_tiers_are_ordered_like_openais() -> None:
    # Batch and flex are discounts, priority a premium: a typo that breaks the order fails here.
    table = PriceTable.load(SHIPPED)
    tiers_seen = set()
    for name in table.models():
        price = table.resolve(name)
        assert price is not None
        for tier, tp in price.tiers:
            tiers_seen.add(tier)
            cheaper = tier in ("flex", "batch")
            for key in ("input", "cached_input", "output"):
                ours, std = getattr(tp, key), getattr(price, key)
                assert (ours <= std) if cheaper else (ours >= std), (name, tier, key)
        if price.long_context is not None:
            assert price.above == 272_000 and price.long_context.input == 2 * price.input, name
    assert tiers_seen == {"flex", "priority", "batch"}
