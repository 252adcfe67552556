"""The daemon's logging: a level and a format from the config (`[log]`), changeable while it runs (SIGHUP).

'text' is a line per record for a terminal or journald (which adds its own time); 'json' is one object per line
for log shippers, with the exception's traceback as one string so a record stays one line.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import orjson

LEVELS = ("debug", "info", "warning", "error")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
               "message": record.getMessage()}
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


def configure(level: str, fmt: str = "text", stream: TextIO | None = None) -> None:
    """Set the root logger's level and its one handler's format (replacing what was there)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    set_level(level)


def set_level(level: str) -> None:
    if level not in LEVELS:
        raise ValueError(f"log level {level!r} must be one of {', '.join(LEVELS)}")
    logging.getLogger().setLevel(level.upper())
