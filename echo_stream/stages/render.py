"""Render stage: MotionWindow -> RenderedFrames (+ the motion, passed through for the egress).

The session's reference portrait is placed once (face detection or a landmarks
sidecar) and its source-side work (crop, control points, flow bases, masks) is
cached per portrait and resolution, shared by every session that uses it. Each
window's frames are rendered in one batched warp.
"""
from __future__ import annotations

import hashlib

from .. import render, schemas
from . import Packet, Stage


class RenderStage(Stage):
    name = "render"
    resources = {"num_cpus": 0.5}
    input_contracts = (schemas.MOTION_WINDOW,)

    def __init__(self, device: str = "cpu", max_cached_portraits: int = 32) -> None:
        super().__init__()
        self.device = device
        self.max_cached = max_cached_portraits
        self._cache: dict[tuple, render.PortraitRenderer] = {}
        self._sessions: dict[str, tuple] = {}

    def setup(self) -> None:
        """Warm up on the bundled portrait at 256x256: portrait placement, then one window rendered. The placed
        portrait stays in the (bounded) cache: the server's chain warm-up and sessions on the default portrait
        use it."""
        from . import warmup

        super().setup()
        try:
            self.open_session(warmup.SESSION, str(render.SAMPLE_PORTRAIT))
            self.process(warmup.motion_packet(6))
        finally:
            self.close_session(warmup.SESSION)

    def open_session(self, session_id: str, portrait, size: tuple[int, int] = (256, 256),
                     landmarks: str | None = None) -> dict:
        """Bind a portrait (a path, encoded image bytes, or a :class:`~echo_stream.render.DecodedImage`) to a
        session; returns the face placement."""
        if isinstance(portrait, render.DecodedImage):      # decoded at the server's edge; ``digest`` is its id
            key = ("decoded", portrait.digest, tuple(size), landmarks)
        elif isinstance(portrait, (bytes, bytearray)):
            key = (hashlib.sha256(portrait).hexdigest(), tuple(size), landmarks)
        else:
            key = (str(portrait), tuple(size), landmarks)
        if key not in self._cache:
            if len(self._cache) >= self.max_cached:
                self._cache.pop(next(iter(self._cache)))
            p = render.load_portrait(portrait, landmarks_path=landmarks)
            self._cache[key] = render.PortraitRenderer(p, size=tuple(size), device=self.device)
        self._sessions[session_id] = key
        r = self._cache[key]
        return {"size": list(size), "face_source": getattr(r.portrait, "source", "detected")}

    def process(self, packets: list[Packet] | Packet) -> list[Packet]:
        if isinstance(packets, Packet):
            packets = [packets]
        out = []
        for p in packets:
            self.check_input(p)
            q = Packet(p.session_id, end=p.end, meta=dict(p.meta))
            mw = p.get(schemas.MOTION_WINDOW)
            if mw is not None:
                q.put(mw, schemas.MOTION_WINDOW)
                key = self._sessions.get(p.session_id)
                if key is not None:  # motion-only sessions have no portrait
                    frames = self._cache[key].render(schemas.column(mw, "motion"))
                    q.put(schemas.make_batch(schemas.RENDERED_FRAMES, {
                        "session_id": schemas.column(mw, "session_id").tolist(),
                        "seq": schemas.column(mw, "seq"), "pts": schemas.column(mw, "pts"),
                        "frame": schemas.column(mw, "frame"), "image": frames}), schemas.RENDERED_FRAMES)
            out.append(q)
            if p.end:
                self.close_session(p.session_id)
        return out

    def close_session(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

