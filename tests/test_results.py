"""Results that are never lost: transcript, payload, signature, outbox, delivery, crash recovery."""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from fakes.webhook import FakeWebhook, RecordedRequest, Reply
from hypothesis import given
from hypothesis import strategies as st

from interview.outbox import DeliveryOptions, OutboxOptions, ResultsService
from interview.results import (
    SIGNATURE_HEADER,
    WEBHOOK_PATH,
    Transcript,
    completion_payload,
    completion_status,
    sign,
    signing_secret,
    verify_signature,
    webhook_url,
)
from pipeline.clock import VirtualClock

SECRET = "whsec-test-9f8e7d6c5b4a"
ORIGINAL_FIELDS = {
    "interviewId",
    "candidateName",
    "jobTitle",
    "durationMinutes",
    "completedAt",
    "status",
    "transcript",
}
NEW_FIELDS = {"durationSeconds", "endReason", "questionsAsked", "totalQuestions", "latency"}
ENTRIES: list[dict[str, Any]] = [
    {"speaker": "agent", "text": "Hello Ada.", "timestamp": 0.5},
    {"speaker": "agent", "text": "Tell me about yourself.", "timestamp": 2.0},
    {"speaker": "user", "text": "I build engines.", "timestamp": 6.25},
]
MERGED: list[dict[str, Any]] = [
    {"speaker": "agent", "text": "Hello Ada. Tell me about yourself.", "timestamp": 0.5},
    {"speaker": "user", "text": "I build engines.", "timestamp": 6.25},
]


class Sleeps:
    """An injectable sleep that records the backoff delays and does not wait."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await anyio.lowlevel.checkpoint()


def payload(call_id: str = "call-1", end_reason: str = "completed", **extra: Any) -> dict[str, Any]:
    return completion_payload(
        call_id=call_id,
        candidate_name="Ada Lovelace",
        job_title="Analytical Engineer",
        started_at=1_700_000_000.0,
        ended_at=1_700_000_754.3,
        end_reason=end_reason,
        transcript=ENTRIES,
        questions_asked=2,
        total_questions=3,
        latency={"voice_to_voice_ms": {"p50": 812.0, "p95": 1400.0}, "turns": 2},
        **extra,
    )


def service(directory: Path, hook: FakeWebhook | None = None, **kw: Any) -> ResultsService:
    kw.setdefault("sleep", Sleeps())
    return ResultsService(
        directory, webhook_base_url=hook.url if hook else None, secret=SECRET, **kw
    )


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.json")) if directory.is_dir() else []


# --------------------------------------------------------------------------- transcript


def test_transcript_merges_consecutive_fragments_of_one_speaker() -> None:
    t = Transcript()
    for e in ENTRIES:
        t.add(e["speaker"], e["text"], e["timestamp"])
    assert not t.add("user", "   ", 9.0)
    assert t.entries() == MERGED
    assert t.candidate_spoke


def test_transcript_rejects_bad_input_naming_the_field() -> None:
    with pytest.raises(ValueError, match="speaker"):
        Transcript().add("interviewer", "hi", 0.0)
    with pytest.raises(ValueError, match=r"transcript\[1\]\.timestamp"):
        Transcript([ENTRIES[0], {"speaker": "user", "text": "x", "timestamp": "soon"}])


fragments = st.lists(
    st.tuples(
        st.sampled_from(["agent", "user"]),
        st.text(alphabet=st.sampled_from("ab \t"), max_size=6),
        st.floats(min_value=0, max_value=1e5, allow_nan=False),
    ),
    max_size=40,
)


@given(fragments)
def test_transcript_property_turns_alternate_and_text_is_preserved(frags: list[Any]) -> None:
    t = Transcript()
    for speaker, text, ts in frags:
        t.add(speaker, text, ts)
    entries = t.entries()
    assert all(a["speaker"] != b["speaker"] for a, b in itertools.pairwise(entries))
    kept = [(s, x.strip(), ts) for s, x, ts in frags if x.strip()]
    for speaker in ("agent", "user"):
        said = " ".join(x for s, x, _ in kept if s == speaker)
        assert " ".join(e["text"] for e in entries if e["speaker"] == speaker) == said
    # every entry starts at the first fragment of its run
    starts = [round(ts, 2) for i, (s, _, ts) in enumerate(kept) if i == 0 or kept[i - 1][0] != s]
    assert [e["timestamp"] for e in entries] == starts


# --------------------------------------------------------------------------- payload


def test_payload_keeps_every_original_field_and_adds_the_new_ones() -> None:
    p = payload(score=7.5, ai_evaluation={"summary": "strong"})
    assert ORIGINAL_FIELDS | NEW_FIELDS <= set(p)
    assert p["interviewId"] == "call-1"
    assert p["candidateName"] == "Ada Lovelace" and p["jobTitle"] == "Analytical Engineer"
    assert p["durationSeconds"] == 754.3
    assert p["durationMinutes"] == round(754.3 / 60, 2)
    assert p["completedAt"].endswith("Z")
    parsed = datetime.fromisoformat(p["completedAt"].replace("Z", "+00:00"))
    assert parsed.timestamp() == pytest.approx(1_700_000_754.3)
    assert p["status"] == "completed" and p["endReason"] == "completed"
    assert p["transcript"] == MERGED
    assert (p["questionsAsked"], p["totalQuestions"]) == (2, 3)
    assert p["latency"]["voice_to_voice_ms"]["p50"] == 812.0
    assert (p["score"], p["aiEvaluation"]) == (7.5, {"summary": "strong"})
    assert "score" not in payload() and "aiEvaluation" not in payload()
    json.dumps(p)  # serialisable as is


@pytest.mark.parametrize(
    ("reason", "spoke", "status"),
    [
        ("completed", False, "completed"),
        ("ended_by_agent", True, "completed"),
        ("candidate_left", True, "completed"),
        ("candidate_left", False, "abandoned"),
        ("max_duration", False, "abandoned"),
        ("shutdown", True, "completed"),
        ("failed", True, "failed"),
        ("crashed", True, "abandoned"),
    ],
)
def test_status_mapping(reason: str, spoke: bool, status: str) -> None:
    assert completion_status(reason, candidate_spoke=spoke) == status


def test_unknown_end_reason_and_bad_call_id_are_refused() -> None:
    with pytest.raises(ValueError, match="endReason"):
        payload(end_reason="bye")
    with pytest.raises(ValueError, match="interviewId"):
        payload(call_id="../etc/passwd")


# --------------------------------------------------------------------------- signing


def test_signature_verifies_and_tampering_or_replay_fails() -> None:
    body = json.dumps(payload()).encode()
    now = 1_700_000_000
    header = sign(SECRET, body, now)
    assert header.startswith(f"t={now},v1=")
    assert verify_signature(SECRET, header, body, now=now + 10)
    assert not verify_signature(SECRET, header, body.replace(b"Ada", b"Eve"), now=now)
    assert not verify_signature(SECRET, header, body, now=now + 301)  # replayed later
    assert not verify_signature(SECRET, header, body, now=now - 301)  # from the future
    assert not verify_signature("other-secret", header, body, now=now)
    assert not verify_signature(SECRET, None, body, now=now)
    assert not verify_signature(SECRET, header.split(",")[1], body, now=now)  # no timestamp
    rotated = f"{header},v1={sign('old', body, now).split('v1=')[1]}"
    assert verify_signature(SECRET, rotated, body, now=now)


@given(st.text(max_size=200), st.binary(max_size=50))
def test_verify_never_raises_on_garbage(header: str, body: bytes) -> None:
    assert verify_signature(SECRET, header, body) is False


def test_webhook_url_and_secret_fallback() -> None:
    assert webhook_url("https://app.example.com/") == "https://app.example.com" + WEBHOOK_PATH
    with pytest.raises(ValueError, match="NEXTJS_WEBHOOK_URL"):
        webhook_url("app.example.com")
    assert signing_secret("wh", "api") == "wh"
    assert signing_secret("  ", "api") == "api"
    assert signing_secret(None, None) is None


# --------------------------------------------------------------------------- delivery


def test_retries_5xx_with_one_idempotency_key_then_delivers(tmp_path: Path) -> None:
    sleeps = Sleeps()
    with FakeWebhook(SECRET, script=[500, 503, 200]) as hook:
        results = service(tmp_path, hook, sleep=sleeps)

        async def main() -> Any:
            async with results:
                pending = await results.submit(payload())
                assert await results.flush(10)
                return pending

        pending = anyio.run(main)
    assert [r.answer for r in hook.requests] == ["500", "503", "200"]
    assert hook.keys == [pending.idempotency_key] * 3
    assert all(r.signature_valid for r in hook.requests)
    assert all(r.headers["content-type"] == "application/json" for r in hook.requests)
    assert hook.received == [payload()]
    assert files(results.pending_dir) == [] and files(results.dead_dir) == []
    # exponential backoff with jitter: each wait within [half, all] of 0.5 s * 2^(n-1)
    assert len(sleeps.delays) == 2
    for n, delay in enumerate(sleeps.delays):
        assert 0.25 * 2**n <= delay <= 0.5 * 2**n


def test_a_4xx_is_not_retried_and_the_result_is_kept_in_dead(tmp_path: Path) -> None:
    with FakeWebhook(SECRET, script=[400]) as hook:
        results = service(tmp_path, hook)

        async def main() -> None:
            async with results:
                await results.submit(payload())
                assert await results.flush(10)

        anyio.run(main)
    assert len(hook.requests) == 1 and hook.received == []
    assert files(results.pending_dir) == []
    [dead] = list(results.dead_dir.glob("*.json"))
    envelope = json.loads(dead.read_text())
    assert envelope["lastStatus"] == 400 and envelope["attempts"] == 1
    assert envelope["payload"] == payload()


@pytest.mark.parametrize(
    "fault",
    [Reply(drop=True), Reply(delay_s=3.0), Reply(429), Reply(502)],
    ids=["dropped", "timeout", "429", "502"],
)
def test_network_faults_are_retried(tmp_path: Path, fault: Reply) -> None:
    with FakeWebhook(SECRET, script=[fault]) as hook:
        results = service(tmp_path, hook, delivery=DeliveryOptions(request_timeout_s=0.5))

        async def main() -> None:
            async with results:
                await results.submit(payload())
                assert await results.flush(20)

        anyio.run(main)
    assert len(hook.requests) >= 2 and hook.received == [payload()]
    assert len(set(hook.keys)) == 1
    assert files(results.pending_dir) == []


def test_a_lost_acknowledgement_is_deduplicated_by_the_receiver(tmp_path: Path) -> None:
    with FakeWebhook(SECRET, script=[Reply(drop=True, accept=True)]) as hook:
        results = service(tmp_path, hook)

        async def main() -> None:
            async with results:
                await results.submit(payload())
                assert await results.flush(10)

        anyio.run(main)
    assert len(hook.requests) == 2 and len(set(hook.keys)) == 1
    assert hook.received == [payload()]  # once, though it arrived twice


def test_outbox_is_written_before_the_first_attempt_and_removed_after_2xx(tmp_path: Path) -> None:
    seen: list[tuple[list[str], Any]] = []
    pending_dir = tmp_path / "pending"

    def inspect(request: RecordedRequest) -> None:
        names = files(pending_dir)
        envelopes = [json.loads((pending_dir / n).read_text()) for n in names]
        seen.append((names, envelopes))

    with FakeWebhook(SECRET, script=[503], on_request=inspect) as hook:
        results = service(tmp_path, hook)

        async def main() -> Any:
            async with results:
                pending = await results.submit(payload())
                assert await results.flush(10)
                return pending

        pending = anyio.run(main)
    assert len(seen) == 2
    for names, envelopes in seen:  # during both attempts, the result was on disk
        assert names == [pending.path.name]
        assert envelopes[0]["payload"] == payload()
        key = f"{envelopes[0]['callId']}:{envelopes[0]['resultId']}"
        assert key == pending.idempotency_key
    assert files(pending_dir) == []


def test_exhausted_attempts_stay_pending_and_are_replayed_after_a_restart(tmp_path: Path) -> None:
    with FakeWebhook(SECRET, script=[500, 500, 500]) as hook:
        first = service(tmp_path, hook, delivery=DeliveryOptions(max_attempts=3))

        async def main() -> Any:
            async with first:
                pending = await first.submit(payload())
                assert await first.flush(10)
                return pending

        pending = anyio.run(main)
        assert files(first.pending_dir) == [pending.path.name]
        assert json.loads(pending.path.read_text())["attempts"] == 3
        assert hook.received == []

        async def restart() -> list[str]:
            async with service(tmp_path, hook) as second:
                recovered = await second.recover()
                assert await second.flush(10)
                return recovered

        assert anyio.run(restart) == []  # nothing to recover, one result to replay
    assert hook.keys == [pending.idempotency_key] * 4
    assert hook.received == [payload()]
    assert files(first.pending_dir) == []


def test_without_a_webhook_url_the_result_stays_in_the_outbox(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="synchire.results")
    results = service(tmp_path)

    async def main() -> None:
        async with results:
            await results.submit(payload())
            assert await results.flush(1)
        assert [r.outcome for r in await results.deliver_pending()] == ["no_webhook"]

    anyio.run(main)
    assert len(files(results.pending_dir)) == 1
    assert any("NEXTJS_WEBHOOK_URL is not set" in r.getMessage() for r in caplog.records)


def test_an_unreadable_pending_file_is_moved_to_dead(tmp_path: Path) -> None:
    (tmp_path / "pending").mkdir()
    (tmp_path / "pending" / "broken.json").write_text("{not json")
    with FakeWebhook(SECRET) as hook:
        reports = anyio.run(service(tmp_path, hook).deliver_pending)
    assert [r.outcome for r in reports] == ["dead"]
    assert files(tmp_path / "dead") == ["broken.json"] and hook.requests == []


def test_backoff_runs_on_the_virtual_clock(tmp_path: Path) -> None:
    """Default sleep (anyio): 5 failures then success take 5 backoff waits of virtual time."""
    answers = iter([500, 500, 503, 500, 502, 200])
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(next(answers))

    async def write_pending() -> None:
        async with service(tmp_path) as offline:
            await offline.submit(payload())

    anyio.run(write_pending)
    clock = VirtualClock()
    results = ResultsService(
        tmp_path,
        webhook_base_url="http://webapp.invalid",
        secret=SECRET,
        transport=httpx.MockTransport(handler),
    )

    async def main() -> tuple[float, Any]:
        start = clock.now()
        reports = await results.deliver_pending()
        return clock.now() - start, reports

    elapsed, reports = clock.run(main)
    assert [(r.outcome, r.attempts, r.status_code) for r in reports] == [("delivered", 6, 200)]
    assert len({r.headers["idempotency-key"] for r in requests}) == 1
    assert sum(0.25 * 2**n for n in range(5)) <= elapsed <= sum(0.5 * 2**n for n in range(5))


# --------------------------------------------------------------------------- checkpoints


def test_submit_removes_the_checkpoint_and_it_never_comes_back(tmp_path: Path) -> None:
    opts = OutboxOptions(checkpoint_interval_s=0.001, heartbeat_s=0.001)
    results = service(tmp_path, outbox=opts)

    async def main() -> None:
        async with results:
            await results.admit("call-1", candidate_name="Ada", job_title="Engineer")
            assert files(results.active_dir) == ["call-1.json"]
            t = Transcript()
            for i, e in enumerate(ENTRIES):
                t.add(e["speaker"], e["text"], e["timestamp"])
                results.checkpoint("call-1", transcript=t, questions_asked=i)
                await anyio.sleep(0.002)
            await results.submit(payload())
            results.checkpoint("call-1", transcript=t, questions_asked=9)  # late: ignored
            await anyio.sleep(0.05)  # writer and heartbeat get many chances to misbehave
            assert files(results.active_dir) == []

    anyio.run(main)
    assert len(files(results.pending_dir)) == 1


def test_live_checkpoints_are_refreshed_by_the_heartbeat(tmp_path: Path) -> None:
    ticks = iter(range(1_000_000))
    results = service(
        tmp_path, outbox=OutboxOptions(heartbeat_s=0.01), wall_clock=lambda: float(next(ticks))
    )
    path = tmp_path / "active" / "call-1.json"

    async def main() -> None:
        async with results:
            await results.admit("call-1", candidate_name="Ada", job_title="Engineer")
            first = json.loads(path.read_text())["updatedAt"]
            with anyio.fail_after(10):  # hang guard: the heartbeat must rewrite the file
                while True:
                    if json.loads(path.read_text())["updatedAt"] != first:
                        break
                    await anyio.sleep(0.01)

    anyio.run(main)


def test_a_fresh_checkpoint_of_another_live_instance_is_left_alone(tmp_path: Path) -> None:
    now = time.time()

    async def other_instance() -> None:  # admits, then "keeps running" elsewhere
        async with service(tmp_path) as other:
            await other.admit("call-live", candidate_name="Ada", job_title="Engineer")

    anyio.run(other_instance)

    async def recover(at: float) -> list[str]:
        async with service(tmp_path, wall_clock=lambda: at) as results:
            return await results.recover()

    assert anyio.run(recover, now + 60) == []
    assert files(tmp_path / "active") == ["call-live.json"]
    assert anyio.run(recover, now + 600) == ["call-live"]  # silent for 10 min: gone
    assert files(tmp_path / "active") == []


CRASHING_PROCESS = """
import json, sys, anyio
from interview.outbox import OutboxOptions, ResultsService

async def main(outbox, entries):
    options = OutboxOptions(checkpoint_interval_s=0.01)
    async with ResultsService(outbox, webhook_base_url=None, secret=None, outbox=options) as r:
        await r.admit("crash-1", candidate_name="Grace Hopper", job_title="Compiler Engineer",
                      total_questions=3)
        r.checkpoint("crash-1", transcript=json.loads(entries), questions_asked=1)
        await anyio.sleep_forever()

anyio.run(main, sys.argv[1], sys.argv[2])
"""


def test_an_interview_whose_process_is_killed_is_delivered_as_abandoned(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    checkpoint = outbox / "active" / "crash-1.json"
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHING_PROCESS, str(outbox), json.dumps(ENTRIES)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20  # hang guard only
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the interview process exited early: {proc.communicate()[1]}")
            if checkpoint.exists() and json.loads(checkpoint.read_text())["transcript"] == ENTRIES:
                break
            assert time.monotonic() < deadline, "the checkpoint never showed the transcript"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    with FakeWebhook(SECRET) as hook:

        async def restart() -> list[str]:
            async with service(outbox, hook, outbox=OutboxOptions(orphan_after_s=0)) as results:
                recovered = await results.recover()
                assert await results.flush(10)
                return recovered

        assert anyio.run(restart) == ["crash-1"]
    [request] = hook.requests
    assert request.signature_valid
    [result] = hook.received
    assert result["interviewId"] == "crash-1"
    assert result["status"] == "abandoned" and result["endReason"] == "crashed"
    assert result["candidateName"] == "Grace Hopper"
    assert result["jobTitle"] == "Compiler Engineer"
    assert result["transcript"] == MERGED
    assert (result["questionsAsked"], result["totalQuestions"]) == (1, 3)
    assert files(outbox / "active") == [] and files(outbox / "pending") == []


# --------------------------------------------------------------------------- secrets


def test_secrets_never_appear_in_log_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with FakeWebhook(SECRET, script=[500, Reply(drop=True), 200, 401]) as hook:
        results = service(tmp_path, hook)

        async def main() -> None:
            async with results:
                await results.admit("call-1", candidate_name="Ada", job_title="Engineer")
                results.checkpoint("call-1", transcript=ENTRIES)
                await results.submit(payload())
                await results.submit(payload(call_id="call-2"))
                assert await results.flush(10)

        anyio.run(main)
    assert len(hook.received) == 1 and len(files(results.dead_dir)) == 1
    signatures = [r.headers[SIGNATURE_HEADER.lower()] for r in hook.requests]
    assert caplog.records, "expected some log lines"
    for record in caplog.records:
        text = record.getMessage() + repr(vars(record))
        assert SECRET not in text
        assert not any(sig.split("v1=")[1] in text for sig in signatures)
    assert SECRET not in repr(results)


def test_admitting_a_call_again_delivers_its_leftover_checkpoint_first(tmp_path: Path) -> None:
    async def died() -> str:  # admitted, then the process "died" (the checkpoint stays)
        async with service(tmp_path) as first:
            return await first.admit("call-9", candidate_name="Ada", job_title="Engineer")

    old_result = anyio.run(died)

    async def rejoin() -> str:
        async with service(tmp_path) as second:
            return await second.admit("call-9", candidate_name="Ada", job_title="Engineer")

    new_result = anyio.run(rejoin)
    assert new_result != old_result
    [pending] = list((tmp_path / "pending").glob("*.json"))
    envelope = json.loads(pending.read_text())
    assert envelope["resultId"] == old_result
    assert envelope["payload"]["status"] == "abandoned"
    assert json.loads((tmp_path / "active" / "call-9.json").read_text())["resultId"] == new_result


def test_the_periodic_sweep_takes_over_orphans_without_a_restart(tmp_path: Path) -> None:
    async def died() -> None:
        async with service(tmp_path) as first:
            await first.admit("call-7", candidate_name="Ada", job_title="Engineer")

    anyio.run(died)
    options = OutboxOptions(orphan_after_s=0, sweep_interval_s=0.01)
    with FakeWebhook(SECRET) as hook:

        async def running() -> None:
            async with service(tmp_path, hook, outbox=options):
                with anyio.fail_after(10):  # hang guard: the sweep must deliver it
                    while True:
                        if hook.received:
                            break
                        await anyio.sleep(0.01)

        anyio.run(running)
    assert [(p["interviewId"], p["status"]) for p in hook.received] == [("call-7", "abandoned")]
