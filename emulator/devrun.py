"""``make run``: the facade against real Twilio when credentials are set, else against the emulator.

Without credentials it starts the emulator on a free loopback port, says so loudly, and runs
``python -m service`` pointed at it with the emulator's own dev API key, with guest tokens on
(signed with the emulator's demo secret for its demo conversations service: demo tokens).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from emulator.app import ACCOUNT_SID, API_KEY, API_SECRET, SERVICE_SID

CREDENTIAL_VARIABLES = (
    "TWILIO_AUTH_TOKEN",
    "TWILIO_AUTH_TOKEN_FILE",
    "TWILIO_API_SECRET",
    "TWILIO_API_SECRET_FILE",
)


def main() -> int:
    # A laptop run listens on loopback only, real credentials or not; GRPC_HOST=[::] opts out.
    os.environ.setdefault("GRPC_HOST", "localhost")
    if any(os.environ.get(name) for name in CREDENTIAL_VARIABLES):
        os.execv(sys.executable, [sys.executable, "-m", "service"])  # noqa: S606
    emulator = subprocess.Popen(
        [sys.executable, "-m", "emulator"], stdout=subprocess.PIPE, text=True
    )
    assert emulator.stdout is not None
    url = emulator.stdout.readline().strip().rsplit(" ", 1)[-1]
    banner = (
        "NO TWILIO CREDENTIALS: running against the local Flex EMULATOR at "
        f"{url}. No real conversations are created. Set TWILIO_ACCOUNT_SID and "
        "TWILIO_AUTH_TOKEN (or TWILIO_API_KEY and TWILIO_API_SECRET) to use Twilio.\n"
        "Guest access tokens are DEMO tokens (emulator API key and service "
        f"{SERVICE_SID}): no Twilio client will accept them."
    )
    print("=" * 78 + "\n" + banner + "\n" + "=" * 78, file=sys.stderr, flush=True)
    env = dict(
        os.environ,
        TWILIO_ACCOUNT_SID=ACCOUNT_SID,
        TWILIO_API_KEY=API_KEY,
        TWILIO_API_SECRET=API_SECRET,
        TWILIO_CONVERSATIONS_SERVICE_SID=SERVICE_SID,
        FLEX_API_BASE_URL=url,
        CONVERSATIONS_API_BASE_URL=url,
        LOG_FORMAT=os.environ.get("LOG_FORMAT", "console"),
        # No load balancer to drain from on a laptop: stop at once on Ctrl-C.
        SHUTDOWN_DELAY_SECONDS=os.environ.get("SHUTDOWN_DELAY_SECONDS", "0"),
    )
    facade = subprocess.Popen([sys.executable, "-m", "service"], env=env)
    signal.signal(signal.SIGTERM, lambda *_: facade.send_signal(signal.SIGTERM))
    try:
        code = facade.wait()
    except KeyboardInterrupt:  # forwarded in case it reached only us; then wait for the drain
        facade.send_signal(signal.SIGINT)
        code = facade.wait()
    finally:
        emulator.terminate()
        emulator.wait()
    return code


if __name__ == "__main__":
    sys.exit(main())
