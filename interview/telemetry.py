"""Prometheus metrics for ``GET /metrics``: interviews, turns, latency, provider errors.

Each app owns a :class:`Telemetry` with its own registry (never prometheus-client's global
one), so two apps in one process (tests) count independently. The manager keeps the
interview gauges and counters; code running inside an interview reaches the telemetry of the
manager that started it through :func:`current` (a context variable the manager sets in each
interview's task), e.g. ``telemetry.current().observe_turn(record.figures())``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

LATENCY_BUCKETS: tuple[float, ...] = (
    0.05,
    0.1,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    10.0,
)
"""Seconds; dense where a spoken reply feels quick (under a second), sparse beyond."""

_FIGURES: tuple[tuple[str, str], ...] = (
    ("voice_to_voice_ms", "voice_to_voice"),
    ("llm_ttft_ms", "llm_ttft"),
    ("tts_ttfb_ms", "tts_ttfb"),
    ("endpointing_ms", "endpointing"),
)


class Telemetry:
    """The service's metrics, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.active_interviews = Gauge(
            "synchire_active_interviews", "Interviews running now on this instance.", registry=r
        )
        self.interviews_started = Counter(
            "synchire_interviews_started", "Interviews admitted.", registry=r
        )
        self.interviews_ended = Counter(
            "synchire_interviews_ended", "Interviews ended, by end reason.", ["reason"], registry=r
        )
        self.joins_refused = Counter(
            "synchire_joins_refused",
            "Join requests refused, by cause (duplicate, capacity, draining, config, invalid).",
            ["cause"],
            registry=r,
        )
        self.turns = Counter("synchire_turns", "Candidate turns answered.", registry=r)
        self.voice_to_voice = self._latency(
            "voice_to_voice", "Candidate's speech end to the first reply audio sent."
        )
        self.llm_ttft = self._latency("llm_ttft", "Brain request to its first token.")
        self.tts_ttfb = self._latency("tts_ttfb", "Voice request to its first audio.")
        self.endpointing = self._latency("endpointing", "Speech end to the turn committed.")
        self.provider_errors = Counter(
            "synchire_provider_errors",
            "Errors from providers (gemini, elevenlabs, heygen, getstream, webhook...).",
            ["provider"],
            registry=r,
        )

    def _latency(self, name: str, doc: str) -> Histogram:
        return Histogram(
            f"synchire_{name}_seconds", doc, buckets=LATENCY_BUCKETS, registry=self.registry
        )

    def observe_turn(self, figures: Mapping[str, float | None]) -> None:
        """Count one answered turn and record its latency figures (milliseconds, as
        :meth:`pipeline.metrics.TurnRecord.figures` gives them; missing ones are skipped)."""
        self.turns.inc()
        for key, attr in _FIGURES:
            value = figures.get(key)
            if value is not None and value >= 0:
                histogram: Histogram = getattr(self, attr)
                histogram.observe(value / 1000.0)

    def provider_error(self, provider: str) -> None:
        self.provider_errors.labels(provider=provider).inc()

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition and its content type: Prometheus text, or OpenMetrics when the
        scraper's ``Accept`` header asks for it."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


_fallback = Telemetry()
_current: ContextVar[Telemetry | None] = ContextVar("telemetry", default=None)


def current() -> Telemetry:
    """The telemetry of the manager running this interview (a private one outside any)."""
    t = _current.get()
    return t if t is not None else _fallback


@contextmanager
def bind(telemetry: Telemetry) -> Iterator[None]:
    """Make :func:`current` return ``telemetry`` in this context."""
    token = _current.set(telemetry)
    try:
        yield
    finally:
        _current.reset(token)
