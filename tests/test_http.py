"""The retry policy: the first attempt runs bare, and a retriable failure is tenacity's first attempt."""

from __future__ import annotations

import logging

import pytest
import requests

from etl.http import Retriable, RetryPolicy, WaitTooLong, header_number


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


@pytest.mark.parametrize(
    ("value", "number"),
    [("120", 120), (" 7 ", 7), ("0", 0), (None, None), ("", None), ("\u00b2", None), ("\u0663", None),
     ("1_000", None), ("-1", None), ("+5", None), ("1.5", None)],
)  # fmt: skip
def test_a_header_number_is_ascii_digits_only(value, number):
    """str.isdigit() is true for '²' (float() refuses it) and for '٣' (int() reads it): neither is a number here."""
    assert header_number(value) == number


# -- the image GET straight to urllib3 (direct_get) -----------------------------------------------


def _downloader(make_settings, **kwargs):
    from etl.media import Downloader

    return Downloader(make_settings(ETL_ALLOW_PRIVATE_HOSTS="true"), policy=RetryPolicy(attempts=1), **kwargs)


def test_a_plain_url_is_fetched_directly_over_one_kept_connection(make_settings, http_server):
    from etl.http import RawResponse
    from tests.support import Reply, png_bytes

    body = png_bytes()
    http_server.routes["/a.png"] = Reply(body=body)
    downloader = _downloader(make_settings)
    with downloader._get(http_server.url("/a.png?size=large")) as response:
        assert isinstance(response, RawResponse) and response.status_code == 200
        assert response.headers["content-type"] == "image/png"
    for _ in range(3):
        assert downloader.fetch(http_server.url("/a.png")).body == body
    [(_, path, headers), *rest] = http_server.requests
    assert path == "/a.png?size=large"
    assert headers["User-Agent"].startswith("social-archiver/") and headers["Accept-Encoding"]
    pools = downloader.session.get_adapter(http_server.base).poolmanager.pools
    [pool] = [pools[key] for key in pools.keys()]
    assert pool.num_connections == 1  # each body read to its end: the connection went back to the pool


@pytest.mark.badinput("image URLs requests would rewrite (spaces, escapes, non-ASCII): sent the usual way")
def test_a_url_requests_would_rewrite_is_sent_as_requests_sends_it(make_settings, http_server):
    from tests.support import Reply, png_bytes

    body = png_bytes()
    http_server.routes["/a%20b%C3%A9.png"] = Reply(body=body)
    downloader = _downloader(make_settings)
    for url in ("/a b\u00e9.png", "/a%20b%C3%A9.png"):
        with downloader._get(http_server.url(url)) as response:
            assert isinstance(response, requests.Response) and response.status_code == 200
    assert [path for _, path, _ in http_server.requests] == ["/a%20b%C3%A9.png"] * 2


def test_an_adapter_patched_before_the_first_session_is_not_bypassed(make_settings, http_server):
    """`responses` patches HTTPAdapter.send; the downloader's session is made on first use, inside the patch: its
    GETs must still go through the patched send (so `responses` sees them), not straight to urllib3."""
    import responses

    from etl.http import direct_get

    with responses.RequestsMock() as mock:
        mock.add(responses.GET, http_server.url("/a.png"), body=b"mocked", content_type="image/png")
        downloader = _downloader(make_settings)
        assert direct_get(downloader.session, http_server.url("/a.png"), {}, (1.0, 1.0)) is None
        with downloader._get(http_server.url("/a.png")) as response:
            assert response.content == b"mocked"
    assert http_server.requests == []
    direct = direct_get(downloader.session, http_server.url("/a.png"), {}, (1.0, 1.0))
    assert direct is not None  # the patch undone: straight to urllib3 again
    direct.close()


@pytest.mark.fault("the image host refuses the connection or stalls: requests' own errors, as before")
def test_direct_errors_are_requests_errors(make_settings, http_server):
    from etl.errors import MediaError
    from tests.support import Reply, free_port, png_bytes

    downloader = _downloader(make_settings)
    with pytest.raises(requests.ConnectionError):
        downloader._get(f"http://127.0.0.1:{free_port()}/a.png")
    with pytest.raises(MediaError, match="network error after 1 attempts: ConnectionError"):
        downloader.fetch(f"http://127.0.0.1:{free_port()}/a.png")
    http_server.routes["/slow.png"] = Reply(body=png_bytes(), delay=1.0)
    slow = _downloader(make_settings, total_timeout=5)
    slow.timeout = (2.0, 0.2)
    with pytest.raises(requests.exceptions.ReadTimeout):
        slow._get(http_server.url("/slow.png"))
    with pytest.raises(MediaError, match="timed out after 1 attempts: ReadTimeout"):
        slow.fetch(http_server.url("/slow.png"))


def test_a_send_wrapped_with_functools_wraps_is_not_taken_for_requests_own():
    """A wrapper made with functools.wraps carries HTTPAdapter.send's name: the direct GET must still see it."""
    import functools

    import requests

    from etl.http import _sends_as_requests_does

    original = requests.adapters.HTTPAdapter.send

    @functools.wraps(original)
    def send(self, *args, **kwargs):
        return original(self, *args, **kwargs)

    wrapped = type("Instrumented", (requests.adapters.HTTPAdapter,), {"send": send})
    assert _sends_as_requests_does(requests.adapters.HTTPAdapter())
    assert not _sends_as_requests_does(wrapped())
