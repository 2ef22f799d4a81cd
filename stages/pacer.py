"""Real-time egress pacing: exact frames at wall-clock pace, a jitter buffer, instant flush.

Speech providers deliver a reply in bursts of any size and sample rate; a transport wants one
frame of exactly ``frame_ms`` every ``frame_ms``. The :class:`Pacer` resamples each reply to
the output rate, cuts it into exact frames and hands out one frame per tick of the call's
clock. Ticks follow absolute deadlines (``origin + n * period``), so scheduling delays never
accumulate into drift.

* **Jitter buffer.** A reply starts playing once ``jitter_buffer_ms`` of it is queued (or its
  final chunk has arrived), so a bursty provider does not stutter at the start.
* **Underruns.** A tick with a reply in progress (started, not finished) and nothing queued
  emits silence (or nothing, without ``emit_silence``) and is counted. Playback resumes with
  the next frame that arrives; there is no re-buffering.
* **Interrupts.** The pacer listens on the control lane. An interrupt clears everything queued
  synchronously, inside :meth:`~pipeline.control.ControlLane.interrupt`, so the very next
  tick is silent.
* **Playback reports.** :meth:`Pacer.played` says how much of a reply (an epoch) was actually
  heard, so the brain's history can hold only what the candidate heard.
* **Agent-speaking callbacks.** ``on_playback_start(t)`` is called with ``ctx.clock.now()``
  when the first frame of a reply is emitted; ``on_playback_stop(t)`` when its last frame has
  been emitted, or when an interrupt cuts it short. Barge-in detection (stages/vad.py) uses them
  to know when the agent is talking, without the pacer knowing about the VAD.

The stage ends when its inbox has ended and everything queued has been played out.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

import anyio

from pipeline.audio import VAD_FRAME_MS, Reframer, Resampler, frame_bytes
from pipeline.control import Interrupt
from pipeline.frames import AgentAudio
from pipeline.stage import CallContext, Inbox, Outbox

PlaybackCallback = Callable[[float], None]

_MAX_REPORTS = 256  # playback reports kept (most recent epochs); older ones are forgotten


@dataclass
class PacerOptions:
    """How the pacer shapes egress audio."""

    sample_rate: int = 48000
    """Rate (Hz) of every egress frame; each reply is resampled to it. 48 kHz suits Opus."""
    frame_ms: int = 20
    """Length of one egress frame and the tick period (10, 20 or 30 ms)."""
    jitter_buffer_ms: int = 60
    """Audio to accumulate at the start of a reply before playback begins, unless the reply's
    final chunk has arrived. Absorbs bursty providers at the cost of this much latency."""
    max_buffer_s: float = 30.0
    """Most audio held queued; beyond it the oldest frames are dropped (``dropped_overflow``)."""
    emit_silence: bool = True
    """Emit silent frames when idle or on underrun, so the transport gets a steady cadence.
    When False nothing is emitted while there is nothing to play."""
    max_lag_frames: int = 3
    """If the ticker falls behind by more than this many frames (a stalled loop), it skips the
    missed ticks instead of bursting them out, and counts them as ``late_ticks``."""
    realtime: bool = True
    """Pace frames at wall-clock speed. False (batch runs to a file): hand frames on as fast as
    the egress takes them, with no silence and no jitter wait; playback reports still hold."""
    stall_timeout_s: float | None = 10.0
    """A reply whose audio stopped arriving this long ago without its final chunk is treated
    as finished (so underruns and the agent-speaking state do not last forever). None: never."""

    def __post_init__(self) -> None:
        if self.sample_rate <= 0:
            raise ValueError(f"PacerOptions.sample_rate must be positive, got {self.sample_rate}")
        if self.frame_ms not in VAD_FRAME_MS:
            raise ValueError(f"PacerOptions.frame_ms must be one of {VAD_FRAME_MS}")
        frame_bytes(self.sample_rate, self.frame_ms)  # raises unless whole samples per frame
        if self.jitter_buffer_ms < 0:
            raise ValueError("PacerOptions.jitter_buffer_ms must not be negative")
        if self.max_buffer_s <= 0:
            raise ValueError("PacerOptions.max_buffer_s must be positive")
        if self.max_lag_frames < 1:
            raise ValueError("PacerOptions.max_lag_frames must be at least 1")
        if self.stall_timeout_s is not None and self.stall_timeout_s <= 0:
            raise ValueError("PacerOptions.stall_timeout_s must be positive or None")


@dataclass(frozen=True, slots=True)
class EgressFrame:
    """One paced frame for the transport: 16-bit mono PCM of exactly ``frame_ms``.

    ``epoch``/``turn_id`` are those of the reply it belongs to (None for silence); ``index``
    counts every frame the pacer has emitted, so a gap means frames were lost downstream.
    """

    pcm: bytes
    sample_rate: int
    epoch: int | None
    turn_id: int | None
    silent: bool
    index: int


@dataclass(frozen=True, slots=True)
class PlaybackReport:
    """How much of one reply was played.

    ``seconds_total`` is the reply's audio received so far; ``text_played`` joins the ``text``
    of the chunks whose audio was played to the end (a space is put between pieces that have
    no whitespace of their own at the join).
    """

    epoch: int
    seconds_played: float
    seconds_total: float
    completed: bool
    text_played: str


@dataclass
class PacerStats:
    """Counters of one pacer (all frames are ``frame_ms`` long)."""

    frames_sent: int = 0
    audio_frames: int = 0
    underruns: int = 0
    dropped_on_interrupt: int = 0
    dropped_overflow: int = 0
    dropped_stale: int = 0
    late_ticks: int = 0
    replies: int = 0


class _Reply:
    """The pacer's state for one reply (one epoch)."""

    __slots__ = (
        "completed",
        "epoch",
        "final",
        "last_input",
        "played",
        "played_text",
        "position",
        "queued",
        "received",
        "reframer",
        "resampler",
        "started",
        "texts",
        "turn_id",
    )

    def __init__(self, epoch: int, turn_id: int | None, reframer: Reframer, now: float) -> None:
        self.epoch = epoch
        self.turn_id = turn_id
        self.reframer = reframer
        self.resampler: Resampler | None = None
        self.queued = 0  # frames of this reply in the pacer's queue
        self.received = 0.0  # output-rate samples of audio received
        self.position = 0  # output-rate samples consumed from the queue (played or dropped)
        self.played = 0  # output-rate samples emitted
        self.texts: deque[tuple[float, str]] = deque()  # (end position, text) not yet played
        self.played_text: list[str] = []
        self.started = False
        self.final = False
        self.completed = False
        self.last_input = now


class Pacer:
    """Paces agent audio out at real time; see the module docstring.

    Inbox: :class:`~pipeline.frames.AgentAudio` (any rate, any chunk size); other frames pass
    straight through. Outbox: :class:`EgressFrame` every ``frame_ms`` plus the passed frames.

    ``on_playback_start(t)`` / ``on_playback_stop(t)`` (optional, ``t`` = ``ctx.clock.now()``)
    tell an observer such as the VAD's barge-in logic when the agent starts and stops being
    heard: start when a reply's first frame is emitted; stop when its last frame has been
    emitted or an interrupt cut it short. They run inside the pacer's tick (or inside
    ``interrupt()``), so they must be quick and must not block; exceptions are logged.
    """

    def __init__(
        self,
        options: PacerOptions | None = None,
        *,
        name: str = "pacer",
        on_playback_start: PlaybackCallback | None = None,
        on_playback_stop: PlaybackCallback | None = None,
    ) -> None:
        self.name = name
        self.options = options or PacerOptions()
        self.on_playback_start = on_playback_start
        self.on_playback_stop = on_playback_stop
        self.on_reply_done: PlaybackCallback | None = None
        """Called with the clock time whenever a reply is over (played, cut or empty)."""
        self.stats = PacerStats()
        self.origin: float | None = None
        """Clock time of tick 0 of the current schedule (frame n is due at origin + n*period)."""
        opts = self.options
        self._rate = opts.sample_rate
        self._period = opts.frame_ms / 1000.0
        self._frame_samples = opts.sample_rate * opts.frame_ms // 1000
        self._silence = bytes(frame_bytes(opts.sample_rate, opts.frame_ms))
        self._jitter_frames = math.ceil(opts.jitter_buffer_ms / opts.frame_ms)
        self._max_frames = max(1, int(opts.max_buffer_s * 1000 / opts.frame_ms))
        self._reports: OrderedDict[int, _Reply] = OrderedDict()
        self._reset()

    def _reset(self) -> None:
        self._queue: deque[tuple[_Reply, bytes]] = deque()
        self._replies: deque[_Reply] = deque()  # in play order; the head is playing or next
        self._by_epoch: dict[int, _Reply] = {}
        self._index = 0
        self._inbox_done = False
        self._wake = anyio.Event()

    # -- public -------------------------------------------------------------------------------

    def played(self, epoch: int) -> PlaybackReport:
        """How much of reply ``epoch`` was played (all zero if the pacer never saw it)."""
        r = self._reports.get(epoch)
        if r is None:
            return PlaybackReport(epoch, 0.0, 0.0, False, "")
        rate = self._rate
        return PlaybackReport(
            epoch=epoch,
            seconds_played=min(r.played, r.received) / rate,
            seconds_total=r.received / rate,
            completed=r.completed,
            text_played=_join_text(r.played_text),
        )

    @property
    def queued_seconds(self) -> float:
        """Audio waiting to be played."""
        return len(self._queue) * self._period

    async def run(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        self._reset()
        self._ctx = ctx
        unsubscribe = ctx.control.subscribe(self._on_interrupt)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._ticker, ctx, outbox)
                await self._receive(ctx, inbox, outbox)
        finally:
            unsubscribe()

    # -- input --------------------------------------------------------------------------------

    async def _receive(self, ctx: CallContext, inbox: Inbox, outbox: Outbox) -> None:
        try:
            async for frame in inbox:
                if isinstance(frame, AgentAudio):
                    self._accept(frame, ctx.clock.now())
                else:
                    await outbox.send(frame)
        finally:
            self._inbox_done = True
            for reply in list(self._replies):
                if not reply.final:
                    self._finalize(reply, ctx.clock.now())
            self._wake.set()

    def _accept(self, chunk: AgentAudio, now: float) -> None:
        if chunk.epoch < self._ctx.control.epoch:
            self.stats.dropped_stale += 1
            return
        reply = self._by_epoch.get(chunk.epoch)
        if reply is None:
            if chunk.epoch in self._reports or (
                self._replies and chunk.epoch < self._replies[-1].epoch
            ):
                self.stats.dropped_stale += 1  # a reply already over, or older than a newer one
                return
            for older in list(self._replies):  # a newer reply ends the older ones
                if not older.final:
                    self._finalize(older, now)
            reply = self._new_reply(chunk, now)
        if chunk.turn_id is not None and reply.turn_id is None:
            reply.turn_id = chunk.turn_id
        reply.last_input = now
        rate = chunk.sample_rate
        if rate <= 0:
            raise ValueError(f"AgentAudio.sample_rate must be positive, got {rate}")
        resampler = reply.resampler
        if resampler is None or resampler.in_rate != rate:
            tail = resampler.flush() if resampler is not None else b""
            if tail:
                self._enqueue(reply, reply.reframer.push(tail))
            resampler = reply.resampler = Resampler(rate, self._rate)
        reply.received += (len(chunk.pcm) // 2) * self._rate / rate
        if chunk.text:
            reply.texts.append((reply.received, chunk.text))
        self._enqueue(reply, reply.reframer.push(resampler.process(chunk.pcm)))
        if chunk.final:
            self._finalize(reply, now)
        self._wake.set()

    def _new_reply(self, chunk: AgentAudio, now: float) -> _Reply:
        reply = _Reply(chunk.epoch, chunk.turn_id, Reframer(self._rate, self.options.frame_ms), now)
        self._replies.append(reply)
        self._by_epoch[chunk.epoch] = reply
        self._reports[chunk.epoch] = reply
        while len(self._reports) > _MAX_REPORTS:
            self._reports.popitem(last=False)
        self.stats.replies += 1
        return reply

    def _enqueue(self, reply: _Reply, frames: list[bytes]) -> None:
        if not frames:
            return
        queue = self._queue
        queue.extend((reply, pcm) for pcm in frames)
        reply.queued += len(frames)
        if len(queue) > self._max_frames:
            self._drop_oldest(len(queue) - self._max_frames)

    def _drop_oldest(self, n: int) -> None:
        for _ in range(n):
            reply, _pcm = self._queue.popleft()
            reply.queued -= 1
            reply.position += self._frame_samples
            texts = reply.texts
            while texts and texts[0][0] <= reply.position:
                texts.popleft()  # its audio was not (fully) played: not heard
        self.stats.dropped_overflow += n

    def _finalize(self, reply: _Reply, now: float) -> None:
        """No more audio will come for ``reply``: drain its resampler and reframer."""
        if reply.final:
            return
        reply.final = True
        if reply.resampler is not None:
            tail = reply.resampler.flush()
            if tail:
                self._enqueue(reply, reply.reframer.push(tail))
            reply.resampler = None
        rest = reply.reframer.flush(pad=True)
        if rest is not None:
            self._enqueue(reply, [rest])
        if reply.queued == 0:
            self._finish(reply, now)

    def _finish(self, reply: _Reply, now: float, completed: bool = True) -> None:
        """The reply is over: played to the end (``completed``) or cut short."""
        if self._replies and self._replies[0] is reply:
            self._replies.popleft()
        elif reply in self._replies:
            self._replies.remove(reply)
        self._by_epoch.pop(reply.epoch, None)
        reply.resampler = None
        reply.completed = completed
        if completed:
            reply.played_text.extend(text for _, text in reply.texts)
        reply.texts.clear()
        if reply.started:
            self._notify(self.on_playback_stop, now)
        self._notify(self.on_reply_done, now)

    # -- interrupts ---------------------------------------------------------------------------

    def _on_interrupt(self, event: Interrupt) -> None:
        """Runs inside ``ControlLane.interrupt()``: drop everything older than the new epoch."""
        stale = [r for r in self._replies if r.epoch < event.epoch]
        if not stale:
            return
        queue = self._queue
        before = len(queue)
        if len(stale) == len(self._replies):
            queue.clear()
        else:
            self._queue = deque(item for item in queue if item[0].epoch >= event.epoch)
        self.stats.dropped_on_interrupt += before - len(self._queue)
        now = self._ctx.clock.now()
        for reply in stale:
            reply.queued = 0
            self._finish(reply, now, completed=False)

    # -- output -------------------------------------------------------------------------------

    async def _ticker(self, ctx: CallContext, outbox: Outbox) -> None:
        if not self.options.realtime:
            await self._unpaced(outbox)
            return
        clock = ctx.clock
        period = self._period
        max_lag = self.options.max_lag_frames * period
        emit_silence = self.options.emit_silence
        origin = self.origin = clock.now()
        n = 0
        while True:
            if self._inbox_done and not self._replies:
                return
            if not emit_silence and not self._replies:
                # Idle without a cadence to keep: sleep until audio (or the end) arrives.
                await self._wake.wait()
                self._wake = anyio.Event()
                if not self._replies:
                    continue
                origin = self.origin = clock.now()
                n = 0
            deadline = origin + n * period
            await clock.sleep_until(deadline)
            n += 1
            lag = clock.now() - deadline
            if lag > max_lag:
                skipped = int(lag / period + 1e-6)  # whole periods missed (float-safe)
                n += skipped
                self.stats.late_ticks += skipped
            frame = self._next_frame()
            if frame is not None:
                await outbox.send(frame)

    async def _unpaced(self, outbox: Outbox) -> None:
        """Batch mode: every queued frame goes out at once, in order; idle waits for input."""
        while True:
            replies = self._replies
            if replies and replies[0].queued:
                await outbox.send(self._play(replies[0]))
                continue
            if self._inbox_done and not replies:
                return
            await self._wake.wait()
            self._wake = anyio.Event()

    def _next_frame(self) -> EgressFrame | None:
        """The frame for this tick (the per-tick work: keep it small)."""
        replies = self._replies
        if replies:
            head = replies[0]
            if head.queued and (head.started or head.final or head.queued >= self._jitter_frames):
                return self._play(head)
            if head.started:
                self.stats.underruns += 1
                self._ctx.usage.underruns += 1
            self._check_stall(head)
        if not self.options.emit_silence:
            return None
        frame = EgressFrame(self._silence, self._rate, None, None, True, self._index)
        self._index += 1
        self.stats.frames_sent += 1
        return frame

    def _play(self, reply: _Reply) -> EgressFrame:
        _, pcm = self._queue.popleft()
        reply.queued -= 1
        ctx = self._ctx
        if not reply.started:
            reply.started = True
            ctx.mark(reply.turn_id, "first_egress")
            self._notify(self.on_playback_start, ctx.clock.now())
        before = min(reply.played, reply.received)
        reply.played += self._frame_samples
        reply.position += self._frame_samples
        ctx.usage.audio_out_seconds += (min(reply.played, reply.received) - before) / self._rate
        texts = reply.texts
        while texts and texts[0][0] <= reply.position:
            reply.played_text.append(texts.popleft()[1])
        frame = EgressFrame(pcm, self._rate, reply.epoch, reply.turn_id, False, self._index)
        self._index += 1
        stats = self.stats
        stats.frames_sent += 1
        stats.audio_frames += 1
        if reply.final and not reply.queued:
            self._finish(reply, ctx.clock.now())
        return frame

    def _check_stall(self, head: _Reply) -> None:
        timeout = self.options.stall_timeout_s
        if timeout is None or head.final:
            return
        now = self._ctx.clock.now()
        if now - head.last_input >= timeout:
            self._ctx.log.warning(
                "pacer: reply %d got no audio for %.1f s without a final chunk; ending it",
                head.epoch,
                now - head.last_input,
            )
            self._finalize(head, now)

    def _notify(self, callback: PlaybackCallback | None, at: float) -> None:
        if callback is None:
            return
        try:
            callback(at)
        except Exception:  # a broken observer must not stop the audio
            self._ctx.log.exception("pacer: playback callback failed")


def _join_text(pieces: list[str]) -> str:
    out = ""
    for piece in pieces:
        if out and not out[-1].isspace() and not piece[:1].isspace():
            out += " "
        out += piece
    return out
