"""``make run``: the facade against real Twilio when any Twilio variable is set, else against the
emulator.

With any ``TWILIO_*`` variable set it runs ``python -m service``, which refuses a half-set
configuration with a line naming what is missing. With none it starts the emulator on a free
loopback port, says so loudly, and runs the facade pointed at it with the emulator's own dev API
key, with guest tokens on (signed with the emulator's demo secret for its demo conversations
service: demo tokens).

Ctrl-C works as on any server: the first drains (calls in flight finish, as on SIGTERM), a
second stops at once. The terminal sends SIGINT to its whole foreground process group; the
children run in groups of their own, so each Ctrl-C reaches the facade once, through this
process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from emulator.app import ACCOUNT_SID, API_KEY, API_SECRET, SERVICE_SID


def twilio_variables() -> list[str]:
    return sorted(
        name for name, value in os.environ.items() if name.startswith("TWILIO_") and value
    )


def main() -> int:
    # A laptop run listens on loopback only, real credentials or not; GRPC_HOST=[::] opts out.
    os.environ.setdefault("GRPC_HOST", "localhost")
    if twilio_variables():
        os.execv(sys.executable, [sys.executable, "-m", "service"])  # noqa: S606
    facade: subprocess.Popen[bytes] | None = None

    def forward(number: int, _frame: object) -> None:
        if facade is None:
            raise KeyboardInterrupt  # nothing to drain yet
        facade.send_signal(number)

    # Each signal reaches the facade exactly once: the first drains, a second stops at once.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    emulator = subprocess.Popen(
        [sys.executable, "-m", "emulator"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # stopped by us once the facade is gone, not by Ctrl-C
    )
    try:
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
            # No load balancer to take the replica out of: the drain starts at once.
            SHUTDOWN_DELAY_SECONDS=os.environ.get("SHUTDOWN_DELAY_SECONDS", "0"),
        )
        facade = subprocess.Popen(
            [sys.executable, "-m", "service"], env=env, start_new_session=True
        )
        return facade.wait()
    finally:
        if facade is not None and facade.poll() is None:  # only when this process failed
            facade.kill()
            facade.wait()
        emulator.terminate()
        emulator.wait()


if __name__ == "__main__":
    sys.exit(main())
