"""The quality checks that quarantine a featurised conversation unfit for training."""
from __future__ import annotations

import math

from ..errors import InputError
from .settings import Settings


def _dbfs(x: float) -> float:
    return 20 * math.log10(max(x, 1e-12))


def check_quality(row: dict, feats: dict, settings: Settings) -> None:
    """Raise :class:`InputError` when a featurised conversation is unfit for training: silent avatar
    audio, no motion targets, or tracks whose lengths disagree (beyond ``length_tolerance_s``)."""
    cid = str(row.get("conversation_id"))
    m = feats["media"]
    tol = settings.length_tolerance_s
    dur = m["avatar_s"]
    if _dbfs(m["avatar_peak"]) < settings.silence_dbfs:
        raise InputError(row["avatar_media"], f"avatar audio is silent (peak {_dbfs(m['avatar_peak']):.0f} dBFS "
                                              f"< {settings.silence_dbfs:g} dBFS)")
    if settings.require_motion and not feats["has_motion"]:
        raise InputError(cid, "no motion targets: give 'avatar_motion' (motion .parquet or Live Link Face .csv)"
                              + (" or avatar video with a face for the tracker" if not settings.no_tracker else
                                 " or run without --no-tracker on avatar video"))
    declared = row.get("duration_s")
    if declared is not None and abs(float(declared) - dur) > tol:
        raise InputError(row["avatar_media"], f"wrong length: avatar audio is {dur:.2f} s, the manifest says "
                                              f"duration_s {float(declared):.2f} s (tolerance {tol:g} s)")
    for key, what, path_key in (("user_audio_s", "user audio", "user_media"),
                                ("user_video_s", "user video", "user_media"), ("motion_s", "motion track", None)):
        got = m.get(key)
        if got is None:
            continue
        too_long = key == "user_audio_s" or (key == "motion_s" and path_key is None and row.get("avatar_motion"))
        if got < dur - tol or (too_long and got > dur + tol):
            where = row.get(path_key) if path_key else (row.get("avatar_motion") or m.get("motion_source") or cid)
            raise InputError(str(where), f"wrong length: {what} covers {got:.2f} s, the avatar audio {dur:.2f} s "
                                         f"(tolerance {tol:g} s)")
