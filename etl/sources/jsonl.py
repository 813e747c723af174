"""Import of normalized posts, one JSON object per line, from a file or standard input."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from etl.errors import RecordError, UsageError
from etl.records import PLATFORM_RE, Post, post_from_dict
from etl.sources import register
from etl.sources.base import FetchWindow, Source

# A line longer than this is refused (and skipped without being held in memory): far above any real post.
MAX_LINE_BYTES = 16 * 1024 * 1024


_CHUNK = 1 << 16  # bytes read at a time: a few hundred lines, split here rather than by readline() each


def _batches(
    stream: IO[Any], limit: int, read1: Callable[[int], bytes] | None = None
) -> Iterator[list[str | RecordError]]:
    """The stream's lines, a list at a time, without their newline and the first one without a byte order mark:
    each as text, or as the RecordError that refuses it (longer than `limit` bytes, skipped unread; not valid
    UTF-8). Lists rather than lines: a generator's step per line was a tenth of reading a post. `read1`: how to
    read the stream's bytes, if not its own read1 (standard input, read so that a stop is heard: _stoppable_read1)."""
    read1 = read1 or getattr(stream, "read1", None)
    batches = (
        _text_lines(stream, limit) if read1 is None or isinstance(stream, io.TextIOBase) else _chunked(read1, limit)
    )
    for batch in batches:
        if batch:
            if type(batch[0]) is str:
                batch[0] = batch[0].lstrip("\ufeff")  # a byte order mark some editors write
            yield batch
            break
    yield from batches


def _stoppable_read1(fd: int, should_stop: Callable[[], bool]) -> Callable[[int], bytes]:
    """read1 of a file descriptor that waits for input at most half a second at a time and, once a stop was asked
    for (SIGTERM), reads as the end of the input: a quiet producer on a pipe kept a blocked read, and the run, going
    past SIGTERM (and a container's grace period) until its next line or its end."""
    import os
    import select

    def read1(size: int) -> bytes:
        while not should_stop():
            if select.select([fd], [], [], 0.5)[0]:
                return os.read(fd, size)
        return b""

    return read1


def _chunked(read1: Callable[[int], bytes], limit: int) -> Iterator[list[str | RecordError]]:
    # A block of whole lines is decoded at once and split on b"\n" (never part of a multi-byte UTF-8 character);
    # only a block that is not valid UTF-8 is decoded line by line, to refuse those lines alone. read1 returns
    # what a pipe has ready, so lines fed slowly on stdin are handled as they come.
    parts: list[bytes] = []  # the start of a line whose end is not read yet
    held = 0  # their bytes
    skipping = False  # inside a line longer than the limit, already refused: dropped up to its newline
    while chunk := read1(_CHUNK):
        if skipping:
            end = chunk.find(b"\n")
            if end < 0:
                continue
            chunk, skipping = chunk[end + 1 :], False
        cut = chunk.rfind(b"\n")
        if cut < 0:
            if held + len(chunk) > limit:
                yield [_too_long(limit)]
                parts, held, skipping = [], 0, True
            else:
                parts.append(chunk)
                held += len(chunk)
            continue
        block = b"".join((*parts, chunk[:cut])) if parts else chunk[:cut]
        rest = chunk[cut + 1 :]
        parts, held = ([rest], len(rest)) if rest else ([], 0)
        if len(block) <= limit:  # no line in it can be too long (the usual case: the limit is far above a chunk)
            try:
                yield block.decode("utf-8").split("\n")
                continue
            except UnicodeDecodeError:
                pass
        yield [_too_long(limit) if len(line) > limit else _decoded(line) for line in block.split(b"\n")]
    if skipping:
        return
    if held > limit:
        yield [_too_long(limit)]
    elif parts:
        yield [_decoded(b"".join(parts))]  # the last line, without a newline


def _text_lines(stream: IO[Any], limit: int) -> Iterator[list[str | RecordError]]:
    """_batches of a stream read with readline() (a text stream given in place of stdin), a line each."""
    while True:
        line = stream.readline(limit + 1)
        if not line:
            return
        newline = b"\n" if isinstance(line, bytes) else "\n"
        if len(line) <= limit or line.endswith(newline):
            yield [_decoded(line.rstrip(newline))]
            continue
        while True:
            rest = stream.readline(1 << 20)
            if not rest or rest.endswith(newline):
                break
        yield [_too_long(limit)]


def _too_long(limit: int) -> RecordError:
    return RecordError(f"the line is longer than {limit} bytes")


def _decoded(line: bytes | str) -> str | RecordError:
    try:
        return _decode(line)
    except RecordError as exc:
        return exc


def _decode(line: bytes | str) -> str:
    if isinstance(line, str):
        if any("\udc80" <= ch <= "\udcff" for ch in line):  # bytes a surrogateescape'd text stream could not decode
            raise RecordError("the line is not valid UTF-8")
        return line
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError(
            f"the line is not valid UTF-8 (byte 0x{line[exc.start]:02x} at column {exc.start + 1})"
        ) from None


_scan_once = json.JSONDecoder().scan_once  # what json.loads runs, without its checks of either end
_BLANK = object()


def _scan(text: str) -> Any:
    """json.loads of a line (already without its newline), or _BLANK for a blank one. A line that starts its
    value at the first character and ends it at the last (every usual line) is scanned directly; anything
    else (whitespace at either end, an error) goes through json.loads, which gives the same value or the error."""
    try:
        data, end = _scan_once(text, 0)
        if end == len(text):
            return data
    except Exception:  # json's own StopIteration, ValueError, RecursionError: _parse says which
        pass
    if not text.strip():
        return _BLANK
    return _parse(text)


def _parse(text: str) -> Any:
    text = text.rstrip("\r\n")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        ended = ", the line ends too soon (truncated?)" if exc.pos >= len(text.rstrip()) else ""
        raise RecordError(f"not valid JSON ({exc.msg} at column {exc.pos + 1}{ended})") from None
    except ValueError as exc:  # an integer of more than 4,300 digits
        raise RecordError(f"not valid JSON ({str(exc).split(':')[0]})") from None
    except RecursionError:
        raise RecordError("not valid JSON (nested too deeply)") from None


def _gone_key(data: dict[str, Any]) -> tuple[str, str]:
    """(post_id, platform) of a deletion marker line; RecordError when either is missing."""
    platform, post_id = data.get("platform"), data.get("post_id")
    if not isinstance(platform, str) or not PLATFORM_RE.match(platform.strip().lower()):
        raise RecordError("a deletion marker needs a valid platform")
    if isinstance(post_id, bool) or not isinstance(post_id, (str, int)) or not str(post_id).strip():
        raise RecordError("a deletion marker needs a post_id")
    return str(post_id).strip(), platform.strip().lower()


@register
class JsonlSource(Source):
    """Posts in the normalized format (DESIGN.md); a bad line is reported with its number and skipped."""

    name = "jsonl"
    incremental = False

    def __init__(self, settings: Any, *, input: str | None = None, stdin: IO[Any] | None = None, **kwargs: Any):
        super().__init__(settings, **kwargs)
        # Checked here, when the run builds its sources, so that a bad --input stops it before any work.
        if input is None:
            raise UsageError("the jsonl source needs --input FILE (or - for standard input)")
        if input != "-" and not Path(input).is_file():
            raise UsageError(f"--input {input}: no such file")
        self.input = input
        self.stdin = stdin  # a binary or text stream read instead of standard input (tests)

    @classmethod
    def check_settings(cls, settings: Any) -> None:
        """The input comes from the command line (--input), checked when the source is built."""

    def config_key(self) -> str:
        return "-" if self.input == "-" else str(Path(self.input).resolve())

    def _stream_batches(self) -> Iterator[list[str | RecordError]]:
        # Bytes, decoded block by block: a line of invalid UTF-8 is rejected alone, not the whole input.
        if self.input == "-":
            if self.stdin is not None:
                yield from _batches(self.stdin, MAX_LINE_BYTES)
            else:  # read from its descriptor (nothing read it before: its buffer is empty), hearing a stop
                fd = sys.stdin.fileno()
                yield from _batches(sys.stdin.buffer, MAX_LINE_BYTES, _stoppable_read1(fd, self.should_stop))
            return
        with Path(self.input).open("rb") as stream:
            yield from _batches(stream, MAX_LINE_BYTES)

    def fetch(self, window: FetchWindow) -> Iterator[Post]:
        where = "stdin" if self.input == "-" else self.input
        admits = window.admits if window.since is not None or window.until is not None else None
        number = 0
        for batch in self._stream_batches():
            for text in batch:
                number += 1
                data: Any = None
                try:
                    if type(text) is not str:
                        raise text
                    if text.endswith("\r"):
                        text = text.rstrip("\r")
                    data = _scan(text)
                    if data is _BLANK:
                        continue
                    if type(data) is dict and data.get("deleted") is True:
                        # {"platform", "post_id", "deleted": true}: the platform says this post is gone.
                        gone_id, gone_platform = _gone_key(data)
                        self.report_gone(gone_id, "marked deleted in the input", platform=gone_platform)
                        continue
                    post = post_from_dict(data, origin=f"{where} line {number}")
                except RecordError as exc:
                    self._reject_line(f"{where} line {number}", data, exc)
                    continue
                if admits is None or admits(post.created_at):
                    yield post

    def _reject_line(self, where: str, data: Any, exc: RecordError) -> None:
        post_id = data.get("post_id") if isinstance(data, dict) else None
        shown = f" (post_id {str(post_id)[:100]!r})" if isinstance(post_id, (str, int)) and post_id != "" else ""
        self.reject(f"{where}{shown}", str(exc))
