"""Tests for proxy.pricing: exact costs, name resolution, table validation and the shipped table."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from proxy.core.record import Usage
from proxy.pricing.table import ModelPrice, PriceTable, PricingError
from tests.support.paths import SHIPPED_PRICING as SHIPPED

# Prices written the way people write them: floats, ints, strings, a reasoning price of its own.
TABLE_YAML = """\
models:
  gpt-4o:
    input: 2.50
    cached_input: 1.25
    output: 10.00
  gpt-5:
    input: 1.25
    cached_input: 0.125
    output: 10
  text-embedding-3-small:
    input: 0.02
  thinker:
    input: 1
    output: "2"
    reasoning: 3
  tenth:
    input: 0.1
    output: 0.2
  thousand:
    input: "1e3"
"""


def write(tmp_path: Path, text: str, name: str = "prices.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def table(tmp_path: Path) -> PriceTable:
    return PriceTable.load(write(tmp_path, TABLE_YAML))


# --- costs -------------------------------------------------------------------------------------


COST_CASES = [
    # (model, usage, expected USD) - figures worked by hand from the prices above.
    # 86 uncached x 2.50 + 1920 cached x 1.25 + 300 x 10 = 215 + 2400 + 3000 = 5615 per 1M
    ("gpt-4o", Usage(prompt_tokens=2006, cached_tokens=1920, completion_tokens=300), "0.005615"),
    # reasoning is inside completion: 81 x 1.25 + 1035 x 10 = 10451.25 (not + 832 x 10 again)
    ("gpt-5", Usage(prompt_tokens=81, completion_tokens=1035, reasoning_tokens=832), "0.01045125"),
    # 64 cached of 1000: 936 x 1.25 + 64 x 0.125 + 0 = 1170 + 8 = 1178
    ("gpt-5", Usage(prompt_tokens=1000, cached_tokens=64), "0.001178"),
    # embeddings: no output price, so stray completion tokens cost nothing
    ("text-embedding-3-small", Usage(prompt_tokens=1000), "0.00002"),
    ("text-embedding-3-small", Usage(prompt_tokens=1000, completion_tokens=7), "0.00002"),
    ("text-embedding-3-small", Usage(prompt_tokens=8), "0.00000016"),
    # reasoning priced apart: 100 x 1 + (50 - 30) x 2 + 30 x 3 = 100 + 40 + 90 = 230
    ("thinker", Usage(prompt_tokens=100, completion_tokens=50, reasoning_tokens=30), "0.00023"),
    # 10M in + 10M out: 25 + 100
    ("gpt-4o", Usage(prompt_tokens=10_000_000, completion_tokens=10_000_000), "125"),
    # 10M tokens all cached: 12.5
    ("gpt-4o", Usage(prompt_tokens=10_000_000, cached_tokens=10_000_000), "12.5"),
    # 0.1 + 0.2 is 0.3 exactly here (it is not in binary floating point)
    ("tenth", Usage(prompt_tokens=1_000_000, completion_tokens=1_000_000), "0.3"),
    ("tenth", Usage(prompt_tokens=3), "0.0000003"),
    ("thousand", Usage(prompt_tokens=1_000_000), "1000"),
    # a dated snapshot is priced as its base model
    ("gpt-4o-2024-08-06", Usage(prompt_tokens=1000, completion_tokens=500), "0.0075"),
    # impossible counts are clamped, never a negative cost: cached <= prompt, reasoning <= completion
    ("thinker", Usage(prompt_tokens=10, cached_tokens=50), "0.00001"),
    ("thinker", Usage(completion_tokens=10, reasoning_tokens=40), "0.00003"),
    ("gpt-4o", Usage(prompt_tokens=-5, completion_tokens=-5), "0"),
]


@pytest.mark.parametrize(("model", "usage", "expected"), COST_CASES)
def test_cost_is_exact(table: PriceTable, model: str, usage: Usage, expected: str) -> None:
    cost, priced = table.cost(model, usage)
    assert priced is True
    assert isinstance(cost, Decimal)
    assert cost == Decimal(expected)


@pytest.mark.parametrize(
    ("model", "usage", "text"),
    [
        ("gpt-4o", Usage(prompt_tokens=1000, completion_tokens=500), "0.0075"),
        ("thousand", Usage(prompt_tokens=1_000_000), "1000"),
        ("gpt-4o", Usage(), "0"),
        ("tenth", Usage(prompt_tokens=10), "0.000001"),
    ],
)
def test_cost_str_is_plain_decimal(table: PriceTable, model: str, usage: Usage, text: str) -> None:
    cost, _ = table.cost(model, usage)
    assert str(cost) == text


def test_tiny_cost_is_exact_and_formats_plainly(table: PriceTable) -> None:
    cost, _ = table.cost("text-embedding-3-small", Usage(prompt_tokens=1))
    assert cost == Decimal("0.00000002")
    assert format(cost, "f") == "0.00000002"


def test_unpriced_model_costs_zero_and_says_so(table: PriceTable) -> None:
    assert table.cost("no-such-model", Usage(prompt_tokens=1000)) == (Decimal(0), False)
    assert table.cost(None, Usage(prompt_tokens=1000)) == (Decimal(0), False)


def test_cost_of_nothing_is_priced_zero(table: PriceTable) -> None:
    assert table.cost("gpt-4o", Usage()) == (Decimal(0), True)


# --- exact reading of prices ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "expected"),
    [("0.1", "0.1"), ("2.125", "2.125"), ("0.0625", "0.0625"), ('"2.50"', "2.50"), ("3", "3"),
     ("'0.000001'", "0.000001"), ("1_000.5", "1000.5"), ("0.30000000000000001", "0.30000000000000001"),
     ("-0.0", "0.0")],
)
def test_yaml_prices_are_read_exactly(tmp_path: Path, written: str, expected: str) -> None:
    table = PriceTable.load(write(tmp_path, f"models:\n  m:\n    input: {written}\n"))
    price = table.resolve("m")
    assert price is not None
    assert price.input == Decimal(expected)
    assert str(price.input) == expected


@pytest.mark.parametrize(("value", "expected"), [(0.1, "0.1"), (2.125, "2.125"), (7, "7"), ("0.0625", "0.0625")])
def test_mapping_prices_are_read_exactly(value: object, expected: str) -> None:
    price = PriceTable.from_mapping({"models": {"m": {"input": value}}}).resolve("m")
    assert price is not None and str(price.input) == expected


def test_defaults_of_missing_prices() -> None:
    table = PriceTable.from_mapping(
        {"models": {"emb": {"input": "0.02"}, "chat": {"input": 1, "output": 4}}}
    )
    assert table.resolve("emb") == ModelPrice("emb", Decimal("0.02"), Decimal("0.02"), Decimal(0), Decimal(0))
    assert table.resolve("chat") == ModelPrice("chat", Decimal(1), Decimal(1), Decimal(4), Decimal(4))


# --- resolution ------------------------------------------------------------------------------------

RESOLVE_YAML = """\
models:
  gpt-4o: {input: 1}
  gpt-4o-mini: {input: 2}
  tuned: {input: 3, match: ["ft:gpt-4o*", "gpt-4o-2099-*"]}
  later: {input: 4, match: ["ft:*", "gpt-4o-m??i"]}
  o1: {input: 5}
  series: {input: 6, match: ["series-?"]}
"""


@pytest.mark.parametrize(
    ("model", "entry"),
    [
        ("gpt-4o", "gpt-4o"),  # exact
        ("gpt-4o-mini", "gpt-4o-mini"),  # exact beats the glob "gpt-4o-m??i"
        ("gpt-4o-maxi", "later"),  # glob
        ("ft:gpt-4o:org::abc", "tuned"),  # the first entry whose glob fits wins
        ("ft:o1:org::abc", "later"),
        ("gpt-4o-2099-01-01", "tuned"),  # glob beats date stripping
        ("gpt-4o-2024-08-06", "gpt-4o"),  # -YYYY-MM-DD stripped
        ("gpt-4o-20240806", "gpt-4o"),  # -YYYYMMDD stripped
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("o1-2024-12-17", "o1"),
        ("series-1-2025-01-01", "series"),  # date stripped, then matched by glob
        ("FT:gpt-4o", "default"),  # globs are case-sensitive
        ("GPT-4o", "default"),
        ("gpt-4o-2024-08", "default"),  # not a whole date
        ("gpt-4o-2024-08-06-extra", "default"),  # the date must end the name
        ("unknown", "default"),
        ("", "default"),
        (None, "default"),
    ],
)
def test_resolution_order(tmp_path: Path, model: str | None, entry: str) -> None:
    with_default = PriceTable.load(write(tmp_path, RESOLVE_YAML + "default: {input: 9}\n"))
    without = PriceTable.load(write(tmp_path, RESOLVE_YAML, "nodefault.yaml"))
    found = with_default.resolve(model)
    assert found is not None and found.name == entry
    assert with_default.resolve(model) is found  # a second (cached) lookup agrees
    if entry == "default":
        assert without.resolve(model) is None
        assert found.input == Decimal(9)
    else:
        assert without.resolve(model) == found


def test_resolution_memory_stays_bounded(table: PriceTable) -> None:
    for i in range(5000):
        assert table.resolve(f"client-made-up-model-{i}") is None
    assert table.resolve("x" * 100_000) is None
    assert len(table._cache) <= 1024
    assert table.resolve("gpt-4o-2024-08-06") is not None


def test_models_lists_entries_in_file_order(table: PriceTable) -> None:
    assert table.models() == ["gpt-4o", "gpt-5", "text-embedding-3-small", "thinker", "tenth", "thousand"]


# --- version ------------------------------------------------------------------------------------------


def test_version_of_a_file_is_its_sha256_prefix(tmp_path: Path) -> None:
    path = write(tmp_path, TABLE_YAML)
    table = PriceTable.load(path)
    assert table.version == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert table.source == str(path)


def test_version_of_a_mapping_follows_its_prices() -> None:
    base = PriceTable.from_mapping({"models": {"a": {"input": "2.5"}}})
    assert base.source == "<memory>"
    assert len(base.version) == 16 and int(base.version, 16) >= 0
    assert PriceTable.from_mapping({"models": {"a": {"input": 2.50}}}).version == base.version
    assert PriceTable.from_mapping({"models": {"a": {"input": "2.6"}}}).version != base.version
    with_glob = PriceTable.from_mapping({"models": {"a": {"input": "2.5", "match": ["b*"]}}})
    assert with_glob.version != base.version


# --- validation -------------------------------------------------------------------------------------

BAD_TABLES = [
    # (file text, words the message must contain)
    ("models:\n  gpt-4o:\n    input: 1\n  oops: x: y\n", ["YAML error", "line 4", "mapping values"]),
    ("models:\n  a:\n    input: 1\n  a:\n    input: 2\n", ["line 4", "duplicate key 'a'"]),
    ("models: [\n", ["YAML error", "line 2"]),
    ("", ["top level must be a mapping", "got nothing"]),
    ("- gpt-4o\n", ["top level must be a mapping", "got list"]),
    ("models: {}\nprices: {}\n", ["unknown top-level key 'prices'"]),
    ("default: {input: 1}\n", ["missing top-level 'models'"]),
    ("models: [gpt-4o]\n", ["'models' must be a mapping", "got list"]),
    ("models:\n", ["'models' must be a mapping", "got nothing"]),
    ("models:\n  gpt-4o: 2.5\n", ["model 'gpt-4o'", "entry must be a mapping", "got Decimal"]),
    ("models:\n  gpt-4o: {input: 1, ouptut: 2}\n", ["model 'gpt-4o'", "unknown key 'ouptut'"]),
    ("models:\n  gpt-4o: {output: 2}\n", ["model 'gpt-4o'", "missing required 'input'"]),
    ("models:\n  gpt-4o: {input: -1}\n", ["model 'gpt-4o'", "'input' price -1 is negative"]),
    ("models:\n  gpt-4o: {input: 1, output: -0.5}\n", ["'output' price -0.5 is negative"]),
    ("models:\n  gpt-4o: {input: abc}\n", ["model 'gpt-4o'", "'input' price 'abc' is not a number"]),
    ("models:\n  gpt-4o: {input: '1.2.3'}\n", ["'input' price '1.2.3' is not a number"]),
    ("models:\n  gpt-4o: {input: 1:30.5}\n", ["'input' price '1:30.5' is not a number"]),
    ("models:\n  gpt-4o: {input: [1]}\n", ["'input' price [1] is not a number", "got list"]),
    ("models:\n  gpt-4o: {input: }\n", ["'input' price None is not a number"]),
    ("models:\n  gpt-4o: {input: true}\n", ["model 'gpt-4o'", "'input' price True is a boolean"]),
    ("models:\n  gpt-4o: {input: 1, cached_input: .nan}\n", ["'cached_input' price NaN is not a finite"]),
    ("models:\n  gpt-4o: {input: .inf}\n", ["'input' price Infinity is not a finite"]),
    ("models:\n  gpt-4o: {input: -.inf}\n", ["'input' price -Infinity is not a finite"]),
    ("models:\n  gpt-4o: {input: 'NaN'}\n", ["'input' price 'NaN' is not a finite"]),
    ("models:\n  gpt-4o: {input: 1, reasoning: 'Infinity'}\n", ["'reasoning' price", "not a finite"]),
    ("models:\n  ft: {input: 1, match: 'ft:*'}\n", ["model 'ft'", "'match' must be a list", "'ft:*'"]),
    ("models:\n  ft: {input: 1, match: [ft, 3]}\n", ["model 'ft'", "'match' must be a list"]),
    ("models:\n  ft: {input: 1, match: ['']}\n", ["model 'ft'", "'match' must be a list"]),
    ("models:\n  4: {input: 1}\n", ["model name 4 is not a non-empty string"]),
    ("models:\n  1.5: {input: 1}\n", ["model name 1.5 is not a non-empty string"]),
    ("models:\n  '': {input: 1}\n", ["model name '' is not a non-empty string"]),
    ("models: {}\ndefault: 3\n", ["'default'", "entry must be a mapping"]),
    ("models: {}\ndefault: {output: 3}\n", ["'default'", "missing required 'input'"]),
    ("models: {}\ndefault: {input: 1, match: ['*']}\n", ["'default'", "unknown key 'match'"]),
    ("models: {}\ndefault: {input: -2}\n", ["'default'", "'input' price -2 is negative"]),
    # $0.01 a minute is 0.000166... a second: no call's cost could be exact.
    ("models:\n  whisper-1: {input: 0, audio_minute: 0.01}\n", ["model 'whisper-1'", "'audio_minute'",
                                                              "not an exact price per second"]),
]


def test_audio_prices_that_divide_by_60_cost_exactly(tmp_path: Path) -> None:
    table = PriceTable.load(write(tmp_path, "models:\n  whisper-1: {input: 0, audio_minute: 0.006}\n"))
    for seconds, usd in (("1", "0.0001"), ("3.7", "0.00037"), ("0.001", "1E-7")):
        cost, priced = table.cost("whisper-1", Usage(0, 0, 0, audio_seconds=Decimal(seconds)))
        assert priced and cost == Decimal(usd)


@pytest.mark.parametrize(("text", "words"), BAD_TABLES)
def test_bad_table_is_rejected_in_one_line(tmp_path: Path, text: str, words: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PricingError) as caught:
        PriceTable.load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message
    for word in words:
        assert word in message


def test_unreadable_paths(tmp_path: Path) -> None:
    cases = [
        (tmp_path / "missing.yaml", "No such file"),
        (tmp_path, "Is a directory"),
        (write(tmp_path, "models: {}\n") / "below-a-file.yaml", "Not a directory"),
    ]
    for path, words in cases:
        with pytest.raises(PricingError, match="cannot read price table") as caught:
            PriceTable.load(path)
        assert str(caught.value).startswith(f"{path}: ") and words in str(caught.value)


def test_unreadable_by_permission() -> None:
    # Root reads any file whatever its mode (and CI runs as root), so the load runs in a forked child that
    # has dropped to an unprivileged user first; the child reports what the load raised through a pipe.
    home = Path(tempfile.mkdtemp(prefix="meterproxy-perm-"))
    try:
        home.chmod(0o755)  # the unprivileged child may traverse the directory, not read the file
        path = write(home, TABLE_YAML)
        path.chmod(0)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                try:
                    PriceTable.load(path)
                    said = "loaded"
                except PricingError as exc:
                    said = f"PricingError: {exc}"
                os.write(write_end, said.encode())
            finally:
                os._exit(0)
        os.close(write_end)
        os.waitpid(pid, 0)
        with os.fdopen(read_end, "rb") as said_by_child:
            said = said_by_child.read().decode()
        assert said.startswith(f"PricingError: {path}: ") and "Permission denied" in said, said
    finally:
        shutil.rmtree(home)


def test_undecodable_file_is_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"models:\n  caf\xe9: {input: 1}\n")
    with pytest.raises(PricingError) as caught:
        PriceTable.load(path)
    assert str(caught.value).startswith(f"{path}: YAML error") and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (None, "got nothing"),
        ({"models": {"m": {"input": float("nan")}}}, "not a finite"),
        ({"models": {"m": {"input": float("-inf")}}}, "not a finite"),
        ({"models": {"m": {"input": False}}}, "is a boolean"),
        ({"models": {"m": {"input": Decimal("-1")}}}, "is negative"),
        ({"models": {("a", "b"): {"input": 1}}}, "model name ('a', 'b') is not"),
    ],
)
def test_bad_mapping_names_source(data: object, words: str) -> None:
    with pytest.raises(PricingError) as caught:
        PriceTable.from_mapping(data, source="admin-upload")
    assert str(caught.value).startswith("admin-upload: ") and words in str(caught.value)


# --- the shipped table --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped() -> PriceTable:
    return PriceTable.load(SHIPPED)


@pytest.mark.parametrize(
    ("model", "entry", "prices"),
    [
        # (input, cached_input, output) per 1M tokens, OpenAI standard tier, November 2026
        ("gpt-4o-2024-08-06", "gpt-4o", ("2.50", "1.25", "10")),
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13", ("5", "5", "15")),
        ("gpt-4o-mini", "gpt-4o-mini", ("0.15", "0.075", "0.60")),
        ("gpt-4.1-nano-2025-04-14", "gpt-4.1-nano", ("0.10", "0.025", "0.40")),
        ("gpt-5.1", "gpt-5.1", ("1.25", "0.125", "10")),
        ("o3", "o3", ("2", "0.50", "8")),
        ("text-embedding-3-small", "text-embedding-3-small", ("0.02", "0.02", "0")),
    ],
)
def test_shipped_prices(shipped: PriceTable, model: str, entry: str, prices: tuple[str, str, str]) -> None:
    price = shipped.resolve(model)
    assert price is not None and price.name == entry
    assert (price.input, price.cached_input, price.output) == tuple(Decimal(p) for p in prices)
    assert price.reasoning == price.output


def test_shipped_cost_of_a_dated_gpt_4o_call(shipped: PriceTable) -> None:
    # 976 x 2.50 + 1024 x 1.25 + 200 x 10 = 2440 + 1280 + 2000 = 5720 per 1M
    usage = Usage(prompt_tokens=2000, cached_tokens=1024, completion_tokens=200)
    assert shipped.cost("gpt-4o-2024-08-06", usage) == (Decimal("0.00572"), True)


def test_shipped_table_has_no_active_default(shipped: PriceTable) -> None:
    assert "default" not in yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    assert shipped.resolve("some-future-model") is None
    assert shipped.cost("some-future-model", Usage(prompt_tokens=10)) == (Decimal(0), False)


def test_shipped_table_covers_the_listed_families(shipped: PriceTable) -> None:
    names = set(shipped.models())
    for name in ["gpt-4.1", "gpt-4.1-mini", "gpt-5", "gpt-5-pro", "gpt-5.1-codex-max", "gpt-5.2-pro",
                 "gpt-5.4-nano", "gpt-5.5-pro", "gpt-5.6", "o1-pro", "o3-mini", "o4-mini", "gpt-4",
                 "gpt-4-turbo", "gpt-3.5-turbo", "text-embedding-3-large", "text-embedding-ada-002"]:
        assert name in names
    for name in names:
        price = shipped.resolve(name)
        assert price is not None and price.cached_input <= price.input


def test_costs_are_normalised_whatever_the_prices_written_form() -> None:
    # 2.50 and 2.5 are the same price: the ledger must get the same cost string from either.
    written = PriceTable.from_mapping({"models": {"a": {"input": "2.50", "output": "10.00"}}})
    plain = PriceTable.from_mapping({"models": {"a": {"input": "2.5", "output": "10"}}})
    usage = Usage(prompt_tokens=1_000_000, completion_tokens=400_000, total_tokens=1_400_000)
    costs = {format(table.cost("a", usage)[0], "f") for table in (written, plain)}
    assert costs == {"6.5"}
    big = Usage(prompt_tokens=4_000_000, total_tokens=4_000_000)
    assert format(plain.cost("a", big)[0], "f") == "10"
