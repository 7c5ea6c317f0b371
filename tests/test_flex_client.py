"""The Flex client against httpx.MockTransport: wire format, retry policy and error parsing."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from urllib.parse import parse_qsl

import httpx
import pytest

from service.config import Secret, Settings
from service.deadline import Deadline
from service.errors import (
    DeadlineExceeded,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamUnreachable,
)
from service.execution import Executions
from service.flex import FlexClient
from service.params import WebChatParams
from service.ratelimit import Unlimited
from service.upstream import USER_AGENT, TwilioHttp, parse_retry_after

ADDRESS = "IG" + "ab" * 16
CREATED = {"conversation_sid": "CH" + "0" * 32, "identity": "guest"}


def settings(**overrides: object) -> Settings:
    values: dict[str, object] = {
        "username": "AC" + "1" * 32,
        "password": Secret("s3cret-token"),
        "base_url": "https://flex-api.twilio.com",
        "max_attempts": 4,
        "latency_estimate": 0.05,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


class Upstream:
    """Answers from a script; records every request and every backoff sleep."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []
        self.sleeps: list[float] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if self.answers else httpx.Response(201, json=CREATED)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def client(self, **overrides: object) -> FlexClient:
        config = settings(**overrides)
        http = httpx.AsyncClient(
            transport=httpx.MockTransport(self.handler),
            auth=httpx.BasicAuth(config.username, config.password.reveal()),
            headers={"User-Agent": USER_AGENT},
        )
        return FlexClient(TwilioHttp(http, config, sleep=self.sleep), config, Unlimited())


def create(client: FlexClient, retry_ambiguous: bool = False, seconds: float = 30, **fields: str):
    params = WebChatParams(address_sid=ADDRESS, **fields)
    return client.create_web_chat(params, Deadline.after(seconds), retry_ambiguous=retry_ambiguous)


def twilio_error(status: int, code: int, **headers: str) -> httpx.Response:
    body = {
        "code": code,
        "message": f"error {code}",
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    return httpx.Response(status, json=body, headers=headers)


async def test_full_request_wire_format() -> None:
    upstream = Upstream()
    chat = await create(
        upstream.client(ui_version="1.0.0"),
        chat_friendly_name="Chat",
        customer_friendly_name="Ada",
        pre_engagement_data='{"a": 1}',
        identity="ada",
        ui_version="2.0.0",
    )
    assert chat.conversation_sid == CREATED["conversation_sid"]
    [request] = upstream.requests
    assert request.method == "POST"
    assert str(request.url) == "https://flex-api.twilio.com/v2/WebChats"
    assert parse_qsl(request.content.decode()) == [
        ("AddressSid", ADDRESS),
        ("ChatFriendlyName", "Chat"),
        ("CustomerFriendlyName", "Ada"),
        ("PreEngagementData", '{"a": 1}'),
        ("Identity", "ada"),
    ]
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert request.headers["Accept"] == "application/json"
    assert request.headers["Accept-Charset"] == "utf-8"
    assert request.headers["Ui-Version"] == "2.0.0"
    assert request.headers["User-Agent"].startswith("flexwebchat/")
    expected_auth = base64.b64encode(f"{'AC' + '1' * 32}:s3cret-token".encode()).decode()
    assert request.headers["Authorization"] == f"Basic {expected_auth}"


async def test_minimal_request_omits_empty_fields_and_header() -> None:
    upstream = Upstream()
    await create(upstream.client())
    [request] = upstream.requests
    assert parse_qsl(request.content.decode()) == [("AddressSid", ADDRESS)]
    assert "Ui-Version" not in request.headers


# (answers, retry_ambiguous) -> (attempts, outcome)
RETRY_CASES: list[
    tuple[str, list[Callable[[], httpx.Response | Exception]], bool, int, type | None]
] = [
    ("503 then ok", [lambda: twilio_error(503, 20503)], False, 2, None),
    ("429 then ok", [lambda: twilio_error(429, 20429)], False, 2, None),
    ("connect error then ok", [lambda: httpx.ConnectError("refused")], False, 2, None),
    ("pool timeout then ok", [lambda: httpx.PoolTimeout("pool")], False, 2, None),
    ("500 not retried", [lambda: twilio_error(500, 20500)], False, 1, UpstreamError),
    ("502 not retried", [lambda: twilio_error(502, 20500)], False, 1, UpstreamError),
    ("504 not retried", [lambda: twilio_error(504, 20500)], False, 1, UpstreamError),
    (
        "read timeout not retried",
        [lambda: httpx.ReadTimeout("slow")],
        False,
        1,
        UpstreamUnreachable,
    ),
    (
        "reset after send not retried",
        [lambda: httpx.RemoteProtocolError("closed")],
        False,
        1,
        UpstreamUnreachable,
    ),
    ("500 retried when allowed", [lambda: twilio_error(500, 20500)], True, 2, None),
    ("read timeout retried when allowed", [lambda: httpx.ReadTimeout("slow")], True, 2, None),
    ("400 never retried", [lambda: twilio_error(400, 20001)], True, 1, UpstreamError),
    ("404 never retried", [lambda: twilio_error(404, 20404)], True, 1, UpstreamError),
    ("401 never retried", [lambda: twilio_error(401, 20003)], True, 1, UpstreamError),
    ("503 until attempts run out", [lambda: twilio_error(503, 20503)] * 4, False, 4, UpstreamError),
]


@pytest.mark.parametrize(
    ("name", "answers", "ambiguous_ok", "attempts", "error"),
    RETRY_CASES,
    ids=[c[0] for c in RETRY_CASES],
)
async def test_retry_classes(name, answers, ambiguous_ok, attempts, error) -> None:
    upstream = Upstream(*[make() for make in answers])
    client = upstream.client()
    if error is None:
        await create(client, retry_ambiguous=ambiguous_ok)
    else:
        with pytest.raises(error):
            await create(client, retry_ambiguous=ambiguous_ok)
    assert len(upstream.requests) == attempts
    assert len(upstream.sleeps) == attempts - 1


async def test_backoff_is_exponential_with_full_jitter() -> None:
    upstream = Upstream(*[twilio_error(503, 20503) for _ in range(3)])
    await create(upstream.client())
    # wait_random_exponential(multiplier=0.2): attempt n sleeps uniformly in [0, 0.2 * 2**n].
    for attempt, slept in enumerate(upstream.sleeps, start=1):
        assert 0 <= slept <= 0.2 * 2**attempt


async def test_retry_after_is_honoured() -> None:
    upstream = Upstream(twilio_error(429, 20429, **{"Retry-After": "2"}))
    await create(upstream.client())
    assert upstream.sleeps == [2.0]


async def test_no_backoff_sleeps_past_the_deadline() -> None:
    upstream = Upstream(twilio_error(503, 20503, **{"Retry-After": "5"}))
    with pytest.raises(UpstreamError) as caught:
        await create(upstream.client(), seconds=1.0)
    assert caught.value.http_status == 503
    assert upstream.sleeps == []
    assert len(upstream.requests) == 1


async def test_a_request_in_flight_outlives_its_callers_deadline() -> None:
    """The caller gets DEADLINE_EXCEEDED at its deadline; the request already sent is not
    cancelled (that could leave a conversation nobody hears of) and its result is kept."""
    answered = asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.4)
        answered.set()
        return httpx.Response(201, json=CREATED)

    config = settings(latency_estimate=0.01)
    http = httpx.AsyncClient(transport=httpx.MockTransport(slow))
    client = FlexClient(TwilioHttp(http, config), config, Unlimited())
    executions, kept = Executions(), []
    deadline = Deadline.after(0.2)
    with pytest.raises(DeadlineExceeded, match="will finish"):
        await executions.run(
            lambda: create_chat(client, deadline), deadline, after_caller_left=kept.append
        )
    assert executions.in_background == 1
    await executions.drain(within=2)
    assert answered.is_set() and kept and kept[0].conversation_sid == CREATED["conversation_sid"]


async def test_work_that_sent_nothing_is_cancelled_when_the_caller_leaves() -> None:
    sent = []

    async def record(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(201, json=CREATED)

    config = settings(latency_estimate=0.01)
    http = httpx.AsyncClient(transport=httpx.MockTransport(record))
    client = FlexClient(TwilioHttp(http, config), config, Unlimited())
    executions = Executions()

    async def queued_then_create() -> object:
        await asyncio.sleep(1)  # as if waiting for a rate-limit slot
        return await create_chat(client, Deadline.after(5))

    with pytest.raises(DeadlineExceeded):
        await executions.run(queued_then_create, Deadline.after(0.1))
    await asyncio.sleep(0.05)
    assert executions.in_background == 0 and sent == []


async def test_an_attempt_that_cannot_fit_the_deadline_is_not_sent() -> None:
    upstream = Upstream()
    client = upstream.client(latency_estimate=0.5)
    with pytest.raises(DeadlineExceeded, match="round trip"):
        await create(client, seconds=0.3)
    assert upstream.requests == []


def create_chat(client: FlexClient, deadline: Deadline):  # type: ignore[no-untyped-def]
    params = WebChatParams(address_sid=ADDRESS)
    return client.create_web_chat(params, deadline, retry_ambiguous=False)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("not json", "not a JSON object"),
        ("[1, 2]", "not a JSON object"),
        ('{"identity": "x"}', "conversation_sid"),
        ('{"conversation_sid": "CH' + "0" * 31 + '", "identity": "x"}', "conversation_sid"),
        ('{"conversation_sid": "CH' + "0" * 32 + '"}', "identity"),
    ],
)
async def test_unusable_success_bodies_are_faults(body: str, reason: str) -> None:
    upstream = Upstream(httpx.Response(201, text=body))
    with pytest.raises(UpstreamBadResponse, match=reason):
        await create(upstream.client())


@pytest.mark.parametrize(
    ("response", "code", "message"),
    [
        (httpx.Response(404, text="<html>gone</html>"), None, "Not Found"),
        (httpx.Response(400, json={"code": "20001", "message": 7}), None, "Bad Request"),
        (httpx.Response(400, json={"code": True}), None, "Bad Request"),
        (httpx.Response(403, json=["x"]), None, "Forbidden"),
        (
            httpx.Response(400, json={"code": 20001, "message": "Invalid AddressSid"}),
            20001,
            "Invalid AddressSid",
        ),
    ],
)
async def test_error_bodies_are_parsed_defensively(response, code, message) -> None:
    upstream = Upstream(response)
    with pytest.raises(UpstreamError) as caught:
        await create(upstream.client())
    assert caught.value.twilio_code == code
    assert caught.value.message == message


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("3", 3.0),
        ("0.5", 0.5),
        ("-4", 0.0),
        ("9999", 60.0),
        ("soon", None),
        ("nan", None),
    ],
)
def test_parse_retry_after(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header) == seconds


def test_parse_retry_after_http_date() -> None:
    import time
    from email.utils import formatdate

    seconds = parse_retry_after(formatdate(time.time() + 10, usegmt=True))
    assert seconds is not None and 8 <= seconds <= 10
