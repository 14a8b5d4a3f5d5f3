"""``echo-stream web`` in a real browser: Debian's headless Chromium (selenium) with a fake camera (a real
face clip) and microphone (TTS speech) talks over real WebRTC (aiortc) to the web app, whose sessions are
LiveAvatar sessions on a real gRPC server over the Ray pipeline."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("aiortc")
pytest.importorskip("selenium")

from echo_stream.serve.server import ServeOptions, ServerThread  # noqa: E402
from echo_stream.web import browser  # noqa: E402
from echo_stream.web.app import WebApp  # noqa: E402
from echo_stream.web.server import WebThread  # noqa: E402
from echo_stream.web import tts  # noqa: E402
from echo_stream.web.session import AUDIO_RATE, read_barcode, stamp_barcode  # noqa: E402

from .served import ray_backend  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SIZE = 96
TOKEN = "web-test-token-0123456789abcdef"
WHY = browser.missing_browser()
needs_browser = pytest.mark.skipif(WHY is not None, reason=WHY or "")
needs_tts = pytest.mark.skipif(tts.find_tts() is None, reason="no espeak-ng (scripts/ensure_chromium.sh installs it)")


@pytest.fixture(scope="module")
def backend():
    with ray_backend(SIZE) as b:
        yield b


@pytest.fixture(scope="module")
def web(backend):
    """The web app on a gRPC server that takes two sessions."""
    st = ServerThread(backend, ServeOptions.for_model(None, port=0, max_sessions=2))
    port = st.start()
    wt = WebThread(WebApp(f"127.0.0.1:{port}", size=SIZE, seed=1))
    url = wt.start()
    yield wt, url
    wt.stop()
    st.stop()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    return {"camera": browser.make_fake_camera(d / "face.y4m"),
            "mic": browser.make_wav(d / "mic.wav", ("tts1.ogg", "tts2.ogg")),
            "speech": browser.make_wav(d / "speech.wav", ("tts0.ogg", "tts1.ogg", "tts2.ogg", "tts3.ogg"))}


@pytest.fixture(scope="module")
def chrome(media):
    if WHY is not None:
        pytest.skip(WHY)
    d = browser.launch(media["camera"], media["mic"])
    yield d
    d.quit()


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _wait(what, cond, timeout: float = 30.0, every: float = 0.2, state=None):
    end = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}" + (f": {state()}" if state else ""))
        time.sleep(every)


def _session(url: str, sid: str) -> dict:
    for s in _get(url + "stats")["sessions"]:
        if sid.startswith(s["id"]):
            return s
    raise AssertionError(f"session {sid[:8]} is not on the server")


def _start(d, url: str) -> str:
    d.get(url)
    _wait("the page's config", lambda: d.execute_script("return window.echo && window.echo.config"))
    d.find_element("id", "start").click()
    return _wait("the page to connect", lambda: d.execute_script(
        "return echo.error ? 'ERROR ' + echo.error : (echo.state.startsWith('connected') && echo.session)"),
        timeout=45, state=lambda: (d.execute_script("return [echo.state, echo.session]"), _get(url + "stats")))


# JS: sample the avatar <video> for `ms` milliseconds; the mean absolute pixel change between samples
# above the barcode strip, video size, playback time, and the inbound audio's RTP statistics.
_SAMPLE = """
const done = arguments[arguments.length - 1], ms = arguments[0];
const v = document.getElementById('avatar'), c = document.createElement('canvas');
const t0 = v.currentTime, diffs = [], mouth = [];
let prev = null;
const timer = setInterval(() => {
  if (!v.videoWidth) return;
  const w = v.videoWidth, h = v.videoHeight;
  c.width = w; c.height = h;
  const ctx = c.getContext('2d', {willReadFrequently: true});
  ctx.drawImage(v, 0, 0);
  const px = ctx.getImageData(0, 0, w, h - 16).data;
  if (prev) {
    let s = 0, m = 0, n = 0;
    for (let i = 0; i < px.length; i += 4) {
      const d = Math.abs(px[i] - prev[i]), x = (i / 4) % w, y = Math.floor(i / 4 / w);
      s += d;
      if (x > 0.3 * w && x < 0.7 * w && y > 0.4 * h && y < 0.65 * h) { m += d; n++; }
    }
    diffs.push(s / (px.length / 4)); mouth.push(m / n);
  }
  prev = px;
}, 80);
setTimeout(async () => {
  clearInterval(timer);
  let audio = null;
  const pc = window.__pc;
  (await pc.getStats()).forEach((r) => { if (r.type === 'inbound-rtp' && r.kind === 'audio') audio = r; });
  done({w: v.videoWidth, h: v.videoHeight, advanced: v.currentTime - t0, diffs, mouth,
        audio: audio && {packets: audio.packetsReceived, bytes: audio.bytesReceived, energy: audio.totalAudioEnergy}});
}, ms);
"""


def test_web_command_refuses_bad_options(capsys, monkeypatch):
    from echo_stream import cli

    monkeypatch.delenv("ECHO_STREAM_TOKENS", raising=False)
    for argv, named in ((["--host", "0.0.0.0"], "needs bearer tokens"), (["--server", "nope"], "HOST:PORT"),
                        (["--size", "33"], "even number"), (["--tls-key", "k.pem"], "both the certificate"),
                        (["--portrait", "/nonexistent.jpg"], "cannot read the portrait")):
        assert cli.main(["web"] + argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("echo-stream: error:") and named in err and len(err.strip().splitlines()) == 1, err


def test_pacer_plays_bursts_evenly_and_keeps_its_clock_on_underrun():
    """The pacer on its own: frames of a generation window arrive together, leave one per 40 ms tick with
    their own audio; when the next window is late the last picture is repeated with silence (pts keep
    counting) and the playout delay grows to fit; the barcode names the frame shown."""
    from echo_stream.live import AvatarFrame
    from echo_stream.web.session import Pacer, SAMPLES_PER_FRAME, _tracks

    video_cls, audio_cls = _tracks()
    video, audio = video_cls(maxsize=1000), audio_cls(maxsize=2000)
    pacer = Pacer(None, video, audio)
    t0 = 1000.0
    pictures = [np.full((SIZE, SIZE, 3), 10 * k, np.uint8) for k in range(25)]

    def frame(i):
        pcm = np.full(SAMPLES_PER_FRAME, (i + 1) / 100, np.float32)
        return AvatarFrame(index=i, audio=pcm, rgb=pictures[i], speech=True, sent_at=t0 + i / 25)

    for i in range(6):                                   # window 1: frames 0-5 arrive together, 0.5 s after frame 0
        pacer.arrive(frame(i), t0 + 0.5)
    ticks = [t0 + 0.52 + k / 25 for k in range(12)]
    for now in ticks[:8]:
        pacer.tick(now)
    for i in range(6, 12):
        pacer.arrive(frame(i), ticks[7] + 0.4)
    for now in [ticks[7] + 0.4 + k / 25 for k in range(1, 10)]:
        pacer.tick(now)
    pics = [video.queue.get_nowait() for _ in range(video.queue.qsize())]
    pcm = [audio.queue.get_nowait() for _ in range(audio.queue.qsize())]
    assert [p.pts for p in pics] == [3600 * k for k in range(len(pics))], "video pts: one frame per tick"
    assert [a.pts for a in pcm] == [960 * k for k in range(len(pcm))] and len(pcm) == 2 * len(pics)
    shown = [read_barcode(p.to_ndarray(format="rgb24")) for p in pics]
    assert shown[:6] == [0, 1, 2, 3, 4, 5], shown                # the first window, one per tick
    distinct = [shown[0]] + [shown[k] for k in range(1, len(shown)) if shown[k] != shown[k - 1]]
    assert distinct == list(range(12)), shown                    # every frame shown, in order
    repeats = [k for k in range(1, len(shown)) if shown[k] == shown[k - 1]]
    assert shown.count(5) > 1 and shown[repeats[0]] == 5, shown   # the late window: frame 5 again ...
    for k in repeats:                                            # ... with silence
        assert not np.abs(pcm[2 * k].to_ndarray()).any() and not np.abs(pcm[2 * k + 1].to_ndarray()).any()
    k6 = shown.index(6)
    assert np.allclose(pcm[2 * k6].to_ndarray() / 32767, 7 / 100, atol=1e-3)    # frame 6 with its own audio
    assert pacer.underruns == 1 and pacer.delay > 0.5 + 0.4 - 0.05
    assert pacer.repeats == len(repeats) and pacer.speech_sent == pacer.sent


def test_barcode_round_trip():
    rgb = np.full((96, 96, 3), 90, np.uint8)
    for i in (0, 1, 777, 2047, 2048, 123456):
        out = stamp_barcode(rgb, i)
        assert read_barcode(out) == i % 2048
        assert (out[:80] == rgb[:80]).all(), "only the bottom strip is drawn"
    noisy = stamp_barcode(rgb, 1234)
    noisy[-8:, 24:32] ^= 255                    # one bit flipped: the parity refuses it rather than misread it
    assert read_barcode(noisy) is None


@needs_browser
def test_browser_talks_to_the_avatar_and_interrupts(web, chrome, media):
    wt, url = web
    sid = _start(chrome, url)
    assert not sid.startswith("ERROR"), sid
    assert not chrome.find_element("id", "token-row").is_displayed()      # loopback, no tokens: not asked
    # the server receives the user's camera and microphone over WebRTC and sends them to the session
    s = _wait("the user's media at the server", lambda: (lambda s: s["user_frames_sent"] >= 10
                                                          and s["user_audio_s"] > 0.5 and s)(_session(url, sid)))
    assert s["user_video_frames"] > 0 and s["user_audio_frames"] > 0
    # the avatar's picture and voice arrive as one MediaStream (the browser syncs them); the video plays
    _wait("the avatar's video to play", lambda: chrome.execute_script(
        "return document.getElementById('avatar').currentTime > 0.5"))
    kinds = chrome.execute_script("return document.getElementById('avatar').srcObject.getTracks().map(t => t.kind)")
    assert sorted(kinds) == ["audio", "video"]
    listening = chrome.execute_async_script(_SAMPLE, 1200)
    assert listening["w"] == SIZE and listening["h"] == SIZE
    assert listening["advanced"] > 0.6
    # it speaks an uploaded file: the picture changes and the audio arrives
    chrome.find_element("id", "file").send_keys(str(media["speech"]))
    chrome.find_element("id", "upload").click()
    _wait("speech frames played", lambda: _session(url, sid)["speech_played"] >= 12)
    speaking = chrome.execute_async_script(_SAMPLE, 1600)
    assert speaking["advanced"] > 1.0
    # the picture changes from sample to sample, most of all around the mouth (listening: blinks, head motion)
    assert len(speaking["diffs"]) >= 8, speaking
    assert np.mean(np.asarray(speaking["diffs"]) > 0.05) >= 0.6, speaking["diffs"]
    assert np.mean(speaking["mouth"]) > np.mean(listening["mouth"]), (speaking["mouth"], listening["mouth"])
    assert speaking["audio"]["packets"] > 50 and speaking["audio"]["bytes"] > 2000
    assert speaking["audio"]["energy"] > listening["audio"]["energy"], "the speech is heard, not only silence"
    # the interrupt button stops speech within one generation window
    before = _session(url, sid)
    assert before["speaking"]
    chrome.find_element("id", "interrupt").click()
    _wait("the interrupt", lambda: _session(url, sid)["interrupts"] == 1)
    time.sleep(2.0)
    after = _session(url, sid)
    assert not after["speaking"]
    assert after["speech_after_interrupt"] <= 12, after
    assert after["speech_played"] - before["speech_played"] <= 12 + 25 * 0.5   # (the click's own round trip)
    # a file that is not audio is refused with its problem named; the session carries on
    req = urllib.request.Request(f"{url}session/{sid}/speak", data=b"this is not audio" * 100, method="POST",
                                 headers={"X-File-Name": "notes.txt"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=20)
    assert e.value.code == 400
    body = json.loads(e.value.read())
    assert body["code"] == "bad_audio" and "notes.txt" in body["error"], body
    played = _session(url, sid)["frames_played"]
    _wait("frames after the bad upload", lambda: _session(url, sid)["frames_played"] > played + 10,
          state=lambda: (chrome.execute_script("return [echo.state, echo.error, echo.session]"), _get(url + "stats")))
    # the latency readout: server-side per frame, glass-to-glass from the frame counter read back
    echo = chrome.execute_script("return {g2g: echo.g2g, reads: echo.reads, server: echo.serverLat,"
                                 " text: document.getElementById('lat-g2g').textContent}")
    assert echo["reads"] > 25 and len(echo["g2g"]) > 25
    assert 0 < float(np.median(echo["g2g"])) < 5
    assert all(0 < x < 10 for x in echo["server"]), echo["server"]
    assert echo["text"].endswith("ms")
    assert float(np.median(echo["g2g"])) >= float(np.median(echo["server"]))  # the browser shows it later
    chrome.save_screenshot(str(media["camera"].parent / "web.png"))
    chrome.find_element("id", "stop").click()
    _wait("the session to end", lambda: not _get(url + "stats")["sessions"], timeout=20)


def _post(url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=40) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_offers_are_named_and_give_their_session_back(web):
    _, url = web
    assert _post(url + "offer", b"not json") == (400, {"error": 'expected JSON {"sdp": "...", "type": "offer"}',
                                                      "code": "bad_offer"})
    status, body = _post(url + "offer", {"sdp": "v=0 garbage", "type": "offer"})
    assert status == 400 and body["code"] == "bad_offer" and "offer could not be answered" in body["error"]
    assert _get(url + "stats")["sessions"] == []          # its avatar session was opened, then closed again
    status, body = _post(url + "session/nope/say", {"text": "hi"})
    assert status == 404 and body["code"] == "no_session"


def test_an_unreachable_avatar_server_is_named():
    wt = WebThread(WebApp("127.0.0.1:9", size=SIZE))       # nothing listens on the discard port
    url = wt.start()
    try:
        status, body = _post(url + "offer", {"sdp": "v=0", "type": "offer"})
        assert status == 502 and body["code"] == "unavailable" and "127.0.0.1:9" in body["error"], body
    finally:
        wt.stop()


@needs_tts
def test_offline_tts_speaks_and_names_bad_text():
    pcm = tts.synthesize("Hello there, how are you today?", AUDIO_RATE)
    assert pcm.dtype == np.float32 and 0.8 < len(pcm) / AUDIO_RATE < 6 and np.abs(pcm).max() > 0.05
    assert len(tts.synthesize("-v --help", AUDIO_RATE)) > 0          # text, never options
    with pytest.raises(Exception, match="empty"):
        tts.synthesize("   ", AUDIO_RATE)
    with pytest.raises(Exception, match="at most 1000"):
        tts.synthesize("a" * 1001, AUDIO_RATE)


@needs_browser
@needs_tts
def test_typed_sentence_is_spoken(web, chrome):
    _, url = web
    sid = _start(chrome, url)
    assert not sid.startswith("ERROR"), sid
    assert "espeak" in chrome.find_element("id", "tts-note").text
    chrome.find_element("id", "text").clear()
    chrome.find_element("id", "text").send_keys("Nice to meet you. Tell me more about it.")
    chrome.find_element("id", "say").click()
    s = _wait("the sentence to be spoken", lambda: (lambda s: s["speech_played"] >= 25 and s)(_session(url, sid)))
    assert s["utterances"] == 1
    chrome.find_element("id", "text").clear()
    chrome.find_element("id", "say").click()                               # nothing typed: named on the page
    err = _wait("the error", lambda: chrome.execute_script("return echo.error"), timeout=10)
    assert "empty" in err and chrome.execute_script("return echo.errorCode") == "bad_text"
    chrome.find_element("id", "stop").click()
    _wait("the session to end", lambda: not _get(url + "stats")["sessions"], timeout=20)


@needs_browser
def test_two_tabs_two_sessions_and_a_full_server_is_named(web, chrome):
    wt, url = web
    first = chrome.current_window_handle
    sids = []
    for _ in range(2):
        chrome.switch_to.new_window("tab")
        sid = _start(chrome, url)
        assert not sid.startswith("ERROR"), sid
        sids.append(sid)
    assert len(set(sids)) == 2
    for sid in sids:
        _wait("both sessions receive the user and play frames",
              lambda sid=sid: (lambda s: s["user_frames_sent"] > 5 and s["frames_played"] > 25)(_session(url, sid)))
    # the gRPC server takes two sessions: the third tab is told the server is full
    chrome.switch_to.new_window("tab")
    full = _start(chrome, url)
    assert full.startswith("ERROR Server full"), (full, _get(url + "stats"))
    assert chrome.execute_script("return echo.errorCode") == "server_full"
    assert chrome.find_element("id", "error").is_displayed()
    # ... and the two sessions keep playing
    before = {sid: _session(url, sid) for sid in sids}
    time.sleep(2.0)
    for sid in sids:
        s, b = _session(url, sid), before[sid]
        assert s["frames"] > b["frames"] and s["frames_played"] > b["frames_played"], (b, s)
        assert s["frames_played"] + s["repeats"] >= b["frames_played"] + b["repeats"] + 40, (b, s)  # 25 fps
    for handle in chrome.window_handles:
        if handle != first:
            chrome.switch_to.window(handle)
            chrome.close()
    chrome.switch_to.window(first)
    _wait("the closed tabs' sessions to end", lambda: len(_get(url + "stats")["sessions"]) <= 1, timeout=20)


@needs_browser
def test_bad_token_and_no_tts_are_named(backend, chrome):
    st = ServerThread(backend, ServeOptions.for_model(None, port=0, max_sessions=2, tokens={TOKEN: "alice"}))
    port = st.start()
    wt = WebThread(WebApp(f"127.0.0.1:{port}", tokens={TOKEN: "alice"}, size=SIZE, tts=False))
    url = wt.start()
    try:
        chrome.get(url)
        _wait("the page's config", lambda: chrome.execute_script("return window.echo && window.echo.config"))
        assert chrome.find_element("id", "token-row").is_displayed()
        note = chrome.find_element("id", "tts-note").text
        assert "No text-to-speech" in note and "espeak-ng" in note
        chrome.find_element("id", "token").send_keys("not-the-token-at-all")
        chrome.find_element("id", "start").click()
        err = _wait("the error", lambda: chrome.execute_script("return echo.error"))
        assert err.startswith("Bad token") and chrome.execute_script("return echo.errorCode") == "bad_token"
        # the right token is passed on to the gRPC server, which accepts it
        chrome.find_element("id", "token").clear()
        chrome.find_element("id", "token").send_keys(TOKEN)
        chrome.find_element("id", "start").click()
        sid = _wait("the page to connect", lambda: chrome.execute_script(
            "return echo.state.startsWith('connected') && echo.session"))
        assert _session(url, sid)["frames"] > 0 or _wait("frames", lambda: _session(url, sid)["frames"] > 0)
        assert not chrome.find_element("id", "say").is_enabled()      # no TTS: the Say button stays off
    finally:
        chrome.execute_script("if (echo.session) { navigator.sendBeacon('/session/' + echo.session + '/close'); }")
        wt.stop()
        st.stop()


@needs_browser
def test_denied_camera_is_named(web, media):
    _, url = web
    d = browser.launch(media["camera"], media["mic"], fake_ui=False)
    try:
        for name in ("camera", "microphone"):
            d.execute_cdp_cmd("Browser.setPermission", {"permission": {"name": name}, "setting": "denied",
                                                         "origin": url.rstrip("/")})
        d.get(url)
        _wait("the page's config", lambda: d.execute_script("return window.echo && window.echo.config"))
        d.find_element("id", "start").click()
        err = _wait("the error", lambda: d.execute_script("return echo.error"), timeout=15)
        assert "permission was denied" in err and d.execute_script("return echo.errorCode") == "no_permission"
    finally:
        d.quit()
