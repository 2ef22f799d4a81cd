"""Run a cloudbuild.yaml locally, the way Cloud Build would, against fake tools.

Substitution follows Cloud Build's rules: ``$$`` is a literal ``$``; ``$NAME`` / ``${NAME}``
must be a built-in or a declared user substitution (``_NAME``), or the build is rejected;
built-ins that only triggered builds have (``$SHORT_SHA``...) are empty in a manual build.
Each step runs its ``entrypoint`` with its substituted ``args`` and ``env`` in the workspace
directory; the build stops at the first step that fails, as Cloud Build does.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ALWAYS = ("PROJECT_ID", "BUILD_ID", "PROJECT_NUMBER", "LOCATION")
"""Built-ins every build has."""
TRIGGER_ONLY = (
    "TRIGGER_NAME",
    "COMMIT_SHA",
    "REVISION_ID",
    "SHORT_SHA",
    "REPO_NAME",
    "REPO_FULL_NAME",
    "BRANCH_NAME",
    "TAG_NAME",
    "REF_NAME",
    "TRIGGER_BUILD_CONFIG_PATH",
    "SERVICE_ACCOUNT_EMAIL",
    "SERVICE_ACCOUNT",
)
"""Built-ins of triggered builds: empty in a plain ``gcloud builds submit``."""

_TOKEN = re.compile(r"\$\$|\$\{([^}]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


class SubstitutionError(ValueError):
    """Cloud Build would reject the build."""


def substitute(text: str, values: Mapping[str, str]) -> str:
    """``text`` with Cloud Build's substitutions applied."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) if m.group(1) is not None else m.group(2)
        if name in values:
            return values[name]
        if name in TRIGGER_ONLY:
            return ""
        raise SubstitutionError(
            f"${name} is not a substitution (write $${name} for a shell variable)"
        )

    return _TOKEN.sub(one, text)


def referenced(text: str) -> set[str]:
    """Substitution names ``text`` refers to (not ``$$`` escapes)."""
    out = set()
    for m in _TOKEN.finditer(text):
        if m.group(0) != "$$":
            out.add(m.group(1) if m.group(1) is not None else m.group(2))
    return out


def all_strings(node: Any) -> list[str]:
    """Every string in a YAML tree (to find what it references)."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in all_strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in all_strings(v)]
    return []


@dataclass
class StepRun:
    id: str
    argv: list[str]
    returncode: int
    output: str


def run_build(
    config: Mapping[str, Any],
    *,
    workspace: Path,
    base_env: Mapping[str, str],
    builtins: Mapping[str, str],
    overrides: Mapping[str, str] | None = None,
    timeout_s: float = 120,
) -> list[StepRun]:
    """Run every step until one fails; the runs so far."""
    declared = dict(config.get("substitutions") or {})
    for key in overrides or {}:
        if key not in declared:
            raise SubstitutionError(f"{key} is not declared under substitutions")
    values = {**builtins, **declared, **(overrides or {})}
    runs: list[StepRun] = []
    for step in config["steps"]:
        argv = [step["entrypoint"], *(substitute(str(a), values) for a in step.get("args", []))]
        env = dict(base_env)
        for item in step.get("env", []):
            key, _, value = substitute(str(item), values).partition("=")
            env[key] = value
        proc = subprocess.run(
            argv,
            cwd=workspace / step.get("dir", ""),
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        runs.append(StepRun(step["id"], argv, proc.returncode, proc.stdout + proc.stderr))
        if proc.returncode != 0:
            break
    return runs


def default_builtins(project: str = "demo-project", build_id: str = "b-0001") -> dict[str, str]:
    return {
        "PROJECT_ID": project,
        "BUILD_ID": build_id,
        "PROJECT_NUMBER": "123456789012",
        "LOCATION": "global",
    }


def clean_env(path: str, home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A minimal environment for running steps or scripts with fake tools first on PATH."""
    env = {"PATH": path, "HOME": str(home), "LANG": os.environ.get("LANG", "C.UTF-8")}
    env.update(extra or {})
    return env
