"""Settings from the environment (DESIGN.md §9), typed, with what is missing.

Every setting is an environment variable; the field name is the variable's name in lower case
(``MAX_INTERVIEWS`` → ``settings.max_interviews``). Empty variables count as unset. Secrets are
:class:`~pydantic.SecretStr`, so printing the settings never shows them.

Two environments:

* ``production`` never falls back to offline stand-ins. It needs ``API_SECRET_KEY`` (the web
  app's key), ``GEMINI_API_KEY`` (the interviewer), ``ELEVENLABS_API_KEY`` (its voice) and
  ``NEXTJS_WEBHOOK_URL`` (results must go somewhere). Without any of them ``config_valid`` is
  false and interviews are refused, naming what is :attr:`Settings.missing`. HeyGen (video
  avatar) and GetStream (video edge) are optional features: unset, they are simply off; half
  set (a Stream key without its secret) counts as missing.
* ``development`` (the default) is valid without any key: whatever is missing is replaced by
  an offline stand-in (scripted interviewer, espeak-ng voice, pocketsphinx transcriber), and
  :attr:`Settings.mode` says so.

A bad value (``PORT=abc``, ``MAX_INTERVIEWS=0``) raises :class:`ConfigError` naming the
variable, from :func:`load_settings` or the constructor.
"""

from __future__ import annotations

import json
import secrets
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Environment = Literal["development", "production"]
GeminiMode = Literal["chat", "live"]  # "live-audio" is not implemented yet
VideoQuality = Literal["low", "medium", "high", "very_high"]

GEMINI_DEFAULT_MODELS: dict[str, str] = {
    "chat": "gemini-3.8-flash",
    "live": "gemini-3.8-live",
}
"""``GEMINI_MODEL`` when unset, by ``GEMINI_MODE``: the current stable Flash (fast, with a
low thinking level for a quick first word) and the current stable Live model. Kept equal to
``stages.gemini.DEFAULT_MODELS`` (a test checks), without importing the SDK at start-up."""

REQUIRED_IN_PRODUCTION: tuple[str, ...] = (
    "API_SECRET_KEY",
    "GEMINI_API_KEY",
    "ELEVENLABS_API_KEY",
    "NEXTJS_WEBHOOK_URL",
)
"""What ``ENVIRONMENT=production`` cannot run without (see the module docstring)."""

PAIRED: tuple[tuple[str, str], ...] = (("STREAM_API_KEY", "STREAM_API_SECRET"),)
"""Optional features that need both variables once one is set."""

SECRET_FIELDS: tuple[str, ...] = (
    "api_secret_key",
    "api_secret_key_previous",
    "gemini_api_key",
    "elevenlabs_api_key",
    "heygen_api_key",
    "stream_api_key",
    "stream_api_secret",
    "webhook_secret",
)

_NO_ECHO = (*SECRET_FIELDS, "ice_servers")
"""Fields whose bad values are not repeated in error messages (they may hold credentials)."""

MIN_SECRET_LEN = 4
"""Shorter secret values are not scrubbed from logs (they would scrub ordinary words)."""


class ConfigError(ValueError):
    """A setting has a bad value. ``str(err)`` names the variable(s) and why."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration: " + "; ".join(problems))
        self.problems = problems


class IceServer(BaseModel):
    """One STUN/TURN server for WebRTC (the shape of the browser's ``RTCIceServer``)."""

    urls: list[str]
    username: str | None = None
    credential: SecretStr | None = None

    @field_validator("urls", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


def _level(value: Any) -> str:
    name = str(value).strip().upper()
    if name == "WARN":
        name = "WARNING"
    if name not in ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"):
        raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    return name


def _http_url(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip().rstrip("/")
    if not value.startswith(("http://", "https://")) or len(value) <= len("https://"):
        raise ValueError("must be an http(s) URL")
    return value


class Settings(BaseSettings):
    """The service's settings. Defaults are documented next to each field."""

    model_config = SettingsConfigDict(
        env_ignore_empty=True,
        extra="ignore",
        case_sensitive=False,
        frozen=True,
        validate_by_name=True,
        validate_by_alias=True,
    )

    # --- service -------------------------------------------------------------------------
    environment: Environment = "development"
    """``development`` (offline stand-ins allowed) or ``production`` (never)."""
    host: str = "0.0.0.0"
    """Interface ``python -m server`` listens on."""
    port: int = Field(default=8080, ge=1, le=65535)
    """Port ``python -m server`` listens on; Cloud Run sets it."""
    api_secret_key: SecretStr | None = None
    """The key the web app sends as ``X-API-Key``. In development a key is generated when unset."""
    api_secret_key_previous: SecretStr | None = None
    """Also accepted while a new ``API_SECRET_KEY`` rolls out (rotation without downtime)."""
    enable_demo: bool | None = None
    """Serve the demo page at ``/demo``. Unset: on in development, off in production."""
    shutdown_grace_seconds: float = Field(default=8.0, gt=0, le=3600)
    """On SIGTERM, time for interviews to say goodbye and results to flush (Cloud Run gives
    10 s between SIGTERM and SIGKILL)."""
    log_level: str = "INFO"
    """Level of the service's own logs."""
    log_level_webrtc: str = "WARNING"
    """Level of the aiortc / aioice loggers (DEBUG to diagnose ICE/STUN/TURN trouble)."""
    google_cloud_project: str | None = Field(default=None, validation_alias="GOOGLE_CLOUD_PROJECT")
    """Project id, to link log lines to Cloud Trace (``logging.googleapis.com/trace``)."""

    # --- interviews ----------------------------------------------------------------------
    max_interviews: int = Field(default=10, ge=1, le=10_000)
    """Interviews held at once by this instance; more are refused with 503 + Retry-After."""
    max_interview_minutes: float = Field(default=60.0, gt=0, le=24 * 60)
    """An interview is ended (reason ``max_duration``) after this long."""
    vad_aggressiveness: int = Field(default=2, ge=0, le=3)
    """webrtcvad mode: 0 lets most sound through as speech, 3 is the strictest."""
    vad_stop_ms: int = Field(default=700, ge=100, le=5000)
    """Silence that ends the candidate's turn (the endpointing hangover)."""
    barge_in_ms: int = Field(default=300, ge=0, le=5000)
    """Candidate speech that interrupts the interviewer (0 disables barge-in)."""
    outbox_dir: str = "./outbox"
    """Durable outbox for results and interview checkpoints (a Cloud Storage volume on Cloud
    Run, so that a killed instance's interviews are delivered after the next start)."""
    nextjs_webhook_url: str | None = None
    """Base URL of the web app; results go to ``{url}/api/webhooks/interview-complete``."""
    webhook_secret: SecretStr | None = None
    """Signs the completion webhook; falls back to ``API_SECRET_KEY``."""

    # --- brain: Google Gemini ------------------------------------------------------------
    gemini_api_key: SecretStr | None = None
    """Unset in development: the scripted offline interviewer is used."""
    gemini_mode: GeminiMode = "chat"
    """``chat``: one streamed reply per turn, the turn's audio inline; ``live``: the Live API
    over one websocket (``text`` is accepted as an old name of ``chat``)."""
    gemini_model: str = ""
    """Unset: ``gemini-3.8-flash`` (chat) or ``gemini-3.8-live`` (live)."""
    gemini_base_url: str | None = None
    """Root URL (https://host:port) for REST and Live alike (proxies, data residency, tests);
    a private CA is trusted through ``SSL_CERT_FILE``."""

    # --- voice: ElevenLabs ---------------------------------------------------------------
    elevenlabs_api_key: SecretStr | None = None
    """Unset in development: the espeak-ng offline voice is used."""
    elevenlabs_voice_id: str = "21m00Tcm4TlvDq8ikWAM"
    """The interviewer's voice ("Rachel", as in the original service)."""
    elevenlabs_model: str = "eleven_flash_v2_5"
    """Lowest-latency model; ``eleven_turbo_v2_5`` and ``eleven_multilingual_v2`` also work."""
    elevenlabs_base_url: str | None = None

    # --- avatar: HeyGen LiveAvatar (optional) --------------------------------------------
    heygen_api_key: SecretStr | None = None
    """Unset: audio-only interviews (``videoAvatarEnabled`` false)."""
    heygen_avatar_id: str = "default"
    heygen_video_quality: VideoQuality = "low"
    heygen_base_url: str | None = None

    # --- video edge: GetStream (optional) ------------------------------------------------
    stream_api_key: SecretStr | None = None
    stream_api_secret: SecretStr | None = None
    stream_base_url: str | None = None

    # --- WebRTC --------------------------------------------------------------------------
    ice_servers: Annotated[list[IceServer], NoDecode] = Field(default_factory=list)
    """A JSON array of ``{"urls", "username"?, "credential"?}`` or comma-separated URLs. On
    Cloud Run (no inbound UDP) direct WebRTC needs a TURN server here."""
    webrtc_join_timeout_s: float = Field(default=120.0, gt=0, le=24 * 3600)
    """Nobody connects this long after the join: the interview ends (``candidate_left``)."""
    webrtc_leave_grace_s: float = Field(default=20.0, gt=0, le=3600)
    """The candidate's connection gone this long: the interview ends (``candidate_left``)."""

    @field_validator("environment", "heygen_video_quality", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("gemini_mode", mode="before")
    @classmethod
    def _mode(cls, value: Any) -> Any:
        value = value.strip().lower() if isinstance(value, str) else value
        return "chat" if value == "text" else value  # the first release called it "text"

    @field_validator("log_level", "log_level_webrtc", mode="before")
    @classmethod
    def _check_level(cls, value: Any) -> str:
        return _level(value)

    @field_validator(
        "nextjs_webhook_url",
        "gemini_base_url",
        "elevenlabs_base_url",
        "heygen_base_url",
        "stream_base_url",
    )
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        return _http_url(value)

    @field_validator("ice_servers", mode="before")
    @classmethod
    def _parse_ice(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"not valid JSON ({err.msg})") from None
        return [{"urls": [u.strip()]} for u in text.split(",") if u.strip()]

    @model_validator(mode="after")
    def _default_model(self) -> Settings:
        if not self.gemini_model:
            object.__setattr__(self, "gemini_model", GEMINI_DEFAULT_MODELS[self.gemini_mode])
        return self

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise ConfigError(_problems(err)) from None

    # --- derived -------------------------------------------------------------------------
    @property
    def is_production(self) -> bool:
        return self.environment == "production"

    @property
    def missing(self) -> list[str]:
        """Environment variables this configuration still needs (always empty in development)."""
        if not self.is_production:
            return []
        out = [name for name in REQUIRED_IN_PRODUCTION if getattr(self, name.lower()) is None]
        for a, b in PAIRED:
            has_a = getattr(self, a.lower()) is not None
            has_b = getattr(self, b.lower()) is not None
            if has_a != has_b:
                out.append(b if has_a else a)
        return out

    @property
    def config_valid(self) -> bool:
        return not self.missing

    @property
    def offline_brain(self) -> bool:
        """The scripted interviewer stands in for Gemini (development without a key)."""
        return not self.is_production and self.gemini_api_key is None

    @property
    def offline_voice(self) -> bool:
        """espeak-ng stands in for ElevenLabs (development without a key)."""
        return not self.is_production and self.elevenlabs_api_key is None

    @property
    def stand_ins(self) -> tuple[str, ...]:
        """The offline stand-ins in use, for people to read."""
        out: list[str] = []
        if self.offline_brain:
            out.append("scripted interviewer")
        if self.offline_voice:
            out.append("espeak-ng voice")
        if self.offline_brain:
            out.append("pocketsphinx transcriber")
        return tuple(out)

    @property
    def mode(self) -> str:
        """``production``, ``development``, or ``development (offline stand-ins: ...)``."""
        if self.stand_ins:
            return f"{self.environment} (offline stand-ins: {', '.join(self.stand_ins)})"
        return self.environment

    @property
    def llm_name(self) -> str:
        return "scripted (offline)" if self.offline_brain else self.gemini_model

    @property
    def voice_name(self) -> str:
        if self.offline_voice:
            return "espeak-ng (offline)"
        return f"elevenlabs {self.elevenlabs_model}"

    @property
    def transcriber_name(self) -> str:
        """Who writes the candidate's side of the transcript."""
        return "pocketsphinx (offline)" if self.offline_brain else "gemini"

    @property
    def video_avatar_enabled(self) -> bool:
        return self.heygen_api_key is not None

    @property
    def avatar(self) -> str:
        """``heygen`` (with the avatar id) or ``none``."""
        return f"heygen {self.heygen_avatar_id}" if self.video_avatar_enabled else "none"

    @property
    def demo_enabled(self) -> bool:
        return self.enable_demo if self.enable_demo is not None else not self.is_production

    def api_keys(self) -> tuple[str, ...]:
        """Every key accepted as ``X-API-Key`` (current, then previous)."""
        keys = (self.api_secret_key, self.api_secret_key_previous)
        return tuple(k.get_secret_value() for k in keys if k is not None and k.get_secret_value())

    def secret_values(self) -> tuple[str, ...]:
        """Every configured secret value, for log redaction."""
        values = [getattr(self, name) for name in SECRET_FIELDS]
        values += [s.credential for s in self.ice_servers]
        return tuple(
            v.get_secret_value()
            for v in values
            if v is not None and len(v.get_secret_value()) >= MIN_SECRET_LEN
        )


def env_name(field: str) -> str:
    """The environment variable behind a settings field."""
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info is not None else None
    return alias if isinstance(alias, str) else field.upper()


def _problems(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors(include_url=False):
        loc = [str(p) for p in e["loc"]]
        name = env_name(loc[0]) if loc else "settings"
        where = name + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc[1:])
        shown = ""
        if loc and loc[0] not in _NO_ECHO and isinstance(e.get("input"), str | int | float):
            shown = f" (got {e['input']!r})"
        msg = e["msg"].removeprefix("Value error, ")
        out.append(f"{where}: {msg}{shown}")
    return out


def load_settings(**overrides: Any) -> Settings:
    """Read the environment (``overrides`` win); raise :class:`ConfigError` on a bad value."""
    return Settings(**overrides)


def with_api_key(settings: Settings) -> tuple[Settings, str | None]:
    """Make sure a key is configured: in development without one, generate one for this run.

    Returns the settings to use and the generated key (``None`` when none was generated).
    The key check is never disabled: production without a key accepts no key at all.
    """
    if settings.api_secret_key is not None or settings.is_production:
        return settings, None
    key = secrets.token_urlsafe(24)
    return settings.model_copy(update={"api_secret_key": SecretStr(key)}), key
