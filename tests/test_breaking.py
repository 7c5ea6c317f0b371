"""The breaking-change gate (`make breaking`, run by `make lint`) against the committed baseline.

Each case edits a copy of buf.yaml + proto/ + the baseline, never the checkout itself.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

PROTO = Path("proto/flexwebchat/v1/webchat.proto")


def api_copy(tmp_path: Path, edit: tuple[str, str] | None = None) -> Path:
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    for name in ("buf.yaml", "api-baseline.binpb"):
        shutil.copy(ROOT / name, tmp_path / name)
    if edit is not None:
        text = (tmp_path / PROTO).read_text()
        assert edit[0] in text, f"the proto no longer contains {edit[0]!r}"
        (tmp_path / PROTO).write_text(text.replace(edit[0], edit[1], 1))
    return tmp_path


def breaking(api: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-s", "breaking", f"API={api}"], cwd=ROOT, capture_output=True, text=True
    )


def test_the_checked_in_proto_passes_the_gate(tmp_path: Path) -> None:
    result = breaking(api_copy(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_adding_a_field_and_a_method_is_not_breaking(tmp_path: Path) -> None:
    api = api_copy(tmp_path)
    text = (api / PROTO).read_text()
    for anchor, addition in [
        ("message CreateWebChatRequest {\n", "  string added_by_test = 1000;\n"),
        (
            "service WebChatService {\n",
            "  rpc AddedByTest(CreateWebChatRequest) returns (CreateWebChatResponse);\n",
        ),
    ]:
        assert anchor in text
        text = text.replace(anchor, anchor + addition, 1)
    (api / PROTO).write_text(text)
    result = breaking(api)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("edit", "complaint"),
    [
        # A renumbered field: old clients' address_sid lands in an unknown field.
        (("string address_sid = 1;", "string address_sid = 10;"), "address_sid"),
        # A changed type: the bytes on the wire mean something else.
        (("string request_id = 7;", "int64 request_id = 7;"), "request_id"),
        # A removed method: every caller's generated stub loses it.
        (
            ("rpc CreateWebChat(CreateWebChatRequest) returns (CreateWebChatResponse);", ""),
            "CreateWebChat",
        ),
    ],
    ids=["renumbered-field", "changed-type", "removed-method"],
)
def test_a_breaking_edit_fails_the_gate(
    tmp_path: Path, edit: tuple[str, str], complaint: str
) -> None:
    result = breaking(api_copy(tmp_path, edit))
    assert result.returncode != 0
    assert complaint in result.stdout + result.stderr
