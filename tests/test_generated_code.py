"""The committed generated code is what `make proto` produces from the committed proto."""

from __future__ import annotations

import filecmp
import subprocess
from pathlib import Path

from conftest import ROOT

GENERATED = ("webchat_pb2.py", "webchat_pb2.pyi", "webchat_pb2_grpc.py", "webchat_pb2_grpc.pyi")


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run(["make", "-s", "proto", f"GENERATED={tmp_path}"], check=True, cwd=ROOT)
    committed = ROOT / "generated/flexwebchat/v1"
    for name in GENERATED:
        assert filecmp.cmp(tmp_path / "flexwebchat/v1" / name, committed / name, shallow=False), (
            f"generated/flexwebchat/v1/{name} is stale: run `make proto` and commit the result"
        )


def test_generated_package_imports_by_its_proto_package() -> None:
    from flexwebchat.v1 import webchat_pb2, webchat_pb2_grpc

    assert webchat_pb2.DESCRIPTOR.package == "flexwebchat.v1"
    assert hasattr(webchat_pb2_grpc, "WebChatServiceStub")
