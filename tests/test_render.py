"""The warping renderer: face placement (detection, sidecar), cropping, and what motion does to pixels."""
import json
import shutil

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from echo_stream import render
from echo_stream.errors import InputError
from echo_stream.motion import CHANNEL_INDEX, NUM_CHANNELS

SIZE = 256


def motion(n=1, **channels):
    m = np.zeros((n, NUM_CHANNELS), np.float32)
    for name, value in channels.items():
        m[:, CHANNEL_INDEX[name]] = value
    return m


@pytest.fixture(scope="module")
def portrait():
    return render.load_portrait(render.SAMPLE_PORTRAIT)


@pytest.fixture(scope="module")
def renderer(portrait):
    return render.PortraitRenderer(portrait, size=(SIZE, SIZE))


@pytest.fixture(scope="module")
def neutral(renderer):
    return renderer.render(motion()).astype(np.int16)[0]


def changed(frame, ref, thresh=12):
    return np.abs(frame.astype(np.int16) - ref).max(-1) > thresh


def box_mask(shape, x0, y0, x1, y1):
    m = np.zeros(shape, bool)
    m[max(0, int(y0)):int(y1), max(0, int(x0)):int(x1)] = True
    return m


def check_crop_landmarks(crop, size=SIZE):
    lm = crop.landmarks
    le, re_ = lm["left_eye"], lm["right_eye"]
    assert le[0] < re_[0], "image-left eye must be left of the image-right eye"
    assert abs(le[1] - re_[1]) < 1.0, "crop levels the eyes"
    assert abs(le[1] - render.EYE_LINE * size) < 1.0 and abs((le[0] + re_[0]) / 2 - size / 2) < 1.0
    for name, p in lm.items():
        pts = np.asarray(p).reshape(-1, 2)
        assert (pts >= 0).all() and (pts <= size - 1).all(), f"{name} outside the crop"
    assert lm["nose"][1] > le[1] and lm["mouth_centre"][1] > lm["nose"][1] and lm["chin"][1] > lm["mouth_centre"][1]
    assert le[0] < lm["nose"][0] < re_[0]
    assert lm["mouth_left"][0] < lm["mouth_centre"][0] < lm["mouth_right"][0]
    assert 0.45 <= crop.face_height / size <= 0.55
    assert 0.14 * size < crop.iod < 0.24 * size


# -- face placement ---------------------------------------------------------------------------------

def test_bundled_portrait_face_is_found_off_centre(portrait):
    assert portrait.source == "detected"
    h, w = portrait.size
    assert (h, w) == (512, 512)
    x, y, bw, bh = portrait.face_box
    # Eileen Collins' face sits in the upper left-centre of the NASA photo, about 95 px wide.
    assert 150 < x < 200 and 45 < y < 90 and 80 < bw < 120
    le, re_ = portrait.landmarks["left_eye"], portrait.landmarks["right_eye"]
    assert 190 < le[0] < 212 and 235 < re_[0] < 257 and 92 < le[1] < 112 and 92 < re_[1] < 112
    assert portrait.landmarks["jaw"].shape == (11, 2)
    assert set(render.LANDMARK_NAMES) <= set(portrait.landmarks)


def test_crop_places_the_face_canonically(renderer):
    crop = renderer.crop
    assert crop.image.shape == (SIZE, SIZE, 3) and crop.image.dtype == np.uint8
    check_crop_landmarks(crop)


def test_face_found_in_shifted_rescaled_non_square_copy(portrait, tmp_path):
    ref = portrait.crop(SIZE)
    img = portrait.image
    # Face pushed to the right and down in a 1.6x upscaled, 1060x1340 non-square canvas.
    canvas = cv2.copyMakeBorder(img, 150, 0, 340, 10, cv2.BORDER_REPLICATE)
    canvas = cv2.resize(canvas, None, fx=1.6, fy=1.6, interpolation=cv2.INTER_LINEAR)[:1060]
    path = tmp_path / "shifted.png"
    Image.fromarray(canvas).save(path)
    moved = render.load_portrait(path)
    assert moved.source == "detected" and moved.size == canvas.shape[:2]
    crop = moved.crop(SIZE)
    check_crop_landmarks(crop)
    for name in ("left_eye", "right_eye", "nose", "mouth_centre", "chin"):
        assert np.abs(crop.landmarks[name] - ref.landmarks[name]).max() < 4.0, name
    # Same face, same crop: the pictures agree closely.
    assert np.abs(crop.image.astype(int) - ref.image.astype(int)).mean() < 12

    # Downscaled into the lower-right corner of a bigger, flat canvas (small face, JPEG).
    small = np.full((700, 1000, 3), 96, np.uint8)
    small[380:380 + 300, 640:640 + 300] = cv2.resize(img, (300, 300), interpolation=cv2.INTER_AREA)
    path2 = tmp_path / "small.jpg"
    Image.fromarray(small).save(path2, quality=90)
    crop2 = render.load_portrait(path2).crop(SIZE)
    check_crop_landmarks(crop2)
    assert np.abs(crop2.landmarks["mouth_centre"] - ref.landmarks["mouth_centre"]).max() < 6.0


def test_encoded_bytes_and_exif_orientation(portrait, tmp_path):
    data = render.SAMPLE_PORTRAIT.read_bytes()
    p = render.load_portrait(data)
    assert p.source == "detected" and np.allclose(p.landmarks["left_eye"], portrait.landmarks["left_eye"])
    # Stored rotated with an EXIF "rotate 90 CW to view" tag: loads upright.
    im = Image.fromarray(np.rot90(portrait.image).copy())
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    im.save(path, exif=exif, quality=92)
    q = render.load_portrait(path)
    assert q.size == portrait.size
    assert np.abs(q.landmarks["left_eye"] - portrait.landmarks["left_eye"]).max() < 3


def _sidecar_points(portrait, shift=(3.0, -2.0)):
    lm = portrait.landmarks
    return {k: [float(lm[k][0] + shift[0]), float(lm[k][1] + shift[1])]
            for k in ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right", "chin")}


def test_sidecar_beside_the_image_overrides_detection(portrait, tmp_path):
    img = tmp_path / "face.jpg"
    shutil.copy(render.SAMPLE_PORTRAIT, img)
    pts = _sidecar_points(portrait)
    (tmp_path / "face.jpg.landmarks.json").write_text(json.dumps(pts))
    p = render.load_portrait(img)
    assert p.source == "sidecar" and p.face_box is None
    for k, v in pts.items():
        assert np.allclose(p.landmarks[k], v, atol=1e-3), k
    check_crop_landmarks(p.crop(SIZE))


def test_explicit_sidecar_with_68_points_and_swapped_sides(portrait, tmp_path):
    lm = portrait.landmarks
    # A plausible 68-point layout built from the detected landmarks.
    pts = np.zeros((68, 2))
    pts[0:17] = np.array([np.interp(np.linspace(0, 10, 17), np.arange(11), lm["jaw"][:, i]) for i in (0, 1)]).T
    pts[17:22] = np.linspace(lm["left_brow_outer"], lm["left_brow_inner"], 5)
    pts[22:27] = np.linspace(lm["right_brow_inner"], lm["right_brow_outer"], 5)
    pts[27:36] = lm["nose"]
    for off, side in ((36, "left"), (42, "right")):
        outer, inner = lm[f"{side}_eye_outer"], lm[f"{side}_eye_inner"]
        a, b = (outer, inner) if side == "left" else (inner, outer)
        top, bot = lm[f"{side}_eye_top"], lm[f"{side}_eye_bottom"]
        pts[off:off + 6] = [a, top - (b - a) / 6, top + (b - a) / 6, b, bot + (b - a) / 6, bot - (b - a) / 6]
    pts[48:68] = lm["mouth_centre"]
    pts[48], pts[54] = lm["mouth_left"], lm["mouth_right"]
    pts[51], pts[57], pts[8] = lm["upper_lip"], lm["lower_lip"], lm["chin"]
    side = tmp_path / "pts.json"
    side.write_text(json.dumps({"points68": pts.tolist()}))
    p = render.load_portrait(render.SAMPLE_PORTRAIT, landmarks_path=side)
    assert p.source == "sidecar"
    assert np.allclose(p.landmarks["chin"], lm["chin"], atol=1e-3)
    assert np.allclose(p.landmarks["left_eye"], lm["left_eye"], atol=0.5)
    check_crop_landmarks(p.crop(SIZE))

    # Subject-side naming (left/right swapped) is accepted: sides are taken from the image.
    named = _sidecar_points(portrait, (0, 0))
    named["left_eye"], named["right_eye"] = named["right_eye"], named["left_eye"]
    side.write_text(json.dumps(named))
    q = render.load_portrait(render.SAMPLE_PORTRAIT, landmarks_path=side)
    assert q.landmarks["left_eye"][0] < q.landmarks["right_eye"][0]


@pytest.mark.parametrize("content, key", [
    ({"left_eye": [200, 100], "right_eye": [245, 102], "nose": [222, 128], "mouth_left": [205, 150]}, "mouth_right"),
    ({"left_eye": [200, 100], "right_eye": [245, 102], "nose": [222, 9000], "mouth_left": [205, 150],
      "mouth_right": [240, 150]}, "nose"),
    ({"left_eye": [200, 100], "right_eye": "here", "nose": [222, 128], "mouth_left": [205, 150],
      "mouth_right": [240, 150]}, "right_eye"),
    ({"points68": [[1, 2]] * 10}, "points68"),
    ([1, 2, 3], "JSON object"),
])
def test_bad_sidecar_is_an_input_error_naming_the_key(tmp_path, content, key):
    side = tmp_path / "bad.json"
    side.write_text(json.dumps(content))
    with pytest.raises(InputError) as e:
        render.load_portrait(render.SAMPLE_PORTRAIT, landmarks_path=side)
    assert key in str(e.value) and str(side) in str(e.value) and "\n" not in str(e.value)


def test_sidecar_not_json_or_missing(tmp_path):
    side = tmp_path / "bad.json"
    side.write_text("{left_eye: oops")
    with pytest.raises(InputError, match="not valid JSON"):
        render.load_portrait(render.SAMPLE_PORTRAIT, landmarks_path=side)
    with pytest.raises(InputError, match="not found"):
        render.load_portrait(render.SAMPLE_PORTRAIT, landmarks_path=tmp_path / "nope.json")


def test_image_without_a_face_asks_for_a_sidecar(tmp_path):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:300, 0:400]
    img = np.stack([xx * 0.5, yy * 0.6, 120 + 0 * xx], -1) + rng.normal(0, 6, (300, 400, 3))
    path = tmp_path / "wall.png"
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
    with pytest.raises(InputError) as e:
        render.load_portrait(path)
    msg = str(e.value)
    assert "no face" in msg and "landmarks" in msg and str(path) in msg


def test_unsupported_corrupt_or_missing_image(tmp_path):
    txt = tmp_path / "notes.png"
    txt.write_text("this is not an image")
    with pytest.raises(InputError, match="not a supported image"):
        render.load_portrait(txt)
    trunc = tmp_path / "cut.jpg"
    trunc.write_bytes(render.SAMPLE_PORTRAIT.read_bytes()[:3000])
    with pytest.raises(InputError, match="corrupt|truncated|supported"):
        render.load_portrait(trunc)
    with pytest.raises(InputError, match="not found"):
        render.load_portrait(tmp_path / "missing.jpg")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        render.load_portrait(empty)


# -- rendering --------------------------------------------------------------------------------------

def test_output_shape_dtype_and_empty_batch(renderer):
    out = renderer.render(motion(3))
    assert out.shape == (3, SIZE, SIZE, 3) and out.dtype == np.uint8
    empty = renderer.render(np.zeros((0, NUM_CHANNELS), np.float32))
    assert empty.shape == (0, SIZE, SIZE, 3) and empty.dtype == np.uint8
    t = renderer.render_torch(motion(2, jawOpen=0.5))
    assert t.shape == (2, 3, SIZE, SIZE) and t.dtype == torch.float32
    with pytest.raises(InputError, match="shape"):
        renderer.render(np.zeros((2, 10), np.float32))


def test_neutral_motion_renders_the_cropped_portrait(renderer, neutral):
    assert np.abs(neutral - renderer.crop.image.astype(np.int16)).mean() < 1.0


def test_jaw_open_moves_the_lower_face_and_darkens_the_mouth(renderer, neutral):
    frame = renderer.render(motion(jawOpen=1.0))[0]
    diff = changed(frame, neutral)
    lm, e = renderer.crop.landmarks, renderer.crop.iod
    assert diff.sum() > 300
    below_nose = np.zeros_like(diff)
    below_nose[int(lm["nose"][1]):] = True
    assert diff[below_nose].sum() > 0.9 * diff.sum(), "jawOpen changes the lower face, not the eyes/forehead"
    mouth = box_mask(diff.shape, lm["mouth_left"][0] - 0.3 * e, lm["mouth_centre"][1] - 0.3 * e,
                     lm["mouth_right"][0] + 0.3 * e, lm["chin"][1] + 0.6 * e)
    assert diff[mouth].sum() > 0.85 * diff.sum()
    # The opening (just under the upper teeth, at the mouth centre) turns dark.
    cx, cy = lm["mouth_centre"]
    sl = (slice(int(cy + 0.13 * e), int(cy + 0.22 * e)), slice(int(cx - 0.12 * e), int(cx + 0.12 * e)))
    assert frame[sl].mean() < neutral[sl].mean() - 40
    # More opening, more change.
    half = changed(renderer.render(motion(jawOpen=0.4))[0], neutral).sum()
    assert 0 < half < diff.sum()


def test_eye_blink_changes_the_eye_region(renderer, neutral):
    lm, e = renderer.crop.landmarks, renderer.crop.iod
    both = renderer.render(motion(eyeBlinkLeft=1.0, eyeBlinkRight=1.0))[0]
    diff = changed(both, neutral)
    eyes = np.zeros_like(diff)
    for side in ("left_eye", "right_eye"):
        x, y = lm[side]
        eyes |= box_mask(diff.shape, x - 0.45 * e, y - 0.35 * e, x + 0.45 * e, y + 0.3 * e)
    assert diff.sum() > 40 and diff[eyes].sum() > 0.9 * diff.sum()
    # ARKit sides: eyeBlinkLeft is the subject's left eye, i.e. the image-right one.
    one = changed(renderer.render(motion(eyeBlinkLeft=1.0))[0], neutral)
    xs = np.nonzero(one)[1]
    assert xs.size > 20 and np.median(xs) > SIZE / 2


def test_head_pose_moves_the_head_but_not_the_corners(renderer, neutral):
    c = 20
    for kw in ({"headYaw": 0.4}, {"headRoll": 0.3}, {"headPitch": -0.3, "headYaw": -0.2},
               {"headTx": 0.1, "headTy": -0.05, "headTz": 0.2}):
        frame = renderer.render(motion(**kw))[0]
        diff = changed(frame, neutral)
        assert diff.mean() > 0.12, kw
        for ys in (slice(0, c), slice(SIZE - c, SIZE)):
            for xs in (slice(0, c), slice(SIZE - c, SIZE)):
                assert np.abs(frame[ys, xs].astype(np.int16) - neutral[ys, xs]).mean() < 2.0, kw
    # Sign conventions: yaw > 0 turns the face toward the image right; roll > 0 is clockwise.
    lm = renderer.crop.landmarks
    right = renderer.render(motion(headYaw=0.4))[0].astype(np.int16)
    left = renderer.render(motion(headYaw=-0.4))[0].astype(np.int16)
    y, x = int(lm["nose"][1]), int(lm["nose"][0])
    band = neutral[y - 4:y + 4, x - 30:x + 30].mean((0, 2))
    shift = [np.argmin([np.abs(f[y - 4:y + 4, x - 30 + s:x + 30 + s].mean((0, 2)) - band).mean()
                        for s in range(-12, 13)]) - 12 for f in (right, left)]
    assert shift[0] > 2 and shift[1] < -2


def test_rendering_is_deterministic_and_batch_equals_single(renderer):
    rng = np.random.default_rng(1)
    m = rng.uniform(-0.2, 1.0, (6, NUM_CHANNELS)).astype(np.float32)
    m[:, [CHANNEL_INDEX[c] for c in ("headPitch", "headYaw", "headRoll")]] *= 0.4
    m[:, [CHANNEL_INDEX[c] for c in ("headTx", "headTy", "headTz")]] *= 0.1
    m[2, [CHANNEL_INDEX[c] for c in ("headPitch", "headYaw", "headRoll", "headTx", "headTy", "headTz")]] = 0
    a = renderer.render(m)
    b = renderer.render(m)
    assert np.array_equal(a, b)
    single = np.stack([renderer.render(m[i:i + 1])[0] for i in range(len(m))])
    d = np.abs(a.astype(np.int16) - single)
    assert d.max() <= 1 and d.mean() < 0.01


def test_motion_is_clamped(renderer):
    a = renderer.render(motion(jawOpen=5.0, headYaw=3.0))
    b = renderer.render(motion(jawOpen=1.0, headYaw=0.6))
    assert np.array_equal(a, b)
    with pytest.raises(InputError, match="NaN"):
        renderer.render(motion(jawOpen=np.nan))


def test_sizes(portrait):
    with pytest.raises(InputError, match="even"):
        render.PortraitRenderer(portrait, size=(255, 256))
    with pytest.raises(InputError, match="even"):
        render.PortraitRenderer(portrait, size=127)
    r = render.PortraitRenderer(portrait, size=(192, 320))
    out = r.render(motion(2, jawOpen=0.7, headYaw=0.2))
    assert out.shape == (2, 192, 320, 3)
    lm = r.crop.landmarks
    assert abs(lm["left_eye"][1] - render.EYE_LINE * 192) < 1 and abs((lm["left_eye"][0] + lm["right_eye"][0]) / 2 - 160) < 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(portrait, renderer):
    gpu = render.PortraitRenderer(portrait, size=(SIZE, SIZE), device="cuda")
    rng = np.random.default_rng(2)
    m = rng.uniform(0, 0.8, (8, NUM_CHANNELS)).astype(np.float32)
    m[:, -6:] = rng.uniform(-0.2, 0.2, (8, 6))
    a = gpu.render(m)
    b = renderer.render(m)
    d = np.abs(a.astype(np.int16) - b)
    assert a.shape == b.shape and d.mean() < 0.2 and np.percentile(d, 99.9) <= 3


def test_haar_fallback_matches_the_numpy_oracle(monkeypatch):
    """The Haar fallback (OpenCV's CascadeClassifier) finds the face and eyes that the tests' own numpy
    Viola-Jones evaluator of the same cascade files finds."""
    from echo_stream.render import haar

    from . import haar_oracle

    gray = cv2.cvtColor(np.asarray(Image.open(render.SAMPLE_PORTRAIT).convert("RGB")), cv2.COLOR_RGB2GRAY)
    faces, counts = haar_oracle.detect("haarcascade_frontalface_alt2", gray, min_size=60)
    assert len(faces) == 1 and counts[0] >= 10
    x, y, w, h = faces[0]
    eyes, _ = haar_oracle.detect("haarcascade_eye", gray[int(y):int(y + h * 0.6), int(x):int(x + w)], min_size=15,
                                 max_size=45, min_neighbors=2)
    assert len(eyes) == 2
    if haar.opencv_cascade("haarcascade_frontalface_alt2") is None:
        pytest.skip("this OpenCV build has no CascadeClassifier")
    ref, ref_counts = haar.detect("haarcascade_frontalface_alt2", gray, min_size=60)
    assert len(ref) == 1 and np.abs(ref[0] - faces[0]).max() < 0.08 * ref[0, 2]
    assert abs(int(ref_counts[0]) - int(counts[0])) <= max(3, ref_counts[0] // 8)
    cv_eyes, _ = haar.detect("haarcascade_eye", gray[int(y):int(y + h * 0.6), int(x):int(x + w)], min_size=15,
                             max_size=45, min_neighbors=2)
    assert len(cv_eyes) == 2
    # the fallback placement itself (PLACEMENT = "haar") puts the eyes where the oracle's eye boxes are
    monkeypatch.setattr(render.portrait, "PLACEMENT", "haar")
    p = render.load_portrait(render.SAMPLE_PORTRAIT)
    assert p.detector == "haar"
    centres = sorted((ex + x + ew / 2, ey + y + eh / 2) for ex, ey, ew, eh in eyes)
    for name, c in zip(("left_eye", "right_eye"), centres):
        assert np.hypot(*(p.landmarks[name] - np.array(c))) < 6, name


def test_huge_portrait_refused_from_its_header():
    """A portrait of 12000x12000 (a few hundred KB as PNG) is refused before any pixel is decoded."""
    import io
    import warnings

    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 1_000_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(InputError, match=r"12000x12000 pixels.*scale it down"):
            render.load_portrait(buf.getvalue())


def test_decoded_image_input_and_downscaled_decoding(portrait):
    """A portrait decoded elsewhere (the server's edge) is placed like its file; decoding with ``max_side`` scales
    the image down (a large JPEG through libjpeg's reduced-scale decoding), keeping the aspect."""
    import hashlib
    import io

    from echo_stream.render.portrait import DecodedImage, _decode_image, jpeg_draft_scale

    rgb = portrait.image
    p = render.load_portrait(DecodedImage(rgb, hashlib.sha1(rgb.tobytes()).hexdigest(), "config.portrait_image"))
    assert p.source == "detected"
    for k in ("left_eye", "mouth_centre", "chin"):
        np.testing.assert_allclose(p.landmarks[k], portrait.landmarks[k], atol=1.0)
    with pytest.raises(InputError, match="config.portrait_image: expected"):
        render.load_portrait(DecodedImage(rgb[:10], "x", "config.portrait_image"))

    big = cv2.resize(rgb, (3000, 2000), interpolation=cv2.INTER_CUBIC)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="JPEG", quality=90)
    assert jpeg_draft_scale((3000, 2000), 1024) == 2 and jpeg_draft_scale((3000, 2000), None) == 1
    assert jpeg_draft_scale((8192, 4096), 1024) == 8 and jpeg_draft_scale((800, 600), 1024) == 1
    small = _decode_image(buf.getvalue(), "p", max_side=1024)
    assert small.shape == (683, 1024, 3)
    png = io.BytesIO()
    Image.fromarray(big).save(png, format="PNG")
    assert _decode_image(png.getvalue(), "p", max_side=1024).shape == (683, 1024, 3)
