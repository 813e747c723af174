"""Log set-up for the entrypoint: text on a terminal or JSON lines, with every secret value redacted."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime, timezone

REDACTED = "***"


class RedactingFilter(logging.Filter):
    """Replaces every known secret value in a record's final message (and its traceback) with ***."""

    def __init__(self, secrets: Iterable[str]):
        super().__init__()
        # Longest first, so a secret containing another is replaced whole.
        self.secrets = sorted({s for s in secrets if s and len(s) >= 3}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            record.msg = self.redact(record.getMessage())
            record.args = None
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = self.redact(record.exc_text)
            record.exc_info = None if record.exc_text else record.exc_info
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("run_id", "event", "counts"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False, default=str)


class ConsoleHandler(logging.StreamHandler):
    """The stderr handler. A live progress display sets `pause` so that a log line is written with the bar
    cleared and redrawn after it (never on the same line); a record logged with extra={"console": False}
    is left to the other handlers (the CLI prints that error itself on a terminal)."""

    def __init__(self, stream=None):
        super().__init__(stream)
        self.pause: Callable[[], AbstractContextManager[object]] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "console", True) is False:
            return
        with self.pause() if self.pause else nullcontext():
            super().emit(record)


def console_handler() -> ConsoleHandler | None:
    return next((h for h in logging.getLogger().handlers if isinstance(h, ConsoleHandler)), None)


def setup_logging(level: str, fmt: str, secrets: Iterable[str] = (), log_file: str = "", stream=None) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(level)
    redactor = RedactingFilter(secrets)
    formatter: logging.Formatter = (
        JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    handlers: list[logging.Handler] = [ConsoleHandler(stream or sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(redactor)
        root.addHandler(handler)
    # Libraries that log request URLs (with keys in them) at debug level stay at warning.
    for noisy in ("urllib3", "botocore", "boto3", "s3transfer", "googleapiclient.discovery", "PIL", "pgserver"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
