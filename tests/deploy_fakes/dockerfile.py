"""Just enough of the Dockerfile format to run a Dockerfile's steps without Docker.

:func:`parse` reads instructions per stage (comments dropped, continuation lines joined);
:meth:`Stage.environment` applies a stage's ``ENV`` lines in order, expanding ``$VAR`` and
``${VAR}`` from earlier values as Docker does (not from the same instruction). The
``.dockerignore`` matcher follows Docker's rules closely enough for whitelists: patterns in
order, the last match wins, ``!`` re-includes, a match on a parent directory covers its files.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """``$VAR`` / ``${VAR}`` replaced from ``env`` (unset variables become empty)."""
    return _VAR.sub(lambda m: env.get(m.group(1) or m.group(2), ""), text)


@dataclass(frozen=True)
class Instruction:
    keyword: str
    """Upper case: ``RUN``, ``COPY``, ..."""
    value: str
    """The rest of the logical line, flags included."""

    def flags_and_words(self) -> tuple[dict[str, str], list[str]]:
        """``--flag=value`` options first, then the shell-split words."""
        words = shlex.split(self.value)
        flags: dict[str, str] = {}
        while words and words[0].startswith("--"):
            name, _, value = words.pop(0)[2:].partition("=")
            flags[name] = value
        return flags, words

    def exec_form(self) -> list[str]:
        """The JSON array of ``CMD`` / ``HEALTHCHECK ... CMD`` (exec form only)."""
        text = self.value
        if self.keyword == "HEALTHCHECK":
            text = text[text.index(" CMD ") + len(" CMD ") :]
        value = json.loads(text)
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"{self.keyword}: not an exec-form JSON array: {self.value}")
        return value


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        if not found:
            raise LookupError(f"stage {self.name or self.base}: no {keyword}")
        return found[-1]

    def environment(
        self, start: Mapping[str, str], overrides: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """``start`` plus every ``ENV`` of the stage; ``overrides`` win after each ``ENV``."""
        env = dict(start)
        env.update(overrides or {})
        for ins in self.all("ENV"):
            apply_env(ins, env)
            env.update(overrides or {})
        return env


def apply_env(ins: Instruction, env: dict[str, str]) -> None:
    """Apply one ``ENV key=value ...`` to ``env`` (values expanded from before it)."""
    before = dict(env)
    for word in shlex.split(ins.value):
        key, eq, value = word.partition("=")
        if not eq:
            raise ValueError(f"ENV {ins.value!r}: use the key=value form")
        env[key] = expand(value, before)


@dataclass
class Dockerfile:
    args: dict[str, str]
    """``ARG`` defaults declared before the first ``FROM``."""
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise LookupError(f"no stage named {name}")


def logical_lines(text: str) -> Iterable[str]:
    """Instructions one per line: comment lines dropped, ``\\`` continuations joined."""
    current = ""
    for raw in text.splitlines():
        if raw.strip().startswith("#"):
            continue
        line = raw.rstrip()
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip():
            yield current.strip()
        current = ""
    if current.strip():
        yield current.strip()


def parse(text: str) -> Dockerfile:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical_lines(text):
        keyword, _, value = line.partition(" ")
        keyword = keyword.upper()
        value = value.strip()
        if keyword == "FROM":
            words = value.split()
            base = expand(words[0], args)
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages:
            if keyword != "ARG":
                raise ValueError(f"{keyword} before the first FROM")
            key, _, default = value.partition("=")
            args[key] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, value))
    return Dockerfile(args, stages)


# --- .dockerignore ---------------------------------------------------------------------------


def _pattern(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


class DockerIgnore:
    """Which context paths a ``.dockerignore`` keeps out of the build."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negated = line.startswith("!")
            pattern = line[1:].strip() if negated else line
            pattern = str(PurePosixPath(pattern.strip("/"))) if pattern.strip("/") else "."
            self.rules.append((negated, _pattern(pattern)))

    def excluded(self, path: str) -> bool:
        parts = PurePosixPath(path).parts
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        result = False
        for negated, rule in self.rules:
            if any(rule.fullmatch(p) for p in prefixes):
                result = not negated
        return result
