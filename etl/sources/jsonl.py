"""Import of normalized posts, one JSON object per line, from a file or standard input."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from etl.errors import ConfigError, RecordError
from etl.records import Post, post_from_dict
from etl.sources import register
from etl.sources.base import FetchWindow, Source


@register
class JsonlSource(Source):
    """Posts in the normalized format (DESIGN.md); a bad line is reported with its number and skipped."""

    name = "jsonl"
    incremental = False

    def __init__(self, settings: Any, *, input: str | None = None, stdin: IO[str] | None = None, **kwargs: Any):
        super().__init__(settings, **kwargs)
        self.input = input
        self.stdin = stdin

    @classmethod
    def check_settings(cls, settings: Any) -> None:
        """The input comes from the command line (--input), checked when the source is built."""

    def config_key(self) -> str:
        return "-" if self.input in (None, "-") else str(Path(self.input).resolve())

    def _lines(self) -> Iterator[tuple[int, str]]:
        if self.input is None:
            raise ConfigError("the jsonl source needs --input FILE (or - for standard input)")
        if self.input == "-":
            stream = self.stdin or sys.stdin
            yield from enumerate(stream, start=1)
            return
        path = Path(self.input)
        if not path.is_file():
            raise ConfigError(f"--input {self.input}: no such file")
        # errors="surrogateescape": a line with invalid UTF-8 is rejected alone, not the whole file.
        with path.open("r", encoding="utf-8", errors="surrogateescape", newline="") as stream:
            yield from enumerate(stream, start=1)

    def fetch(self, window: FetchWindow) -> Iterator[Post]:
        where = "stdin" if self.input in (None, "-") else self.input
        for number, line in self._lines():
            if not line.strip():
                continue
            data: Any = None
            try:
                if any("\udc80" <= ch <= "\udcff" for ch in line):  # surrogateescape'd bytes
                    raise RecordError("the line is not valid UTF-8")
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise RecordError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
                post = post_from_dict(data)
            except RecordError as exc:
                post_id = data.get("post_id") if isinstance(data, dict) else None
                self.reject(f"{where} line {number}" + (f" (post_id {post_id!r})" if post_id else ""), str(exc))
                continue
            if window.admits(post.created_at):
                yield post
