"""Rate limits over an exact 60-second sliding window, with a clock the test moves."""

from __future__ import annotations

import pytest

from proxy.control.limits import Subject
from proxy.control.ratelimit import RateLimiter, RateRefusal, Ticket, format_duration

KEY = Subject("key", "k1")
USER = Subject("user", "alice")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def limiter(clock: Clock) -> RateLimiter:
    return RateLimiter(clock)


def admitted(result: Ticket | RateRefusal) -> Ticket:
    assert isinstance(result, Ticket), result
    return result


def refused(result: Ticket | RateRefusal) -> RateRefusal:
    assert isinstance(result, RateRefusal), result
    return result


def test_requests_per_minute_slide(limiter: RateLimiter, clock: Clock) -> None:
    for at in (0, 30, 45):
        clock.now = 1000.0 + at
        admitted(limiter.try_acquire([(KEY, 3, None)], 0))
    clock.now = 1050.0
    refusal = refused(limiter.try_acquire([(KEY, 3, None)], 0))
    assert refusal.kind == "requests" and refusal.retry_after == pytest.approx(10.0)
    assert refusal.headers["Retry-After"] == "10"
    assert refusal.headers["x-ratelimit-limit-requests"] == "3"
    assert refusal.headers["x-ratelimit-remaining-requests"] == "0"
    assert refusal.headers["x-ratelimit-reset-requests"] == "55s"  # until the newest request leaves
    assert "Limit 3, Used 3, Requested 1" in refusal.message
    clock.now = 1060.0  # the request of t=0 has left the window; t=30 and t=45 are still in it
    ticket = admitted(limiter.try_acquire([(KEY, 3, None)], 0))
    assert ticket.headers["x-ratelimit-remaining-requests"] == "0"
    clock.now = 1061.0
    assert refused(limiter.try_acquire([(KEY, 3, None)], 0)).retry_after == pytest.approx(29.0)


def test_tokens_per_minute_and_the_retry_time(limiter: RateLimiter, clock: Clock) -> None:
    admitted(limiter.try_acquire([(KEY, None, 1000)], 400))
    clock.now += 10
    admitted(limiter.try_acquire([(KEY, None, 1000)], 400))
    clock.now += 10
    refusal = refused(limiter.try_acquire([(KEY, None, 1000)], 400))
    assert (refusal.kind, refusal.used, refusal.requested) == ("tokens", 800, 400)
    assert refusal.retry_after == pytest.approx(40.0)  # when the first 400 leave
    assert refusal.headers["x-ratelimit-remaining-tokens"] == "200"
    assert refusal.headers["x-ratelimit-limit-tokens"] == "1000"
    admitted(limiter.try_acquire([(KEY, None, 1000)], 200))  # a smaller one fits now


def test_a_request_larger_than_the_limit_is_told_it_can_never_fit(limiter: RateLimiter) -> None:
    refusal = refused(limiter.try_acquire([(KEY, None, 1000)], 1001))
    assert refusal.retry_after is None and "Retry-After" not in refusal.headers
    assert "larger than the limit" in refusal.message


def test_the_estimate_is_corrected_when_the_call_ends(limiter: RateLimiter, clock: Clock) -> None:
    ticket = admitted(limiter.try_acquire([(KEY, None, 1000)], 900))
    refused(limiter.try_acquire([(KEY, None, 1000)], 200))
    ticket.adjust(100)  # it used far less than prompt + max_tokens
    admitted(limiter.try_acquire([(KEY, None, 1000)], 800))
    clock.now += 61
    ticket.adjust(5000)  # out of the window already: must not count again
    admitted(limiter.try_acquire([(KEY, None, 1000)], 1000))


def test_all_subjects_are_checked_before_any_is_counted(limiter: RateLimiter) -> None:
    admitted(limiter.try_acquire([(USER, 1, None)], 0))
    refusal = refused(limiter.try_acquire([(KEY, 5, None), (USER, 1, None)], 0))
    assert refusal.subject == USER
    for _ in range(5):  # the refused request took none of the key's five
        admitted(limiter.try_acquire([(KEY, 5, None)], 0))


def test_release_takes_a_request_back_and_headers_show_the_tightest(limiter: RateLimiter) -> None:
    ticket = admitted(limiter.try_acquire([(KEY, 10, None), (USER, 2, 500)], 100))
    assert ticket.headers == {
        "x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "1m0s", "x-ratelimit-limit-tokens": "500",
        "x-ratelimit-remaining-tokens": "400", "x-ratelimit-reset-tokens": "1m0s",
    }
    ticket.release()
    for _ in range(2):
        admitted(limiter.try_acquire([(USER, 2, 500)], 250))


def test_idle_subjects_are_swept(limiter: RateLimiter, clock: Clock) -> None:
    for n in range(100):
        admitted(limiter.try_acquire([(Subject("user", f"u{n}"), 1, None)], 0))
    clock.now += 61
    admitted(limiter.try_acquire([(KEY, 1, None)], 0))
    assert list(limiter._windows) == [KEY]


@pytest.mark.parametrize("seconds,text", [
    (0, "0s"), (0.0201, "21ms"), (1, "1s"), (7.655, "7.66s"), (59.999, "1m0s"), (60, "1m0s"), (360, "6m0s"),
    (61.2, "1m2s"),
])
def test_durations_in_openai_form(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_a_window_counted_elsewhere_gets_the_same_refusals_and_headers(limiter: RateLimiter, clock: Clock) -> None:
    # The shared limits (PostgreSQL) answer from the window's entries and counts: the same words, waits and
    # headers as the in-process limiter, request for request.
    import random

    from proxy.control.ratelimit import Figures, headers_of, refusal_of

    rng = random.Random(14)
    entries: list[tuple[float, int]] = []
    for _ in range(300):
        clock.now += rng.choice([0.0, 0.4, 3.0, 17.0])
        tokens = rng.choice([10, 200, 900])
        entries = [(at, used) for at, used in entries if at > clock.now - 60]
        ours = refusal_of(KEY, entries, 12, 3000, tokens, clock.now)
        theirs = limiter.try_acquire([(KEY, 12, 3000)], tokens)
        if isinstance(theirs, RateRefusal):
            assert ours == theirs
            continue
        assert ours is None
        entries.append((clock.now, tokens))
        figures = Figures(len(entries), sum(t for _, t in entries), clock.now)
        assert headers_of([(12, 3000, figures)], clock.now) == theirs.headers
