"""``python -m emulator [--port N] [--rate-limit R]``: runs the Flex emulator until SIGTERM.

Prints one line, ``emulator listening on http://HOST:PORT``, once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from emulator.app import start


async def run(host: str, port: int, rate_limit: float) -> None:
    runner, bound, _ = await start(host, port, rate_limit=rate_limit)
    print(f"emulator listening on http://{host}:{bound}", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m emulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--rate-limit", type=float, default=5.0, help="requests/second; 0 = off")
    args = parser.parse_args()
    asyncio.run(run(args.host, args.port, args.rate_limit))


if __name__ == "__main__":
    main()
