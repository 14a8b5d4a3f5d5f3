"""A session's portrait, checked and decoded at the server's edge, before any shared stage sees it.

A hostile portrait must cost the shared render actor nothing it cannot afford (a 445 KB PNG of
12000x12000 used to take it ~8 s and 2.7 GB to refuse, stalling every session it renders). So:

1. **header** (on the event loop, microseconds): PIL opens the image lazily (no pixel decoded); its format
   must be one of :data:`~echo_stream.render.portrait.PORTRAIT_FORMATS` (no GIF, EPS, PSD, ...) and its
   size, as it will be decoded, at most ``Limits.max_portrait_side`` pixels a side and
   ``Limits.max_portrait_pixels`` in all (a JPEG larger than the working size is decoded by libjpeg at
   1/2, 1/4 or 1/8 scale, so JPEGs up to the generic 8192 px / 40 MP pass). Refusals are INVALID_ARGUMENT
   naming ``config.portrait_image`` and the problem.
2. **decode** (off the event loop and out of the server process): a helper process (one per slot, two by
   default, started with the server) forks one child per portrait, which decodes it under a time budget
   (``portrait_decode_cpu_s`` of CPU time, RLIMIT_CPU, so a busy machine does not turn a good portrait away;
   ``portrait_decode_wall_s`` of wall-clock time as a backstop: killed beyond either) and a memory budget
   (``portrait_decode_memory_mb`` of address space, RLIMIT_AS), scaled down to at most
   ``portrait_working_side`` pixels on its long side.
3. the render actor gets the decoded, bounded image (:class:`~echo_stream.render.DecodedImage`): what
   it still does there (face detection, the crop) costs tens of milliseconds.

Registered avatars (``--avatar NAME=IMAGE``) are the operator's files: they go to the render actor by path.
"""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures as cf
import hashlib
import io
import logging
import math
import os
import queue
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
from collections import OrderedDict

import numpy as np

from ..errors import InputError
from ..render.portrait import (
    MAX_PORTRAIT_PIXELS,
    MAX_PORTRAIT_SIDE,
    PORTRAIT_FORMATS,
    DecodedImage,
    _decode_image,
    jpeg_draft_scale,
)

log = logging.getLogger(__name__)

WHAT = "config.portrait_image"
_JPEG = ("JPEG", "MPO")


def check_header(data: bytes, limits) -> tuple[str, int, int]:
    """(format, width, height) of the image, from its header only; raises InputError for anything the
    server will not decode (unknown format, too large as decoded, too small)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InputError(WHAT, "empty: expected the bytes of a portrait image (png, jpeg, webp, bmp or tiff)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # the size is checked below
            # only these plugins may read it (an MPO is opened by the JPEG plugin)
            with Image.open(io.BytesIO(data), formats=[f for f in PORTRAIT_FORMATS if f != "MPO"]) as im:
                fmt, (w, h) = im.format, im.size
    except UnidentifiedImageError:
        raise InputError(WHAT, f"not an image in a format accepted for portraits "
                               f"({', '.join(f.lower() for f in PORTRAIT_FORMATS if f != 'MPO')})") from None
    except Image.DecompressionBombError:
        raise InputError(WHAT, f"image is over {Image.MAX_IMAGE_PIXELS * 2 // 10**6} megapixels: scale it "
                               f"down to at most {limits.max_portrait_side} pixels a side") from None
    except (OSError, ValueError, SyntaxError, EOFError, TypeError) as e:
        raise InputError(WHAT, "corrupt or truncated image header") from None
    n = jpeg_draft_scale((w, h), limits.portrait_working_side) if fmt in _JPEG else 1
    dw, dh = math.ceil(w / n), math.ceil(h / n)
    if (max(dw, dh) > limits.max_portrait_side or dw * dh > limits.max_portrait_pixels
            or max(w, h) > MAX_PORTRAIT_SIDE or w * h > MAX_PORTRAIT_PIXELS):
        raise InputError(WHAT, f"image is {w}x{h} pixels; a served portrait may have at most "
                               f"{limits.max_portrait_side} pixels a side and "
                               f"{limits.max_portrait_pixels / 1e6:g} megapixels (a JPEG up to "
                               f"{MAX_PORTRAIT_SIDE} px / {MAX_PORTRAIT_PIXELS // 10**6} MP): scale it down")
    if min(w, h) < 32:
        raise InputError(WHAT, f"image is too small ({w}x{h}); need at least 32x32 pixels")
    return fmt, w, h


# --------------------------------------------------------------------------------------------------------------
# The decoding helper: `python -m echo_stream.serve.portrait_gate`, started by the server (one per slot). It has
# PIL and numpy imported and no thread of its own, and forks one child per portrait: the child sets its limits,
# decodes, writes the pixels to a pipe and exits; the helper kills it when the time budget runs out. Frames on
# stdin / stdout (all integers little-endian):
#   request:  u64 size | u32 CPU budget (ms) | u32 wall-clock backstop (ms) | u32 memory (MB) | u32 max side | image
#   answer:   u8 status | u32 height | u32 width | u64 size | payload (RGB bytes when OK, else a UTF-8 line)
_REQ = struct.Struct("<QIIII")
_ANS = struct.Struct("<BIIQ")
OK, INPUT, MEMORY, TIMEOUT, ERROR = range(5)


def _read_exactly(f, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = f.read(n - len(out))
        if not chunk:
            raise EOFError("the stream ended")
        out += chunk
    return bytes(out)


def _address_space() -> int:
    """This process's mapped address space in bytes (0 when unknown)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _child(w: int, data: bytes, cpu_s: float, max_side: int, memory_mb: int) -> None:
    """(Forked child.) Decode under CPU-time and address-space limits; write one answer frame to ``w``; exit."""
    status, h, wd, payload = ERROR, 0, 0, b""
    try:
        try:
            import resource

            base = _address_space()
            if base and memory_mb:
                limit = base + memory_mb * 1024 * 1024
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            used = resource.getrusage(resource.RUSAGE_SELF)
            soft = math.ceil(used.ru_utime + used.ru_stime + cpu_s)   # SIGXCPU (which ends it) past the budget
            resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 1))
        except (ImportError, ValueError, OSError):      # no limit where the platform has none
            pass
        rgb = _decode_image(data, WHAT, max_side=max_side)
        status, (h, wd), payload = OK, rgb.shape[:2], np.ascontiguousarray(rgb, np.uint8).tobytes()
    except InputError as e:
        status, payload = INPUT, e.problem.encode()
    except MemoryError:
        status = MEMORY
    except BaseException as e:  # noqa: BLE001 - reported to the server, which logs it
        status, payload = ERROR, f"{type(e).__name__}: {e}".encode()
    try:
        with os.fdopen(w, "wb") as out:
            out.write(_ANS.pack(status, h, wd, len(payload)))
            out.write(payload)
    finally:
        os._exit(0)


def _decode_forked(data: bytes, cpu_s: float, wall_s: float, max_side: int,
                   memory_mb: int) -> tuple[int, int, int, bytes]:
    """(Helper.) One portrait in a forked child under the budgets: (status, height, width, payload)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(w, data, cpu_s, max_side, memory_mb)
    os.close(w)
    deadline = time.monotonic() + wall_s
    buf = bytearray()
    want = _ANS.size
    timed_out = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                timed_out = True
                break
            chunk = os.read(r, 1 << 20)
            if not chunk:
                break
            buf += chunk
            if len(buf) >= _ANS.size:
                want = _ANS.size + _ANS.unpack_from(buf)[3]
                if len(buf) >= want:
                    break
    finally:
        os.close(r)
        if timed_out:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    if timed_out:
        return TIMEOUT, 0, 0, b"wall"
    if len(buf) < _ANS.size or len(buf) < want:   # the child died before answering
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) in (signal.SIGXCPU, signal.SIGKILL):
            return TIMEOUT, 0, 0, b"cpu"            # its CPU budget ran out
        # anything else: most likely an allocation the memory limit refused inside C code
        return MEMORY, 0, 0, b""
    code, h, wd, n = _ANS.unpack_from(buf)
    return code, h, wd, bytes(buf[_ANS.size:_ANS.size + n])


def _helper_main() -> None:
    """The helper's loop: requests on stdin, answers on stdout, until stdin closes."""
    import resource  # noqa: F401 - everything a child needs is imported (and PIL's plugins registered) once
    from PIL import Image

    for fmt in ("PNG", "JPEG"):                       # here, not in every child
        buf = io.BytesIO()
        Image.new("RGB", (96, 64)).save(buf, format=fmt)
        _decode_image(buf.getvalue(), WHAT, max_side=48)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            size, cpu_ms, wall_ms, memory_mb, max_side = _REQ.unpack(_read_exactly(inp, _REQ.size))
            data = _read_exactly(inp, size)
        except EOFError:
            return
        code, h, w, payload = _decode_forked(data, cpu_ms / 1000, wall_ms / 1000, max_side, memory_mb)
        out.write(_ANS.pack(code, h, w, len(payload)))
        out.write(payload)
        out.flush()


class _Helper:
    """One helper process, used by one thread at a time (the gate's pool has one thread per helper)."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "echo_stream.serve.portrait_gate"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, close_fds=True)

    def decode(self, data: bytes, cpu_s: float, wall_s: float, max_side: int,
               memory_mb: int) -> tuple[int, int, int, bytes]:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        try:
            self.proc.stdin.write(_REQ.pack(len(data), int(cpu_s * 1000), int(wall_s * 1000), memory_mb, max_side))
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
            # the helper answers within the budget (it kills the child); its own start-up comes on top
            fd = self.proc.stdout.fileno()
            if not select.select([fd], [], [], wall_s + 120.0)[0]:
                raise RuntimeError("the portrait helper did not answer")
            head = _read_exactly(self.proc.stdout, _ANS.size)
            code, h, w, n = _ANS.unpack(head)
            return code, h, w, _read_exactly(self.proc.stdout, n)
        except (OSError, EOFError, RuntimeError):
            self.close()                      # a broken helper is replaced on the next call
            raise

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.kill()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                pass
            self.proc = None


#: idle helpers of this process (shared by its servers: tests start many); a helper exits when its stdin closes
_IDLE: queue.SimpleQueue = queue.SimpleQueue()
_STARTED: list[_Helper] = []
_START_LOCK = threading.Lock()


@atexit.register
def _stop_helpers() -> None:
    for h in _STARTED:
        h.close()


class PortraitGate:
    """Checks and decodes session portraits at the edge (see the module's docstring)."""

    def __init__(self, limits, slots: int = 2, cache: int = 4):
        self.limits = limits
        self._slots = slots
        self._pool = cf.ThreadPoolExecutor(slots, thread_name_prefix="portrait")   # at most `slots` decodes
        self._cache: OrderedDict[str, DecodedImage] = OrderedDict()
        self._cache_size = cache
        self._refused: OrderedDict[str, str] = OrderedDict()   # digest -> the problem, of refused portraits
        self.isolated = hasattr(os, "fork") and sys.platform != "win32"

    def start(self) -> None:
        """Make sure ``slots`` helper processes run, each having decoded one small image: their start-up is
        paid now, not in a session's open."""
        if not self.isolated:
            log.warning("portraits are decoded in the server process (no os.fork on this platform)")
            return
        with _START_LOCK:
            while len(_STARTED) < self._slots:
                h = _Helper()
                h.decode(_tiny_png(), 60.0, 120.0, 64, self.limits.portrait_decode_memory_mb)
                _STARTED.append(h)
                _IDLE.put(h)

    async def prepare(self, data: bytes) -> DecodedImage:
        """The portrait, checked and decoded (raises InputError naming config.portrait_image)."""
        check_header(data, self.limits)
        digest = hashlib.sha256(data).hexdigest()
        refused = self._refused.get(digest)
        if refused is not None:               # refused before (no face, upside down): not by the render actor again
            raise InputError(WHAT, refused)
        hit = self._cache.get(digest)
        if hit is not None:
            self._cache.move_to_end(digest)
            return hit
        rgb = await asyncio.get_running_loop().run_in_executor(self._pool, self.decode, data)
        img = DecodedImage(rgb, digest, WHAT)
        self._cache[digest] = img
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return img

    def remember_refusal(self, image: DecodedImage, problem: str) -> None:
        """A portrait the pipeline refused (no face, upside down ...): the same bytes are refused here next time,
        without a shared stage looking at them again."""
        self._cache.pop(image.digest, None)
        self._refused[image.digest] = problem
        while len(self._refused) > 256:
            self._refused.popitem(last=False)

    def decode(self, data: bytes) -> np.ndarray:
        """(Blocking.) Decode under the budgets, scaled to the working side; raises InputError."""
        lim = self.limits
        if not self.isolated:
            return _decode_image(data, WHAT, max_side=lim.portrait_working_side)
        try:
            helper = _IDLE.get_nowait()
        except queue.Empty:                   # more decodes at once than helpers started: one more
            helper = _Helper()
            with _START_LOCK:
                _STARTED.append(helper)
        try:
            code, h, w, payload = helper.decode(data, lim.portrait_decode_cpu_s, lim.portrait_decode_wall_s,
                                                lim.portrait_working_side, lim.portrait_decode_memory_mb)
        finally:
            _IDLE.put(helper)
        if code == OK:
            return np.frombuffer(payload, np.uint8).reshape(h, w, 3)
        if code == INPUT:
            raise InputError(WHAT, payload.decode(errors="replace"))
        if code == TIMEOUT:
            took = (f"more than {lim.portrait_decode_cpu_s:g} s of CPU time" if payload == b"cpu"
                    else f"longer than {lim.portrait_decode_wall_s:g} s")
            raise InputError(WHAT, f"decoding the image took {took}: send a plain png or jpeg of at most a few "
                                   "megapixels")
        if code == MEMORY:
            raise InputError(WHAT, f"decoding the image needs more than {lim.portrait_decode_memory_mb} MB: "
                                   "send a plain png or jpeg of at most a few megapixels")
        raise RuntimeError(f"portrait decoding failed in its child process: {payload.decode(errors='replace')}")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _tiny_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (128, 128, 128)).save(buf, format="PNG")
    return buf.getvalue()


if __name__ == "__main__":
    _helper_main()
