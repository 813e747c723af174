"""Import of normalized posts, one JSON object per line, from a file or standard input."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from etl.errors import RecordError, UsageError
from etl.records import PLATFORM_RE, Post, post_from_dict
from etl.sources import register
from etl.sources.base import FetchWindow, Source

# A line longer than this is refused (and skipped without being held in memory): far above any real post.
MAX_LINE_BYTES = 16 * 1024 * 1024


def _bounded_lines(stream: IO[Any], limit: int) -> Iterator[bytes | str | None]:
    """The stream's lines (bytes or str, as it gives them); None for a line longer than `limit`, skipped unread."""
    while True:
        line = stream.readline(limit + 1)
        if not line:
            return
        newline = b"\n" if isinstance(line, bytes) else "\n"
        if len(line) <= limit or line.endswith(newline):
            yield line
            continue
        while True:
            rest = stream.readline(1 << 20)
            if not rest or rest.endswith(newline):
                break
        yield None


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

    def _lines(self) -> Iterator[tuple[int, bytes | str | None]]:
        # Bytes, decoded line by line: a line of invalid UTF-8 is rejected alone, not the whole input.
        if self.input == "-":
            stream = self.stdin if self.stdin is not None else sys.stdin.buffer
            yield from enumerate(_bounded_lines(stream, MAX_LINE_BYTES), start=1)
            return
        with Path(self.input).open("rb") as stream:
            yield from enumerate(_bounded_lines(stream, MAX_LINE_BYTES), start=1)

    def fetch(self, window: FetchWindow) -> Iterator[Post]:
        where = "stdin" if self.input == "-" else self.input
        for number, line in self._lines():
            data: Any = None
            try:
                if line is None:
                    raise RecordError(f"the line is longer than {MAX_LINE_BYTES} bytes")
                text = _decode(line)
                if number == 1:
                    text = text.lstrip("\ufeff")  # a byte order mark some editors write
                if not text.strip():
                    continue
                data = _parse(text)
                if isinstance(data, dict) and data.get("deleted") is True:
                    # {"platform", "post_id", "deleted": true}: the platform says this post is gone.
                    gone_id, gone_platform = _gone_key(data)
                    self.report_gone(gone_id, "marked deleted in the input", platform=gone_platform)
                    continue
                post = post_from_dict(data, origin=f"{where} line {number}")
            except RecordError as exc:
                post_id = data.get("post_id") if isinstance(data, dict) else None
                shown = (
                    f" (post_id {str(post_id)[:100]!r})" if isinstance(post_id, (str, int)) and post_id != "" else ""
                )
                self.reject(f"{where} line {number}{shown}", str(exc))
                continue
            if window.admits(post.created_at):
                yield post
