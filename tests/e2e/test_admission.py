"""What reaches the upstream and what a budget reserves (docs/security.md): over real HTTP, with the fake upstream
and the openai SDK."""
from __future__ import annotations

import io
import json
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

import openai
import pytest

from proxy.control.limits import Limits, Subject
from proxy.core.credentials import key_id_of
from proxy.ledger.reprice import reprice
from proxy.pricing.table import PriceTable
from tests.support import ADMIN_TOKEN, FakeUpstream, ProxyServer, Reply, gzipped
from tests.support.cli import cli
from tests.support.http import raw_exchange, request
from tests.support.paths import SHIPPED_PRICING

USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
CHAT = {"id": "x", "object": "chat.completion", "model": "gpt-4o", "choices": [], "usage": USAGE}
HI = [{"role": "user", "content": "hi"}]
_clients: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Any:
    yield
    while _clients:
        _clients.pop().close()


def sdk(proxy: ProxyServer, key: str) -> openai.OpenAI:
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)
    _clients.append(client)
    return client


def admin(proxy: ProxyServer, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    status, _, raw = request(proxy.url, method=method, path="/admin" + path,
                             body=None if body is None else json.dumps(body).encode(),
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    return status, json.loads(raw)


def managed(start_proxy: Callable[..., ProxyServer], **overrides: Any) -> ProxyServer:
    return start_proxy(keys="managed", upstream_api_key="sk-real-upstream", **overrides)


def new_key(proxy: ProxyServer, **fields: Any) -> tuple[str, str]:
    status, created = admin(proxy, "POST", "/keys", {"user": "alice", **fields})
    assert status == 201, created
    return created["key"], created["key_id"]


def code_of(body: bytes) -> str:
    return json.loads(body)["error"]["code"]


# --- a managed key can do only what it was given --------------------------------------------------

def test_a_managed_key_gets_the_inference_routes_only(start_proxy: Callable[..., ProxyServer],
                                                       upstream: FakeUpstream) -> None:
    proxy = managed(start_proxy)
    key, key_id = new_key(proxy)
    client = sdk(proxy, key)
    upstream.json(CHAT)
    client.chat.completions.create(model="gpt-4o", messages=HI)
    upstream.json({"object": "list", "data": []})
    client.models.list()
    assert len(upstream.seen) == 2
    for call in (client.files.list, client.batches.list, lambda: client.models.delete("ft:gpt-4o:acme::x"),
                 lambda: client.fine_tuning.jobs.list()):
        with pytest.raises(openai.PermissionDeniedError) as err:
            call()
        assert err.value.code == "route_not_allowed"
    assert len(upstream.seen) == 2  # never forwarded
    refused = proxy.rows("status = 403")
    assert len(refused) == 4 and {r["key_id"] for r in refused} == {key_id}
    assert all("route_not_allowed" in r["error"] for r in refused)


def test_a_key_routes_narrow_or_widen_the_default(start_proxy: Callable[..., ProxyServer],
                                                  upstream: FakeUpstream) -> None:
    proxy = managed(start_proxy)
    files_only, files_id = new_key(proxy, routes=["GET /v1/files", "GET /v1/files/*"])
    wider, _ = new_key(proxy, routes=["default", "* /v1/files/**", "GET /v1/files"])
    upstream.json({"object": "list", "data": []})
    sdk(proxy, files_only).files.list()
    sdk(proxy, wider).files.list()
    with pytest.raises(openai.PermissionDeniedError):
        sdk(proxy, files_only).chat.completions.create(model="gpt-4o", messages=HI)
    upstream.json(CHAT)
    sdk(proxy, wider).chat.completions.create(model="gpt-4o", messages=HI)
    assert [s.path_qs for s in upstream.seen] == ["/v1/files", "/v1/files", "/v1/chat/completions"]
    # Changed through the admin API; null goes back to the default set.
    status, patched = admin(proxy, "PATCH", f"/keys/{files_id}", {"routes": None})
    assert status == 200 and patched["routes"] is None
    with pytest.raises(openai.PermissionDeniedError):
        sdk(proxy, files_only).files.list()
    for bad in (["POST v1/files"], ["FETCH /v1/files"], [], "POST /v1/files", ["POST /v1/fi*les"]):
        status, error = admin(proxy, "PATCH", f"/keys/{files_id}", {"routes": bad})
        assert status == 400 and error["error"]["param"] == "routes", bad


def test_the_cli_sets_routes_organization_and_project(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "cli.db")
    assert cli("keys", "create", "--db", db, "--user", "erin", "--route", "default", "--route", "GET /v1/files",
               "--organization", "org-acme", "--project", "proj_1", "--format", "json") == 0
    created = json.loads(capsys.readouterr().out)
    assert created["routes"] == ["default", "GET /v1/files"]
    assert (created["organization"], created["project"]) == ("org-acme", "proj_1")
    assert cli("keys", "update", created["key_id"], "--db", db, "--route", "none", "--format", "json") == 0
    assert json.loads(capsys.readouterr().out)["routes"] is None
    assert cli("keys", "update", created["key_id"], "--db", db, "--route", "GET files") == 2
    assert "routes" in capsys.readouterr().err


def test_account_headers_are_the_key_s_own(start_proxy: Callable[..., ProxyServer], upstream: FakeUpstream) -> None:
    proxy = managed(start_proxy)
    plain, _ = new_key(proxy)
    scoped, _ = new_key(proxy, organization="org-acme", project="proj_search")
    upstream.json(CHAT)
    evil = {"OpenAI-Organization": "org-someone-else", "OpenAI-Project": "proj_other"}
    sdk(proxy, plain).chat.completions.create(model="gpt-4o", messages=HI, extra_headers=evil)
    sdk(proxy, scoped).chat.completions.create(model="gpt-4o", messages=HI, extra_headers=evil)
    twice = b"OpenAI-Organization: org-a\r\nopenai-organization: org-b\r\nOpenAI-Project: p1\r\nOpenAI-Project: p2\r\n"
    body = json.dumps({"model": "gpt-4o", "messages": HI}).encode()
    assert raw_exchange(proxy.url, b"/v1/chat/completions", b"Authorization: Bearer " + plain.encode() + b"\r\n"
                        + twice, body)[0] == 200
    first, second, third = upstream.seen
    for seen in (first, third):
        assert not {"openai-organization", "openai-project"} & {k.lower() for k, _ in seen.header_items}
    sent = [(k.lower(), v) for k, v in second.header_items if k.lower().startswith("openai-")]
    assert sorted(sent) == [("openai-organization", "org-acme"), ("openai-project", "proj_search")]


def test_passthrough_still_forwards_account_headers(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    upstream.json(CHAT)
    request(proxy.url, headers={"OpenAI-Organization": "org-mine"})
    assert upstream.seen[-1].headers["OpenAI-Organization"] == "org-mine"


def test_a_client_cannot_move_managed_spend_by_header(start_proxy: Callable[..., ProxyServer],
                                                      upstream: FakeUpstream) -> None:
    proxy = managed(start_proxy)
    key, key_id = new_key(proxy)  # no team
    status, _ = admin(proxy, "PUT", "/budgets/team/victims", {"budget_usd": "0"})
    assert status == 200
    upstream.json(CHAT)
    headers = {"X-Meter-User": "mallory", "X-Meter-Team": "victims"}
    sdk(proxy, key).chat.completions.create(model="gpt-4o", messages=HI, max_tokens=5, extra_headers=headers,
                                            user="body-user")
    row = proxy.rows()[-1]
    # The victims' zero budget did not apply, and the call's spend is not on their ledger either.
    assert row["status"] == 200 and row["user"] == "alice" and "team" not in json.loads(row["tags"])
    mallory, _ = new_key(proxy, budget_usd="0")
    with pytest.raises(openai.RateLimitError):
        sdk(proxy, mallory).chat.completions.create(model="gpt-4o", messages=HI, extra_headers=headers)
    refused = proxy.rows()[-1]
    assert refused["status"] == 429 and refused["user"] == "alice" and "team" not in json.loads(refused["tags"])
    status, _ = raw_exchange(proxy.url, b"/v1//chat/completions",
                             b"Authorization: Bearer " + key.encode() + b"\r\nX-Meter-User: mallory\r\n"
                             b"X-Meter-Team: victims\r\n")
    refused = proxy.rows()[-1]
    assert status == 400 and refused["user"] is None and "team" not in json.loads(refused["tags"])


# --- a budget cannot be talked past ---------------------------------------------------------------

BOB = {Subject("user", "bob"): Limits(Decimal("1"), "month")}


def test_unmetered_routes_are_refused_under_a_budget(start_proxy: Callable[..., ProxyServer],
                                                     upstream: FakeUpstream) -> None:
    proxy = start_proxy(limits=BOB)
    upstream.json({"object": "list", "data": []})
    as_bob = {"X-Meter-User": "bob"}
    status, _, body = request(proxy.url, method="GET", path="/v1/files", body=None, headers=as_bob)
    assert status == 403 and code_of(body) == "unmetered_route"
    status, _, body = request(proxy.url, path="/v1/audio/speech", headers=as_bob,
                              body=b'{"model": "tts-1", "input": "hi", "voice": "alloy"}')
    assert status == 403 and code_of(body) == "unmetered_route"
    assert upstream.seen == []
    assert [r["status"] for r in proxy.rows()] == [403, 403]
    assert request(proxy.url, method="GET", path="/v1/models", body=None, headers=as_bob)[0] == 200  # free
    assert request(proxy.url, method="GET", path="/v1/files", body=None)[0] == 200  # no budget: no refusal
    allowed = start_proxy(limits=BOB, unmetered_routes=("GET /v1/files",), db=str(Path(proxy.settings.db)) + "2")
    assert request(allowed.url, method="GET", path="/v1/files", body=None, headers=as_bob)[0] == 200


def test_a_tpm_limit_refuses_unmetered_routes_too(start_proxy: Callable[..., ProxyServer],
                                                  upstream: FakeUpstream) -> None:
    proxy = start_proxy(limits={Subject("user", "bob"): Limits(tpm=100_000)})
    upstream.json({})
    status, _, body = request(proxy.url, path="/v1/files/file-1/content", method="GET", body=None,
                              headers={"X-Meter-User": "bob"})
    assert status == 403 and code_of(body) == "unmetered_route" and upstream.seen == []


def test_a_managed_key_s_explicit_route_is_allowed_unmetered(start_proxy: Callable[..., ProxyServer],
                                                              upstream: FakeUpstream) -> None:
    proxy = managed(start_proxy)
    key, _ = new_key(proxy, budget_usd="5", routes=["default", "GET /v1/files"])
    upstream.json({"object": "list", "data": []})
    sdk(proxy, key).files.list()
    assert len(upstream.seen) == 1


IMAGE_USAGE = {"total_tokens": 4310, "input_tokens": 50, "output_tokens": 4160,
               "input_tokens_details": {"text_tokens": 10, "image_tokens": 40}}


def test_image_generation_is_metered_and_priced(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    upstream.json({"created": 1, "data": [{"b64_json": "aGk="}], "usage": IMAGE_USAGE})
    sdk(proxy, "sk-img").images.generate(model="gpt-image-1", prompt="a red square", quality="high")
    row = proxy.rows()[-1]
    assert (row["prompt_tokens"], row["completion_tokens"], row["usage_source"], row["priced"]) == (
        50, 4160, "upstream", 1)
    # 10 text tokens at 5, 40 image tokens at 10, 4160 image output tokens at 40 USD per 1M.
    expected = (10 * Decimal(5) + 40 * Decimal(10) + 4160 * Decimal(40)) / 1_000_000
    assert Decimal(row["cost_usd"]) == expected


def test_a_streamed_image_generation_is_metered(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    partial = {"type": "image_generation.partial_image", "b64_json": "aGk=", "partial_image_index": 0}
    done = {"type": "image_generation.completed", "b64_json": "aGk=", "usage": IMAGE_USAGE}
    body = (f"event: image_generation.partial_image\ndata: {json.dumps(partial)}\n\n"
            f"event: image_generation.completed\ndata: {json.dumps(done)}\n\n").encode()
    upstream.sse(body, chunk_size=40)
    status, _, got = request(proxy.url, path="/v1/images/generations",
                             body=b'{"model": "gpt-image-1", "prompt": "a red square", "stream": true}')
    assert status == 200 and got == body
    row = proxy.rows()[-1]
    assert (row["stream"], row["prompt_tokens"], row["completion_tokens"], row["priced"]) == (1, 50, 4160, 1)


def test_an_image_generation_without_usage_is_flagged_unpriced(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    upstream.json({"created": 1, "data": [{"url": "https://example.invalid/x.png"}]})
    sdk(proxy, "sk-img").images.generate(model="gpt-image-1", prompt="a red square")
    row = proxy.rows()[-1]
    assert row["priced"] == 0 and row["cost_usd"] == "0"


def test_transcription_is_metered_and_priced(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    usage = {"type": "tokens", "input_tokens": 140, "output_tokens": 45, "total_tokens": 185,
             "input_token_details": {"text_tokens": 20, "audio_tokens": 120}}
    upstream.json({"text": "hello there", "usage": usage})
    audio = io.BytesIO(b"RIFF" + b"\0" * 4000)
    audio.name = "hello.wav"
    sdk(proxy, "sk-audio").audio.transcriptions.create(model="gpt-4o-transcribe", file=audio)
    row = proxy.rows()[-1]
    assert (row["requested_model"], row["prompt_tokens"], row["completion_tokens"], row["audio_prompt_tokens"],
            row["priced"]) == ("gpt-4o-transcribe", 140, 45, 120, 1)
    expected = (20 * Decimal("2.50") + 120 * Decimal(6) + 45 * Decimal(10)) / 1_000_000
    assert Decimal(row["cost_usd"]) == expected
    upstream.json({"text": "hello", "usage": {"type": "duration", "seconds": 3}})
    for model, cost, priced in (("whisper-1", "0.0003", 1), ("gpt-4o-transcribe", "0.0003", 1),
                                ("gpt-4o", "0", 0)):  # gpt-4o has no per-minute price: flagged, never free
        audio.seek(0)
        sdk(proxy, "sk-audio").audio.transcriptions.create(model=model, file=audio)
        row = proxy.rows()[-1]
        assert (row["model"], row["cost_usd"], row["priced"], row["prompt_tokens"]) == (model, cost, priced, 0)


def test_a_per_minute_call_keeps_its_cost_when_repriced(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    upstream.json({"text": "hello", "usage": {"type": "duration", "seconds": 30}})
    audio = io.BytesIO(b"RIFF" + b"\0" * 400)
    audio.name = "a.wav"
    sdk(proxy, "sk-audio").audio.transcriptions.create(model="whisper-1", file=audio)
    assert proxy.rows()[-1]["cost_usd"] == "0.003"
    conn = sqlite3.connect(proxy.settings.db, isolation_level=None)
    try:  # the ledger keeps no seconds: re-pricing from its (zero) tokens must not make the call free
        report = reprice(conn, PriceTable.load(SHIPPED_PRICING))
    finally:
        conn.close()
    assert report.changed == 0 and proxy.rows()[-1]["cost_usd"] == "0.003"


def test_a_transcription_reserves_against_a_budget(start_proxy: Callable[..., ProxyServer],
                                                   upstream: FakeUpstream) -> None:
    # The small one reserves its 2,000 output tokens (max_output) at 10 USD per 1M and a few hundred bytes of
    # audio at 6: 0.022 USD.
    proxy = start_proxy(limits={Subject("user", "bob"): Limits(Decimal("0.05"), "day")})
    upstream.json({"text": "hi", "usage": {"type": "tokens", "input_tokens": 5, "output_tokens": 1,
                                           "total_tokens": 6}})
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-bob", max_retries=0,
                           default_headers={"X-Meter-User": "bob"})
    _clients.append(client)
    small = io.BytesIO(b"\0" * 100)
    small.name = "a.wav"
    client.audio.transcriptions.create(model="gpt-4o-transcribe", file=small)
    # 2 MB of audio could be up to 2M audio tokens at 6 USD per 1M: past the budget, never forwarded.
    big = io.BytesIO(b"\0" * 2_000_000)
    big.name = "b.wav"
    with pytest.raises(openai.RateLimitError) as err:
        client.audio.transcriptions.create(model="gpt-4o-transcribe", file=big)
    assert err.value.code == "budget_exceeded" and len(upstream.seen) == 1
    # whisper-1 bills minutes: 2 MB could be 20,000 seconds (no accepted format is under 100 bytes a second).
    big.seek(0)
    with pytest.raises(openai.RateLimitError):
        client.audio.transcriptions.create(model="whisper-1", file=big)
    small.seek(0)
    client.audio.transcriptions.create(model="whisper-1", file=small)
    assert len(upstream.seen) == 2


@pytest.mark.parametrize("target", [
    b"/v1//chat/completions", b"/v1/chat//completions", b"/v1/chat/completions/", b"/v1/chat/completions;x=1",
    b"/v1/chat;v=2/completions", b"/v1/chat/%63ompletions", b"/v1/%43hat/completions", b"/v1/chat%2Fcompletions",
    b"/v1/chat%2fcompletions", b"/v1/Chat/Completions", b"/v1/chat/COMPLETIONS", b"/v1/EMBEDDINGS",
    b"/v1/chat\\completions", b"/v1/chat/completions%00", b"/v1/chat/completions%zz",
])
def test_non_canonical_paths_are_refused(upstream: FakeUpstream, proxy: ProxyServer, target: bytes) -> None:
    upstream.json(CHAT)
    body = json.dumps({"model": "gpt-4o", "messages": HI}).encode()
    status, answer = raw_exchange(proxy.url, target, b"Authorization: Bearer sk-path-test\r\n", body)
    assert status == 400 and code_of(answer) == "invalid_path", answer
    assert upstream.seen == []
    assert proxy.rows()[-1]["status"] == 400


def test_a_method_the_route_does_not_take_is_refused(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    upstream.json(CHAT)
    body = json.dumps({"model": "gpt-4o", "messages": HI}).encode()
    status, answer = raw_exchange(proxy.url, b"/v1/chat/completions", body=body, method=b"GET")
    assert status == 400 and code_of(answer) == "method_not_allowed"
    status, answer = raw_exchange(proxy.url, b"/v1/chat/completions", body=body, method=b"PUT")
    assert status == 405 and code_of(answer) == "method_not_allowed"
    status, answer = raw_exchange(proxy.url, b"/v1/embeddings", body=b"", method=b"GET")
    assert status == 405
    assert upstream.seen == []
    assert raw_exchange(proxy.url, b"/v1/chat/completions", body=b"", method=b"GET")[0] == 200  # stored list


@pytest.mark.parametrize("sent,forwarded", [
    ("zstd", "identity"),
    ("zstd, br;q=0.9, gzip", "br;q=0.9, gzip"),
    ("gzip, deflate, br, zstd", "gzip, deflate, br"),
    ("*", "gzip, deflate, br"),
    ("identity", "identity"),
])
def test_the_upstream_is_asked_only_for_decodable_encodings(upstream: FakeUpstream, proxy: ProxyServer,
                                                            sent: str, forwarded: str) -> None:
    upstream.json(CHAT)
    request(proxy.url, headers={"Accept-Encoding": sent})
    assert upstream.seen[-1].headers["Accept-Encoding"] == forwarded


def test_a_compressed_answer_still_reaches_the_client_as_sent(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    packed = gzipped(json.dumps(CHAT).encode())
    upstream.reply(Reply(headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
                         chunks=[packed], content_length=True))
    status, headers, got = request(proxy.url, headers={"Accept-Encoding": "zstd, gzip"})
    assert status == 200 and got == packed and headers["Content-Encoding"] == "gzip"
    assert proxy.rows()[-1]["prompt_tokens"] == 10  # metered from the decoded copy


def test_the_reservation_is_the_largest_output_field(start_proxy: Callable[..., ProxyServer],
                                                     upstream: FakeUpstream) -> None:
    # 0.02 USD fits about 2,000 gpt-4o output tokens (10 USD per 1M) but not 16,384 (its max_output).
    proxy = start_proxy(limits={Subject("user", "bob"): Limits(Decimal("0.02"), "day")})
    upstream.json(CHAT)
    client = sdk(proxy, "sk-bob")

    def ask(**fields: Any) -> str:
        try:
            client.chat.completions.create(model="gpt-4o", messages=HI, user="bob", **fields)
        except openai.RateLimitError as err:
            return str(err.code)
        return "ok"

    assert ask(max_tokens=100) == "ok"
    assert ask() == "budget_exceeded"  # no limit: the model's own maximum output is reserved
    assert ask(max_tokens=100, extra_body={"max_completion_tokens": "5000"}) == "budget_exceeded"
    assert ask(max_tokens=100, extra_body={"max_output_tokens": 3000.5}) == "budget_exceeded"
    assert ask(max_tokens=600, n=4) == "budget_exceeded"  # 2,400 tokens over four choices
    assert ask(max_tokens=600, extra_body={"n": "4"}) == "budget_exceeded"
    assert ask(max_tokens=100, extra_body={"max_completion_tokens": "unlimited"}) == "budget_exceeded"
    assert len(upstream.seen) == 1


def test_duplicate_json_keys_are_refused_when_checked(start_proxy: Callable[..., ProxyServer],
                                                      upstream: FakeUpstream) -> None:
    proxy = start_proxy(limits=BOB)
    upstream.json(CHAT)
    twice = b'{"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], ' \
            b'"max_tokens": 100000}'
    status, _, body = request(proxy.url, body=twice, headers={"X-Meter-User": "bob"})
    assert status == 400 and code_of(body) == "duplicate_json_key" and json.loads(body)["error"]["param"] == \
        "max_tokens"
    nested = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "a", "content": "b"}]}'
    assert request(proxy.url, body=nested, headers={"X-Meter-User": "bob"})[0] == 400
    assert upstream.seen == []
    assert request(proxy.url, body=twice)[0] == 200  # no policy reads this one: forwarded as sent
    assert upstream.seen[-1].body == twice


def test_an_unpriced_model_is_refused_under_a_budget(start_proxy: Callable[..., ProxyServer],
                                                     upstream: FakeUpstream, tmp_path: Path) -> None:
    proxy = start_proxy(limits=BOB)
    upstream.json(CHAT)
    client = sdk(proxy, "sk-bob")
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.chat.completions.create(model="mystery-model", messages=HI, max_tokens=5, user="bob")
    assert err.value.code == "unpriced_model" and upstream.seen == []
    client.chat.completions.create(model="mystery-model", messages=HI, max_tokens=5)  # no budget: forwarded
    assert len(upstream.seen) == 1
    table = tmp_path / "with-default.yaml"
    table.write_text("models:\n  gpt-4o: {input: 2.5, output: 10}\n"
                     "default: {input: 100, output: 100000, max_output: 1000}\n")
    priced = start_proxy(limits=BOB, pricing=str(table), db=str(tmp_path / "other.db"))
    client = sdk(priced, "sk-bob")
    client.chat.completions.create(model="mystery-model", messages=HI, max_tokens=5, user="bob")
    with pytest.raises(openai.RateLimitError):  # 1,000 output tokens at the default's 0.1 USD each: past 1 USD
        client.chat.completions.create(model="mystery-model", messages=HI, user="bob")
    assert len(upstream.seen) == 2


@pytest.mark.parametrize("headers", [
    b"Authorization: Bearer sk-one-aaaaaaaa\r\napi-key: sk-two-bbbbbbbb\r\n",
    b"Authorization: Bearer sk-one-aaaaaaaa\r\nConnection: authorization\r\n",
    b"api-key: sk-one-aaaaaaaa\r\nConnection: keep-alive, api-key\r\n",
    b"Authorization: Basic c2stb25lOg==\r\n",
    b"Authorization: Bearer\r\n",
    b"Authorization: Bearer sk-one aaaaaaaa\r\n",
    b"Authorization: sk-one-aaaaaaaa\r\n",
], ids=["two credentials", "Authorization in Connection", "api-key in Connection", "Basic", "no key",
        "two words", "no scheme"])
def test_one_identity_per_request(upstream: FakeUpstream, proxy: ProxyServer, headers: bytes) -> None:
    upstream.json(CHAT)
    body = json.dumps({"model": "gpt-4o", "messages": HI}).encode()
    status, answer = raw_exchange(proxy.url, b"/v1/chat/completions", headers, body)
    assert status == 400 and code_of(answer) == "ambiguous_credentials"
    assert upstream.seen == [] and proxy.rows()[-1]["status"] == 400


def test_own_usage_view_shows_only_the_key_s_own_in_passthrough(start_proxy: Callable[..., ProxyServer],
                                                                upstream: FakeUpstream) -> None:
    proxy = start_proxy(limits={Subject("user", "alice"): Limits(Decimal("100"), "month"),
                                Subject("team", "ml"): Limits(Decimal("50"), "month")})
    upstream.json(CHAT)
    request(proxy.url, headers={"Authorization": "Bearer sk-alice", "X-Meter-User": "alice",
                                "X-Meter-Team": "ml"})
    status, _, raw = request(proxy.url, method="GET", path="/meter/usage", body=None,
                             headers={"Authorization": "Bearer sk-mallory", "X-Meter-User": "alice",
                                      "X-Meter-Team": "ml"})
    view = json.loads(raw)
    assert status == 200 and view["user"] is None and view["team"] is None
    assert [b["kind"] for b in view["budgets"]] == ["key"] and view["totals"]["calls"] == 0
    mine = json.loads(request(proxy.url, method="GET", path="/meter/usage", body=None,
                              headers={"Authorization": "Bearer sk-alice"})[2])
    assert mine["totals"]["calls"] == 1


def test_the_shipped_table_has_max_output_for_every_model() -> None:
    table = PriceTable.load(SHIPPED_PRICING)
    missing = [m for m in table.models() if table.resolve(m).max_output is None]  # type: ignore[union-attr]
    assert missing == []


def test_own_usage_view_looks_up_the_subject_the_ledger_records(proxy: ProxyServer, upstream: FakeUpstream) -> None:
    # Two X-Meter-User headers: the row keeps the last; /meter/usage must read the same caller (key_id) as the
    # row, and show no user at all in passthrough (a header proves nothing), never the first header's.
    upstream.json(CHAT)
    heads = b"Authorization: Bearer sk-two-users-0001\r\nX-Meter-User: alice\r\nX-Meter-User: bob\r\n"
    body = json.dumps({"model": "gpt-4o", "messages": HI}).encode()
    assert raw_exchange(proxy.url, b"/v1/chat/completions", heads, body)[0] == 200
    row = proxy.rows()[-1]
    assert (row["user"], row["key_id"]) == ("bob", key_id_of("sk-two-users-0001"))
    status, raw = raw_exchange(proxy.url, b"/meter/usage", heads, b"", method=b"GET")
    view = json.loads(raw)
    assert status == 200 and view["key_id"] == row["key_id"] and view["user"] is None
    assert view["totals"]["calls"] == 1 and view["totals"]["cost_usd"] == row["cost_usd"]
