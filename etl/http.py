"""One HTTP session factory and one retry policy (tenacity) for every source and the image downloader."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from etl import __version__
from etl.lazy import requests, urllib3  # imported on first use: a run without HTTP never loads them

if TYPE_CHECKING:
    import tenacity

log = logging.getLogger(__name__)
T = TypeVar("T")
USER_AGENT = f"social-archiver/{__version__}"


@functools.cache
def transient_exceptions() -> tuple[type[Exception], ...]:
    """Failures worth another attempt: the network, or the server said "later"."""
    return (
        requests.ConnectionError,
        requests.Timeout,
        requests.exceptions.ChunkedEncodingError,
        requests.exceptions.ContentDecodingError,
    )


class Retriable(Exception):
    """Raised inside a retried call to ask for another attempt, optionally after `retry_after` seconds."""

    def __init__(self, message: str, *, retry_after: float | None = None, response: requests.Response | None = None):
        super().__init__(message)
        self.retry_after = retry_after
        self.response = response


class WaitTooLong(Exception):
    """The server asked us to wait longer than the policy allows; the caller decides what to do."""

    def __init__(self, wait: float, response: requests.Response | None):
        super().__init__(f"asked to wait {wait:.0f}s")
        self.wait = wait
        self.response = response


def is_retriable_status(status: int) -> bool:
    return status == 429 or 500 <= status <= 599


_ASCII_DIGITS = re.compile(r"[0-9]+", re.ASCII)


def header_number(value: str | None) -> int | None:
    """A header's value as a whole number when it is ASCII digits (spaces around allowed); None for anything else.

    Not str.isdigit: it is true for "²" (byte 0xB2, as http.client decodes headers in Latin-1) and for other
    scripts' digits, which int() and float() then refuse (a ValueError out of the downloader and the retry policy
    for a 429 the next attempt would have healed) or read as numbers no HTTP header carries.
    """
    value = value.strip() if value else ""
    return int(value) if _ASCII_DIGITS.fullmatch(value) else None


def retry_after_seconds(response: requests.Response, *, now: float | None = None) -> float | None:
    """Seconds the server asked us to wait: Retry-After (seconds or HTTP date), else x-rate-limit-reset (epoch)."""
    now = time.time() if now is None else now
    value = response.headers.get("Retry-After")
    if value:
        value = value.strip()
        seconds = header_number(value)
        if seconds is not None:
            return float(seconds)
        import email.utils

        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            when = None
        if when is not None:
            return max(0.0, when.timestamp() - now)
    reset = header_number(response.headers.get("x-rate-limit-reset"))
    if reset is not None and response.status_code == 429:
        return max(0.0, reset - now)
    return None


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry: jittered exponential backoff, Retry-After honoured up to max_wait."""

    attempts: int = 4
    max_wait: float = 30.0
    base: float = 0.5
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> RetryPolicy:
        values = {"attempts": settings.http_retries, "max_wait": settings.retry_max_wait, **overrides}
        return cls(**values)

    def _wait(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        asked = getattr(exc, "retry_after", None)
        if asked is not None:
            if asked > self.max_wait:
                raise WaitTooLong(asked, getattr(exc, "response", None))
            return asked
        import tenacity

        backoff = tenacity.wait_random_exponential(multiplier=self.base, max=max(self.max_wait, 0.001))
        return backoff(state)

    def call(self, fn: Callable[[], T], *, describe: str = "request") -> T:
        """Run fn, retrying on Retriable and transient network errors; the last error is re-raised.

        The first attempt runs bare: setting tenacity up costs about 0.2 ms of CPU, as much as an image's whole
        HTTP exchange, and nearly every call succeeds at once. Only when it fails with an error worth another
        attempt does tenacity take over, that error counting as its first attempt (same waits, log lines and
        number of attempts as if tenacity had run it)."""
        try:
            return fn()
        except (Retriable, *transient_exceptions()) as exc:
            first: BaseException | None = exc

        def again() -> T:
            nonlocal first
            if first is not None:
                failed, first = first, None
                raise failed
            return fn()

        return self._retrying(describe)(again)

    def _retrying(self, describe: str) -> tenacity.Retrying:
        import tenacity  # here: a run that sends no request (a rerun of a file) never needs it

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.info(
                "retrying %s in %.1fs (attempt %d of %d): %s",
                describe,
                state.upcoming_sleep,
                state.attempt_number,
                self.attempts,
                exc,
            )

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.attempts),
            wait=self._wait,
            retry=tenacity.retry_if_exception_type((Retriable, *transient_exceptions())),
            sleep=self.sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        return retrying


MAX_INFORMATIONAL = 8  # informational (1xx) answers skipped before a request's final one; past it, one is the answer
_attempt = threading.local()  # .deadline: the time.monotonic() by which this thread's requests must be answered


def set_deadline(deadline: float | None) -> float | None:
    """Bound this thread's requests through the session's pools by `deadline` (a time.monotonic() value): their
    connecting (TLS handshake too), sending and every read of the status line, headers and body; None lifts the
    bound. Returns the deadline it replaces (for the caller to put back).

    Socket timeouts alone bound each wait for a byte, not an answer: a host that sends its headers a byte at a
    time, each just inside the read timeout, held a download thread for hours. Each socket operation's timeout
    is cut to the time left instead (no watchdog thread, nothing to clean up); past the deadline the operation
    raises a timeout, as if the read timeout had run out, and urllib3 closes the connection, so it is never
    pooled for reuse."""
    previous = getattr(_attempt, "deadline", None)
    _attempt.deadline = deadline
    return previous


def _time_left() -> float | None:
    """Seconds until this thread's deadline (0 or less once past it), or None when it has none."""
    deadline = getattr(_attempt, "deadline", None)
    return None if deadline is None else deadline - time.monotonic()


class _DeadlineReader(io.RawIOBase):
    """A socket's reads, as http.client's file over it makes them, each under the read timeout as before and
    none past the deadline: when less time is left than the read timeout, the socket's timeout is cut to it."""

    def __init__(self, sock: Any, deadline: float):
        super().__init__()
        self._file = sock.makefile("rb", buffering=0)  # counted by the socket, as http.client's own file is
        self._sock = sock
        self._deadline = deadline
        self._timeout = sock.gettimeout()  # the read timeout, which urllib3 has just set
        self._cut = False

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._file.fileno()

    def readinto(self, buffer: Any) -> int | None:
        left = self._deadline - time.monotonic()
        if self._timeout is None or left < self._timeout:
            if left <= 0:
                raise TimeoutError("past the attempt's deadline")
            self._sock.settimeout(left)
            self._cut = True
        return self._file.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            self._file.close()
            if self._cut:  # a connection read to its end in time goes back to the pool with its read timeout
                with contextlib.suppress(OSError):  # closed already
                    self._sock.settimeout(self._timeout)
        super().close()


class _Bounded:
    """For urllib3's connection classes: connecting and sending end by this thread's deadline (set_deadline)."""

    timeout: Any
    sock: Any

    def _new_conn(self) -> Any:
        left = _time_left()
        if left is not None and (self.timeout is None or left < self.timeout):
            if left <= 0:
                raise urllib3.exceptions.ConnectTimeoutError(self, "past the attempt's deadline before connecting")
            self.timeout = left  # urllib3 sets it again for each request
        return super()._new_conn()  # type: ignore[misc]

    def request(self, *args: Any, **kwargs: Any) -> None:
        left = _time_left()
        if left is not None and self.sock is not None:  # a pooled connection (a new one was bounded above)
            if left <= 0:
                raise TimeoutError("past the attempt's deadline before sending")
            if self.timeout is None or left < self.timeout:
                # urllib3's request() sets the reused socket's timeout to self.timeout as it sends (a cut of the
                # socket's own would be undone), and the read timeout again before the answer is read.
                self.timeout = left
        super().request(*args, **kwargs)  # type: ignore[misc]


@functools.cache
def final_answer_pools() -> dict[str, type]:
    """urllib3's pool classes by scheme, with connections that skip informational answers (1xx but 101).

    A host may answer `103 Early Hints` (RFC 8297), or any other 1xx, before its final answer on the same
    connection; http.client skips only `100 Continue` and took the 103 for the answer (its image failed with
    "HTTP 103" on every attempt). Its response class is the only hook: _read_status, which begin() calls for
    each status line, reads past such answers (their headers read with the public parse_headers).

    Their connections and responses also keep the deadline of the thread's attempt, if it has one (set_deadline).
    """
    import http.client  # with the pools: a run that sends no request never needs it

    class FinalResponse(http.client.HTTPResponse):
        def __init__(self, sock: Any, *args: Any, **kwargs: Any):
            super().__init__(sock, *args, **kwargs)
            deadline = getattr(_attempt, "deadline", None)
            if deadline is not None:
                self.fp.close()  # http.client's file over the socket, not read yet: replaced by one that keeps time
                self.fp = io.BufferedReader(_DeadlineReader(sock, deadline))

        def _read_status(self) -> tuple[str, int, str]:
            for _ in range(MAX_INFORMATIONAL):
                version, status, reason = super()._read_status()
                if not 100 <= status < 200 or status == 101:  # 101: the connection changes protocol; not ours
                    return version, status, reason
                http.client.parse_headers(self.fp)  # the informational answer's headers, skipped
            return super()._read_status()

    class HTTPConnection(_Bounded, urllib3.connection.HTTPConnection):
        response_class = FinalResponse

    class HTTPSConnection(_Bounded, urllib3.connection.HTTPSConnection):
        response_class = FinalResponse

    class HTTPConnectionPool(urllib3.HTTPConnectionPool):
        ConnectionCls = HTTPConnection

    class HTTPSConnectionPool(urllib3.HTTPSConnectionPool):
        ConnectionCls = HTTPSConnection

    return {"http": HTTPConnectionPool, "https": HTTPSConnectionPool}


def _skipping_informational(manager: Any) -> Any:
    """The pool manager, its pools made by final_answer_pools when it uses urllib3's own (a SOCKS proxy's not)."""
    if manager.pool_classes_by_scheme is urllib3.poolmanager.pool_classes_by_scheme:
        manager.pool_classes_by_scheme = final_answer_pools()
    return manager


@functools.cache
def pinned_host_adapter() -> type:
    """PinnedHostAdapter, defined on first use: its base class is requests' (see etl/lazy.py)."""

    class PinnedHostAdapter(requests.adapters.HTTPAdapter):
        """An adapter for requests sent to a vetted IP address with the real name in the Host header.

        The image downloader connects to the address its URL guard checked (no second DNS lookup an attacker
        could answer differently) and names the host in `Host`; for https this adapter also gives that name to
        TLS, as SNI and for the certificate check, and keeps one connection pool per name. Its pools skip
        informational answers (final_answer_pools).
        """

        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            _skipping_informational(self.poolmanager)

        def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
            return _skipping_informational(super().proxy_manager_for(proxy, **proxy_kwargs))

        def build_connection_pool_key_attributes(self, request: Any, verify: Any, cert: Any = None) -> tuple[dict, dict]:
            host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
            host = request.headers.get("Host")
            if host and host_params.get("scheme") == "https":
                name = urlsplit(f"//{host}").hostname
                if name and name != host_params.get("host"):
                    pool_kwargs["server_hostname"] = name
            return host_params, pool_kwargs

    return PinnedHostAdapter


# A URL the direct GET takes as it is: what requests' URL preparation (IDNA, requoting) would leave unchanged.
_PLAIN_URL = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+(?:/[A-Za-z0-9\-._~/!$&'()*+,;=:@?]*)?", re.ASCII)


def _sends_as_requests_does(adapter: Any) -> bool:
    """Whether the adapter sends with requests' own HTTPAdapter.send: not one of its own, nor one patched in (as
    `responses` does). Told by the function's name, not by identity with a copy taken beforehand: requests is
    imported on first use (etl/lazy.py), perhaps after the patch."""
    send = type(adapter).send
    return (
        getattr(send, "__module__", None) == "requests.adapters"
        and getattr(send, "__qualname__", None) == "HTTPAdapter.send"
        and not hasattr(send, "__wrapped__")  # a wrapper made with functools.wraps carries the name it wraps
    )


@dataclass(frozen=True)
class _Target:
    """What an adapter's pool key reads of a request: its URL and headers (for PinnedHostAdapter's Host)."""

    url: str
    headers: dict[str, str]


class RawResponse:
    """The part of a requests.Response the image downloader reads (status_code, headers, raw, close), over
    urllib3's own response: building a requests.Response costs more than the image's HTTP exchange."""

    __slots__ = ("raw", "status_code", "headers")

    def __init__(self, raw: urllib3.BaseHTTPResponse):
        self.raw = raw
        self.status_code = raw.status
        self.headers = raw.headers  # case-insensitive, as requests' are

    def __enter__(self) -> RawResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        # As requests.Response.close does for a streamed body: the connection goes back to the pool only
        # when the body was read to its end (urllib3 releases it then); otherwise it is closed.
        self.raw.close()
        self.raw.release_conn()


def direct_get(
    session: requests.Session, url: str, headers: dict[str, str], timeout: tuple[float, float]
) -> RawResponse | None:
    """GET `url` (streamed, no redirect followed) through the session's adapter straight to urllib3, with the
    session's headers, TLS settings and pools, and urllib3's errors mapped to requests' as HTTPAdapter.send
    maps them; None for a URL requests would rewrite (non-ASCII, spaces, percent escapes: sent the usual way).
    Only for a session with no proxy and nothing taken from the environment (the caller checks)."""
    if not _PLAIN_URL.fullmatch(url):
        return None
    adapter = session.get_adapter(url)
    if not _sends_as_requests_does(adapter):
        return None  # an adapter that sends its own way (or is patched, as `responses` does): not bypassed
    target = _Target(url, {**session.headers, **headers})
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        host_params, pool_kwargs = adapter.build_connection_pool_key_attributes(target, session.verify, session.cert)
        pool = adapter.poolmanager.connection_from_host(**host_params, pool_kwargs=pool_kwargs)
    except (ValueError, urllib3.exceptions.LocationValueError) as exc:
        raise requests.exceptions.InvalidURL(exc) from None
    adapter.cert_verify(pool, url, session.verify, session.cert)
    try:
        raw = pool.urlopen(
            "GET", path, headers=target.headers, redirect=False, assert_same_host=False, preload_content=False,
            decode_content=False, retries=adapter.max_retries, timeout=_timeouts(timeout), chunked=False,
        )  # fmt: skip
    except (urllib3.exceptions.ProtocolError, OSError) as exc:
        raise requests.ConnectionError(exc) from None
    except urllib3.exceptions.MaxRetryError as exc:
        reason = exc.reason
        if isinstance(reason, urllib3.exceptions.ConnectTimeoutError) and not isinstance(
            reason, urllib3.exceptions.NewConnectionError
        ):
            raise requests.exceptions.ConnectTimeout(exc) from None
        if isinstance(reason, urllib3.exceptions.ResponseError):
            raise requests.exceptions.RetryError(exc) from None
        if isinstance(reason, urllib3.exceptions.SSLError):
            raise requests.exceptions.SSLError(exc) from None
        raise requests.ConnectionError(exc) from None
    except urllib3.exceptions.ClosedPoolError as exc:
        raise requests.ConnectionError(exc) from None
    except urllib3.exceptions.SSLError as exc:
        raise requests.exceptions.SSLError(exc) from None
    except urllib3.exceptions.ReadTimeoutError as exc:
        raise requests.exceptions.ReadTimeout(exc) from None
    except urllib3.exceptions.InvalidHeader as exc:
        raise requests.exceptions.InvalidHeader(exc) from None
    return RawResponse(raw)


@functools.lru_cache(maxsize=8)
def _timeouts(timeout: tuple[float, float]) -> urllib3.Timeout:
    return urllib3.Timeout(connect=timeout[0], read=timeout[1])


def make_session(pool_size: int = 10, *, user_agent: str = USER_AGENT) -> requests.Session:
    """A pooled session; retries are the policy's job, so urllib3's own are off."""
    session = requests.Session()
    # pool_connections is how many hosts keep a pool; images come from many (and pinned ones by address).
    adapter = pinned_host_adapter()(pool_connections=max(pool_size, 4), pool_maxsize=max(pool_size, 4), max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = user_agent
    return session
