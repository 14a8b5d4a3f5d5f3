// echo-stream web: the browser side of a live avatar session over WebRTC.
// Camera + microphone go to the server; the avatar's video + audio come back in one MediaStream.
// A data channel carries, per frame, when its audio left for the avatar server (sent_at) and the
// server-side latency; the frame counter drawn in the picture's bottom-left corner is read back here
// to estimate the glass-to-glass latency.
"use strict";

const $ = (id) => document.getElementById(id);
const echo = window.echo = {
  state: "idle", session: null, error: null, errorCode: null, config: null,
  serverLat: [], playLat: [], g2g: [], reads: 0, badReads: 0, shown: 0, speaking: false,
};
let pc = null, dc = null, local = null;
let barcode = { block: 8, bits: 12 };
const sentAt = new Map();   // barcode value -> {index, s}
const pendingReads = [];    // barcode values read before their note arrived: {code, t}
let lastCode = -1;

function setState(text, cls) {
  echo.state = text;
  const el = $("state");
  el.textContent = text;
  el.className = "state " + (cls || "");
}

function showError(msg, code) {
  echo.error = msg;
  echo.errorCode = code || "error";
  const el = $("error");
  el.textContent = msg;
  el.hidden = false;
  setState("error", "bad");
}

function clearError() { echo.error = null; echo.errorCode = null; $("error").hidden = true; }

function mediaError(e) {
  const n = e && e.name;
  if (!window.isSecureContext)
    return ["This page is not a secure context, so the browser offers no camera or microphone. Open it as " +
            "http://localhost:PORT or over HTTPS (echo-stream web --tls-cert/--tls-key).", "insecure"];
  if (n === "NotAllowedError" || n === "SecurityError" || n === "PermissionDeniedError")
    return ["Camera and microphone permission was denied. Allow both for this page (the camera icon in the " +
            "address bar) and press Start again.", "no_permission"];
  if (n === "NotFoundError" || n === "OverconstrainedError" || n === "DevicesNotFoundError")
    return ["No camera or microphone was found. Connect one and press Start again.", "no_device"];
  if (n === "NotReadableError" || n === "TrackStartError")
    return ["The camera or microphone is in use by another application (or failed to start).", "device_busy"];
  return ["Cannot open the camera and microphone: " + (e && (e.message || n) || e), "media_error"];
}

async function loadConfig() {
  try {
    const r = await fetch("/config");
    echo.config = await r.json();
  } catch (e) {
    showError("Cannot reach the web server: " + e, "unreachable");
    return;
  }
  const note = $("tts-note");
  note.textContent = echo.config.tts ? "Typed sentences are " + echo.config.tts_hint + "." :
    "No text-to-speech: " + echo.config.tts_hint + ".";
  note.className = echo.config.tts ? "note" : "note bad";
  $("token-row").hidden = !echo.config.token_required;
}

function quantile(xs, q) {
  if (!xs.length) return NaN;
  const s = xs.slice().sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(q * s.length))];
}

function ms(x) { return isFinite(x) ? Math.round(x * 1000) + " ms" : "–"; }

function push(arr, x, n) { arr.push(x); if (arr.length > n && !echo.keepAll) arr.shift(); }

function onNote(m) {
  if (m.t === "hello") {
    barcode = { block: m.block, bits: m.bits };
    // the frame counter's strip (bottom rows) stays out of view: the video is drawn that much larger and
    // its frame crops it (the counter is still read from the full picture)
    const side = 384 * m.size / (m.size - m.block - 1) + "px";
    $("avatar").style.width = side;
    $("avatar").style.height = side;
    return;
  }
  if (m.t === "error") { showError(m.msg, "session_error"); return; }
  if (m.t !== "f") return;
  const code = m.i % (1 << (barcode.bits - 1));
  sentAt.set(code, { index: m.i, s: m.s });
  push(echo.serverLat, m.l, 250);
  push(echo.playLat, m.p, 250);
  echo.speaking = m.sp;
  for (let k = pendingReads.length - 1; k >= 0; k--) {
    if (pendingReads[k].code === code) {
      push(echo.g2g, pendingReads[k].t - m.s, 500);
      pendingReads.splice(k, 1);
    }
  }
}

function readBarcode(video, canvas) {
  const w = video.videoWidth, h = video.videoHeight;
  if (!w || !h) return null;
  const b = barcode.block, bits = barcode.bits;
  canvas.width = w; canvas.height = h;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(video, 0, 0, w, h);
  const px = ctx.getImageData(0, h - b, b * bits, b).data;
  let v = 0;
  for (let k = 0; k < bits; k++) {
    let sum = 0, n = 0;
    for (let y = Math.floor(b / 4); y < b - Math.floor(b / 4); y++)
      for (let x = k * b + Math.floor(b / 4); x < (k + 1) * b - Math.floor(b / 4); x++) {
        const o = (y * b * bits + x) * 4;
        sum += (px[o] + px[o + 1] + px[o + 2]) / 3; n++;
      }
    if (sum / n > 127) v |= 1 << k;
  }
  const data = v & ((1 << (bits - 1)) - 1);
  let ones = 0; for (let x = data; x; x >>= 1) ones += x & 1;
  return ((ones & 1) << (bits - 1) | data) === v ? data : null;
}

function watchFrames(video) {
  const canvas = $("probe");
  const onFrame = (now, meta) => {
    echo.shown++;
    const code = readBarcode(video, canvas);
    if (code === null) echo.badReads++;
    else if (code !== lastCode) {
      lastCode = code;
      echo.reads++;
      const t = (performance.timeOrigin + (meta.expectedDisplayTime || now)) / 1000;
      const note = sentAt.get(code);
      if (note && t - note.s < 60) push(echo.g2g, t - note.s, 500);
      else { pendingReads.push({ code, t }); if (pendingReads.length > 50) pendingReads.shift(); }
    }
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}

function refresh() {
  $("lat-server").textContent = ms(quantile(echo.serverLat, 0.5)) + " / " + ms(quantile(echo.serverLat, 0.99));
  $("lat-play").textContent = ms(quantile(echo.playLat, 0.5));
  $("lat-g2g").textContent = ms(quantile(echo.g2g, 0.5)) + " / " + ms(quantile(echo.g2g, 0.99));
  $("frames").textContent = echo.shown + " / " + echo.reads;
  const b = $("speaking");
  b.textContent = echo.speaking ? "speaking" : "listening";
  b.className = "badge" + (echo.speaking ? " on" : "");
}

function enable(on) {
  $("start").disabled = on;
  $("stop").disabled = !on;
  $("interrupt").disabled = !on;
  $("upload").disabled = !on;
  $("say").disabled = !on || !(echo.config && echo.config.tts);
}

function waitIce(conn) {
  if (conn.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (conn.iceGatheringState === "complete") { conn.removeEventListener("icegatheringstatechange", done); resolve(); } };
    conn.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, 3000);
  });
}

async function start() {
  clearError();
  $("start").disabled = true;
  setState("opening camera and microphone…");
  try {
    if (!navigator.mediaDevices) throw { name: "SecurityError" };
    local = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 360 }, audio: true });
  } catch (e) {
    const [msg, code] = mediaError(e);
    showError(msg, code);
    $("start").disabled = false;
    return;
  }
  $("self").srcObject = local;
  setState("connecting…");
  pc = window.__pc = new RTCPeerConnection({ iceServers: [] });
  local.getTracks().forEach((t) => pc.addTrack(t, local));
  dc = pc.createDataChannel("echo");
  dc.onmessage = (ev) => onNote(JSON.parse(ev.data));
  const remote = new MediaStream();
  pc.ontrack = (ev) => {
    const stream = ev.streams && ev.streams[0];
    const v = $("avatar");
    if (stream) { if (v.srcObject !== stream) v.srcObject = stream; }
    else { remote.addTrack(ev.track); v.srcObject = remote; }
  };
  pc.onconnectionstatechange = () => {
    const s = pc && pc.connectionState;
    if (s === "connected") setState("connected", "ok");
    else if (s === "failed") showError("The WebRTC connection failed (no network path between this browser and the " +
                                       "server: UDP blocked?).", "ice_failed");
    else if (s === "disconnected") setState("connection interrupted…", "bad");
  };
  await pc.setLocalDescription(await pc.createOffer());
  await waitIce(pc);
  let r, body;
  try {
    r = await fetch("/offer", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type,
                             token: $("token").value.trim() || null }) });
    body = await r.json();
  } catch (e) {
    body = { error: "Cannot reach the web server: " + e, code: "unreachable" };
    r = { ok: false };
  }
  if (!r.ok) {
    const prefix = { server_full: "Server full. ", bad_token: "Bad token. ", unavailable: "Avatar server unavailable. " };
    showError((prefix[body.code] || "") + body.error, body.code);
    stop(false);
    return;
  }
  echo.session = body.session;
  await pc.setRemoteDescription({ sdp: body.sdp, type: body.type });
  const v = $("avatar");
  if ("requestVideoFrameCallback" in v) watchFrames(v);
  enable(true);
}

async function stop(notify = true) {
  if (notify && echo.session) navigator.sendBeacon("/session/" + echo.session + "/close");
  echo.session = null;
  if (pc) { pc.close(); pc = null; }
  if (local) { local.getTracks().forEach((t) => t.stop()); local = null; }
  enable(false);
  if (!echo.error) setState("not connected");
}

async function post(path, init) {
  if (!echo.session) return;
  try {
    const r = await fetch("/session/" + echo.session + path, Object.assign({ method: "POST" }, init || {}));
    const body = await r.json();
    if (!r.ok) showError(body.error, body.code); else clearError();
    return body;
  } catch (e) { showError("Cannot reach the web server: " + e, "unreachable"); }
}

$("start").onclick = start;
$("stop").onclick = () => stop(true);
$("interrupt").onclick = () => post("/interrupt");
$("say").onclick = () => post("/say", { headers: { "Content-Type": "application/json" },
                                        body: JSON.stringify({ text: $("text").value }) });
$("upload").onclick = () => {
  const f = $("file").files[0];
  if (!f) { showError("Choose an audio file first.", "no_file"); return; }
  post("/speak", { body: f, headers: { "X-File-Name": encodeURIComponent(f.name) } });
};
function leave() { if (echo.session) { navigator.sendBeacon("/session/" + echo.session + "/close"); echo.session = null; } }
window.addEventListener("pagehide", leave);
window.addEventListener("beforeunload", leave);
setInterval(refresh, 250);
loadConfig();
