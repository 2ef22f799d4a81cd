"""Deployment (issue 8): deploy/deploy-cloud-run.sh and cloudbuild.yaml run against fake
``gcloud`` and ``docker`` (tests/deploy_fakes/cli.py) that record their calls; the Dockerfile,
cloudbuild.yaml, the script and interview/config.py agree; and the image's environment, built
by the Dockerfile's own builder steps in a clean virtual environment, serves /health and holds
an offline interview.

No Docker engine and no Google Cloud account are used. The last test installs the project's
runtime dependencies from the package index (pip's cache makes repeated runs quick); without
an index it is skipped, except under CI=true where it fails.
"""

from __future__ import annotations

import base64
import glob
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml
from deploy_fakes import cli as fake
from deploy_fakes.cloudbuild import (
    SubstitutionError,
    all_strings,
    clean_env,
    default_builtins,
    referenced,
    run_build,
    substitute,
)
from deploy_fakes.dockerfile import Dockerfile, DockerIgnore, Stage, parse
from pydantic import SecretStr

from interview.config import REQUIRED_IN_PRODUCTION, SECRET_FIELDS, Settings, env_name

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "deploy" / "deploy-cloud-run.sh"
SERVICE = "sync-hire-agent"
PROJECT = "demo-project"
WEBHOOK = "https://app.example.com"
TAG = "b-0001"
IMAGE = f"us-central1-docker.pkg.dev/{PROJECT}/sync-hire/{SERVICE}:{TAG}"
CLOUD_TOOLS = frozenset({"gcloud", "docker", "gsutil", "bq", "docker-credential-gcloud"})
ICE = "ICE_SERVERS"  # a list of STUN/TURN servers, credentials included: a secret as a whole


def settings_env_names() -> set[str]:
    return {env_name(name) for name in Settings.model_fields}


def is_secret_field(name: str) -> bool:
    annotation = Settings.model_fields[name.lower()].annotation
    return SecretStr in getattr(annotation, "__args__", (annotation,))


def dockerfile() -> Dockerfile:
    return parse((ROOT / "Dockerfile").read_text())


def cloudbuild() -> dict[str, Any]:
    loaded = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


# --- the sandbox: fakes first on PATH, no real cloud tool anywhere ---------------------------


@pytest.fixture(scope="module")
def system_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Links to every system command except the real gcloud and docker."""
    out = tmp_path_factory.mktemp("system-bin")
    for directory in ("/usr/local/bin", "/usr/bin", "/bin"):
        if not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            target = out / entry.name
            if entry.name in CLOUD_TOOLS or target.exists() or target.is_symlink():
                continue
            if directory == "/usr/local/bin" and entry.name.startswith("docker"):
                continue
            target.symlink_to(entry.path)
    return out


class Health:
    """The deployed service's stand-in: answers GET /health with ``status`` and ``body``."""

    def __init__(self) -> None:
        self.status = 200
        self.body: dict[str, Any] = {"status": "healthy", "config_valid": True}
        self.hits = 0
        health = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                health.hits += self.path == "/health"
                data = json.dumps(health.body).encode()
                self.send_response(health.status if self.path == "/health" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def health() -> Iterator[Health]:
    server = Health()
    yield server
    server.close()


@dataclass
class Run:
    returncode: int
    output: str
    calls: list[fake.Call]

    def commands(self) -> list[tuple[str, ...]]:
        return [c.command for c in self.calls]

    def changes(self) -> list[fake.Call]:
        return [c for c in self.calls if not c.read_only]

    def one(self, *command: str) -> fake.Call:
        found = [c for c in self.calls if c.command == command]
        assert len(found) == 1, f"{command}: {len(found)} calls in {self.commands()}"
        return found[0]


@dataclass
class Cloud:
    """A fake project (the world file), the fake tools, and a way to run things against them."""

    root: Path
    system_bin: Path
    health: Health
    world: dict[str, Any] = field(default_factory=fake.world_template)

    def __post_init__(self) -> None:
        self.world["service_url"] = self.health.url
        self.home = self.root / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.world_path = self.root / "world.json"
        self.save()

    def save(self) -> None:
        self.world_path.write_text(json.dumps(self.world))

    def load(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.world_path.read_text())
        return loaded

    def env(
        self, tools: tuple[str, ...] = ("gcloud", "docker"), **extra: str
    ) -> tuple[dict[str, str], Path]:
        fakes = self.root / ("bin-" + "-".join(tools))
        if not fakes.exists():
            fake.install(fakes, tools)
        log = self.root / f"calls-{time.monotonic_ns()}.jsonl"
        env = clean_env(
            f"{fakes}:{self.system_bin}",
            self.home,
            {"FAKE_WORLD": str(self.world_path), "FAKE_LOG": str(log), **extra},
        )
        return env, log

    def script(
        self,
        *args: str,
        tools: tuple[str, ...] = ("gcloud", "docker"),
        script: Path = SCRIPT,
        environ: dict[str, str] | None = None,
        **extra: str,
    ) -> Run:
        """Run the deploy script; ``environ`` and ``extra`` are its environment ("" = unset)."""
        defaults = {"IMAGE_TAG": TAG, "HEALTH_RETRIES": "0", "NEXTJS_WEBHOOK_URL": WEBHOOK}
        env, log = self.env(tools, **{**defaults, **(environ or {}), **extra})
        env = {k: v for k, v in env.items() if v != ""}  # extra="" means unset
        proc = subprocess.run(
            [str(script), *args],
            cwd=self.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return Run(proc.returncode, proc.stdout + proc.stderr, fake.load_calls(log))

    def build(self, overrides: dict[str, str] | None = None) -> tuple[list[Any], Run]:
        workspace = self.root / "workspace"
        workspace.mkdir(exist_ok=True)
        shutil.copy2(ROOT / "Dockerfile", workspace / "Dockerfile")
        env, log = self.env()
        runs = run_build(
            cloudbuild(),
            workspace=workspace,
            base_env=env,
            builtins=default_builtins(PROJECT, TAG),
            overrides=overrides,
        )
        output = "\n".join(f"[{r.id}] rc={r.returncode}\n{r.output}" for r in runs)
        return runs, Run(runs[-1].returncode, output, fake.load_calls(log))


@pytest.fixture
def cloud(tmp_path: Path, system_bin: Path, health: Health) -> Cloud:
    return Cloud(tmp_path, system_bin, health)


def flag_items(value: str | bool) -> dict[str, str]:
    """``A=1,B=2`` → ``{"A": "1", "B": "2"}``."""
    assert isinstance(value, str)
    return dict(item.split("=", 1) for item in value.split(","))


def secrets_of(deploy: fake.Call) -> dict[str, str]:
    return flag_items(deploy.flags["set-secrets"])


def env_of(deploy: fake.Call) -> dict[str, str]:
    return flag_items(deploy.flags["set-env-vars"])


ALL_SECRETS = {env_name(f) for f in SECRET_FIELDS} | {ICE}
REQUIRED_SECRETS = set(REQUIRED_IN_PRODUCTION) & ALL_SECRETS


def every_secret(cloud: Cloud) -> None:
    cloud.world["secrets"] = dict.fromkeys(sorted(ALL_SECRETS), "ENABLED")
    cloud.save()


# --- the deploy script -----------------------------------------------------------------------


def test_first_run_goes_through_the_nine_steps(cloud: Cloud) -> None:
    cloud.world["enabled_apis"] = ["run.googleapis.com"]
    cloud.save()
    run = cloud.script()
    assert run.returncode == 0, run.output
    changes = [c.command for c in run.changes()]
    assert changes == [
        ("gcloud", "services", "enable"),
        ("gcloud", "artifacts", "repositories", "create"),
        ("gcloud", "auth", "configure-docker"),
        ("docker", "build"),
        ("docker", "push"),
        ("gcloud", "run", "deploy"),
    ]
    commands = run.commands()
    secret_checks = [i for i, c in enumerate(commands) if c[1:3] == ("secrets", "versions")]
    build = commands.index(("docker", "build"))
    assert secret_checks and max(secret_checks) < build  # secrets checked before building
    assert commands.index(("gcloud", "iam", "service-accounts", "describe")) < build
    assert commands.index(("gcloud", "storage", "buckets", "describe")) < build
    describe_url = [c for c in run.calls if c.flags.get("format") == "value(status.url)"]
    assert len(describe_url) == 1 and commands.index(describe_url[0].command) > build
    assert commands[-1] == ("gcloud", "run", "services", "describe")

    enable = run.one("gcloud", "services", "enable")  # only what is missing
    assert sorted(enable.args) == [
        "artifactregistry.googleapis.com",
        "cloudbuild.googleapis.com",
        "secretmanager.googleapis.com",
    ]
    repo = run.one("gcloud", "artifacts", "repositories", "create")
    assert repo.args == ["sync-hire"] and repo.flags["repository-format"] == "docker"
    assert repo.flags["location"] == "us-central1"
    assert run.one("gcloud", "auth", "configure-docker").args == ["us-central1-docker.pkg.dev"]
    build_call = run.one("docker", "build")
    assert build_call.flags["platform"] == "linux/amd64"
    assert build_call.flags["tag"] == IMAGE and build_call.args == [str(ROOT)]
    assert run.one("docker", "push").args == [IMAGE]

    deploy = run.one("gcloud", "run", "deploy")
    assert deploy.args == [SERVICE]
    expected = {
        "image": IMAGE,
        "region": "us-central1",
        "project": PROJECT,
        "min-instances": "1",
        "max-instances": "10",
        "memory": "2Gi",
        "cpu": "2",
        "timeout": "3600",
        "concurrency": "10",
        "port": "8080",
        "execution-environment": "gen2",
        "service-account": f"sync-hire-agent@{PROJECT}.iam.gserviceaccount.com",
    }
    assert {k: deploy.flags.get(k) for k in expected} == expected
    for switch in ("no-cpu-throttling", "session-affinity", "cpu-boost", "allow-unauthenticated"):
        assert deploy.flags.get(switch) is True, switch
    assert flag_items(deploy.flags["add-volume"]) == {
        "name": "outbox",
        "type": "cloud-storage",
        "bucket": f"{PROJECT}-sync-hire-outbox",
    }
    env = env_of(deploy)
    assert env["ENVIRONMENT"] == "production" and env["NEXTJS_WEBHOOK_URL"] == WEBHOOK
    assert "PORT" not in env
    assert secrets_of(deploy) == {n: f"{n}:latest" for n in sorted(REQUIRED_SECRETS)}
    assert cloud.health.hits == 1
    assert f"Deployed: {cloud.health.url}" in run.output
    # every command was printed as it ran
    assert "+ gcloud run deploy sync-hire-agent --image=" in run.output
    assert f"+ docker push {IMAGE}" in run.output


def test_second_run_creates_nothing_that_exists(cloud: Cloud) -> None:
    first = cloud.script()
    assert first.returncode == 0, first.output
    second = cloud.script()
    assert second.returncode == 0, second.output
    assert [c.command for c in second.changes()] == [
        ("docker", "build"),
        ("docker", "push"),
        ("gcloud", "run", "deploy"),
    ]
    assert "exists" in second.output and "already configured" in second.output
    assert cloud.load()["services"][SERVICE]["revision"] == f"{SERVICE}-00002"


def test_dry_run_prints_everything_and_changes_nothing(cloud: Cloud) -> None:
    cloud.world["enabled_apis"] = []
    cloud.save()
    before = cloud.load()
    run = cloud.script("--dry-run")
    assert run.returncode == 0, run.output
    assert run.calls and all(c.read_only for c in run.calls), run.commands()
    assert cloud.load() == before
    assert not (cloud.home / ".docker").exists()
    assert cloud.health.hits == 0
    for printed in (
        "+ gcloud services enable run.googleapis.com",
        "+ gcloud artifacts repositories create sync-hire",
        "+ gcloud auth configure-docker us-central1-docker.pkg.dev",
        f"+ docker build --platform=linux/amd64 --tag={IMAGE}",
        f"+ docker push {IMAGE}",
        "+ gcloud run deploy sync-hire-agent",
        "+ curl",
    ):
        assert printed in run.output, printed
    assert "nothing was changed" in run.output


def test_dry_run_reports_what_would_stop_a_real_run(cloud: Cloud) -> None:
    cloud.world["secrets"] = {}
    cloud.save()
    run = cloud.script("--dry-run")
    assert run.returncode == 1
    assert all(c.read_only for c in run.calls)
    for name in REQUIRED_SECRETS:
        assert f"secret {name} is missing" in run.output
    assert "+ gcloud run deploy" in run.output  # the dry run still shows the rest


def test_missing_prerequisites_stop_before_anything_is_built_naming_every_one(
    cloud: Cloud,
) -> None:
    cloud.world["secrets"] = {"STREAM_API_KEY": "ENABLED", "GEMINI_API_KEY": "DISABLED"}
    cloud.world["buckets"] = []
    cloud.world["service_accounts"] = []
    cloud.save()
    run = cloud.script(NEXTJS_WEBHOOK_URL="")
    assert run.returncode == 1
    assert run.changes() == [], run.commands()
    # every missing secret is named, not just the first: exactly the production requirements
    # of interview/config.py that are secrets
    named = set(re.findall(r"secret ([A-Z_]+) is missing", run.output))
    assert named == REQUIRED_SECRETS == set(REQUIRED_IN_PRODUCTION) - {"NEXTJS_WEBHOOK_URL"}
    assert "NEXTJS_WEBHOOK_URL is not set" in run.output  # the requirement that is no secret
    assert "STREAM_API_KEY and STREAM_API_SECRET go together" in run.output
    assert f"service account sync-hire-agent@{PROJECT}.iam.gserviceaccount.com" in run.output
    assert f"bucket gs://{PROJECT}-sync-hire-outbox" in run.output
    assert f"gcloud secrets create {sorted(REQUIRED_SECRETS)[0]} --data-file=-" in run.output
    checked = {
        str(c.flags["secret"]) for c in run.calls if c.command[1:3] == ("secrets", "versions")
    }
    assert checked == ALL_SECRETS


@pytest.mark.parametrize("why", ["no docker", "no daemon", "asked"])
def test_without_docker_the_image_is_built_by_cloud_build(cloud: Cloud, why: str) -> None:
    tools: tuple[str, ...] = ("gcloud",) if why == "no docker" else ("gcloud", "docker")
    cloud.world["docker_daemon"] = why != "no daemon"
    cloud.save()
    extra = {"USE_CLOUD_BUILD": "1"} if why == "asked" else {}
    run = cloud.script(tools=tools, environ=extra)
    assert run.returncode == 0, run.output
    assert not [c for c in run.calls if c.tool == "docker" and c.command != ("docker", "info")]
    assert ("gcloud", "auth", "configure-docker") not in run.commands()
    submit = run.one("gcloud", "builds", "submit")
    assert submit.args == [str(ROOT)] and submit.flags["tag"] == IMAGE
    assert run.one("gcloud", "run", "deploy").flags["image"] == IMAGE


def test_without_gcloud_it_stops_at_once(cloud: Cloud) -> None:
    run = cloud.script(tools=("docker",))
    assert run.returncode == 1
    assert "gcloud not found" in run.output and run.calls == []


def test_project_region_and_names_are_configurable(cloud: Cloud) -> None:
    cloud.world["service_accounts"].append("sync-hire-agent@other.iam.gserviceaccount.com")
    cloud.world["buckets"].append("other-sync-hire-outbox")
    cloud.save()
    run = cloud.script(GCP_PROJECT_ID="other", GCP_REGION="europe-west1", AR_REPOSITORY="images")
    assert run.returncode == 0, run.output
    assert ("gcloud", "config", "get-value") not in run.commands()
    image = f"europe-west1-docker.pkg.dev/other/images/{SERVICE}:{TAG}"
    assert run.one("docker", "push").args == [image]
    deploy = run.one("gcloud", "run", "deploy")
    assert deploy.flags["region"] == "europe-west1" and deploy.flags["project"] == "other"
    assert "europe-west1/images" in cloud.load()["repositories"]
    cloud.world["project"] = None  # neither GCP_PROJECT_ID nor a configured project
    cloud.save()
    unset = cloud.script()
    assert unset.returncode == 1 and "no project" in unset.output


def test_development_needs_only_the_api_key(cloud: Cloud) -> None:
    cloud.world["secrets"] = {"API_SECRET_KEY": "ENABLED"}
    cloud.save()
    run = cloud.script("development", NEXTJS_WEBHOOK_URL="")
    assert run.returncode == 0, run.output
    deploy = run.one("gcloud", "run", "deploy")
    assert env_of(deploy)["ENVIRONMENT"] == "development"
    assert "NEXTJS_WEBHOOK_URL" not in env_of(deploy)
    assert secrets_of(deploy) == {"API_SECRET_KEY": "API_SECRET_KEY:latest"}


def test_optional_secrets_are_mounted_when_they_exist_and_all_are_settings(cloud: Cloud) -> None:
    every_secret(cloud)
    run = cloud.script(EXTRA_ENV_VARS="MAX_INTERVIEWS=8,LOG_LEVEL=DEBUG")
    assert run.returncode == 0, run.output
    deploy = run.one("gcloud", "run", "deploy")
    mounted = secrets_of(deploy)
    assert mounted == {n: f"{n}:latest" for n in ALL_SECRETS}
    # every secret interview/config.py knows can be mounted, and each is a setting
    assert {env_name(f) for f in SECRET_FIELDS} <= set(mounted) <= settings_env_names()
    assert all(is_secret_field(n) for n in set(mounted) - {ICE})
    env = env_of(deploy)
    assert env["MAX_INTERVIEWS"] == "8" and env["LOG_LEVEL"] == "DEBUG"
    assert set(env) <= settings_env_names()


@pytest.mark.parametrize(
    ("args", "extra", "message"),
    [
        (("staging",), {}, "unknown argument: staging"),
        ((), {"EXTRA_ENV_VARS": "PORT=9000"}, "PORT is reserved"),
        ((), {"EXTRA_ENV_VARS": "GEMINI_API_KEY=x"}, "is a secret"),
        ((), {"EXTRA_ENV_VARS": "not-a-pair"}, "is not KEY=VALUE"),
        ((), {"NEXTJS_WEBHOOK_URL": "https://a.example,b"}, "without commas"),
        ((), {"NEXTJS_WEBHOOK_URL": "app.example.com"}, "must be an http(s) URL"),
    ],
)
def test_bad_input_is_refused_before_anything_changes(
    cloud: Cloud, args: tuple[str, ...], extra: dict[str, str], message: str
) -> None:
    run = cloud.script(*args, environ=extra)
    assert run.returncode != 0
    assert message in run.output
    assert run.changes() == []


def test_a_failing_health_check_fails_the_run_and_says_how_to_roll_back(cloud: Cloud) -> None:
    cloud.world["repositories"] = ["us-central1/sync-hire"]
    cloud.world["services"] = {
        SERVICE: {"url": cloud.health.url, "revision": f"{SERVICE}-00007", "image": "old"}
    }
    cloud.save()
    cloud.health.status = 503
    run = cloud.script()
    assert run.returncode == 1
    assert "did not answer 200" in run.output
    assert (
        f"gcloud run services update-traffic {SERVICE} --region=us-central1 "
        f"--project={PROJECT} --to-revisions={SERVICE}-00007=100"
    ) in run.output
    cloud.health.status = 200
    cloud.health.body = {"status": "healthy", "config_valid": False}
    invalid = cloud.script()
    assert invalid.returncode == 1 and "config_valid is false" in invalid.output
    assert f"--to-revisions={SERVICE}-00008=100" in invalid.output


def test_runs_from_any_copy_of_the_repository(cloud: Cloud, tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere" / "synchire"
    (copy / "deploy").mkdir(parents=True)
    shutil.copy2(SCRIPT, copy / "deploy" / SCRIPT.name)
    shutil.copy2(ROOT / "Dockerfile", copy / "Dockerfile")
    run = cloud.script(script=copy / "deploy" / SCRIPT.name, IMAGE_TAG="")
    assert run.returncode == 0, run.output
    build = run.one("docker", "build")
    assert build.args == [str(copy)]
    tag = str(build.flags["tag"]).rsplit(":", 1)[1]
    assert re.fullmatch(r"\d{8}-\d{6}", tag), tag  # not a git checkout: the time alone


def test_shellcheck_is_clean() -> None:
    """The script and cloudbuild.yaml's bash steps (as Cloud Build hands them to bash)."""
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    config = cloudbuild()
    values = {**default_builtins(), **config["substitutions"]}
    scripts = {str(SCRIPT): SCRIPT.read_text()}
    for step in config["steps"]:
        if step["entrypoint"] == "bash":
            scripts[f"cloudbuild.yaml {step['id']}"] = "#!/bin/bash\n" + substitute(
                step["args"][1], values
            )
    for name, text in scripts.items():
        proc = subprocess.run(
            ["shellcheck", "-"], input=text, capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode == 0, f"{name}:\n{proc.stdout}"


# --- cloudbuild.yaml -------------------------------------------------------------------------


def test_cloudbuild_structure() -> None:
    config = cloudbuild()
    steps = config["steps"]
    assert [s["id"] for s in steps] == ["preflight", "build", "push", "deploy", "smoke"]
    subs = config["substitutions"]
    assert subs["_REGION"] == "us-central1" and subs["_SERVICE"] == SERVICE
    assert subs["_REPOSITORY"] and subs["_ENVIRONMENT"] == "production"
    # every declared substitution is used, every reference is declared or built in
    used = set().union(*(referenced(s) for s in all_strings(steps + config["images"])))
    assert set(subs) <= used
    manual = {**default_builtins(), **subs}
    for text in all_strings(config):
        substitute(text, manual)  # raises on an unknown $NAME (a shell variable without $$)
    with pytest.raises(SubstitutionError):
        substitute("echo $name", manual)
    # a tag that a manual build has too
    image = substitute(config["images"][0], manual)
    assert image == f"us-central1-docker.pkg.dev/{PROJECT}/sync-hire/{SERVICE}:b-0001"
    assert "SHORT_SHA" not in used
    build, push = steps[1], steps[2]
    assert "--platform=linux/amd64" in build["args"]
    assert substitute(build["args"][-2], manual) == f"--tag={image}"
    assert substitute(push["args"][-1], manual) == image


def test_cloudbuild_deploys_exactly_what_the_script_deploys(cloud: Cloud) -> None:
    every_secret(cloud)
    runs, build = cloud.build(
        {"_NEXTJS_WEBHOOK_URL": WEBHOOK, "_EXTRA_ENV_VARS": "LOG_LEVEL=DEBUG"}
    )
    assert [r.id for r in runs] == ["preflight", "build", "push", "deploy", "smoke"]
    assert build.returncode == 0, build.output
    assert build.one("docker", "build").flags["platform"] == "linux/amd64"
    commands = build.commands()
    assert commands.index(("docker", "push")) < commands.index(("gcloud", "run", "deploy"))
    assert cloud.health.hits == 1  # the smoke step
    assert "PORT" not in env_of(build.one("gcloud", "run", "deploy"))

    cloud.world["repositories"] = ["us-central1/sync-hire"]
    cloud.save()
    script = cloud.script(EXTRA_ENV_VARS="LOG_LEVEL=DEBUG")
    assert script.returncode == 0, script.output
    from_build = build.one("gcloud", "run", "deploy")
    from_script = script.one("gcloud", "run", "deploy")
    assert from_build.args == from_script.args == [SERVICE]
    assert sorted(from_build.argv) == sorted(from_script.argv)
    assert secrets_of(from_build) == {n: f"{n}:latest" for n in ALL_SECRETS}


def test_cloudbuild_stops_before_building_when_secrets_are_missing(cloud: Cloud) -> None:
    cloud.world["secrets"] = {"API_SECRET_KEY": "ENABLED"}
    cloud.save()
    runs, build = cloud.build()
    assert [r.id for r in runs] == ["preflight"]
    assert build.returncode != 0 and build.changes() == []
    for name in REQUIRED_SECRETS - {"API_SECRET_KEY"}:
        assert f"secret {name} is missing" in build.output
    assert "_NEXTJS_WEBHOOK_URL is not set" in build.output


def test_cloudbuild_development_build(cloud: Cloud) -> None:
    cloud.world["secrets"] = {"API_SECRET_KEY": "ENABLED"}
    cloud.save()
    _runs, build = cloud.build({"_ENVIRONMENT": "development"})
    assert build.returncode == 0, build.output
    deploy = build.one("gcloud", "run", "deploy")
    assert env_of(deploy)["ENVIRONMENT"] == "development"
    assert secrets_of(deploy) == {"API_SECRET_KEY": "API_SECRET_KEY:latest"}


# --- agreement: Dockerfile, cloudbuild.yaml, script, interview/config.py -----------------------


def test_port_service_and_outbox_agree(cloud: Cloud) -> None:
    default_port = Settings.model_fields["port"].default
    runtime = dockerfile().stage("runtime")
    env = runtime.environment({"PATH": "/usr/bin"})
    assert runtime.last("EXPOSE").value == str(default_port) == env["PORT"]
    deploy = cloud.script().one("gcloud", "run", "deploy")
    assert deploy.flags["port"] == str(default_port)
    assert deploy.args == [SERVICE] == [cloudbuild()["substitutions"]["_SERVICE"]]
    mount = flag_items(deploy.flags["add-volume-mount"])
    assert mount == {"volume": "outbox", "mount-path": env["OUTBOX_DIR"]}
    assert env_of(deploy)["OUTBOX_DIR"] == env["OUTBOX_DIR"]
    # the drain plus uvicorn's last second fit Cloud Run's 10 s between SIGTERM and SIGKILL
    grace = float(env_of(deploy)["SHUTDOWN_GRACE_SECONDS"])
    assert math.ceil(grace) + 1 < 10
    for key in (*env_of(deploy), *secrets_of(deploy)):
        assert key in settings_env_names(), key
    # the image's own settings are settings too (or Python's)
    for key in env:
        assert key in settings_env_names() | {"PATH", "VIRTUAL_ENV"} or key.startswith("PYTHON")
    # the web app's Firebase rewrite names the same service
    assert f'"serviceId": "{SERVICE}"' in (ROOT / "docs" / "INTEGRATION.md").read_text()


def _strip_types(ts: str) -> str:
    """The documented verifier as plain JavaScript: it uses only these few TypeScript forms."""
    js = ts.replace(
        'import { createHmac, timingSafeEqual } from "node:crypto";',
        'const { createHmac, timingSafeEqual } = require("node:crypto");',
    )
    js = js.replace("export function", "function")
    js = re.sub(r"\)\s*:\s*boolean\s*\{", ") {", js)
    return re.sub(
        r"(\w+)\s*:\s*(?:string\[\]|string|number|boolean|Buffer)(?:\s*\|\s*null)?", r"\1", js
    )


def test_documented_typescript_verifier_agrees_with_the_signer() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    from interview.results import sign, verify_signature

    doc = (ROOT / "docs" / "INTEGRATION.md").read_text()
    block = re.search(r"```ts\n(// lib/verify-synchire-signature\.ts\n.*?)```", doc, re.S)
    assert block, "the verifier's code block is missing from docs/INTEGRATION.md"
    now, secret = 1_750_000_000, "whsec-test-0123456789"
    body = json.dumps({"interviewId": "c1", "candidateName": "Zoë"}, ensure_ascii=False).encode()
    good = sign(secret, body, now)
    cases = [
        (secret, good, body),
        (secret, good, body + b" "),  # tampered body
        ("another-secret", good, body),
        (secret, sign(secret, body, now - 301), body),  # too old: a replay
        (secret, f"{sign('old-secret', body, now)},v1={good.split('v1=')[1]}", body),
        (secret, f"t={now},v1=zz", body),
        (secret, "v1=abc", body),
        (secret, "", body),
    ]
    script = _strip_types(block.group(1)) + (
        "\nconst cases = JSON.parse(require('node:fs').readFileSync(0, 'utf8'));\n"
        "console.log(JSON.stringify(cases.map(([s, h, b]) =>"
        f" verifySynchireSignature(s, h || null, Buffer.from(b, 'base64'), {now}))));\n"
    )
    payload = json.dumps([[s, h, base64.b64encode(b).decode()] for s, h, b in cases])
    proc = subprocess.run(
        [node, "-e", script], input=payload, capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stderr
    expected = [verify_signature(s, h, b, now=now) for s, h, b in cases]
    assert json.loads(proc.stdout) == expected
    assert expected[0] is True and expected[4] is True and not any(expected[1:4])


def test_dockerfile_shape() -> None:
    parsed = dockerfile()
    assert parsed.args["PYTHON_IMAGE"] == "python:3.13-slim"
    assert [(s.name, s.base) for s in parsed.stages] == [
        ("builder", "python:3.13-slim"),
        ("runtime", "python:3.13-slim"),
    ]
    runtime = parsed.stage("runtime")
    user = runtime.last("USER").value.split(":")[0]
    assert user not in ("0", "root")
    keywords = [i.keyword for i in runtime.instructions]
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k in ("RUN", "COPY"))
    assert not any("pip" in i.value for i in runtime.all("RUN"))  # nothing installed there
    assert [i.flags_and_words()[0] for i in runtime.all("COPY")] == [{"from": "builder"}]
    assert runtime.last("CMD").exec_form() == ["python", "-m", "server"]
    probe = runtime.last("HEALTHCHECK").exec_form()
    assert probe[0] == "python" and "/health" in probe[-1] and "PORT" in probe[-1]
    assert runtime.last("STOPSIGNAL").value == "SIGTERM"
    builder = parsed.stage("builder")
    installs = [i.value for i in builder.all("RUN") if " install " in i.value]
    assert len(installs) == 1 and "[dev]" not in installs[0] and "-e " not in installs[0]


def test_dockerignore_keeps_the_context_to_what_the_build_copies() -> None:
    ignore = DockerIgnore((ROOT / ".dockerignore").read_text())
    sources = [
        word
        for ins in dockerfile().stage("builder").all("COPY")
        for word in ins.flags_and_words()[1][:-1]
    ]
    for source in sources:
        path = ROOT / source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        assert files, source
        for f in files:
            if "__pycache__" not in f.parts:
                assert not ignore.excluded(f.relative_to(ROOT).as_posix()), f
    for kept_out in (".venv/bin/python", ".git/HEAD", "tests/test_deploy.py", ".env", "outbox/x"):
        assert ignore.excluded(kept_out), kept_out
    assert ignore.excluded("pipeline/__pycache__/stage.cpython-313.pyc")


# --- the image's environment, built as the Dockerfile builds it -----------------------------

NETWORK_ERRORS = (
    "NewConnectionError",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "ProxyError",
    "No matching distribution found",
    "Could not find a version that satisfies",
)
MANYLINUX_LIBS = frozenset(
    {
        "linux-vdso.so.1",
        "libc.so.6",
        "libm.so.6",
        "libmvec.so.1",
        "libpthread.so.0",
        "libdl.so.2",
        "librt.so.1",
        "libutil.so.1",
        "libresolv.so.2",
        "libgcc_s.so.1",
        "libstdc++.so.6",
        "libz.so.1",
        "ld-linux-x86-64.so.2",
    }
)
"""What a python:3.13-slim image has besides the Python runtime (the manylinux policy's list)."""


def _python313() -> str:
    """Python 3.13 as in the image if this machine has it; else the running Python."""
    candidates = sorted(
        glob.glob(os.path.expanduser("~/.pyenv/versions/3.13*/bin/python3.13")), reverse=True
    )
    candidates.append(shutil.which("python3.13") or "")  # may be a shim that does not run
    for candidate in candidates:
        if not candidate:
            continue
        probe = subprocess.run(
            [candidate, "-c", "import sys, venv, ensurepip; print(sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if probe.returncode == 0 and probe.stdout.strip() == "(3, 13)":
            return candidate
    return sys.executable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _build_like_the_dockerfile(tmp: Path, python: str) -> Path:
    """Run the builder stage's ENV, WORKDIR, COPY and RUN lines with $VIRTUAL_ENV in ``tmp``."""
    builder = dockerfile().stage("builder")
    venv = tmp / "venv"
    shim = tmp / "python-bin"
    shim.mkdir()
    (shim / "python").write_text(f'#!/bin/sh\nexec "{python}" "$@"\n')
    (shim / "python").chmod(0o755)
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PIP_REQUIRE_VIRTUALENV")
    }
    base["PATH"] = f"{shim}:{os.environ['PATH']}"
    env = dict(base)
    cwd = tmp
    for ins in builder.instructions:
        if ins.keyword == "ENV":
            env = Stage("", None, [ins]).environment(env, {"VIRTUAL_ENV": str(venv)})
        elif ins.keyword == "WORKDIR":
            cwd = tmp / ins.value.lstrip("/")
            cwd.mkdir(parents=True, exist_ok=True)
        elif ins.keyword == "COPY":
            flags, words = ins.flags_and_words()
            assert not flags, ins.value
            *sources, dest = words
            target = cwd / dest
            for source in sources:
                src = ROOT / source
                if src.is_dir():
                    shutil.copytree(
                        src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
                    )
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, target / src.name)
        elif ins.keyword == "RUN":
            proc = subprocess.run(
                ["sh", "-c", ins.value],
                cwd=cwd,
                env=env,
                capture_output=True,
                text=True,
                timeout=170,
                check=False,
            )
            if proc.returncode != 0:
                output = proc.stdout + proc.stderr
                if any(e in output for e in NETWORK_ERRORS) and os.environ.get("CI") != "true":
                    pytest.skip(f"no package index reachable for `{ins.value}`")
                pytest.fail(f"RUN {ins.value}\nexit {proc.returncode}\n{output[-4000:]}")
        else:
            raise AssertionError(f"the test does not know builder instruction {ins.keyword}")
    return venv


def _venv_python(venv: Path, code: str, *args: str) -> str:
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code, *args],
        cwd=venv.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _check_installed(venv: Path) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def name(requirement: str) -> str:
        found = re.match(r"[A-Za-z0-9._-]+", requirement)
        assert found, requirement
        return re.sub(r"[-_.]+", "-", found.group(0)).lower()

    listing = _venv_python(
        venv,
        "import importlib.metadata as m, json; "
        "print(json.dumps([d.metadata['Name'] for d in m.distributions()]))",
    )
    installed = {name(n) for n in json.loads(listing)}
    runtime = {name(r) for r in project["dependencies"]}
    dev = {name(r) for r in project["optional-dependencies"]["dev"]}
    assert runtime <= installed, runtime - installed
    assert not dev & installed, dev & installed
    assert "pip" not in installed  # the environment holds runtime dependencies only
    # bytecode compiled ahead (PEP 552 unchecked-hash .pyc: flags == 1)
    compiled = list(venv.glob("lib/python3.*/site-packages/__pycache__/server.cpython-*.pyc"))
    assert compiled, "server.py was not compiled"
    assert int.from_bytes(compiled[0].read_bytes()[4:8], "little") == 1
    assert list(venv.glob("lib/python3.*/site-packages/interview/__pycache__/config.*.pyc"))


def _check_native_libraries(venv: Path) -> None:
    """Every extension module links only to what the slim base image has."""
    if shutil.which("ldd") is None:
        return
    for library in venv.rglob("*.so*"):
        if not library.is_file():
            continue
        proc = subprocess.run(
            ["ldd", str(library)], capture_output=True, text=True, timeout=30, check=False
        )
        for line in proc.stdout.splitlines():
            parts = line.split()
            if not parts or "statically" in line:
                continue
            assert "not found" not in line, f"{library}: {line.strip()}"
            resolved = parts[2] if len(parts) > 2 and parts[1] == "=>" else parts[0]
            if str(venv) in resolved:
                continue
            assert Path(parts[0]).name in MANYLINUX_LIBS, f"{library} needs {parts[0]}"


def _outbox_files(outbox: Path, folder: str, call_id: str) -> list[Path]:
    return sorted((outbox / folder).glob(f"{call_id}.*json"))


def _join_body(call_id: str) -> dict[str, Any]:
    questions = [
        {
            "id": "q1",
            "text": "Tell me about yourself.",
            "type": "open",
            "duration": 2,
            "category": "intro",
        },
        {"id": "q2", "text": "Why this job?", "type": "open", "duration": 2, "category": "fit"},
    ]
    return {
        "callId": call_id,
        "candidateName": "Ada",
        "jobTitle": "Engineer",
        "questions": questions,
    }


async def _until(check: Callable[[], object], within: float) -> None:
    """Poll ``check`` (a file system, a process: nothing to await) under a hang guard."""
    with anyio.fail_after(within):
        while not check():  # noqa: ASYNC110 (a file system or a process: no event to await)
            await anyio.sleep(0.2)


async def _hold_interviews(
    base: str, key: str, outbox: Path, proc: subprocess.Popen[bytes], answer: bytes
) -> None:
    """Over WebRTC on loopback: one interview ended through the API, then one running while the
    server gets SIGTERM. Every wait has a hang guard; nothing is timed."""
    from aiortc_client import SPEECH_DBFS, CandidateClient, loopback_only

    headers = {"X-API-Key": key}

    def said(speaker: str) -> Any:
        return lambda e: e.get("type") == "transcript" and e.get("speaker") == speaker

    async def connect(http: httpx.AsyncClient, call_id: str) -> Any:
        r = await http.post("/join-interview", json=_join_body(call_id), headers=headers)
        assert r.status_code == 200, r.text
        joined = r.json()
        client = CandidateClient()
        answer = await client.connect(http, joined["webrtcUrl"], token=joined["clientToken"])
        assert answer.status_code == 201, answer.text
        await client.wait_event(said("agent"), within=60)  # the greeting, in espeak-ng's voice
        await client.wait_until(lambda: client.loudest() > SPEECH_DBFS, within=60)
        return client

    with loopback_only():
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            one = await connect(http, "deploy-one")
            try:
                await one.say(answer)
                heard = await one.wait_event(said("user"), within=60)  # pocketsphinx heard it
                assert heard["text"].strip()
                r = await http.post("/agents/deploy-one/shutdown", headers=headers)
                assert r.status_code == 200 and r.json()["success"] is True
                await one.wait_event(lambda e: e.get("type") == "ended", within=60)
            finally:
                await one.close()
            await _until(lambda: _outbox_files(outbox, "pending", "deploy-one"), within=60)

            two = await connect(http, "deploy-two")
            try:
                proc.send_signal(signal.SIGTERM)  # Cloud Run stopping the instance
                await _until(lambda: proc.poll() is not None, within=30)
            finally:
                await two.close()


@pytest.mark.realclock
def test_image_environment_serves_health_and_holds_an_offline_interview(tmp_path: Path) -> None:
    python = _python313()
    venv = _build_like_the_dockerfile(tmp_path, python)
    _check_installed(venv)
    _check_native_libraries(venv)
    fixture = ROOT / "tests" / "fixtures" / "answer_single.wav"
    heard = _venv_python(
        venv,
        "import sys, wave\n"
        "from stages.local import PocketsphinxTranscriber\n"
        "with wave.open(sys.argv[1]) as w: pcm = w.readframes(w.getnframes())\n"
        "print(PocketsphinxTranscriber().transcribe_blocking(pcm, 16000))",
        str(fixture),
    )
    assert heard.strip(), "the offline transcriber heard nothing"

    runtime = dockerfile().stage("runtime")
    port, key, outbox = _free_port(), "deploy-test-key-0123456789", tmp_path / "outbox"
    env = runtime.environment(
        {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}, {"VIRTUAL_ENV": str(venv)}
    )
    env.update(
        HOST="127.0.0.1",
        PORT=str(port),
        OUTBOX_DIR=str(outbox),
        ENVIRONMENT="development",
        API_SECRET_KEY=key,
    )
    command = runtime.last("CMD").exec_form()
    executable = shutil.which(command[0], path=env["PATH"])
    assert executable is not None and Path(executable).parent == venv / "bin"
    app_dir = tmp_path / "app"  # not the checkout: the installed modules must be used
    app_dir.mkdir()
    log = tmp_path / "server.log"
    base = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [executable, *command[1:]], cwd=app_dir, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 60  # a hang guard
        health: dict[str, Any] | None = None
        while health is None:
            assert proc.poll() is None, f"the server exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no /health:\n{log.read_text()}"
            try:
                r = httpx.get(f"{base}/health", timeout=2)
                health = r.json() if r.status_code == 200 else None
            except httpx.TransportError:
                time.sleep(0.2)
        assert health["status"] == "healthy" and health["config_valid"] is True
        assert "offline stand-ins" in health["mode"]
        demo = httpx.get(f"{base}/demo", timeout=10)  # the development demo page is there too
        assert demo.status_code == 200 and "text/html" in demo.headers["content-type"]

        from pipeline.audio import read_wav, resample

        wav = read_wav(fixture)
        answer = resample(wav.pcm, wav.sample_rate, 48000, wav.channels)
        try:
            anyio.run(_hold_interviews, base, key, outbox, proc, answer)
        except BaseException as exc:
            raise AssertionError(f"{exc!r}\n--- server log ---\n{log.read_text()[-6000:]}") from exc
        # a clean stop: drained, then uvicorn re-raises SIGTERM (so the status says -15 or 0)
        assert proc.returncode in (0, -signal.SIGTERM), log.read_text()
        text = log.read_text()
        assert "drained" in text and "Application shutdown complete" in text, text

        result = json.loads(_outbox_files(outbox, "pending", "deploy-one")[0].read_text())
        payload = result["payload"]
        assert payload["interviewId"] == "deploy-one" and payload["endReason"] == "shutdown"
        assert [e["speaker"] for e in payload["transcript"][:2]] == ["agent", "user"]
        # the interview running at SIGTERM was not lost: its result, or its checkpoint
        kept = _outbox_files(outbox, "pending", "deploy-two")
        kept += _outbox_files(outbox, "active", "deploy-two")
        assert kept, log.read_text()
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
