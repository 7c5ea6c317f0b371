"""The committed generated code is what `make proto` produces from the committed proto."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

GENERATED = ("webchat_pb2.py", "webchat_pb2.pyi", "webchat_pb2_grpc.py")


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iproto",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            "proto/flexwebchat/v1/webchat.proto",
        ],
        check=True,
        cwd=ROOT,
    )
    committed = ROOT / "generated/flexwebchat/v1"
    for name in GENERATED:
        assert filecmp.cmp(tmp_path / "flexwebchat/v1" / name, committed / name, shallow=False), (
            f"generated/flexwebchat/v1/{name} is stale: run `make proto` and commit the result"
        )


def test_generated_package_imports_by_its_proto_package() -> None:
    from flexwebchat.v1 import webchat_pb2, webchat_pb2_grpc

    assert webchat_pb2.DESCRIPTOR.package == "flexwebchat.v1"
    assert hasattr(webchat_pb2_grpc, "WebChatServiceStub")
