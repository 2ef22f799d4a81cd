"""Settings from the environment: names, defaults, validity, stand-ins, secrets, bad values."""

from __future__ import annotations

import json

import pytest

from interview.config import (
    REQUIRED_IN_PRODUCTION,
    ConfigError,
    Settings,
    env_name,
    load_settings,
    with_api_key,
)

ALL_KEYS = {
    "API_SECRET_KEY": "api-key-0123456789",
    "GEMINI_API_KEY": "AIza-gemini-0123456789",
    "ELEVENLABS_API_KEY": "sk_eleven_0123456789",
    "NEXTJS_WEBHOOK_URL": "https://app.example.com/",
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No setting leaks in from the machine running the tests."""
    for field in Settings.model_fields:
        monkeypatch.delenv(env_name(field), raising=False)
    return monkeypatch


def test_defaults() -> None:
    s = Settings()
    assert s.environment == "development"
    assert s.port == 8080
    assert s.max_interviews == 10
    assert s.max_interview_minutes == 60
    assert s.outbox_dir == "./outbox"
    assert s.shutdown_grace_seconds == 8
    assert s.log_level == "INFO"
    assert s.log_level_webrtc == "WARNING"
    assert s.gemini_mode == "chat"
    assert s.gemini_model == "gemini-3.8-flash"
    assert s.elevenlabs_model == "eleven_flash_v2_5"
    assert s.api_secret_key is None
    assert s.ice_servers == []


@pytest.mark.parametrize(
    ("env", "value", "field", "expected"),
    [
        ("ENVIRONMENT", "Production", "environment", "production"),
        ("PORT", "9000", "port", 9000),
        ("MAX_INTERVIEWS", "3", "max_interviews", 3),
        ("MAX_INTERVIEW_MINUTES", "1.5", "max_interview_minutes", 1.5),
        ("OUTBOX_DIR", "/mnt/outbox", "outbox_dir", "/mnt/outbox"),
        ("GEMINI_MODEL", "gemini-x", "gemini_model", "gemini-x"),
        ("GEMINI_MODE", "LIVE", "gemini_mode", "live"),
        ("GEMINI_BASE_URL", "http://127.0.0.1:9/", "gemini_base_url", "http://127.0.0.1:9"),
        ("ELEVENLABS_VOICE_ID", "voice1", "elevenlabs_voice_id", "voice1"),
        ("ELEVENLABS_MODEL", "eleven_turbo_v2_5", "elevenlabs_model", "eleven_turbo_v2_5"),
        ("ELEVENLABS_BASE_URL", "https://eu.example", "elevenlabs_base_url", "https://eu.example"),
        ("HEYGEN_AVATAR_ID", "ava", "heygen_avatar_id", "ava"),
        ("HEYGEN_VIDEO_QUALITY", "HIGH", "heygen_video_quality", "high"),
        ("HEYGEN_BASE_URL", "https://h.example", "heygen_base_url", "https://h.example"),
        ("STREAM_BASE_URL", "https://s.example", "stream_base_url", "https://s.example"),
        ("NEXTJS_WEBHOOK_URL", "https://a.example/", "nextjs_webhook_url", "https://a.example"),
        ("LOG_LEVEL", "debug", "log_level", "DEBUG"),
        ("LOG_LEVEL_WEBRTC", "warn", "log_level_webrtc", "WARNING"),
        ("ENABLE_DEMO", "false", "enable_demo", False),
        ("VAD_STOP_MS", "900", "vad_stop_ms", 900),
        ("GOOGLE_CLOUD_PROJECT", "my-proj", "google_cloud_project", "my-proj"),
        ("SHUTDOWN_GRACE_SECONDS", "5", "shutdown_grace_seconds", 5.0),
    ],
)
def test_environment_variable_names(
    clean_env: pytest.MonkeyPatch, env: str, value: str, field: str, expected: object
) -> None:
    clean_env.setenv(env, value)
    assert getattr(Settings(), field) == expected


@pytest.mark.parametrize(
    "env",
    [
        "API_SECRET_KEY",
        "API_SECRET_KEY_PREVIOUS",
        "GEMINI_API_KEY",
        "ELEVENLABS_API_KEY",
        "HEYGEN_API_KEY",
        "STREAM_API_KEY",
        "STREAM_API_SECRET",
        "WEBHOOK_SECRET",
    ],
)
def test_secrets_never_print(clean_env: pytest.MonkeyPatch, env: str) -> None:
    clean_env.setenv(env, "s3cr3t-value-xyz")
    s = Settings()
    assert getattr(s, env.lower()).get_secret_value() == "s3cr3t-value-xyz"
    assert "s3cr3t-value-xyz" not in repr(s)
    assert "s3cr3t-value-xyz" not in str(s)
    assert "s3cr3t-value-xyz" in s.secret_values()


def test_empty_variable_counts_as_unset(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("GEMINI_API_KEY", "")
    clean_env.setenv("PORT", "")
    s = Settings()
    assert s.gemini_api_key is None
    assert s.port == 8080


def test_development_is_valid_without_keys_and_says_stand_ins_are_used() -> None:
    s = Settings()
    assert s.config_valid and s.missing == []
    assert s.llm_name == "scripted (offline)"
    assert s.voice_name == "espeak-ng (offline)"
    assert s.transcriber_name == "pocketsphinx (offline)"
    assert s.avatar == "none" and not s.video_avatar_enabled
    assert s.mode == (
        "development (offline stand-ins: scripted interviewer, espeak-ng voice, "
        "pocketsphinx transcriber)"
    )
    assert s.demo_enabled


def test_development_with_keys_uses_the_providers(clean_env: pytest.MonkeyPatch) -> None:
    for name, value in ALL_KEYS.items():
        clean_env.setenv(name, value)
    clean_env.setenv("HEYGEN_API_KEY", "heygen-0123456789")
    s = Settings()
    assert s.stand_ins == ()
    assert s.mode == "development"
    assert s.llm_name == "gemini-3.8-flash"
    assert s.voice_name == "elevenlabs eleven_flash_v2_5"
    assert s.avatar.startswith("heygen") and s.video_avatar_enabled


def test_only_the_missing_provider_is_replaced(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("GEMINI_API_KEY", "AIza-gemini-0123456789")
    s = Settings()
    assert s.stand_ins == ("espeak-ng voice",)
    assert s.llm_name == "gemini-3.8-flash"


def test_production_lists_everything_missing(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("ENVIRONMENT", "production")
    s = Settings()
    assert not s.config_valid
    assert s.missing == list(REQUIRED_IN_PRODUCTION)
    assert s.stand_ins == () and s.mode == "production"
    assert s.llm_name == "gemini-3.8-flash"  # never "scripted" in production
    assert not s.demo_enabled


def test_production_with_required_keys_is_valid(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("ENVIRONMENT", "production")
    for name, value in ALL_KEYS.items():
        clean_env.setenv(name, value)
    s = Settings()
    assert s.config_valid and s.missing == []
    assert s.avatar == "none"  # HeyGen is optional


@pytest.mark.parametrize("given", ["STREAM_API_KEY", "STREAM_API_SECRET"])
def test_half_configured_stream_is_missing_its_pair(
    clean_env: pytest.MonkeyPatch, given: str
) -> None:
    clean_env.setenv("ENVIRONMENT", "production")
    for name, value in ALL_KEYS.items():
        clean_env.setenv(name, value)
    clean_env.setenv(given, "stream-0123456789")
    other = "STREAM_API_SECRET" if given == "STREAM_API_KEY" else "STREAM_API_KEY"
    assert Settings().missing == [other]


@pytest.mark.parametrize(
    ("env", "value", "expected"),
    [
        ("PORT", "abc", "PORT"),
        ("PORT", "70000", "PORT"),
        ("MAX_INTERVIEWS", "0", "MAX_INTERVIEWS"),
        ("MAX_INTERVIEW_MINUTES", "-1", "MAX_INTERVIEW_MINUTES"),
        ("ENVIRONMENT", "staging", "ENVIRONMENT"),
        ("LOG_LEVEL", "loud", "LOG_LEVEL"),
        ("LOG_LEVEL_WEBRTC", "chatty", "LOG_LEVEL_WEBRTC"),
        ("NEXTJS_WEBHOOK_URL", "app.example.com", "NEXTJS_WEBHOOK_URL"),
        ("GEMINI_MODE", "batch", "GEMINI_MODE"),
        ("ICE_SERVERS", "[not json", "ICE_SERVERS"),
        ("GOOGLE_CLOUD_PROJECT", "", None),
    ],
)
def test_bad_values_name_the_variable(
    clean_env: pytest.MonkeyPatch, env: str, value: str, expected: str | None
) -> None:
    clean_env.setenv(env, value)
    if expected is None:
        Settings()  # empty is unset, not an error
        return
    with pytest.raises(ConfigError) as info:
        Settings()
    assert str(info.value).startswith(f"invalid configuration: {expected}")


def test_all_problems_are_reported_together(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("PORT", "abc")
    clean_env.setenv("MAX_INTERVIEWS", "0")
    with pytest.raises(ConfigError) as info:
        load_settings()
    names = [p.split(":")[0] for p in info.value.problems]
    assert sorted(names) == ["MAX_INTERVIEWS", "PORT"]
    assert "'abc'" in str(info.value)  # the bad value is shown...


def test_bad_credentials_are_not_repeated(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(
        "ICE_SERVERS", json.dumps([{"urls": 5, "username": "u", "credential": "turn-pass-987"}])
    )
    with pytest.raises(ConfigError) as info:
        Settings()
    assert "ICE_SERVERS[0].urls" in str(info.value)
    assert "turn-pass-987" not in str(info.value)  # ...but never a credential


def test_ice_servers_json_or_list(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(
        "ICE_SERVERS",
        json.dumps([{"urls": "turn:t.example:3478", "username": "u", "credential": "pass-123"}]),
    )
    s = Settings()
    assert s.ice_servers[0].urls == ["turn:t.example:3478"]
    assert "pass-123" in s.secret_values() and "pass-123" not in repr(s)
    clean_env.setenv("ICE_SERVERS", "stun:a.example:3478, stun:b.example:3478")
    assert [x.urls for x in Settings().ice_servers] == [
        ["stun:a.example:3478"],
        ["stun:b.example:3478"],
    ]


def test_live_mode_has_its_own_default_model(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("GEMINI_MODE", "live")
    assert Settings().gemini_model == "gemini-3.8-live"


def test_api_keys_current_then_previous(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("API_SECRET_KEY", "new-key-123")
    clean_env.setenv("API_SECRET_KEY_PREVIOUS", "old-key-456")
    assert Settings().api_keys() == ("new-key-123", "old-key-456")


def test_generated_key_only_in_development(clean_env: pytest.MonkeyPatch) -> None:
    s, key = with_api_key(Settings())
    assert key is not None and len(key) >= 24
    assert s.api_keys() == (key,)
    _, second = with_api_key(Settings())
    assert second != key  # a fresh one per run
    configured, none = with_api_key(Settings(api_secret_key="mine-123"))
    assert none is None and configured.api_keys() == ("mine-123",)
    clean_env.setenv("ENVIRONMENT", "production")
    prod, none = with_api_key(Settings())
    assert none is None and prod.api_keys() == ()  # production never invents a key


def test_overrides_win_over_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("MAX_INTERVIEWS", "4")
    assert load_settings(max_interviews=2).max_interviews == 2
    with pytest.raises(ConfigError, match="MAX_INTERVIEWS"):
        load_settings(max_interviews=0)


def test_gemini_defaults_agree_with_the_brain_and_text_is_an_old_name_of_chat(
    clean_env: pytest.MonkeyPatch,
) -> None:
    from interview.config import GEMINI_DEFAULT_MODELS
    from stages.gemini import DEFAULT_MODELS

    for mode, model in GEMINI_DEFAULT_MODELS.items():
        assert DEFAULT_MODELS[mode] == model
    clean_env.setenv("GEMINI_MODE", "Text")
    assert Settings().gemini_mode == "chat"
    clean_env.setenv("GEMINI_MODE", "live-audio")
    with pytest.raises(ConfigError, match="GEMINI_MODE"):
        Settings()
