// The demo page's logic: start an interview, connect the microphone over WebRTC, play the
// interviewer and show the live events. Plain browser JavaScript (no build step, no imports).
//
// Flow: POST /join-interview (X-API-Key) → {callId, clientToken, webrtcUrl, iceServers?};
// a peer connection with the microphone track and an "events" data channel (created before
// the offer, so the offer carries it); ICE gathered completely (no trickle); the offer POSTed
// to webrtcUrl as application/sdp with "Authorization: Bearer <clientToken>" → 201 with the
// SDP answer and a Location; DELETE on that Location hangs up (?end=true: and ends it).
//
// Events on the data channel (JSON): transcript {speaker, text, timestamp}, progress
// {questionIndex (0-based), category, totalQuestions}, latency {turnId, endpointing_ms,
// llm_ttft_ms, tts_ttfb_ms, voice_to_voice_ms}, ended {reason}.
//
// window.demoState is what the headless browser test reads: the transcript entries shown,
// every event received, the received audio energy from getStats() and the connection state.
"use strict";

(function () {
  const SAMPLE_QUESTIONS = [
    {
      id: "q1",
      text: "Tell me about a project you are proud of.",
      type: "behavioral",
      duration: 3,
      category: "experience",
    },
    {
      id: "q2",
      text: "How do you debug a slow database query?",
      type: "technical",
      duration: 3,
      category: "technical",
      keyPoints: ["query plan", "indexes"],
    },
  ];

  const ICE_GATHERING_TIMEOUT_MS = 10000; // then send the candidates gathered so far
  const STATS_INTERVAL_MS = 250;
  const END_PLAYOUT_MS = 1500; // after "ended", let the closing words finish before closing

  const END_REASONS = {
    completed: "The interview is complete. Thank you!",
    candidate_left: "The interview ended: the candidate left or stayed silent.",
    max_duration: "The interview reached its maximum duration.",
    shutdown: "The interview was stopped by the service.",
    failed: "The interview ended because of an error on the server.",
    hung_up: "You hung up.",
  };

  const $ = (id) => document.getElementById(id);

  // Base path: "" for /demo, "/python-api" for /python-api/demo (Firebase Hosting's prefix).
  const basePath = location.pathname.replace(/\/demo(\/.*)?$/, "");

  const state = {
    phase: "idle", // idle | starting | connecting | live | ended | error
    callId: null,
    connectionState: "new",
    iceConnectionState: "new",
    iceGatheringState: "new",
    dataChannelState: "none",
    transcript: [], // the entries shown, in order: {speaker, text, timestamp}
    events: [], // every message received on the data channel (parsed)
    progress: null,
    latency: [], // one entry per turn: the latency event's figures
    audio: {
      // inbound-rtp audio from pc.getStats(): what we received from the interviewer
      totalAudioEnergy: 0,
      audioLevel: 0,
      maxAudioLevel: 0,
      totalSamplesDuration: 0,
      packetsReceived: 0,
      bytesReceived: 0,
    },
    mic: { audioLevel: 0, packetsSent: 0, bytesSent: 0 },
    endedReason: null,
    error: null,
  };
  window.demoState = state;

  let pc = null;
  let micStream = null;
  let statsTimer = null;
  let hangupUrl = null;
  let clientToken = null;
  let apiKey = null;
  let admitted = false; // the server has started the interview (shut it down if we give up)

  // --- small helpers ------------------------------------------------------------------------

  function setPhase(phase) {
    state.phase = phase;
    $("phase").textContent = phase;
    const busy = phase === "starting" || phase === "connecting" || phase === "live";
    $("start").disabled = busy;
    $("hangup").disabled = !busy;
    for (const el of $("join-form").elements) {
      if (el.id !== "start") el.disabled = busy;
    }
  }

  function showError(message) {
    state.error = message;
    const el = $("error");
    el.textContent = message;
    el.hidden = false;
  }

  function clearError() {
    state.error = null;
    $("error").hidden = true;
    $("error").textContent = "";
  }

  function clock(seconds) {
    if (typeof seconds !== "number" || !isFinite(seconds)) return "";
    const s = Math.max(0, Math.floor(seconds));
    return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
  }

  function ms(value) {
    return typeof value === "number" && isFinite(value) ? String(Math.round(value)) : "—";
  }

  function field(event, snake, camel) {
    return event[snake] !== undefined ? event[snake] : event[camel];
  }

  async function readBody(response) {
    const text = await response.text();
    try {
      return JSON.parse(text);
    } catch (_) {
      return { error: text.slice(0, 300) || response.statusText };
    }
  }

  function reasonOf(body, response) {
    return (body && (body.error || body.detail)) || `${response.status} ${response.statusText}`;
  }

  // --- the form -----------------------------------------------------------------------------

  function fillSampleQuestions() {
    $("questions").value = JSON.stringify(SAMPLE_QUESTIONS, null, 2);
  }

  function readForm() {
    const key = $("api-key").value.trim();
    if (!key) throw new Error("API key: required (make demo prints it; or open /demo?key=...)");
    const candidateName = $("candidate-name").value.trim();
    if (!candidateName) throw new Error("Candidate name: required");
    const jobTitle = $("job-title").value.trim();
    if (!jobTitle) throw new Error("Job title: required");
    let questions;
    try {
      questions = JSON.parse($("questions").value);
    } catch (err) {
      throw new Error(`Questions: not valid JSON (${err.message})`);
    }
    if (!Array.isArray(questions) || questions.length === 0) {
      throw new Error("Questions: must be a JSON list with at least one question");
    }
    // The rest (ids, texts, durations) is checked by the server, which names the field.
    return { key, candidateName, jobTitle, questions };
  }

  function newCallId() {
    const bytes = new Uint8Array(6);
    crypto.getRandomValues(bytes);
    return "demo-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // --- live events --------------------------------------------------------------------------

  function addTranscript(event) {
    const speaker = event.speaker === "user" ? "user" : "agent";
    const entry = { speaker, text: String(event.text || ""), timestamp: event.timestamp };
    const li = document.createElement("li");
    li.className = speaker;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = speaker === "agent" ? "Interviewer" : $("candidate-name").value || "You";
    const time = document.createElement("time");
    time.textContent = clock(entry.timestamp);
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = entry.text;
    li.append(time, who, text);
    const list = $("transcript");
    list.append(li);
    list.scrollTop = list.scrollHeight;
    state.transcript.push(entry);
  }

  function showProgress(index, total, category) {
    const n = typeof total === "number" ? total : "—";
    const i = typeof index === "number" ? index + 1 : "—";
    $("progress").textContent =
      `Question ${i} of ${n}` + (category ? ` · ${category}` : "");
  }

  function addLatency(event) {
    const turn = field(event, "turnId", "turn_id");
    const figures = {
      turnId: turn,
      endpointing_ms: field(event, "endpointing_ms", "endpointingMs"),
      llm_ttft_ms: field(event, "llm_ttft_ms", "llmTtftMs"),
      tts_ttfb_ms: field(event, "tts_ttfb_ms", "ttsTtfbMs"),
      voice_to_voice_ms: field(event, "voice_to_voice_ms", "voiceToVoiceMs"),
    };
    const body = $("latency").tBodies[0];
    const selector = `tr[data-turn="${CSS.escape(String(turn))}"]`;
    let row = turn !== undefined ? body.querySelector(selector) : null;
    const known = row !== null;
    if (!known) {
      row = document.createElement("tr");
      if (turn !== undefined) row.dataset.turn = String(turn);
      body.append(row);
    }
    const cells = [
      turn !== undefined ? String(turn) : String(body.rows.length),
      ms(figures.endpointing_ms),
      ms(figures.llm_ttft_ms),
      ms(figures.tts_ttfb_ms),
      ms(figures.voice_to_voice_ms),
    ];
    row.replaceChildren(
      ...cells.map((text) => {
        const td = document.createElement("td");
        td.textContent = text;
        return td;
      })
    );
    const index = state.latency.findIndex((f) => known && f.turnId === turn);
    if (index >= 0) state.latency[index] = figures;
    else state.latency.push(figures);
  }

  function onEvent(raw) {
    let event;
    try {
      event = JSON.parse(raw);
    } catch (_) {
      state.events.push({ type: "invalid", raw: String(raw).slice(0, 200) });
      return;
    }
    state.events.push(event);
    switch (event && event.type) {
      case "transcript":
        addTranscript(event);
        break;
      case "progress":
        state.progress = event;
        showProgress(event.questionIndex, event.totalQuestions, event.category);
        break;
      case "latency":
        addLatency(event);
        break;
      case "ended":
        interviewEnded(String(event.reason || "completed"));
        break;
      default: // other events are kept in demoState.events only
        break;
    }
  }

  // --- WebRTC -------------------------------------------------------------------------------

  async function openMicrophone() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new Error(
        "Microphone: not available here. Browsers allow it only on https or on " +
          "http://localhost / http://127.0.0.1."
      );
    }
    try {
      return await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
        video: false,
      });
    } catch (err) {
      throw new Error(`Microphone: ${err.name}: ${err.message || "could not be opened"}`);
    }
  }

  function iceGatheringDone(peer, timeoutMs) {
    if (peer.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const finish = () => {
        clearTimeout(timer);
        peer.removeEventListener("icegatheringstatechange", check);
        resolve();
      };
      const check = () => {
        if (peer.iceGatheringState === "complete") finish();
      };
      const timer = setTimeout(finish, timeoutMs);
      peer.addEventListener("icegatheringstatechange", check);
    });
  }

  function watchPeer(peer) {
    peer.addEventListener("connectionstatechange", () => {
      state.connectionState = peer.connectionState;
      $("connection").textContent = peer.connectionState;
      if (peer !== pc) return;
      if (peer.connectionState === "connected" && state.phase === "connecting") setPhase("live");
      if (peer.connectionState === "failed" && state.phase !== "ended") {
        showError("The connection failed (ICE/DTLS). A TURN server may be needed (ICE_SERVERS).");
        teardown("error");
      }
    });
    peer.addEventListener("iceconnectionstatechange", () => {
      state.iceConnectionState = peer.iceConnectionState;
    });
    peer.addEventListener("icegatheringstatechange", () => {
      state.iceGatheringState = peer.iceGatheringState;
    });
    peer.addEventListener("track", (ev) => {
      const audio = $("remote-audio");
      audio.srcObject = ev.streams[0] || new MediaStream([ev.track]);
      audio.play().catch((err) => {
        if (err.name === "NotAllowedError") {
          showError("The browser blocked playback: press play to hear the interviewer.");
        }
      });
    });
  }

  function openEvents(peer) {
    const channel = peer.createDataChannel("events", { ordered: true });
    state.dataChannelState = channel.readyState;
    const update = () => {
      state.dataChannelState = channel.readyState;
    };
    channel.addEventListener("open", update);
    channel.addEventListener("close", update);
    channel.addEventListener("message", (ev) => onEvent(ev.data));
    return channel;
  }

  async function pollStats() {
    if (!pc) return;
    let report;
    try {
      report = await pc.getStats();
    } catch (_) {
      return;
    }
    report.forEach((r) => {
      const kind = r.kind || r.mediaType;
      if (kind !== "audio") return;
      if (r.type === "inbound-rtp") {
        const a = state.audio;
        a.totalAudioEnergy = r.totalAudioEnergy || 0;
        a.audioLevel = r.audioLevel || 0;
        a.maxAudioLevel = Math.max(a.maxAudioLevel, a.audioLevel);
        a.totalSamplesDuration = r.totalSamplesDuration || 0;
        a.packetsReceived = r.packetsReceived || 0;
        a.bytesReceived = r.bytesReceived || 0;
        $("remote-level").value = Math.sqrt(a.audioLevel); // audioLevel is linear, 0..1
      } else if (r.type === "media-source") {
        state.mic.audioLevel = r.audioLevel || 0;
        $("mic-level").value = Math.sqrt(state.mic.audioLevel);
      } else if (r.type === "outbound-rtp") {
        state.mic.packetsSent = r.packetsSent || 0;
        state.mic.bytesSent = r.bytesSent || 0;
      }
    });
  }

  async function connect(webrtcUrl, iceServers) {
    const peer = new RTCPeerConnection({ iceServers });
    pc = peer;
    watchPeer(peer);
    openEvents(peer); // before the offer, so the offer negotiates the data channel
    for (const track of micStream.getAudioTracks()) peer.addTrack(track, micStream);
    await peer.setLocalDescription(await peer.createOffer());
    await iceGatheringDone(peer, ICE_GATHERING_TIMEOUT_MS);
    if (peer !== pc) return; // hung up meanwhile
    const response = await fetch(webrtcUrl, {
      method: "POST",
      headers: { "Content-Type": "application/sdp", Authorization: `Bearer ${clientToken}` },
      body: peer.localDescription.sdp,
    });
    if (response.status !== 201 && !response.ok) {
      throw new Error(`WebRTC offer: ${reasonOf(await readBody(response), response)}`);
    }
    const answer = await response.text();
    const location = response.headers.get("Location");
    if (location) hangupUrl = new URL(location, webrtcUrl).href;
    if (peer !== pc) return;
    await peer.setRemoteDescription({ type: "answer", sdp: answer });
    statsTimer = setInterval(pollStats, STATS_INTERVAL_MS);
  }

  // --- start, hang up, end ------------------------------------------------------------------

  async function start(ev) {
    ev.preventDefault();
    clearError();
    let form;
    try {
      form = readForm();
    } catch (err) {
      showError(err.message);
      return;
    }
    resetCall();
    apiKey = form.key;
    setPhase("starting");
    try {
      micStream = await openMicrophone(); // before joining: no interview without a microphone
      if (state.phase === "ended") return teardown("ended"); // hung up meanwhile
      const callId = newCallId();
      const response = await fetch(`${basePath}/join-interview`, {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-API-Key": form.key },
        body: JSON.stringify({
          callId,
          candidateName: form.candidateName,
          jobTitle: form.jobTitle,
          questions: form.questions,
        }),
      });
      const joined = await readBody(response);
      admitted = response.ok && Boolean(joined.success);
      if (admitted) state.callId = joined.callId || callId;
      if (state.phase === "ended") {
        await abandon(); // hung up while joining: end the interview just admitted
        return teardown("ended");
      }
      if (!response.ok || !joined.success) {
        throw new Error(`Join: ${reasonOf(joined, response)}`);
      }
      if (!joined.webrtcUrl || !joined.clientToken) {
        throw new Error("Join: the server returned no webrtcUrl/clientToken (WebRTC is off?)");
      }
      clientToken = joined.clientToken;
      showProgress(null, form.questions.length, null);
      setPhase("connecting");
      const iceServers = Array.isArray(joined.iceServers) ? joined.iceServers : [];
      await connect(new URL(joined.webrtcUrl, location.href).href, iceServers);
    } catch (err) {
      if (state.phase === "ended") return; // hung up while starting
      showError(err.message || String(err));
      await abandon();
      teardown("error");
    }
  }

  // The interview was admitted but never connected: end it now rather than after the
  // server's join timeout.
  async function abandon() {
    if (!admitted || !state.callId || !apiKey || hangupUrl) return;
    try {
      await fetch(`${basePath}/agents/${encodeURIComponent(state.callId)}/shutdown`, {
        method: "POST",
        headers: { "X-API-Key": apiKey },
      });
    } catch (_) {
      /* the server ends it after its join timeout */
    }
  }

  // The hang-up button ends the interview (?end=true). Without it the server would keep the
  // interview for a reconnect within its grace period (what a closed tab gets, see pagehide).
  async function hangUp() {
    const url = hangupUrl && new URL(hangupUrl);
    if (url) url.searchParams.set("end", "true");
    interviewEnded("hung_up", 0);
    if (url) {
      try {
        let response = await fetch(url, {
          method: "DELETE",
          headers: { Authorization: `Bearer ${clientToken}` },
        });
        if ((response.status === 401 || response.status === 403) && apiKey) {
          response = await fetch(url, { method: "DELETE", headers: { "X-API-Key": apiKey } });
        }
      } catch (_) {
        /* the server sees the peer go and ends the interview after its grace */
      }
    } else {
      await abandon();
    }
  }

  function interviewEnded(reason, playoutMs = END_PLAYOUT_MS) {
    if (state.phase === "ended") return;
    state.endedReason = reason;
    const el = $("ended");
    el.textContent = END_REASONS[reason] || `The interview ended (${reason}).`;
    el.hidden = false;
    setPhase("ended");
    setTimeout(() => teardown("ended"), playoutMs);
  }

  function teardown(phase) {
    if (statsTimer !== null) {
      clearInterval(statsTimer);
      statsTimer = null;
    }
    if (pc) {
      const peer = pc;
      pc = null;
      peer.close();
      state.connectionState = "closed";
      $("connection").textContent = "closed";
    }
    if (micStream) {
      for (const track of micStream.getTracks()) track.stop();
      micStream = null;
    }
    $("remote-audio").srcObject = null;
    $("remote-level").value = 0;
    $("mic-level").value = 0;
    if (state.phase !== "ended" || phase === "ended") setPhase(phase);
  }

  function resetCall() {
    Object.assign(state, {
      callId: null,
      connectionState: "new",
      iceConnectionState: "new",
      iceGatheringState: "new",
      dataChannelState: "none",
      transcript: [],
      events: [],
      progress: null,
      latency: [],
      endedReason: null,
      error: null,
    });
    state.audio = {
      totalAudioEnergy: 0,
      audioLevel: 0,
      maxAudioLevel: 0,
      totalSamplesDuration: 0,
      packetsReceived: 0,
      bytesReceived: 0,
    };
    state.mic = { audioLevel: 0, packetsSent: 0, bytesSent: 0 };
    hangupUrl = null;
    clientToken = null;
    admitted = false;
    $("transcript").replaceChildren();
    $("latency").tBodies[0].replaceChildren();
    $("ended").hidden = true;
    $("connection").textContent = "—";
    showProgress(null, null, null);
  }

  // --- page setup ---------------------------------------------------------------------------

  // Which interviewer this server runs (offline stand-ins in development), for the reader.
  async function showService() {
    try {
      const response = await fetch(`${basePath}/health`);
      const health = await response.json();
      $("service").textContent =
        `Service ${health.version || ""}: ${health.mode || health.status || "unknown"}` +
        (health.config_valid === false ? " — configuration incomplete" : "");
    } catch (_) {
      $("service").textContent = "The service did not answer /health.";
    }
  }

  function init() {
    fillSampleQuestions();
    showService();
    const params = new URLSearchParams(location.search);
    const key = params.get("key");
    if (key) {
      $("api-key").value = key;
      params.delete("key"); // keep the key out of the address bar and the history
      const query = params.toString();
      history.replaceState(null, "", location.pathname + (query ? `?${query}` : "") + location.hash);
    }
    $("join-form").addEventListener("submit", start);
    $("reset-questions").addEventListener("click", fillSampleQuestions);
    $("hangup").addEventListener("click", hangUp);
    window.addEventListener("pagehide", () => {
      if (hangupUrl && state.phase === "live") {
        // best effort: the server also ends the interview once the peer is gone for long
        fetch(hangupUrl, {
          method: "DELETE",
          headers: { Authorization: `Bearer ${clientToken}` },
          keepalive: true,
        }).catch(() => {});
      }
    });
    setPhase("idle");
  }

  init();
})();
