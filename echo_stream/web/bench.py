"""Latency over WebRTC: a real headless Chromium (Debian's, fake camera and microphone from the test media)
talks to `echo-stream web` on local Ray for SECONDS while the avatar speaks uploaded speech most of the time.

Per frame it records the server-side latency (the frame's audio leaving for the gRPC server -> the frame back
at the web server), the time the web server sent it to the browser after that, and a glass-to-glass
estimate: the page reads the frame counter drawn into each picture's corner when the browser is about to
show it, and compares it with the moment that frame's audio was sent (browser and server share the clock
here). Writes bench/results/web_latency.json (machine, versions, config, p50/p99, frame counts).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np


def _q(xs, q: float) -> float | None:
    return round(float(np.quantile(np.asarray(xs, float), q)), 4) if len(xs) else None


def _post(url: str, data: bytes) -> dict:
    req = urllib.request.Request(url, data=data, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def run(args) -> int:
    import ray

    from .. import atomic, machine
    from ..errors import InputError
    from ..pipeline import PipelineOptions
    from ..serve.backend import RayBackend
    from ..serve.server import ServeOptions, ServerThread
    from . import browser
    from .app import WebApp
    from .server import WebThread

    why = browser.missing_browser(args.chromium, args.chromedriver)
    if why:
        raise InputError("--chromium", why)
    if args.seconds < 5:
        raise InputError("--seconds", f"at least 5 s, got {args.seconds}")
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="echo-bench-web-"))
    camera = browser.make_fake_camera(tmp / "face.y4m")
    mic = browser.make_wav(tmp / "mic.wav", ("tts1.ogg", "tts2.ogg"))
    speech_files = ("tts0.ogg", "tts1.ogg", "tts2.ogg", "tts3.ogg")
    speech = browser.make_wav(tmp / "speech.wav", speech_files).read_bytes()
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    backend = RayBackend.start(PipelineOptions(size=(args.size, args.size), stride=args.stride))
    opts = ServeOptions.for_model(None, port=0, max_sessions=2, stride=args.stride)
    st = ServerThread(backend, opts)
    port = st.start()
    webapp = WebApp(f"127.0.0.1:{port}", size=args.size, seed=0)
    wt = WebThread(webapp)
    url = wt.start()
    driver = browser.launch(camera, mic, chromium=args.chromium, driver=args.chromedriver)
    try:
        driver.get(url)
        deadline = time.monotonic() + 30
        while not driver.execute_script("return window.echo && window.echo.config"):
            if time.monotonic() > deadline:
                raise RuntimeError("the page did not load")
            time.sleep(0.2)
        driver.execute_script("echo.keepAll = true")
        driver.find_element("id", "start").click()
        deadline = time.monotonic() + 60
        while True:
            state = driver.execute_script("return [echo.state, echo.session, echo.error]")
            if state[2]:
                raise RuntimeError(f"the page reports: {state[2]}")
            if state[0].startswith("connected") and state[1]:
                sid = state[1]
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the page did not connect within 60 s")
            time.sleep(0.2)
        t0 = time.monotonic()
        spoken = 0
        while time.monotonic() - t0 < args.seconds:
            s = next(x for x in _get(url + "stats")["sessions"] if sid.startswith(x["id"]))
            if not s["speaking"]:
                _post(f"{url}session/{sid}/speak", speech)
                spoken += 1
            time.sleep(0.5)
        page = driver.execute_script("return {server: echo.serverLat, play: echo.playLat, g2g: echo.g2g,"
                                     " shown: echo.shown, reads: echo.reads, bad: echo.badReads}")
        s = next(x for x in _get(url + "stats")["sessions"] if sid.startswith(x["id"]))
        if args.screenshot:
            driver.save_screenshot(args.screenshot)
    finally:
        driver.quit()
        wt.stop()
        st.stop()
        backend.shutdown()
        ray.shutdown()
    import aiortc
    import selenium

    env = machine.environment()
    env.update({"aiortc": aiortc.__version__, "selenium": selenium.__version__,
                "chromium": os.popen(f"{args.chromium} --version 2>/dev/null").read().strip(),
                "load_average_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]})
    result = {
        "benchmark": "web_latency", "machine": env,
        "config": {"seconds": args.seconds, "size": args.size, "fps": 25, "num_cpus": args.num_cpus,
                   "stride_frames": opts.stride_for(None, opts.stride), "audio_rate": 48000,
                   "speech": [f"tests/data/tts/{f}" for f in speech_files], "speech_uploads": spoken,
                   "browser": "headless Chromium, fake camera (tests/data/real, 320x180 y4m) and microphone",
                   "transport": "WebRTC over loopback interfaces (aiortc <-> Chromium), VP8/Opus as negotiated"},
        "server_frame_latency_s": {"p50": _q(page["server"], 0.5), "p99": _q(page["server"], 0.99),
                                   "frames": len(page["server"]),
                                   "what": "avatar audio sent to the gRPC server -> its frame back at the web server"},
        "sent_to_browser_s": {"p50": _q(page["play"], 0.5), "p99": _q(page["play"], 0.99),
                              "what": "the same start -> the web server sending the frame (after its playout "
                                      "buffer) over WebRTC"},
        "glass_to_glass_s": {"p50": _q(page["g2g"], 0.5), "p99": _q(page["g2g"], 0.99), "frames": len(page["g2g"]),
                             "what": "the same start -> the browser about to show the frame (its barcode read "
                                     "back from the <video> in requestVideoFrameCallback)"},
        "frames": {"shown_in_browser": page["shown"], "barcode_reads": page["reads"], "barcode_unreadable":
                   page["bad"], "played_by_server": s["frames_played"], "repeated_underrun": s["repeats"],
                   "speech_frames": s["speech_played"], "user_frames_sent": s["user_frames_sent"],
                   "user_audio_s": s["user_audio_s"]},
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "web_latency.json")
    atomic.write_text(path, json.dumps(result, indent=1, default=str))
    print(f"web latency over {args.seconds:.0f} s: server p50 {result['server_frame_latency_s']['p50']} s "
          f"p99 {result['server_frame_latency_s']['p99']} s; glass-to-glass p50 {result['glass_to_glass_s']['p50']} "
          f"s p99 {result['glass_to_glass_s']['p99']} s ({len(page['g2g'])} frames); wrote {path}")
    return 0
