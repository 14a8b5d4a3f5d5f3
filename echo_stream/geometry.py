"""The window geometry of generation: one object, built from the model config, that every part asks.

A generation window spans ``W = window_frames`` frames: ``K'`` known frames (the previous window's
last output) then ``S'`` new ones, ``K' + S' = W``; it also reads ``L = lookahead_frames`` frames of
avatar audio beyond its end, and the user's last ``history_frames + W`` frames up to its end. ``S'``
(the *stride*) is the latency/compute knob: at most the config's ``new_frames`` (then ``K'`` is the
config's ``overlap_frames``); serving uses fewer for video sessions (lower latency), training can
prepare a checkpoint for that (``--long-known``).

Who asks what:

* the memory stage cuts windows (``split``), the diffusion stage conditions on ``known`` frames;
* serving validates a session's requested stride (``stride``) and hands audio to the pipeline as soon
  as a window can be cut (``ready_s``);
* ``echo-stream serve --stride`` and ``eval --stride`` name the same quantity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from . import config as _config
from .errors import InputError

#: seconds the audio features look beyond a frame's end (the mel window's half): a window is ready once
#: its audio plus this much is in
FEATURE_LOOKAHEAD_S = 0.010


class StrideError(InputError, ValueError):
    """A stride outside ``1 .. new_frames`` (an :class:`InputError` naming the argument; also a ValueError)."""


@dataclass(frozen=True)
class WindowGeometry:
    window_frames: int          # W
    max_stride: int             # the config's new_frames: the most new frames a window may generate
    lookahead_frames: int       # L
    history_frames: int = 0     # the user's frames before the window the user branch sees
    config_name: str = ""
    fps: int = _config.FPS

    @classmethod
    def of(cls, cfg) -> "WindowGeometry":
        """The geometry of a model config (``echo_stream.config.ModelConfig``)."""
        return cls(window_frames=cfg.window_frames, max_stride=cfg.new_frames, lookahead_frames=cfg.lookahead_frames,
                   history_frames=getattr(cfg, "user_history_frames", 0), config_name=getattr(cfg, "name", ""))

    def stride(self, requested: int | None = None, what: str = "stride") -> int:
        """``S'``: the requested new frames per window (None: ``max_stride``), checked; ``what`` names the
        argument or field in the error."""
        s = self.max_stride if requested is None else int(requested)
        if not 1 <= s <= self.max_stride:
            model = f" of config {self.config_name!r}" if self.config_name else ""
            raise StrideError(what, f"new frames per window must be between 1 and {self.max_stride} (the new_frames"
                                   f"{model}), got {requested}")
        return s

    def known(self, stride: int | None = None) -> int:
        """``K' = W - S'``: previous-motion frames each window is conditioned on."""
        return self.window_frames - self.stride(stride)

    def split(self, stride: int | None = None) -> tuple[int, int, int]:
        """``(K', S', L)``."""
        s = self.stride(stride)
        return self.window_frames - s, s, self.lookahead_frames

    @property
    def user_frames(self) -> int:
        """Rows of user features a window reads (its history and its own frames)."""
        return self.history_frames + self.window_frames

    def ready_extra_s(self) -> float:
        """Audio beyond a window's last new frame that must be in before the window can be cut."""
        return self.lookahead_frames / self.fps + FEATURE_LOOKAHEAD_S

    def ready_s(self, stride: int, received_s: float) -> float:
        """Seconds of avatar audio after which the next window is ready, given ``received_s`` seconds in:
        windows end every ``S' / fps`` seconds, each needing :meth:`ready_extra_s` beyond its end."""
        window_s = self.stride(stride) / self.fps
        extra = self.ready_extra_s()
        return math.floor(max(0.0, received_s - extra) / window_s) * window_s + extra


def default_geometry() -> WindowGeometry:
    """The geometry of the default model config (``tiny``)."""
    return WindowGeometry.of(_config.get_config("tiny"))
