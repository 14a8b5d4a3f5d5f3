"""Context-memory stage (LCU): Features (+ TranscriptSegment) -> generation windows + MemoryTokens.

Per session it holds the LCU memory (bounded: ``memory_slots`` behaviour slots
plus the transcript traces, whatever the session length) and a short feature history. It cuts the feature stream
into generation windows: window ``w`` generates frames ``[t0, t0 + S)``
(``t0 = w * S``) and needs features for ``[t0 - K, t0 + S + L)`` (K overlap
frames of context, L lookahead frames = 80 ms). Each window goes out with the
memory tokens as they were *before* the window (generation is causal), then the
memory is updated from the window's new frames of both sides' behaviour and
the transcript text that has arrived by the window's end. A window's feature
rows start ``H = cfg.user_history_frames`` frames earlier, at ``t0 - K - H``:
the user branch attends to the user's last ``U = H + W`` frames up to the
window's end (:func:`window_arrays` splits the rows).

Stride (low-latency streaming)
------------------------------
By default a window generates ``S = cfg.new_frames`` frames, so its first frame
waits for ``S + L`` frames of the avatar's audio before anything is computed
(0.72 s with ``tiny``). ``stride`` ``S' < S`` cuts that wait: the window keeps
its trained span ``W = K + S`` frames, but carries ``K' = W - S'`` known frames
(the session's latest generated motion) and generates ``S'`` new ones, one
model call every ``S'`` frames (``W / S'`` times as many calls per second).
The LCU memory still advances in blocks of ``S`` frames (its decays are per
block), so its time scale does not depend on the stride; each window goes out
with the memory as of the last complete block before it. The stride is the
stage's (``stride``) unless :meth:`MemoryStage.set_stride` gave a session its
own; each window's packet says its K' (``meta["known_frames"]``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .. import schemas
from ..arrays import take_rows
from ..geometry import WindowGeometry
from ..model import EchoModel, MemoryState
from . import Packet, Stage

_COLUMNS = schemas.FEATURE_COLUMNS


@dataclass
class _SessionMemory:
    memory: torch.Tensor
    steps: int = 0
    window: int = 0
    seq: int = 0
    known: int = 0                          # K' known frames per window
    stride: int = 0                         # S' new frames per window
    mem_frame: int = 0                      # first frame not yet folded into the memory
    buf_start: int = 0                      # frame index of buf row 0
    buf: dict = field(default_factory=dict)  # column -> (n, ...) array
    total_frames: int | None = None
    texts: list = field(default_factory=list)  # (pts, text) not yet consumed


class MemoryStage(Stage):
    name = "memory"
    resources = {"num_cpus": 0.25}
    input_contracts = (schemas.FEATURES,)

    def __init__(self, model: EchoModel | None = None, model_loader=None, use_memory: bool = True,
                 stride: int | None = None) -> None:
        super().__init__()
        #: False = LCU ablation: every window sees the initial memory (no long-range context)
        self.use_memory = use_memory
        #: new frames per window (None: the config's ``new_frames``); see the module docstring
        self.stride = stride
        self._strides: dict[str, int | None] = {}   # per-session strides (set_stride)
        self._model = model
        self._loader = model_loader
        self._sessions: dict[str, _SessionMemory] = {}

    def setup(self) -> None:
        if self._model is None:
            self._model = self._loader()
        self._model.eval()
        window_geometry(self._model.cfg, self.stride)  # a bad stride fails here, not mid-session
        super().setup()
        from . import warmup

        try:                                  # one synthetic session through process (see .warmup)
            self.process(warmup.features_packet(self._model.cfg.window_frames + self._model.cfg.lookahead_frames))
        finally:
            self.close_session(warmup.SESSION)


    @property
    def model(self) -> EchoModel:
        self.ensure_setup()
        return self._model

    # -- state ---------------------------------------------------------------------------------
    def set_stride(self, session_id: str, stride: int | None) -> None:
        """This session's new frames per window (None: the stage's default); before its first features.

        A session that exists already (a transcript came first) gets the new geometry while no feature
        row has reached it; after that the stride is fixed (ValueError)."""
        window_geometry(self.model.cfg, stride if stride is not None else self.stride)
        old = self._sessions.get(session_id)
        if old is not None and (old.window > 0 or old.buf_start + len(old.buf["avatar_audio"]) > 0):
            raise ValueError(f"session {session_id}: the stride is fixed once its features started arriving")
        self._strides[session_id] = stride
        if old is not None:            # only transcript so far: same texts, the new window geometry
            s = self._sessions[session_id] = self._new_session(session_id)
            s.texts, s.total_frames = old.texts, old.total_frames

    def _new_session(self, sid: str) -> _SessionMemory:
        cfg = self.model.cfg
        with torch.inference_mode():
            mem = self.model.memory_init(1)
        s = _SessionMemory(memory=mem)
        stride = self._strides.get(sid)
        s.known, s.stride, _ = window_geometry(cfg, self.stride if stride is None else stride)
        # K' + H frames of silence before t = 0 give the first window its context rows
        pad = s.known + cfg.user_history_frames
        s.buf_start = -pad
        s.buf = {name: np.zeros((pad, *shape), np.float32)
                 for name, shape in self._shapes().items()}
        return s

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(schemas.FEATURES.spec(name).shape) for name in _COLUMNS}

    def export_state(self, session_id: str) -> bytes | None:
        """The session's LCU memory as bytes (safetensors), for checkpointing; None for a session this
        stage does not hold (already closed, or failed before it arrived): nothing to checkpoint."""
        s = self._sessions.get(session_id)
        if s is None:
            return None
        return MemoryState(s.memory[0], steps=s.steps, config_name=self.model.cfg.name).to_bytes()

    def import_state(self, session_id: str, data: bytes) -> None:
        st = MemoryState.from_bytes(data, self.model.cfg)
        s = self._sessions.get(session_id) or self._new_session(session_id)
        s.memory = st.memory.unsqueeze(0)
        s.steps = st.steps
        self._sessions[session_id] = s

    def add_transcript(self, batch) -> None:
        """Transcript segments of a session (a control-path message: it does not wait behind features)."""
        schemas.validate(batch, schemas.TRANSCRIPT_SEGMENT)
        for sid, pts, text in zip(schemas.column(batch, "session_id"), schemas.column(batch, "pts").tolist(),
                                  schemas.column(batch, "text").tolist()):
            s = self._sessions.get(sid)
            if s is None:
                s = self._sessions[sid] = self._new_session(sid)
            s.texts.append((pts, text))

    # -- processing ------------------------------------------------------------------------------
    def process(self, packet: Packet) -> list[Packet]:
        self.check_input(packet)
        sid = packet.session_id
        s = self._sessions.get(sid)
        if s is None:
            s = self._sessions[sid] = self._new_session(sid)
        feats = packet.get(schemas.FEATURES)
        if feats is not None and feats.num_rows:
            for name in _COLUMNS:
                s.buf[name] = np.concatenate([s.buf[name], schemas.column(feats, name)])
        if packet.end:
            s.total_frames = s.buf_start + len(s.buf["avatar_audio"])
        out = []
        while True:
            win = self._next_window(sid, s, packet.meta)
            if win is None:
                break
            out.append(win)
        if packet.end:
            if out:
                out[-1].end = True
            else:
                out.append(Packet(sid, end=True, meta=dict(packet.meta, total_frames=s.total_frames)))
            self.close_session(sid)
        return out

    def _next_window(self, sid: str, s: _SessionMemory, meta: dict) -> Packet | None:
        cfg = self.model.cfg
        K, S, L = s.known, s.stride, cfg.lookahead_frames
        t0 = s.window * S
        have_until = s.buf_start + len(s.buf["avatar_audio"])  # exclusive
        if s.total_frames is not None:
            if t0 >= s.total_frames:
                return None
        elif have_until < t0 + S + L:
            return None
        H = cfg.user_history_frames
        rows = self._rows(s, t0 - K - H, t0 + S + L)
        frames = np.arange(t0 - K - H, t0 + S + L)
        n = len(frames)
        valid = S if s.total_frames is None else min(S, s.total_frames - t0)
        win = Packet(sid, meta=dict(meta, window=s.window, t0=t0, valid_frames=valid, known_frames=K,
                                    total_frames=s.total_frames))
        win.put(schemas.make_batch(schemas.FEATURES, {
            "session_id": [sid] * n, "seq": np.arange(n) + s.seq, "pts": frames / cfg.fps, "frame": frames,
            **rows}), schemas.FEATURES)
        tokens = s.memory[0].detach().cpu().numpy()
        win.put(schemas.make_batch(schemas.MEMORY_TOKENS, {
            "session_id": [sid], "seq": [s.window], "pts": [t0 / cfg.fps], "window": [s.window],
            "first_frame": [t0], "tokens": tokens[None]}), schemas.MEMORY_TOKENS)
        s.seq += n
        # fold every complete block of cfg.new_frames frames generated so far into the memory
        block = cfg.new_frames
        while s.mem_frame + block <= t0 + S:
            f0 = s.mem_frame
            self._update(s, self._rows(s, f0, f0 + block), (f0 + block) / cfg.fps)
            s.mem_frame += block
        s.window += 1
        # keep only what comes next needs: the next window's rows and the memory's next block
        drop = min(t0 + S - K - H, s.mem_frame) - s.buf_start
        if drop > 0:
            for name in _COLUMNS:
                s.buf[name] = s.buf[name][drop:]
            s.buf_start += drop
        return win

    @staticmethod
    def _rows(s: _SessionMemory, f0: int, f1: int) -> dict[str, np.ndarray]:
        """Feature rows of frames [f0, f1) from the buffer; silence past the end of the stream."""
        return {name: take_rows(s.buf[name], f0 - s.buf_start, f1 - s.buf_start) for name in _COLUMNS}

    def _update(self, s: _SessionMemory, rows: dict, until_pts: float) -> None:
        text = " ".join(t for p, t in s.texts if p < until_pts)
        s.texts = [(p, t) for p, t in s.texts if p >= until_pts]
        if not self.use_memory:
            return
        m = self.model
        with torch.inference_mode():
            t = {k: torch.from_numpy(np.ascontiguousarray(v))[None] for k, v in rows.items()}
            emb = m.encode_transcript([text])
            s.memory = m.memory_update(s.memory, t["avatar_audio"], t["user_audio"], t["user_video"],
                                       t["user_blend"], t["user_present"], emb)
        s.steps += 1

    def reset_session(self, session_id: str) -> None:
        """Interrupt: drop buffered features and pending windows; the long-range memory stays."""
        s = self._sessions.get(session_id)
        if s is None:
            return
        fresh = self._new_session(session_id)
        fresh.memory, fresh.steps = s.memory, s.steps
        self._sessions[session_id] = fresh

    def close_session(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)
        self._strides.pop(session_id, None)


def window_geometry(cfg, stride: int | None = None) -> tuple[int, int, int]:
    """(K', S', L) for windows of ``stride`` new frames (see :class:`echo_stream.geometry.WindowGeometry`)."""
    return WindowGeometry.of(cfg).split(stride)


def window_arrays(packet: Packet, cfg) -> dict[str, np.ndarray]:
    """A window packet's features as the model takes them: ``avatar_audio`` (W + L rows, from the window's
    first frame), the ``user_*`` columns (the last ``cfg.user_frames`` rows up to the window's end) and
    ``memory`` (its memory tokens)."""
    feats = packet.get(schemas.FEATURES)
    h, u = cfg.user_history_frames, cfg.user_frames
    out = {"avatar_audio": schemas.column(feats, "avatar_audio")[h:]}
    for name in _COLUMNS[1:]:
        out[name] = schemas.column(feats, name)[:u]
    out["memory"] = schemas.column(packet.get(schemas.MEMORY_TOKENS), "tokens")[0]
    return out

