"""The retry policy: the first attempt runs bare, and a retriable failure is tenacity's first attempt."""

from __future__ import annotations

import logging

import pytest
import requests

from etl.http import Retriable, RetryPolicy, WaitTooLong


class Flaky:
    """Fails with the given errors in turn, then returns "done"; counts its calls."""

    def __init__(self, *errors: BaseException):
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


def policy(attempts: int, sleeps: list[float]) -> RetryPolicy:
    return RetryPolicy(attempts=attempts, max_wait=5.0, base=0.01, sleep=sleeps.append)


def test_a_first_success_is_returned_without_a_wait():
    sleeps: list[float] = []
    fn = Flaky()
    assert policy(3, sleeps).call(fn) == "done"
    assert fn.calls == 1 and sleeps == []


def test_failures_count_from_the_first_attempt(caplog: pytest.LogCaptureFixture):
    sleeps: list[float] = []
    fn = Flaky(Retriable("HTTP 503"), requests.ConnectionError("reset"))
    with caplog.at_level(logging.INFO, logger="etl.http"):
        assert policy(3, sleeps).call(fn, describe="image x") == "done"
    assert fn.calls == 3 and len(sleeps) == 2
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("retrying image x")]
    assert [line.split("(")[1].split(")")[0] for line in lines] == ["attempt 1 of 3", "attempt 2 of 3"]


def test_the_attempts_are_a_limit_and_the_last_error_goes_on():
    sleeps: list[float] = []
    fn = Flaky(Retriable("first"), Retriable("second"), Retriable("third"), Retriable("never reached"))
    with pytest.raises(Retriable, match="third"):
        policy(3, sleeps).call(fn)
    assert fn.calls == 3 and len(sleeps) == 2
    one = Flaky(Retriable("only"))
    with pytest.raises(Retriable, match="only"):
        policy(1, sleeps).call(one)
    assert one.calls == 1


def test_other_errors_are_not_retried_and_a_long_wait_is_refused():
    sleeps: list[float] = []
    fn = Flaky(ValueError("a bug"))
    with pytest.raises(ValueError, match="a bug"):
        policy(3, sleeps).call(fn)
    assert fn.calls == 1 and sleeps == []
    asked = Flaky(Retriable("HTTP 429", retry_after=60))
    with pytest.raises(WaitTooLong):
        policy(3, sleeps).call(asked)
    assert asked.calls == 1 and sleeps == []
    honoured = Flaky(Retriable("HTTP 429", retry_after=2))
    assert policy(3, sleeps).call(honoured) == "done"
    assert sleeps == [2]
