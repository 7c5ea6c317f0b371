"""Which guest identities a caller may choose: its namespace from ``CALLER_IDENTITY_PREFIXES``.

A guest token for an identity reads and writes every conversation that identity is in, so a
caller choosing ``identity`` freely could act as a Flex agent or as another caller's guest.
Each caller gets a prefix of its own (``caller=prefix``, case-sensitive; the caller is the name
the facade logs, ``anonymous`` with caller auth off); a caller without one may not choose at all.
The identities the facade chooses itself start with :data:`FACADE_IDENTITY_PREFIX`. No prefix
may be a prefix of another, the facade's included (service.config refuses that at start), so
every identity has at most one owner.
"""

from __future__ import annotations

from collections.abc import Mapping

from .errors import IdentityNotAllowed

# The facade's own identities (a caller that sets none, with find-or-create on).
FACADE_IDENTITY_PREFIX = "flexwebchat-guest-"
VARIABLE = "CALLER_IDENTITY_PREFIXES"


def check_identity(prefixes: Mapping[str, str], caller: str, identity: str) -> None:
    """IdentityNotAllowed unless ``caller`` may choose ``identity`` (an empty one: always)."""
    if not identity:
        return
    prefix = prefixes.get(caller)
    if prefix is None:
        raise IdentityNotAllowed(
            f"caller {caller!r} may not choose identity ({VARIABLE} gives it no prefix); "
            "leave identity empty and the facade chooses one"
        )
    if not identity.startswith(prefix):
        raise IdentityNotAllowed(
            f"caller {caller!r} may choose only identities starting with {prefix!r}"
        )
