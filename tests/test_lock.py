"""requirements.lock, what the image installs, agrees with pyproject.toml: every runtime pin, the
otel extra and the build backend are locked at the pinned version, with hashes, and nothing is
locked as a direct dependency that pyproject.toml no longer names. When pyproject.toml changes,
`make lock` brings the lock up to date."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field

from conftest import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

LOCK = ROOT / "requirements.lock"
STALE = "requirements.lock does not match pyproject.toml: run `make lock` and commit the result"
# How pip-compile names the two kinds of direct requirement in its "# via" comments.
RUNTIME = "flexwebchat (pyproject.toml)"
BUILD = "flexwebchat (pyproject.toml::build-system.requires)"


@dataclass
class Locked:
    version: str
    hashes: list[str] = field(default_factory=list)
    via: list[str] = field(default_factory=list)


def locked(text: str) -> dict[str, Locked]:
    """The lock's packages by canonical name."""
    packages: dict[str, Locked] = {}
    current: Locked | None = None
    for line in text.splitlines():
        if match := re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line):
            current = packages[canonicalize_name(match[1])] = Locked(match[2])
        elif current and (match := re.search(r"--hash=(sha256:[0-9a-f]{64})", line)):
            current.hashes.append(match[1])
        elif current and (match := re.match(r"^\s+#\s+(?:via\s+)?(\S.*)$", line)):
            if match[1] != "via":
                current.via.append(match[1].strip())
    return packages


def pyproject(text: str) -> tuple[list[Requirement], list[Requirement]]:
    """The image's direct requirements (runtime and the otel extra), and the build backend's."""
    project = tomllib.loads(text)
    runtime = (
        project["project"]["dependencies"] + project["project"]["optional-dependencies"]["otel"]
    )
    build = project["build-system"]["requires"]
    return [Requirement(r) for r in runtime], [Requirement(r) for r in build]


def stale(lock_text: str, pyproject_text: str) -> list[str]:
    """Where the lock disagrees with pyproject.toml; empty when it is up to date."""
    packages = locked(lock_text)
    runtime, build = pyproject(pyproject_text)
    problems = []
    for requirement in runtime:
        package = packages.get(canonicalize_name(requirement.name))
        pins = [s.version for s in requirement.specifier if s.operator == "=="]
        if len(pins) != 1 or len(requirement.specifier) != 1:
            problems.append(f"{requirement}: pin the image's dependencies exactly (==)")
        elif package is None or RUNTIME not in package.via:
            problems.append(f"{requirement.name} {pins[0]} is not locked")
        elif package.version != pins[0]:
            problems.append(f"{requirement.name} is {pins[0]}, locked {package.version}")
    for requirement in build:
        package = packages.get(canonicalize_name(requirement.name))
        if package is None or BUILD not in package.via:
            problems.append(f"the build backend's {requirement.name} is not locked")
        elif not requirement.specifier.contains(package.version):
            problems.append(f"{requirement}: locked {package.version}")
    named = {canonicalize_name(r.name) for r in runtime} | {
        canonicalize_name(r.name) for r in build
    }
    for name, package in packages.items():
        if (RUNTIME in package.via or BUILD in package.via) and name not in named:
            problems.append(f"{name} is locked as a requirement pyproject.toml does not name")
    return problems


def test_the_lock_matches_pyproject() -> None:
    problems = stale(LOCK.read_text(), (ROOT / "pyproject.toml").read_text())
    assert not problems, f"{STALE}:\n" + "\n".join(problems)


def test_the_check_sees_a_changed_added_or_removed_dependency() -> None:
    lock, project = LOCK.read_text(), (ROOT / "pyproject.toml").read_text()
    assert '"tenacity==9.2.1"' in project  # the example below changes this pin
    bumped = project.replace('"tenacity==9.2.1"', '"tenacity==9.3.0"')
    assert stale(lock, bumped) == ["tenacity is 9.3.0, locked 9.2.1"]
    added = project.replace('"tenacity==9.2.1",', '"tenacity==9.2.1", "rich==14.0.0",')
    assert stale(lock, added) == ["rich 14.0.0 is not locked"]
    removed = project.replace('"tenacity==9.2.1",', "")
    assert stale(lock, removed) == [
        "tenacity is locked as a requirement pyproject.toml does not name"
    ]
    loose = project.replace('"tenacity==9.2.1"', '"tenacity>=9"')
    assert stale(lock, loose) == ["tenacity>=9: pin the image's dependencies exactly (==)"]


def test_every_locked_package_has_hashes_and_grpcio_is_one_version() -> None:
    packages = locked(LOCK.read_text())
    assert len(packages) > 20  # the transitive dependencies too, not only the direct ones
    assert all(p.hashes for p in packages.values()), [
        n for n, p in packages.items() if not p.hashes
    ]
    # grpcio and its companions are released together and must move together.
    grpc_versions = {p.version for n, p in packages.items() if n.startswith("grpcio")}
    assert len(grpc_versions) == 1, grpc_versions


def test_the_image_installs_exactly_the_lock() -> None:
    """Dependencies only from the lock, checked against its hashes, wheels only (an sdist's build
    would fetch unlocked build tools); the project itself adds none and builds with the locked
    backend."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    runs = [" ".join(r.split()) for r in re.findall(r"^RUN (.*?)(?<!\\)$", dockerfile, re.M | re.S)]
    installs = [r.replace("\\ ", "") for r in runs if "pip install" in r]
    assert len(installs) == 2, installs
    dependencies, project = installs
    assert "--require-hashes" in dependencies and "-r requirements.lock" in dependencies
    assert "--only-binary=:all:" in dependencies
    for flag in ("--no-deps", "--no-build-isolation", "--no-index"):
        assert flag in project
    assert "requirements.lock" in (ROOT / ".dockerignore").read_text()
