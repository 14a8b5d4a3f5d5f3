"""Motion-diffusion stage: generation windows (+ MemoryTokens) -> MotionWindow.

Windows of *different sessions* are stacked into one model call (the serving
layer hands it every window that is ready). Per session the stage keeps the
previous motion (the last ``W - 1`` frames it generated; a window cut with
stride S' is conditioned on the last ``K' = W - S'`` of them), so windows join
without seams, and a seed: sampling is deterministic for a given (session
seed, window index), batched or not. Windows of sessions running different
strides share a call only with windows of the same K' (one model call per K').

Spontaneous blinks (:mod:`echo_stream.blinks`) are added to each window's frames
(``max`` with the model's ``eyeBlink``) before they become the next window's
known frames; they follow the session seed, so they are as deterministic as the
sampling. ``blinks=False`` gives the model's own output.

A model with a listener-reaction head (``cfg.reactions``, :mod:`echo_stream.model.reactions`) gives each
window's new frames onset probabilities from the user's features; a per-session
:class:`~echo_stream.model.reactions.ReactionTrack` draws nods and brow raises from them (keyed by the
session seed and the frame) and adds their gestures, before the blinks. ``reactions=False`` leaves them out.
"""
from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from scipy import signal as sps

from .. import config, motion, schemas
from ..blinks import BlinkTrack
from ..model import EchoModel, window_seed
from ..model.reactions import ReactionTrack, own_voice
from . import Packet, Stage
from .memory import window_arrays, window_geometry


@dataclass
class _SessionMotion:
    prev: np.ndarray   # (K, C) last generated frames
    seed: int
    seq: int = 0
    blinks: BlinkTrack | None = None
    reactions: ReactionTrack | None = None
    head_filter: np.ndarray | None = None   # the head-pose low-pass's state (smooth_head)


def session_seed(session_id: str, seed: int | None) -> int:
    """A session's sampling seed: the user's, or one derived from the session id."""
    if seed is not None:
        return int(seed)
    return zlib.crc32(session_id.encode()) & 0x7FFFFFFF


#: default cutoff (Hz) of the head-pose low-pass. The 4-step sampler leaves the head pose jittery (10-300x the
#: ground truth's power above 4 Hz) and swaying at 0.5-1.5 Hz, where a listener's nods are: with the earlier
#: 3-frame Gaussian the avatar's nod-band energy away from the user's pauses stayed 2.5x the ground truth's
#: (0.016 vs 0.0065), so its nods after pauses stood out half as much. Between its gestures the ground
#: truth's head moves below ~0.6 Hz (slow sway, speech-led nodding low-passed). The cutoff was chosen on
#: *training* conversations (0.4 / 0.5 / 0.6 / 0.8 Hz -> 0.0057 / 0.0071 / 0.0087 / 0.0119, ground truth
#: 0.0060; README "The model and its weights"). The nods of the reaction track are added after it, at full size.
HEAD_CUTOFF_HZ = 0.4
_HEAD = motion.REGION_SLICES["head"]


@functools.lru_cache(maxsize=8)
def _head_sos(cutoff_hz: float, fps: float) -> np.ndarray:
    """The low-pass's second-order sections (designed once per cutoff, not per window)."""
    return sps.butter(2, min(cutoff_hz / (fps / 2), 0.99), output="sos")


def settled_head_state(pose: np.ndarray, cutoff_hz: float, fps: float = config.FPS) -> np.ndarray:
    """The low-pass's state when it has long been at head ``pose`` (6,): it starts there, without a swing."""
    sos = _head_sos(cutoff_hz, fps)
    return sps.sosfilt_zi(sos)[:, :, None] * np.asarray(pose, np.float64)[None, None, :]


def smooth_head(new: np.ndarray, state: np.ndarray | None, cutoff_hz: float,
                fps: float = config.FPS) -> tuple[np.ndarray, np.ndarray]:
    """``new`` (S, C) with its head-pose channels low-passed at ``cutoff_hz``: causal, without waiting.

    A second-order Butterworth run frame by frame with its state kept per session (``state``; None at a
    session's start, which begins the filter settled on the first pose, not swinging in from zero):
    the result is the same however the frames are cut into windows, and nothing waits for later frames
    (the price is a group delay of ~0.5 s at 0.4 Hz on the slow sway only; gestures are added after it).
    Returns the filtered window and the state to keep for the next one.
    """
    x = np.asarray(new[:, _HEAD], np.float64)
    if len(x) == 0:
        return np.array(new, copy=True), state
    if state is None:
        state = settled_head_state(x[0], cutoff_hz, fps)
    y, state = sps.sosfilt(_head_sos(cutoff_hz, fps), x, axis=0, zi=np.asarray(state, np.float64))
    out = np.array(new, copy=True)
    out[:, _HEAD] = y
    return out, state


class DiffusionStage(Stage):
    name = "diffusion"
    resources = {"num_cpus": 0.5}
    input_contracts = (schemas.FEATURES, schemas.MEMORY_TOKENS)

    def __init__(self, model: EchoModel | None = None, model_loader=None, device: str = "cpu",
                 stride: int | None = None, blinks: bool = True, user_guidance: float = 1.0,
                 reactions: bool = True, head_cutoff_hz: float = HEAD_CUTOFF_HZ) -> None:
        super().__init__()
        #: cutoff (Hz) of the low-pass on the model's head pose (0 = off; see :func:`smooth_head`)
        self.head_cutoff_hz = head_cutoff_hz
        #: add the listener reactions of a model with a reaction head (see the module docstring)
        self.reactions = reactions
        #: guidance on the user branch (``EchoModel.sample``); 1 = none (the default)
        self.user_guidance = user_guidance
        #: add spontaneous blinks (see the module docstring)
        self.blinks = blinks
        #: new frames per window (None: the config's ``new_frames``); must match the memory stage's
        self.stride = stride
        self._model = model
        self._loader = model_loader
        self.device = device
        self._sessions: dict[str, _SessionMotion] = {}
        self._seeds: dict[str, int] = {}

    def setup(self) -> None:
        if self._model is None:
            self._model = self._loader()
        self._model.to(self.device).eval()
        window_geometry(self._model.cfg, self.stride)  # a bad stride fails here, not mid-session
        super().setup()
        from ..chain import local_call, run_chain, stage_before
        from . import warmup
        from .memory import MemoryStage

        # one synthetic session's windows through process, at the serving shapes (see .warmup)
        cfg = self._model.cfg
        upstream = stage_before(self.name)
        local = {upstream: MemoryStage(model=self._model, stride=self.stride), self.name: self}
        try:
            run_chain(local_call(local), warmup.features_packet(cfg.window_frames + cfg.lookahead_frames),
                      first=upstream, last=self.name)
        finally:
            self.close_session(warmup.SESSION)

    @property
    def known_frames(self) -> int:
        """K': previous-motion frames each window is conditioned on (``window_frames - stride``)."""
        return window_geometry(self.model.cfg, self.stride)[0]

    @property
    def model(self) -> EchoModel:
        self.ensure_setup()
        return self._model

    def set_seed(self, session_id: str, seed: int | None) -> None:
        self._seeds[session_id] = session_seed(session_id, seed)

    def _session(self, sid: str) -> _SessionMotion:
        s = self._sessions.get(sid)
        if s is None:   # prev holds as many frames as any stride's windows need (W - 1)
            s = self._sessions[sid] = _SessionMotion(motion.neutral_motion(self.model.cfg.window_frames - 1),
                                                     self._seeds.get(sid, session_seed(sid, None)))
        return s

    def _known(self, p: Packet) -> int:
        """K' of a window: what the memory stage cut it with (the stage's default for older packets)."""
        k = p.meta.get("known_frames")
        return self.known_frames if k is None else int(k)      # the property validates: only when needed

    @staticmethod
    def _prev(s: _SessionMotion, k: int) -> np.ndarray:
        """The session's last ``k`` frames (the earliest one repeated if fewer were restored)."""
        prev = s.prev[-k:]
        if len(prev) < k:
            prev = np.concatenate([np.repeat(prev[:1], k - len(prev), axis=0), prev])
        return prev

    def process(self, packets: list[Packet] | Packet) -> list[Packet]:
        """Generate one window for every packet (sessions batched in one model call)."""
        if isinstance(packets, Packet):
            packets = [packets]
        work = [p for p in packets if p.get(schemas.MEMORY_TOKENS) is not None]
        results: dict[int, tuple] = {}
        if work:
            for p in work:
                self.check_input(p)
            results = dict(zip(map(id, work), self._sample(work)))
        out = []
        for p in packets:
            sid = p.session_id
            q = Packet(sid, end=p.end, meta=dict(p.meta))
            if id(p) in results:
                new, probs = results[id(p)]
                s = self._session(sid)
                t0 = int(p.meta["t0"])
                if self.head_cutoff_hz > 0:
                    new, s.head_filter = smooth_head(new, s.head_filter, self.head_cutoff_hz, self.model.cfg.fps)
                if probs is not None:
                    if s.reactions is None:
                        head = self.model.reactions
                        s.reactions = ReactionTrack(s.seed, head.templates.cpu().numpy(), head.gain_std.cpu().numpy())
                    s.reactions.step(probs, t0)
                    new = s.reactions.apply(new, t0)
                if self.blinks:
                    if s.blinks is None:
                        s.blinks = BlinkTrack(s.seed)
                    new = s.blinks.apply(new, t0)
                s.prev = np.concatenate([s.prev, new])[-(self.model.cfg.window_frames - 1):]
                valid = int(p.meta.get("valid_frames", len(new)))
                new = new[:valid]
                frames = np.arange(t0, t0 + len(new))
                fps = self.model.cfg.fps
                q.put(schemas.make_batch(schemas.MOTION_WINDOW, {
                    "session_id": [sid] * len(new), "seq": np.arange(s.seq, s.seq + len(new)),
                    "pts": frames / fps, "frame": frames, "window": [int(p.meta["window"])] * len(new),
                    "motion": new}), schemas.MOTION_WINDOW)
                s.seq += len(new)
            out.append(q)
            if p.end:
                self.close_session(sid)
        return out

    def _sample(self, packets: list[Packet]) -> list[tuple]:
        """One model call per distinct K' among the packets (sessions may run different strides)."""
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(packets):
            groups.setdefault(self._known(p), []).append(i)
        out: list = [None] * len(packets)
        for k, idx in groups.items():
            for i, o in zip(idx, self._sample_group([packets[i] for i in idx], k)):
                out[i] = o
        return out

    def _sample_group(self, packets: list[Packet], k: int) -> list[tuple]:
        """``(motion (S, C), reaction onset probabilities (S, kinds) or None)`` per packet."""
        m = self.model
        cfg = m.cfg
        arrays = [window_arrays(p, cfg) for p in packets]
        sessions = [self._session(p.session_id) for p in packets]

        def stack(name):
            return torch.from_numpy(np.stack([a[name] for a in arrays])).to(self.device)

        with torch.inference_mode():
            out = m.sample(
                prev_motion=torch.from_numpy(np.stack([self._prev(s, k) for s in sessions])).to(self.device),
                avatar_audio=stack("avatar_audio"),
                user_audio=stack("user_audio"), user_video=stack("user_video"),
                user_blend=stack("user_blend"), user_present=stack("user_present"),
                memory=stack("memory"),
                seeds=[window_seed(s.seed, int(p.meta["window"])) for s, p in zip(sessions, packets)],
                user_guidance=self.user_guidance,
            )
            probs = None
            if self.reactions and m.reactions is not None and float(m.reactions.trained) > 0.5:
                # the window's new frames are the last S of the user rows (they end at the window's end)
                ua = stack("user_audio")
                own = own_voice(stack("avatar_audio"), cfg.lookahead_frames)     # the window's W frames
                own = torch.cat([own.new_zeros(own.shape[0], max(0, ua.shape[1] - own.shape[1]), own.shape[2]),
                                 own], 1)[:, -ua.shape[1]:]    # aligned with the user rows (read per frame only)
                probs = m.reactions.probabilities(ua, stack("user_video"), stack("user_blend"), stack("user_present"),
                                                  own)[:, -out.shape[1]:].cpu().numpy()
        out = out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
        return [(o.astype(np.float32), None if probs is None else probs[i]) for i, o in enumerate(out)]

    def export_state(self, session_id: str) -> dict:
        s = self._session(session_id)
        st = {"prev": s.prev.copy(), "seed": s.seed, "seq": s.seq}
        if s.reactions is not None:
            st["reactions"] = s.reactions.state()
        if s.head_filter is not None:
            st["head_filter"] = np.asarray(s.head_filter).tolist()
        return st

    def import_state(self, session_id: str, state: dict) -> None:
        """Restore a session's previous motion (``prev``); ``seed`` / ``seq`` default to the session's own."""
        seed = state.get("seed")
        if seed is None:
            seed = self._seeds.get(session_id, session_seed(session_id, None))
        s = self._sessions[session_id] = _SessionMotion(np.asarray(state["prev"], np.float32), int(seed),
                                                        int(state.get("seq", 0)))
        if state.get("reactions") is not None and self.model.reactions is not None:
            head = self.model.reactions
            s.reactions = ReactionTrack(s.seed, head.templates.cpu().numpy(), head.gain_std.cpu().numpy())
            s.reactions.restore(state["reactions"])
        if state.get("head_filter") is not None:
            s.head_filter = np.asarray(state["head_filter"], np.float64)
        elif self.head_cutoff_hz > 0 and len(s.prev):
            # a re-opened session: the low-pass continues from the last frame it sent, without a jump
            s.head_filter = settled_head_state(s.prev[-1, _HEAD], self.head_cutoff_hz, self.model.cfg.fps)

    def close_session(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)
        self._seeds.pop(session_id, None)
