"""The motion space: one definition used by the model, renderer, Parquet I/O and training data.

Per frame (25 fps) a motion vector holds the 52 ARKit blendshape coefficients
(the names ARKit / Live Link Face / Audio2Face use) followed by head rotation
(``headPitch``, ``headYaw``, ``headRoll``; radians) and head translation
(``headTx``, ``headTy``, ``headTz``; in units of the face height, so the
renderer can scale them to any portrait).

Channels are grouped into five region blocks. ARKit's mouth channels are split
by function: the *lips/jaw* block holds the articulation channels that speech
drives (jaw, lip closure, funnel, pucker, press, roll, stretch, ...); the
expressive mouth-corner channels (smile, frown, dimple) sit with cheeks/nose,
because they carry listener reactions (mirrored smiles) and must be driven by
the user branch of SDCM, which lip tokens never see.
"""
from __future__ import annotations

import numpy as np

FPS = 25

REGION_CHANNELS: dict[str, tuple[str, ...]] = {
    "lips": (
        "jawForward", "jawLeft", "jawRight", "jawOpen",
        "mouthClose", "mouthFunnel", "mouthPucker", "mouthLeft", "mouthRight",
        "mouthRollLower", "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper",
        "mouthPressLeft", "mouthPressRight",
        "mouthLowerDownLeft", "mouthLowerDownRight",
        "mouthUpperUpLeft", "mouthUpperUpRight",
        "mouthStretchLeft", "mouthStretchRight",
        "tongueOut",
    ),
    "eyes": (
        "eyeBlinkLeft", "eyeLookDownLeft", "eyeLookInLeft", "eyeLookOutLeft",
        "eyeLookUpLeft", "eyeSquintLeft", "eyeWideLeft",
        "eyeBlinkRight", "eyeLookDownRight", "eyeLookInRight", "eyeLookOutRight",
        "eyeLookUpRight", "eyeSquintRight", "eyeWideRight",
    ),
    "brows": ("browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight"),
    "cheeks": (
        "cheekPuff", "cheekSquintLeft", "cheekSquintRight",
        "noseSneerLeft", "noseSneerRight",
        "mouthSmileLeft", "mouthSmileRight",
        "mouthFrownLeft", "mouthFrownRight",
        "mouthDimpleLeft", "mouthDimpleRight",
    ),
    "head": ("headPitch", "headYaw", "headRoll", "headTx", "headTy", "headTz"),
}

REGIONS: tuple[str, ...] = tuple(REGION_CHANNELS)
LIP_REGION = "lips"

#: All channel names in motion-vector order.
CHANNELS: tuple[str, ...] = tuple(c for r in REGIONS for c in REGION_CHANNELS[r])
BLENDSHAPES: tuple[str, ...] = tuple(c for c in CHANNELS if not c.startswith("head"))
HEAD_POSE: tuple[str, ...] = REGION_CHANNELS["head"]
NUM_CHANNELS = len(CHANNELS)  # 58
CHANNEL_INDEX: dict[str, int] = {c: i for i, c in enumerate(CHANNELS)}

assert len(BLENDSHAPES) == 52 and len(set(CHANNELS)) == NUM_CHANNELS

#: Index arrays of each region's channels inside the motion vector.
REGION_SLICES: dict[str, np.ndarray] = {
    r: np.array([CHANNEL_INDEX[c] for c in REGION_CHANNELS[r]], dtype=np.int64) for r in REGIONS
}

#: Valid range per channel: blendshapes in [0, 1]; rotations in radians; translations in face heights.
CHANNEL_MIN = np.array([(-0.6 if c in ("headPitch", "headYaw", "headRoll") else -0.3 if c.startswith("headT") else 0.0)
                        for c in CHANNELS], dtype=np.float32)
CHANNEL_MAX = np.array([(0.6 if c in ("headPitch", "headYaw", "headRoll") else 0.3 if c.startswith("headT") else 1.0)
                        for c in CHANNELS], dtype=np.float32)


def clamp_motion(m: np.ndarray) -> np.ndarray:
    """Clip a (..., NUM_CHANNELS) motion array to the valid range of each channel."""
    return np.clip(m, CHANNEL_MIN, CHANNEL_MAX)


def neutral_motion(frames: int) -> np.ndarray:
    """A (frames, NUM_CHANNELS) float32 array of the neutral face (all zeros)."""
    return np.zeros((frames, NUM_CHANNELS), dtype=np.float32)


def channel(m: np.ndarray, name: str) -> np.ndarray:
    """The column of one named channel from a (..., NUM_CHANNELS) array."""
    return m[..., CHANNEL_INDEX[name]]


#: the eight gaze channels (``eyeLook{Down,In,Out,Up}{Left,Right}``)
LOOK_CHANNELS: tuple[str, ...] = tuple(f"eyeLook{d}{s}" for s in ("Left", "Right") for d in ("Down", "In", "Out", "Up"))


def gaze_distance(m: np.ndarray) -> np.ndarray:
    """Per-frame distance of the gaze from straight ahead: the mean over the two eyes of |horizontal| + |vertical|
    (the sum of the eight ``eyeLook*`` channels over 2), float64."""
    return np.asarray(m, np.float64)[:, [CHANNEL_INDEX[c] for c in LOOK_CHANNELS]].sum(1) / 2
