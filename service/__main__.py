"""``python -m service``: load the settings, run the facade until SIGTERM/SIGINT, exit 0."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any

from .config import ConfigError, Settings
from .observability import configure_logging
from .server import serve


def run(main: Coroutine[Any, Any, None]) -> None:
    """uvloop when installed (it is, on Linux): about 20% less CPU per call (make bench)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def main() -> int:
    try:
        settings = Settings.from_env()
        configure_logging(settings.log_level, settings.log_format)
        run(serve(settings))
    except ConfigError as exc:
        print(f"flexwebchat: refusing to start: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
