"""The Redis user docs/security.md tells operators to create is enough for every call path."""

from __future__ import annotations

import re
import uuid
from typing import Any

import redis
from conftest import ROOT, EmulatorProcess, RedisProcess

from emulator.harness import guest_env


def documented_acl() -> list[str]:
    """The ``ACL SETUSER ...`` command of docs/security.md, as its words."""
    text = " ".join((ROOT / "docs/security.md").read_text().split())
    found = re.search(r"`(ACL SETUSER [^`]+)`", text)
    assert found, "docs/security.md gives the facade's Redis user"
    return found.group(1).split()


def test_the_documented_redis_user_serves_creates_replays_and_tokens(
    make_facade: Any, upstream: EmulatorProcess, redis_server: RedisProcess
) -> None:
    words = documented_acl()
    password = next(w[1:] for w in words if w.startswith(">"))
    redis.Redis(port=redis_server.port).execute_command(*words)
    url = f"redis://flexwebchat:{password}@127.0.0.1:{redis_server.port}/0"
    facade = make_facade(upstream.url, **guest_env(upstream.url), REDIS_URL=url)

    request_id = str(uuid.uuid4())
    first = facade.create(request_id=request_id, issue_token=True, initial_message="Hello")
    again = facade.create(request_id=request_id, issue_token=True, initial_message="Hello")
    other = facade.create(request_id=str(uuid.uuid4()))  # rate-limited, like every create

    assert first.conversation_sid.startswith("CH") and first.initial_message_sid
    assert again.conversation_sid == first.conversation_sid
    assert other.conversation_sid not in ("", first.conversation_sid)
    assert facade.refresh(first.access_token).identity == first.identity
    assert facade.metric("flexwebchat_shared_state_errors_total") == 0
