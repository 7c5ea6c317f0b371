"""TLS, mutual TLS (with certificate reload) and bearer tokens, with real certificates."""

from __future__ import annotations

import datetime
import ipaddress
import os
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from conftest import EmulatorProcess, free_port, rich_status
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from flexwebchat.v1 import webchat_pb2, webchat_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from emulator.harness import ADDRESS_SID

REQUEST = webchat_pb2.CreateWebChatRequest(address_sid=ADDRESS_SID)


@dataclass
class Pem:
    key: bytes
    cert: bytes


def issue(name: str, issuer: Pem | None = None, *, server: bool = False, ca: bool = False) -> Pem:
    key = ec.generate_private_key(ec.SECP256R1())
    # name "": no subject at all (a certificate named only by its subject alternative names)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)] if name else [])
    if issuer is None:
        signer, issuer_name = key, subject
    else:
        signer = serialization.load_pem_private_key(issuer.key, None)
        issuer_name = x509.load_pem_x509_certificate(issuer.cert).subject
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        # Key identifiers: Python 3.13's default SSL context verifies strictly (X509_STRICT)
        # and refuses a chain without them ("Missing Authority Key Identifier").
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if ca:  # X509_STRICT (Python 3.13) also wants a CA's key usage
        usage = x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=True,
            crl_sign=True,
            encipher_only=False,
            decipher_only=False,
        )
        builder = builder.add_extension(usage, critical=True)
    if server:
        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(signer, hashes.SHA256())  # type: ignore[arg-type]
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return Pem(key_pem, cert.public_bytes(serialization.Encoding.PEM))


@pytest.fixture(scope="module")
def pki() -> dict[str, Pem]:
    ca, other_ca = issue("test-ca", ca=True), issue("rogue-ca", ca=True)
    return {
        "ca": ca,
        "other_ca": other_ca,
        "server": issue("localhost", ca, server=True),
        "client": issue("billing-service", ca),
        "rogue_client": issue("billing-service", other_ca),
    }


def write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def tls_env(tmp_path: Path, pki: dict[str, Pem], mutual: bool) -> dict[str, str]:
    env = {
        "TLS_CERT_FILE": write(tmp_path, "server.crt", pki["server"].cert),
        "TLS_KEY_FILE": write(tmp_path, "server.key", pki["server"].key),
        "HEALTH_PORT": str(free_port()),
    }
    if mutual:
        env["TLS_CLIENT_CA_FILE"] = write(tmp_path, "ca.crt", pki["ca"].cert)
    return env


def call(
    target: str, root: bytes, client: Pem | None = None, timeout: float = 5
) -> webchat_pb2.CreateWebChatResponse:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root,
        private_key=client.key if client else None,
        certificate_chain=client.cert if client else None,
    )
    with grpc.secure_channel(target, credentials) as channel:
        return webchat_pb2_grpc.WebChatServiceStub(channel).CreateWebChat(REQUEST, timeout=timeout)


def test_tls_serves_encrypted_and_refuses_plaintext(
    make_facade, upstream: EmulatorProcess, tmp_path, pki
) -> None:
    facade = make_facade(upstream.url, **tls_env(tmp_path, pki, mutual=False))
    assert call(facade.target, pki["ca"].cert).conversation_sid.startswith("CH")
    with pytest.raises(grpc.RpcError) as caught:
        facade.create(timeout=3)  # plaintext channel
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_health_stays_reachable_in_plaintext_for_the_kubelet(
    make_facade, upstream, tmp_path, pki
) -> None:
    env = tls_env(tmp_path, pki, mutual=True)
    make_facade(upstream.url, **env)
    with grpc.insecure_channel(f"127.0.0.1:{env['HEALTH_PORT']}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=3
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as caught:  # and nothing else is served there
            webchat_pb2_grpc.WebChatServiceStub(channel).CreateWebChat(REQUEST, timeout=3)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_mutual_tls_names_the_caller_and_refuses_others(
    make_facade, upstream, tmp_path, pki
) -> None:
    facade = make_facade(upstream.url, **tls_env(tmp_path, pki, mutual=True))

    assert call(facade.target, pki["ca"].cert, pki["client"]).conversation_sid.startswith("CH")
    for wrong in (None, pki["rogue_client"]):  # no certificate; one from another CA
        with pytest.raises(grpc.RpcError) as caught:
            call(facade.target, pki["ca"].cert, wrong, timeout=3)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(upstream.requests()) == 1
    [line] = facade.rpc_lines()
    assert line["caller"] == "billing-service"


@pytest.mark.parametrize("name", ["", "anonymous"], ids=["no common name", "anonymous"])
def test_a_client_certificate_must_name_a_caller(
    make_facade, upstream, tmp_path, pki, name: str
) -> None:
    """Without a name, or named "anonymous", two services' certificates would share the records
    of unauthenticated callers: each would replay the other's conversations."""
    facade = make_facade(upstream.url, **tls_env(tmp_path, pki, mutual=True))
    unnamed = issue(name, pki["ca"])
    with pytest.raises(grpc.RpcError) as caught:
        call(facade.target, pki["ca"].cert, unnamed, timeout=3)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "common name" in (caught.value.details() or "")
    assert upstream.requests() == []


def test_rotated_certificates_apply_without_restart(make_facade, upstream, tmp_path, pki) -> None:
    env = tls_env(tmp_path, pki, mutual=False)
    facade = make_facade(upstream.url, **env)
    call(facade.target, pki["ca"].cert)

    new_ca = issue("rotated-ca", ca=True)
    new_server = issue("localhost", new_ca, server=True)
    time.sleep(0.01)
    Path(env["TLS_KEY_FILE"]).write_bytes(new_server.key)
    Path(env["TLS_CERT_FILE"]).write_bytes(new_server.cert)
    future = time.time() + 5  # a distinct mtime even on coarse file systems
    for name in ("TLS_KEY_FILE", "TLS_CERT_FILE"):
        os.utime(env[name], (future, future))

    assert call(facade.target, new_ca.cert).conversation_sid.startswith("CH")
    with pytest.raises(grpc.RpcError):
        call(facade.target, pki["ca"].cert, timeout=3)
    assert facade.proc.poll() is None


@pytest.fixture
def token_facade(make_facade, upstream, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(
        "# name:token, one per calling service\n"
        "billing:tok-billing-0123456789abcdef\n"
        "support:tok-support-0123456789abcdef\n"
    )
    return make_facade(upstream.url, AUTH_TOKENS_FILE=str(tokens)), tokens


def test_bearer_tokens_name_the_caller(token_facade, upstream) -> None:
    facade, _ = token_facade
    reply = facade.stub.CreateWebChat(
        REQUEST, metadata=[("authorization", "Bearer tok-support-0123456789abcdef")], timeout=5
    )
    assert reply.conversation_sid.startswith("CH")
    [line] = facade.rpc_lines()
    assert line["caller"] == "support"
    metrics = httpx.get(f"http://127.0.0.1:{facade.metrics_port}/metrics").text
    assert (
        'flexwebchat_rpcs_total{caller="support",code="OK",method="CreateWebChat"} 1.0' in metrics
    )


@pytest.mark.parametrize(
    "metadata",
    [
        [],
        [("authorization", "Bearer wrong-token-0123456789abcdef")],
        [("authorization", "tok-billing-0123456789abcdef")],
    ],
    ids=["missing", "wrong", "no-scheme"],
)
def test_missing_or_wrong_token_is_unauthenticated(token_facade, upstream, metadata) -> None:
    facade, _ = token_facade
    with pytest.raises(grpc.RpcError) as caught:
        facade.stub.CreateWebChat(REQUEST, metadata=metadata, timeout=5)
    assert rich_status(caught.value)["code"] == grpc.StatusCode.UNAUTHENTICATED
    assert upstream.requests() == []
    assert "tok-billing" not in facade.logs() and "wrong-token" not in facade.logs()


def test_health_and_reflection_need_no_token(token_facade) -> None:
    facade, _ = token_facade
    reply = health_pb2_grpc.HealthStub(facade.channel).Check(
        health_pb2.HealthCheckRequest(), timeout=3
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    from test_grpcurl import grpcurl

    assert "flexwebchat.v1.WebChatService" in grpcurl(facade.target, "list").stdout


def test_token_file_changes_apply_without_restart(token_facade) -> None:
    facade, tokens = token_facade
    tokens.write_text("billing:tok-billing-rotated-0123456789\n")
    future = time.time() + 5
    os.utime(tokens, (future, future))
    time.sleep(1.1)  # the file is checked at most once a second
    new = [("authorization", "Bearer tok-billing-rotated-0123456789")]
    old = [("authorization", "Bearer tok-support-0123456789abcdef")]
    assert facade.stub.CreateWebChat(REQUEST, metadata=new, timeout=5).conversation_sid
    with pytest.raises(grpc.RpcError) as caught:
        facade.stub.CreateWebChat(REQUEST, metadata=old, timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_idempotency_records_are_kept_apart_per_caller(token_facade, upstream) -> None:
    # Another caller who learns (or guesses, or logs) a request_id must not receive the first
    # caller's conversation and guest identity by replaying it.
    facade, _ = token_facade
    request = webchat_pb2.CreateWebChatRequest(
        address_sid=ADDRESS_SID, request_id="5b0c1d7e-2f3a-4b5c-8d9e-0f1a2b3c4d5e"
    )

    def as_caller(token: str) -> webchat_pb2.CreateWebChatResponse:
        metadata = [("authorization", f"Bearer {token}")]
        return facade.stub.CreateWebChat(request, metadata=metadata, timeout=5)  # type: ignore[no-any-return]

    billing = as_caller("tok-billing-0123456789abcdef")
    support = as_caller("tok-support-0123456789abcdef")
    assert support.conversation_sid != billing.conversation_sid
    assert support.identity != billing.identity
    assert as_caller("tok-billing-0123456789abcdef") == billing  # still idempotent per caller
    assert len(upstream.requests()) == 2


def test_revocation_applies_beside_a_bad_line(token_facade) -> None:
    facade, tokens = token_facade
    before = tokens.stat()
    # support is removed in the same edit that adds a malformed line; same size and mtime.
    tokens.write_text("billing:tok-billing-0123456789abcdef\nsupport tok-support-012345678\n")
    os.utime(tokens, ns=(before.st_atime_ns, before.st_mtime_ns))
    time.sleep(1.1)
    billing = [("authorization", "Bearer tok-billing-0123456789abcdef")]
    support = [("authorization", "Bearer tok-support-0123456789abcdef")]
    assert facade.stub.CreateWebChat(REQUEST, metadata=billing, timeout=5).conversation_sid
    with pytest.raises(grpc.RpcError) as caught:
        facade.stub.CreateWebChat(REQUEST, metadata=support, timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    [error] = [line for line in facade.log_lines() if line["level"] == "error"]
    assert error["file"] == "AUTH_TOKENS_FILE" and "line 2" in error["error"]
    assert "tok-support" not in facade.logs()


def test_caller_names_are_plain_and_anonymous_is_reserved(token_facade, upstream) -> None:
    """Unauthenticated callers' records are filed under "anonymous": a token by that name (e.g.
    after auth was turned on over a shared Redis) would replay them. Names that look or decode
    alike (invalid UTF-8, zero-width characters) would merge or disguise callers."""
    facade, tokens = token_facade
    tokens.write_bytes(
        b"\xef\xbb\xbfbilling:tok-billing-0123456789abcdef\n"  # a byte-order mark: ignored
        b"Anonymous:tok-anon-0123456789abcdef\n"
        b"caf\xe9:tok-cafe-0123456789abcdef\n"
        + "bil\u200bling:tok-zero-width-0123456789\n".encode()
    )
    time.sleep(1.1)
    billing = [("authorization", "Bearer tok-billing-0123456789abcdef")]
    assert facade.stub.CreateWebChat(REQUEST, metadata=billing, timeout=5).conversation_sid
    for token in ("tok-anon-0123456789abcdef", "tok-cafe-0123456789abcdef"):
        with pytest.raises(grpc.RpcError) as caught:
            facade.stub.CreateWebChat(
                REQUEST, metadata=[("authorization", f"Bearer {token}")], timeout=5
            )
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    errors = [line["error"] for line in facade.log_lines() if line["level"] == "error"]
    assert [e.split(":")[0] for e in errors] == ["line 2", "line 3", "line 4"]
    assert "reserved" in errors[0]
    assert [line["caller"] for line in facade.rpc_lines() if line["code"] == "OK"] == ["billing"]
    assert len(upstream.requests()) == 1


@pytest.mark.parametrize("change", ["emptied", "deleted"])
def test_an_emptied_or_deleted_token_file_denies_every_call(token_facade, change: str) -> None:
    facade, tokens = token_facade
    if change == "emptied":
        tokens.write_text("# nobody\n")
    else:
        tokens.unlink()
    time.sleep(1.1)
    for token in ("tok-billing-0123456789abcdef", "tok-support-0123456789abcdef"):
        with pytest.raises(grpc.RpcError) as caught:
            facade.stub.CreateWebChat(
                REQUEST, metadata=[("authorization", f"Bearer {token}")], timeout=5
            )
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert [line["level"] for line in facade.log_lines() if line["level"] == "error"] == ["error"]
    metrics = httpx.get(f"http://127.0.0.1:{facade.metrics_port}/metrics").text
    assert 'flexwebchat_config_reload_failures_total{file="AUTH_TOKENS_FILE"} 1.0' in metrics


@pytest.mark.parametrize("broken", ["mismatched key", "garbage certificate"])
def test_a_refused_certificate_rotation_is_an_error_and_the_old_one_stays(
    make_facade, upstream, tmp_path, pki, broken: str
) -> None:
    env = tls_env(tmp_path, pki, mutual=False)
    facade = make_facade(upstream.url, **env)
    other = issue("localhost", pki["ca"], server=True)
    if broken == "mismatched key":
        Path(env["TLS_KEY_FILE"]).write_bytes(other.key)  # the certificate stays the old one
    else:
        Path(env["TLS_CERT_FILE"]).write_bytes(b"-----BEGIN CERTIFICATE-----\nnot one\n")
    assert call(facade.target, pki["ca"].cert).conversation_sid.startswith("CH")
    assert call(facade.target, pki["ca"].cert).conversation_sid.startswith("CH")
    [error] = [line for line in facade.log_lines() if line["level"] == "error"]
    assert error["msg"] == "new TLS files refused; keeping the previous ones"
    assert "reloaded TLS certificates" not in facade.logs()
    metrics = httpx.get(f"http://127.0.0.1:{facade.metrics_port}/metrics").text
    assert 'flexwebchat_config_reload_failures_total{file="TLS_CERT_FILE"} 1.0' in metrics


def test_mutual_tls_can_allow_only_named_clients(make_facade, upstream, tmp_path, pki) -> None:
    env = tls_env(tmp_path, pki, mutual=True)
    facade = make_facade(upstream.url, TLS_CLIENT_NAMES="billing-service, support", **env)
    assert call(facade.target, pki["ca"].cert, pki["client"]).conversation_sid.startswith("CH")
    intruder = issue("intranet-crawler", pki["ca"])  # same CA, another name
    with pytest.raises(grpc.RpcError) as caught:
        call(facade.target, pki["ca"].cert, intruder)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert len(upstream.requests()) == 1


def test_bearer_tokens_over_plaintext_are_warned_about(token_facade) -> None:
    facade, _ = token_facade
    [warning] = [line for line in facade.log_lines() if line["level"] == "warning"]
    assert warning["msg"].startswith("bearer tokens are accepted over plaintext")


def test_with_tokens_and_client_names_both_must_hold(make_facade, upstream, tmp_path, pki) -> None:
    """A bearer token leaked to a machine whose certificate (from the same CA) is outside
    TLS_CLIENT_NAMES is refused; a listed certificate still needs a token, which names the
    caller."""
    tokens = tmp_path / "tokens"
    tokens.write_text(
        "billing:tok-billing-0123456789abcdef\nsupport:tok-support-0123456789abcdef\n"
    )
    env = tls_env(tmp_path, pki, mutual=True)
    facade = make_facade(
        upstream.url, TLS_CLIENT_NAMES="billing-service", AUTH_TOKENS_FILE=str(tokens), **env
    )
    intruder = issue("intranet-crawler", pki["ca"])

    def call_as(client: Pem, token: str | None) -> webchat_pb2.CreateWebChatResponse:
        credentials = grpc.ssl_channel_credentials(pki["ca"].cert, client.key, client.cert)
        metadata = [("authorization", f"Bearer {token}")] if token else []
        with grpc.secure_channel(facade.target, credentials) as channel:
            stub = webchat_pb2_grpc.WebChatServiceStub(channel)
            return stub.CreateWebChat(REQUEST, metadata=metadata, timeout=5)  # type: ignore[no-any-return]

    for token in ("tok-billing-0123456789abcdef", "tok-support-0123456789abcdef"):
        assert call_as(pki["client"], token).conversation_sid.startswith("CH")
    for client, token in (
        (intruder, "tok-support-0123456789abcdef"),
        (intruder, "tok-billing-0123456789abcdef"),
        (pki["client"], None),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call_as(client, token)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert len(upstream.requests()) == 2
    callers = [line["caller"] for line in facade.rpc_lines(count=5) if line["code"] == "OK"]
    assert callers == ["billing", "support"]
