"""A local stand-in for Twilio Flex ``POST /v2/WebChats`` and the Conversations endpoint the
facade uses (``POST /v1/Conversations/{CH}/Messages``), as a real HTTP server.

It checks HTTP Basic credentials, parses the form, enforces the 16 KB pre-engagement limit and the
5 requests/second account limit on WebChats (429), answers 201 with a fresh ``CH…`` SID and
identity, remembers the conversations it created (a message to any other is 404), and answers
errors in Twilio's shape. Faults and latency apply to every endpoint. Tests steer it over HTTP:

* ``GET  /__emulator/requests``  every request received: time, headers, form, answered status,
  and the ``conversation_sid`` it created (null if none; set even when a fault hid the answer)
* ``GET  /__emulator/conversations``  every conversation created: SID -> guest identity
* ``POST /__emulator/conversations/{CH}``  ``{"state": "closed"}``: sets a conversation's state
  (``active``, ``inactive`` or ``closed``, as an agent ending the chat would); the
  user-conversations read reports it as ``conversation_state``
* ``POST /__emulator/faults``    ``{"faults": [...], "latency": s}``: each fault answers one coming
  request, in order: ``{"status": 503, "code": 20503, "message": "...", "retry_after": "1",
  "latency": 0.5, "body": "raw text", "drop": true, "after": true, "path": "/v2/WebChats"}``
  (drop closes the connection unanswered; after: the request is processed first, e.g. the
  conversation is created, and then answered with the fault: Twilio's "ambiguous" failures; path:
  the fault waits for a request whose path starts with it; the credential check's requests
  take only such faults)
* ``POST /__emulator/credentials``  ``{"SK…": "secret", "AC…": "token"}``: the credentials it
  accepts from now on (a rotation at Twilio; the defaults are ACCOUNT_SID/AUTH_TOKEN and
  API_KEY/API_SECRET)
* ``POST /__emulator/reset``     forget requests, faults and conversations, refill the rate limit,
  accept the default credentials again

It also answers the facade's start-up credential check: ``GET /v1/Configuration`` (Flex's
configuration, on the flex-api host) and ``GET /v1/Services/{IS}`` (the conversations service;
404 for any other SID than SERVICE_SID). Those requests are listed apart, at
``GET /__emulator/checks``, so that the request log holds the calls' requests only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

ACCOUNT_SID = "AC" + "0" * 32
AUTH_TOKEN = "emulator-auth-token"
API_KEY = "SK" + "0" * 32
API_SECRET = "emulator-api-secret-signs-demo-tokens"  # 32+ bytes, as HS256 wants
ADDRESS_SID = re.compile(r"IG[0-9a-fA-F]{32}")
SERVICE_SID = "IS" + "0" * 32  # the demo Flex conversations service (make run's guest tokens)
MAX_PRE_ENGAGEMENT_BYTES = 16 * 1024
MAX_MESSAGE_BYTES = 32 * 1024
CONVERSATION_STATES = ("active", "inactive", "closed")


@dataclass
class TokenBucket:
    rate: float
    capacity: float
    tokens: float = 0.0
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = self.capacity

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


@dataclass
class Emulator:
    rate_limit: float = 5.0
    credentials: dict[str, str] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)  # credential checks' requests
    faults: list[dict[str, Any]] = field(default_factory=list)
    latency: float = 0.0
    bucket: TokenBucket | None = None
    conversations: dict[str, str] = field(default_factory=dict)  # CH… -> guest identity
    states: dict[str, str] = field(default_factory=dict)  # CH… -> active / inactive / closed
    created: dict[str, str] = field(default_factory=dict)  # CH… -> date_created (ISO 8601)
    message_count: int = 0

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests.clear()
        self.checks.clear()
        self.faults.clear()
        self.conversations.clear()
        self.states.clear()
        self.created.clear()
        self.credentials = {ACCOUNT_SID: AUTH_TOKEN, API_KEY: API_SECRET}
        self.latency = 0.0
        self.bucket = TokenBucket(self.rate_limit, self.rate_limit) if self.rate_limit else None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024 * 1024)
        app.router.add_post("/v2/WebChats", self.create_web_chat)
        app.router.add_post("/v1/Conversations/{sid}/Messages", self.create_message)
        app.router.add_get(
            "/v1/Services/{service}/Users/{identity}/Conversations", self.user_conversations
        )
        app.router.add_get("/v1/Configuration", self.configuration)
        app.router.add_get("/v1/Services/{service}", self.service)
        app.router.add_get("/__emulator/requests", self.list_requests)
        app.router.add_get("/__emulator/checks", self.list_checks)
        app.router.add_get("/__emulator/conversations", self.list_conversations)
        app.router.add_post("/__emulator/conversations/{sid}", self.set_conversation_state)
        app.router.add_post("/__emulator/faults", self.add_faults)
        app.router.add_post("/__emulator/credentials", self.set_credentials)
        app.router.add_post("/__emulator/reset", self.reset_state)
        return app

    async def create_web_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, self._web_chat, rate_limited=True)

    async def create_message(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, self._message, rate_limited=False)

    async def user_conversations(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, self._user_conversations, rate_limited=False)

    async def configuration(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, self._configuration, rate_limited=False, check=True)

    async def service(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, self._service, rate_limited=False, check=True)

    async def _handle(
        self, request: web.Request, answer: Any, *, rate_limited: bool, check: bool = False
    ) -> web.StreamResponse:
        form = await request.post()
        entry: dict[str, Any] = {
            "time": time.time(),
            "method": request.method,
            "path": request.path,
            "headers": dict(request.headers),
            "form": {k: v for k, v in form.items() if isinstance(v, str)},
            "status": None,
            "conversation_sid": None,
        }
        (self.checks if check else self.requests).append(entry)
        fault = self._next_fault(request.path, check)
        response = await self._answer(request, entry["form"], answer, rate_limited, fault)
        entry["status"] = response.status if response is not None else "dropped"
        entry["conversation_sid"] = request.get("conversation_sid")
        if response is None:
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=500)  # never written: the connection is gone
        return response

    async def _answer(
        self,
        request: web.Request,
        form: dict[str, str],
        answer: Any,
        rate_limited: bool,
        fault: dict[str, Any],
    ) -> web.Response | None:
        if self.latency:
            await asyncio.sleep(self.latency)
        await asyncio.sleep(float(fault.get("latency", 0)))
        if not fault.get("after"):
            if fault.get("drop"):
                return None
            if fault.get("status"):
                return _fault_response(fault)
        response = self._process(request, form, answer, rate_limited)
        if fault.get("after") and fault.get("drop"):
            return None
        if fault.get("after") and fault.get("status"):
            return _fault_response(fault)
        return response

    def _next_fault(self, path: str, check: bool) -> dict[str, Any]:
        for index, fault in enumerate(self.faults):
            if "path" not in fault and check:
                continue  # a fault for the calls: the credential check never takes it
            if path.startswith(fault.get("path", "")):
                return self.faults.pop(index)
        return {}

    def _process(
        self, request: web.Request, form: dict[str, str], answer: Any, rate_limited: bool
    ) -> web.Response:
        if not self._authorized(request.headers.get("Authorization", "")):
            return twilio_error(401, 20003, "Authenticate")
        if rate_limited and self.bucket is not None and not self.bucket.take():
            return twilio_error(429, 20429, "Too Many Requests")
        if request.method == "POST" and request.content_type != "application/x-www-form-urlencoded":
            return twilio_error(
                400, 20001, "Content-Type must be application/x-www-form-urlencoded"
            )
        response: web.Response = answer(request, form)
        return response

    def _web_chat(self, request: web.Request, form: dict[str, str]) -> web.Response:
        address_sid = form.get("AddressSid", "")
        if not address_sid:
            return twilio_error(
                400, 20001, "Missing required parameter AddressSid in the post body"
            )
        if not ADDRESS_SID.fullmatch(address_sid):
            return twilio_error(400, 20001, "Invalid AddressSid")
        if len(form.get("PreEngagementData", "").encode()) > MAX_PRE_ENGAGEMENT_BYTES:
            return twilio_error(400, 45731, "Pre-engagement data exceeds 16 KB")
        body = {
            "conversation_sid": "CH" + uuid.uuid4().hex,
            "identity": form.get("Identity") or str(uuid.uuid4()),
        }
        self.conversations[body["conversation_sid"]] = body["identity"]
        self.states[body["conversation_sid"]] = "active"
        self.created[body["conversation_sid"]] = _now_iso()
        request["conversation_sid"] = body["conversation_sid"]  # for the request log
        return web.json_response(body, status=201)

    def _configuration(self, request: web.Request, form: dict[str, str]) -> web.Response:
        return web.json_response(
            {"account_sid": ACCOUNT_SID, "status": "ok", "url": str(request.url)}
        )

    def _service(self, request: web.Request, form: dict[str, str]) -> web.Response:
        sid = request.match_info["service"]
        if sid != SERVICE_SID:
            return twilio_error(404, 20404, f"The requested resource /Services/{sid} was not found")
        return web.json_response(
            {"sid": sid, "account_sid": ACCOUNT_SID, "friendly_name": "Flex Conversations"}
        )

    def _user_conversations(self, request: web.Request, form: dict[str, str]) -> web.Response:
        """The conversations a user (by identity) participates in; 404 for an unknown user."""
        identity = request.match_info["identity"]
        sids = [sid for sid, who in self.conversations.items() if who == identity]
        if request.match_info["service"] != SERVICE_SID or not sids:
            return twilio_error(
                404, 20404, f"The requested resource /Users/{identity} was not found"
            )
        conversations = [
            {
                "conversation_sid": sid,
                "chat_service_sid": SERVICE_SID,
                "conversation_state": self.states[sid],
                "date_created": self.created[sid],
            }
            for sid in sids
        ]
        return web.json_response({"conversations": conversations, "meta": {"page": 0}})

    def _message(self, request: web.Request, form: dict[str, str]) -> web.Response:
        sid = request.match_info["sid"]
        if sid not in self.conversations:
            return twilio_error(
                404, 20404, f"The requested resource /Conversations/{sid}/Messages was not found"
            )
        body = form.get("Body", "")
        if not body:
            return twilio_error(400, 20001, "Missing required parameter Body in the post body")
        if len(body.encode()) > MAX_MESSAGE_BYTES:
            return twilio_error(400, 50511, "Message body exceeds the maximum length")
        self.message_count += 1
        message = {
            "sid": "IM" + uuid.uuid4().hex,
            "conversation_sid": sid,
            "author": form.get("Author") or "system",
            "body": body,
            "index": self.message_count - 1,
            "date_created": _now_iso(),
        }
        return web.json_response(message, status=201)

    def _authorized(self, header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        expected = self.credentials.get(user)
        return expected is not None and hmac.compare_digest(expected, password)

    async def list_requests(self, request: web.Request) -> web.Response:
        return web.json_response(self.requests)

    async def list_checks(self, request: web.Request) -> web.Response:
        return web.json_response(self.checks)

    async def list_conversations(self, request: web.Request) -> web.Response:
        return web.json_response(self.conversations)

    async def set_conversation_state(self, request: web.Request) -> web.Response:
        sid = request.match_info["sid"]
        state = (await request.json()).get("state")
        if sid not in self.conversations or state not in CONVERSATION_STATES:
            return web.json_response({"error": "unknown conversation or state"}, status=400)
        self.states[sid] = state
        return web.json_response({sid: state})

    async def add_faults(self, request: web.Request) -> web.Response:
        spec = await request.json()
        self.faults.extend(spec.get("faults", []))
        if "latency" in spec:
            self.latency = float(spec["latency"])
        return web.json_response({"queued": len(self.faults)})

    async def set_credentials(self, request: web.Request) -> web.Response:
        self.credentials = {str(k): str(v) for k, v in (await request.json()).items()}
        return web.json_response({})

    async def reset_state(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({})


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def twilio_error(status: int, code: int, message: str) -> web.Response:
    body = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    return web.json_response(body, status=status)


def _fault_response(fault: dict[str, Any]) -> web.Response:
    status = int(fault["status"])
    headers = {"Retry-After": str(fault["retry_after"])} if "retry_after" in fault else {}
    if "body" in fault:
        return web.Response(status=status, text=str(fault["body"]), headers=headers)
    if 200 <= status < 300:
        return web.json_response({}, status=status, headers=headers)
    code = int(fault.get("code", 0)) or status * 100
    response = twilio_error(status, code, fault.get("message", "Injected fault"))
    response.headers.update(headers)
    return response


async def start(
    host: str = "127.0.0.1", port: int = 0, **options: Any
) -> tuple[web.AppRunner, int, Emulator]:
    """Starts an emulator in the running loop; returns (runner, bound port, emulator)."""
    emulator = Emulator(**options)
    runner = web.AppRunner(emulator.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    return runner, int(bound), emulator
