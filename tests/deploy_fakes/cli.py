"""A fake ``gcloud`` and ``docker``: record every call and answer from a JSON "world".

Run as ``python cli.py gcloud|docker ARGS...`` (the wrappers :func:`install` writes put that on
``PATH`` under the real names). Every call is appended to ``$FAKE_LOG`` as one JSON line
``{"tool": ..., "argv": [...]}`` *before* it is handled, so a failing call is recorded too.
The world (``$FAKE_WORLD``, a JSON file) is the project's state; commands that create
something change it, so a second run sees what the first one made.

Only the commands the deployment files use are understood; anything else exits 97 naming the
call, so a new command in the script fails its tests until the fake learns it. Value flags must
be written ``--flag=value`` (the style of the deployment files); a bare ``--flag`` is a switch.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

UNHANDLED = 97

READ_ONLY: frozenset[tuple[str, ...]] = frozenset(
    {
        ("gcloud", "config", "get-value"),
        ("gcloud", "services", "list"),
        ("gcloud", "secrets", "versions", "describe"),
        ("gcloud", "iam", "service-accounts", "describe"),
        ("gcloud", "storage", "buckets", "describe"),
        ("gcloud", "artifacts", "repositories", "describe"),
        ("gcloud", "run", "services", "describe"),
        ("docker", "info"),
    }
)
"""Commands that change nothing (the only ones a dry run may run)."""

_COMMAND_WORDS = {"gcloud": 2, "docker": 1}
"""How many leading positional words name a command (the rest are its arguments); a few gcloud
groups take three (``gcloud run services describe``)."""


def world_template(project: str = "demo-project", region: str = "us-central1") -> dict[str, Any]:
    """A project where everything the deployment needs exists, except the Artifact Registry
    repository (created by the first run) and the service itself."""
    return {
        "project": project,
        "enabled_apis": [
            "run.googleapis.com",
            "artifactregistry.googleapis.com",
            "cloudbuild.googleapis.com",
            "secretmanager.googleapis.com",
        ],
        "secrets": {
            "API_SECRET_KEY": "ENABLED",
            "GEMINI_API_KEY": "ENABLED",
            "ELEVENLABS_API_KEY": "ENABLED",
        },
        "service_accounts": [f"sync-hire-agent@{project}.iam.gserviceaccount.com"],
        "buckets": [f"{project}-sync-hire-outbox"],
        "repositories": [],
        "services": {},
        "built": [],
        "pushed": [],
        "service_url": "http://127.0.0.1:9",
        "docker_daemon": True,
    }


@dataclass
class Call:
    """One parsed call: the command words, its positional arguments, its flags."""

    tool: str
    argv: list[str]
    words: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    flags: dict[str, str | bool] = field(default_factory=dict)

    @classmethod
    def parse(cls, tool: str, argv: list[str]) -> Call:
        call = cls(tool, list(argv))
        positional = []
        for item in argv:
            if item.startswith("--"):
                name, eq, value = item[2:].partition("=")
                call.flags[name] = value if eq else True
            else:
                positional.append(item)
        n = _COMMAND_WORDS[tool]
        if tool == "gcloud" and (
            positional[:1] in (["secrets"], ["iam"], ["storage"], ["artifacts"])
            or positional[:2] == ["run", "services"]
        ):
            n = 3  # gcloud GROUP SUBGROUP VERB
        call.words, call.args = positional[:n], positional[n:]
        return call

    @property
    def command(self) -> tuple[str, ...]:
        return (self.tool, *self.words)

    @property
    def read_only(self) -> bool:
        return self.command in READ_ONLY


def load_calls(log: Path) -> list[Call]:
    """Every call recorded in ``log``, parsed, in order."""
    if not log.exists():
        return []
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [Call.parse(row["tool"], row["argv"]) for row in rows]


class Fail(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _gcloud(call: Call, world: dict[str, Any]) -> str:
    cmd, a, f = tuple(call.words), call.args, call.flags
    fmt = f.get("format")
    if cmd == ("config", "get-value") and a == ["project"]:
        return world["project"] or ""
    if cmd == ("services", "list"):
        return "\n".join(world["enabled_apis"])
    if cmd == ("services", "enable"):
        world["enabled_apis"] += [x for x in a if x not in world["enabled_apis"]]
        return ""
    if cmd == ("secrets", "versions", "describe") and a == ["latest"]:
        state = world["secrets"].get(str(f.get("secret")))
        if state is None:
            raise Fail(f"NOT_FOUND: Secret [{f.get('secret')}] not found")
        return state if fmt == "value(state)" else f"state: {state}"
    if cmd == ("iam", "service-accounts", "describe"):
        if a[0] not in world["service_accounts"]:
            raise Fail(f"NOT_FOUND: Unknown service account {a[0]}")
        return a[0]
    if cmd == ("storage", "buckets", "describe"):
        name = a[0].removeprefix("gs://")
        if name not in world["buckets"]:
            raise Fail(f"The specified bucket does not exist: {name}")
        return name
    if cmd[:2] == ("artifacts", "repositories"):
        key = f"{f.get('location')}/{a[0]}"
        if cmd[2] == "describe":
            if key not in world["repositories"]:
                raise Fail(f"NOT_FOUND: Repository {a[0]} not found")
            return key
        if cmd[2] == "create":
            if key in world["repositories"]:
                raise Fail(f"ALREADY_EXISTS: the repository already exists: {a[0]}")
            world["repositories"].append(key)
            return ""
    if cmd == ("auth", "configure-docker"):
        config_dir = Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker")
        config_dir.mkdir(parents=True, exist_ok=True)
        path = config_dir / "config.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        data.setdefault("credHelpers", {})[a[0]] = "gcloud"
        path.write_text(json.dumps(data))
        return ""
    if cmd == ("builds", "submit"):
        if not (Path(a[0]) / "Dockerfile").exists():
            raise Fail(f"no Dockerfile in {a[0]}")
        world["built"].append(f["tag"])
        world["pushed"].append(f["tag"])
        return ""
    if cmd[:2] == ("run", "deploy"):
        return _deploy(call, world)
    if cmd == ("run", "services", "describe"):
        service = world["services"].get(a[0])
        if service is None:
            raise Fail(f"Cannot find service [{a[0]}]")
        if fmt == "value(status.url)":
            return str(service["url"])
        if fmt == "value(status.latestReadyRevisionName)":
            return str(service["revision"])
    raise Fail(f"fake gcloud: unhandled call: gcloud {' '.join(call.argv)}", UNHANDLED)


def _deploy(call: Call, world: dict[str, Any]) -> str:
    service = call.args[0]
    image = str(call.flags.get("image"))
    if image not in world["pushed"]:
        raise Fail(f"Image '{image}' not found (it was never pushed)")
    old = world["services"].get(service)
    n = 1 + (int(old["revision"].rsplit("-", 1)[1]) if old else 0)
    world["services"][service] = {
        "url": world["service_url"],
        "revision": f"{service}-{n:05d}",
        "image": image,
    }
    return ""


def _docker(call: Call, world: dict[str, Any]) -> str:
    cmd, a, f = tuple(call.words), call.args, call.flags
    if cmd == ("info",):
        if not world["docker_daemon"]:
            raise Fail("Cannot connect to the Docker daemon at unix:///var/run/docker.sock.")
        return "Server Version: fake"
    if cmd == ("build",):
        if not (Path(a[0]) / "Dockerfile").exists():
            raise Fail(f"unable to prepare context: no Dockerfile in {a[0]}")
        world["built"].append(f["tag"])
        return ""
    if cmd == ("push",):
        if a[0] not in world["built"]:
            raise Fail(f"An image does not exist locally with the tag: {a[0]}")
        world["pushed"].append(a[0])
        return ""
    raise Fail(f"fake docker: unhandled call: docker {' '.join(call.argv)}", UNHANDLED)


def main(argv: list[str]) -> int:
    tool, args = argv[0], argv[1:]
    log = Path(os.environ["FAKE_LOG"])
    world_path = Path(os.environ["FAKE_WORLD"])
    with log.open("a") as out:
        out.write(json.dumps({"tool": tool, "argv": args}) + "\n")
    world = json.loads(world_path.read_text())
    call = Call.parse(tool, args)
    try:
        answer = _gcloud(call, world) if tool == "gcloud" else _docker(call, world)
    except Fail as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return err.code
    except (KeyError, IndexError) as err:
        print(f"fake {tool}: malformed call {args!r}: missing {err}", file=sys.stderr)
        return UNHANDLED
    world_path.write_text(json.dumps(world, indent=1))
    if answer:
        print(answer)
    return 0


def install(bin_dir: Path, tools: tuple[str, ...] = ("gcloud", "docker")) -> None:
    """Write executable wrappers named after ``tools`` into ``bin_dir``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for tool in tools:
        wrapper = bin_dir / tool
        wrapper.write_text(
            f'#!/bin/sh\nexec "{sys.executable}" -I -S "{Path(__file__)}" {tool} "$@"\n'
        )
        wrapper.chmod(0o755)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
