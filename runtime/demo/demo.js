// The runtime's live-stream demo: no build step, no dependencies.
//
// POST /api/v1/stream (with the API key, when the runtime has keys) -> a session's URLs and token; from then
// on every call carries only the session's token (X-Stream-Token). The browser sends a receive-only offer
// (one video, one audio track); the media then flows from the GPU service over ICE.
//
// Figures shown: offer -> first frame, Say -> speech_started, Say -> first frame whose mouth region changed
// (each frame drawn small on a canvas and compared with the frame at the click), frames counted with
// requestVideoFrameCallback, and getStats (fps, decoded / dropped frames, jitter, audio received).
// Everything measured is also in window.demo, for tests.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const video = $("video");
  const keyRequired = document.body.dataset.apiKeyRequired === "true";
  const demo = window.demo = {
    state: "idle", ice: null, session: null, frames: 0, fps: null, firstFrameMs: null,
    says: [], events: [], stats: null, errors: [], motion: [],
  };
  let pc = null, session = null, eventsAbort = null, statsTimer = null, offerAt = null, frameHandle = null;
  let frameTimes = [], lastGrey = null;
  let watch = null;  // the Say being timed: {at, level, utterance, started, changed}
  const CHANGE_LEVEL = 4;  // grey levels (mean over an 8x8 block of the mouth region, frame to frame) that count

  if (keyRequired) {
    $("key-box").hidden = false;
    $("api-key").value = sessionStorage.getItem("avatar-api-key") || "";
  }

  function setState(state) {
    demo.state = state;
    $("state").textContent = state;
    $("state").dataset.state = state;
    const live = ["connecting", "connected", "disconnected", "new", "checking", "creating"].includes(state);
    $("connect").disabled = live;
    $("disconnect").disabled = !live && state !== "failed";
    $("say").disabled = $("interrupt").disabled = state !== "connected";
  }

  function log(line) {
    const el = $("log");
    el.textContent += `${new Date().toISOString().slice(11, 23)} ${line}\n`;
    el.scrollTop = el.scrollHeight;
  }

  function fail(err) {
    const text = String(err && err.message || err);
    demo.errors.push(text);
    $("error").textContent = text;
    log(`error: ${text}`);
  }

  const ms = (v) => (v == null ? "\u2013" : `${Math.round(v)} ms`);

  async function api(method, url, body, withKey) {
    const headers = {};
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (withKey) {
      const key = $("api-key").value.trim();
      if (key) headers["X-API-Key"] = key;
    } else {
      headers["X-Stream-Token"] = session.token;
    }
    const res = await fetch(url, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
    if (!res.ok) {
      let text = res.statusText;
      try { text = (await res.json()).error || text; } catch (_) { /* not JSON */ }
      const wait = res.headers.get("Retry-After");
      throw new Error(`${method} ${new URL(url, location.href).pathname} answered ${res.status}: ${text}` +
                      (wait ? ` (retry after ${wait} s)` : ""));
    }
    return res.status === 204 ? null : res.json();
  }

  // -- server-sent events over fetch (the token in a header, not in the URL) ----------------------------

  async function readEvents(url) {
    eventsAbort = new AbortController();
    const res = await fetch(url, {headers: {"X-Stream-Token": session.token, Accept: "text/event-stream"},
                                  signal: eventsAbort.signal});
    if (!res.ok) throw new Error(`events answered ${res.status}`);
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true}).replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
        if (data) {
          try { onEvent(JSON.parse(data)); } catch (e) { log(`unreadable event: ${data.slice(0, 80)}`); }
        }
      }
    }
  }

  function onEvent(ev) {
    const now = performance.now();
    demo.events.push({...ev, received_ms: now});
    log(`${ev.event}${ev.utterance_id ? " " + ev.utterance_id : ""}` +
        (ev.position_s != null ? ` position ${ev.position_s.toFixed(2)} s` : "") + (ev.interrupted ? " (interrupted)" : ""));
    if (ev.event === "speech_started" && watch && watch.started == null &&
        (watch.utterance == null || watch.utterance === ev.utterance_id)) {
      watch.started = now - watch.at;
      $("m-speech-started").textContent = ms(watch.started);
    }
    if (ev.event === "session_closed") setState("closed");
  }

  // -- frames: counted with requestVideoFrameCallback; the mouth region compared after a Say -------------

  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = 128;
  const ctx = canvas.getContext("2d", {willReadFrequently: true});

  function mouthRegion() {
    // the lower part of the face (fractions of the frame), or the frame's lower middle when the box is unknown
    const box = session && session.face_box;
    const [x, y, w, h] = box || [0.25, 0.25, 0.5, 0.6];
    return [x + 0.2 * w, y + 0.6 * h, 0.6 * w, 0.4 * h];
  }

  function grab() {
    const [fx, fy, fw, fh] = mouthRegion();
    const vw = video.videoWidth, vh = video.videoHeight;
    ctx.drawImage(video, fx * vw, fy * vh, fw * vw, fh * vh, 0, 0, 128, 128);
    const rgba = ctx.getImageData(0, 0, 128, 128).data;
    const grey = new Float32Array(128 * 128);
    for (let i = 0; i < grey.length; i++) grey[i] = 0.299 * rgba[4 * i] + 0.587 * rgba[4 * i + 1] + 0.114 * rgba[4 * i + 2];
    return grey;
  }

  function blockChange(a, b) {
    let worst = 0;
    for (let by = 0; by < 128; by += 8) {
      for (let bx = 0; bx < 128; bx += 8) {
        let sum = 0;
        for (let y = by; y < by + 8; y++) for (let x = bx; x < bx + 8; x++) sum += Math.abs(a[y * 128 + x] - b[y * 128 + x]);
        worst = Math.max(worst, sum / 64);
      }
    }
    return worst;
  }

  function onFrame(now, meta) {
    if (!pc) return;
    demo.frames++;
    if (demo.firstFrameMs == null && offerAt != null) {
      demo.firstFrameMs = now - offerAt;
      $("m-first-frame").textContent = ms(demo.firstFrameMs);
      log(`first frame ${video.videoWidth}x${video.videoHeight}`);
    }
    frameTimes.push(now);
    while (frameTimes.length && now - frameTimes[0] > 2000) frameTimes.shift();
    demo.fps = frameTimes.length > 1 ? (frameTimes.length - 1) * 1000 / (frameTimes[frameTimes.length - 1] - frameTimes[0]) : null;
    if (video.videoWidth) {
      // the mouth region's change from the previous frame: idle motion is slow, a mouth opening is not
      const grey = grab();
      const score = lastGrey ? blockChange(grey, lastGrey) : 0;
      lastGrey = grey;
      demo.motion.push([Math.round(now), Math.round(score * 10) / 10]);
      while (demo.motion.length && now - demo.motion[0][0] > 60000) demo.motion.shift();
      if (watch && watch.changed == null) {
        if (watch.level == null) {  // what idle motion alone reached in the 2 s before the click
          const idle = demo.motion.filter(([t]) => t < watch.at && t > watch.at - 2000).map(([, v]) => v);
          watch.level = Math.max(CHANGE_LEVEL, 2 * Math.max(0, ...idle));
        }
        if (now > watch.at && score >= watch.level) {
          watch.changed = now - watch.at;
          $("m-first-change").textContent = ms(watch.changed);
        } else if (now - watch.at > 15000) {
          watch = null;  // nothing moved in 15 s: this one is not timed
        }
      }
    }
    frameHandle = video.requestVideoFrameCallback(onFrame);
  }

  // -- stats ---------------------------------------------------------------------------------------------

  let lastBytes = null;
  async function pollStats() {
    if (!pc) return;
    const report = await pc.getStats();
    const s = {video: null, audio: null, rtt_ms: null};
    const codecs = {};
    report.forEach((r) => { if (r.type === "codec") codecs[r.id] = r.mimeType; });
    report.forEach((r) => {
      if (r.type === "inbound-rtp" && (r.kind === "video" || r.kind === "audio")) {
        s[r.kind] = {
          framesDecoded: r.framesDecoded, framesDropped: r.framesDropped, framesPerSecond: r.framesPerSecond,
          frameWidth: r.frameWidth, frameHeight: r.frameHeight, jitter: r.jitter, packetsLost: r.packetsLost,
          packetsReceived: r.packetsReceived, bytesReceived: r.bytesReceived,
          jitterBufferDelayMs: r.jitterBufferEmittedCount ? 1000 * r.jitterBufferDelay / r.jitterBufferEmittedCount : null,
          totalSamplesReceived: r.totalSamplesReceived, audioLevel: r.audioLevel, concealedSamples: r.concealedSamples,
          codec: codecs[r.codecId] || null,
        };
      }
      if (r.type === "candidate-pair" && r.nominated && r.state === "succeeded" && r.currentRoundTripTime != null) {
        s.rtt_ms = 1000 * r.currentRoundTripTime;
      }
    });
    const now = performance.now();
    const bytes = (s.video ? s.video.bytesReceived : 0) + (s.audio ? s.audio.bytesReceived : 0);
    s.kbps = lastBytes ? 8 * (bytes - lastBytes[1]) / (now - lastBytes[0]) : null;
    lastBytes = [now, bytes];
    demo.stats = s;
    const v = s.video || {}, a = s.audio || {};
    $("m-frames").textContent = `${demo.frames} / ${demo.fps == null ? "\u2013" : demo.fps.toFixed(1)}`;
    $("m-decoded").textContent = `${v.framesDecoded ?? "\u2013"} / ${v.framesDropped ?? "\u2013"}`;
    $("m-fps").textContent = v.framesPerSecond == null ? "\u2013" : `${v.framesPerSecond}`;
    $("m-jitter").textContent = `${v.jitter == null ? "\u2013" : ms(1000 * v.jitter)} / ${a.jitter == null ? "\u2013" : ms(1000 * a.jitter)}`;
    $("m-jbuf").textContent = ms(v.jitterBufferDelayMs);
    $("m-audio").textContent = a.totalSamplesReceived == null ? "\u2013" :
      `${(a.totalSamplesReceived / 48000).toFixed(1)} s / ${a.audioLevel == null ? "\u2013" : a.audioLevel.toFixed(3)}`;
    $("m-codec").textContent = `${[v.codec, a.codec].filter(Boolean).join(", ") || "\u2013"} / ` +
      (s.kbps == null ? "\u2013" : `${Math.round(s.kbps)} kbit/s`);
    $("m-rtt").textContent = ms(s.rtt_ms);
  }

  // -- actions -------------------------------------------------------------------------------------------

  function gathered(peer, timeoutMs) {
    return new Promise((resolve) => {
      if (peer.iceGatheringState === "complete") return resolve();
      const done = () => { if (peer.iceGatheringState === "complete") resolve(); };
      peer.addEventListener("icegatheringstatechange", done);
      setTimeout(resolve, timeoutMs);  // whatever is gathered by then; checks from the other side fill in
    });
  }

  async function connect() {
    $("error").textContent = "";
    for (const id of ["m-first-frame", "m-speech-started", "m-first-change"]) $(id).textContent = "\u2013";
    Object.assign(demo, {frames: 0, fps: null, firstFrameMs: null, stats: null});
    frameTimes = [];
    lastGrey = null;
    lastBytes = null;
    if (keyRequired) sessionStorage.setItem("avatar-api-key", $("api-key").value.trim());
    setState("creating");
    try {
      const body = {};
      if ($("avatar").value.trim()) body.avatar_id = $("avatar").value.trim();
      if ($("size").value) body.size = $("size").value;
      session = await api("POST", "/api/v1/stream", body, true);
      demo.session = {stream_id: session.stream_id, fps: session.fps, width: session.width, height: session.height,
                      face_box: session.face_box};
      log(`session ${session.stream_id}: ${session.width}x${session.height} at ${session.fps} fps`);
      readEvents(session.events_url).catch((e) => { if (e.name !== "AbortError") fail(e); });
      pc = new RTCPeerConnection({iceServers: session.ice_servers || []});
      pc.addTransceiver("video", {direction: "recvonly"});
      pc.addTransceiver("audio", {direction: "recvonly"});
      const media = new MediaStream();
      video.srcObject = media;
      pc.ontrack = (e) => {
        media.addTrack(e.track);
        log(`track ${e.track.kind}`);
        video.play().catch((err) => log(`play: ${err.message} (click the video to start the sound)`));
      };
      pc.onconnectionstatechange = () => { setState(pc.connectionState); log(`connection ${pc.connectionState}`); };
      pc.oniceconnectionstatechange = () => { demo.ice = pc.iceConnectionState; $("ice").textContent = `(ICE ${pc.iceConnectionState})`; };
      setState("connecting");
      await pc.setLocalDescription(await pc.createOffer());
      await gathered(pc, 2000);
      offerAt = performance.now();
      const answer = await api("POST", session.offer_url, {sdp: pc.localDescription.sdp, type: "offer"});
      await pc.setRemoteDescription(answer);
      frameHandle = video.requestVideoFrameCallback(onFrame);
      statsTimer = setInterval(() => pollStats().catch(fail), 1000);
    } catch (err) {
      fail(err);
      await disconnect(true);
      setState("error");
    }
  }

  async function disconnect(quiet) {
    clearInterval(statsTimer);
    if (frameHandle != null) video.cancelVideoFrameCallback(frameHandle);
    frameHandle = null;
    if (eventsAbort) eventsAbort.abort();
    if (pc) pc.close();
    pc = null;
    video.srcObject = null;
    watch = null;
    const ending = session;
    session = null;
    if (ending) {
      try { await fetch(ending.stream_url, {method: "DELETE", headers: {"X-Stream-Token": ending.token}}); }
      catch (e) { if (!quiet) fail(e); }
    }
    if (!quiet) setState("closed");
  }

  async function say() {
    const text = $("text").value.trim();
    if (!text || !session) return;
    $("error").textContent = "";
    for (const id of ["m-speech-started", "m-first-change"]) $(id).textContent = "\u2013";
    watch = {at: performance.now(), level: null, utterance: null, started: null, changed: null};
    const timing = watch;
    demo.says.push(timing);
    try {
      const out = await api("POST", session.say_url, {text});
      timing.utterance = out.utterance_id;
      timing.acceptedMs = performance.now() - timing.at;
      log(`say ${out.utterance_id} (accepted in ${Math.round(timing.acceptedMs)} ms)`);
    } catch (err) {
      fail(err);
    }
  }

  async function interrupt() {
    try {
      const out = await api("POST", session.interrupt_url);
      log(`interrupted ${out.interrupted || "nothing"}`);
    } catch (err) {
      fail(err);
    }
  }

  $("connect").addEventListener("click", connect);
  $("disconnect").addEventListener("click", () => disconnect(false));
  $("say").addEventListener("click", say);
  $("interrupt").addEventListener("click", interrupt);
  $("text").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) say(); });
  video.addEventListener("click", () => video.play());
  window.addEventListener("pagehide", () => {
    if (session) fetch(session.stream_url, {method: "DELETE", headers: {"X-Stream-Token": session.token}, keepalive: true});
  });
  setState("idle");
})();
