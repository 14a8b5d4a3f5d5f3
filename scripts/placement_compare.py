"""Side by side: the renderer's portrait placement from the Haar cascades vs from the face mesh.

Real photos only: the bundled portrait (public-domain NASA photo) and stills of the tests' real face
video (Pexels). Each row: Haar landmarks, mesh landmarks, then the renderer opening the mouth and
raising the brows from each placement. Writes docs/placement_mesh_vs_haar.png.

    .venv/bin/python scripts/placement_compare.py
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from echo_stream import media, motion, render

ROOT = Path(__file__).resolve().parents[1]
VIDEO = ROOT / "tests" / "data" / "real" / "WolfgangLanger_Pexels.mp4"


def draw(crop) -> np.ndarray:
    img = crop.image.copy()
    for name, p in crop.landmarks.items():
        pts = np.atleast_2d(p).astype(int)
        colour = (255, 40, 40) if name != "jaw" else (40, 200, 255)
        for q in pts:
            cv2.circle(img, (int(q[0]), int(q[1])), 2, colour, -1)
        if name == "jaw":
            cv2.polylines(img, [pts.reshape(-1, 1, 2)], False, colour, 1)
    return img


def label(img: np.ndarray, text: str) -> np.ndarray:
    img = img.copy()
    cv2.putText(img, text, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(img, text, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return img


def main() -> None:
    stills = {i: f for i, _, f in media.iter_video_frames(VIDEO) if i in (175, 470)}
    photos = [("NASA portrait", str(render.SAMPLE_PORTRAIT))]
    tmp = ROOT / "out"
    tmp.mkdir(exist_ok=True)
    for i, f in stills.items():
        p = tmp / f"pexels_{i}.png"
        cv2.imwrite(str(p), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        photos.append((f"Pexels still {i / 25:.1f} s", str(p)))
    expr = motion.neutral_motion(1)
    expr[0, motion.CHANNEL_INDEX["jawOpen"]] = 0.8
    expr[0, motion.CHANNEL_INDEX["browInnerUp"]] = 1.0
    rows = []
    for title, path in photos:
        cells = []
        for placement in ("haar", "mesh"):
            render.portrait.PLACEMENT = placement
            r = render.PortraitRenderer(render.load_portrait(path), size=(256, 256))
            cells.append(label(draw(r.crop), f"{placement}: {title}"))
            cells.append(label(r.render(expr)[0], f"{placement}: jawOpen .8 + browInnerUp"))
        rows.append(np.concatenate(cells, 1))
    out = ROOT / "docs" / "placement_mesh_vs_haar.png"
    cv2.imwrite(str(out), cv2.cvtColor(np.concatenate(rows, 0), cv2.COLOR_RGB2BGR))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
