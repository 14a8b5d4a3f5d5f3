"""Spontaneous blinks: the shared definition, and what generation adds."""
import numpy as np

from echo_stream import blinks, motion
from echo_stream.corpus import idle
from echo_stream.corpus.metrics import blink_stats

from .test_stages import CFG, _windows, media, model  # noqa: F401  (fixtures)

BL = [motion.CHANNEL_INDEX["eyeBlinkLeft"], motion.CHANNEL_INDEX["eyeBlinkRight"]]


def test_blink_track_is_deterministic_and_independent_of_chunking():
    whole = blinks.BlinkTrack(7).values(0, 3000)
    track = blinks.BlinkTrack(7)
    cuts = [0, 5, 21, 400, 401, 1700, 3000]
    parts = np.concatenate([track.values(a, b) for a, b in zip(cuts, cuts[1:])])
    assert np.array_equal(whole, parts)
    assert not np.array_equal(whole, blinks.BlinkTrack(8).values(0, 3000))


def test_blinks_close_the_eyes_every_one_to_nine_seconds():
    m = np.zeros((25 * 600, motion.NUM_CHANNELS), np.float32)       # ten minutes of a model that never blinks
    out = blinks.BlinkTrack(3).apply(m, 0)
    st = blink_stats(out)
    assert 12 <= st["blinks_per_min"] <= 24, st                     # mean interval 3.5 s
    assert st["blink_max"] == 1.0 and st["blink_max_gap_s"] <= 9.1, st
    assert 0.08 <= st["blink_closure_s"] <= 0.25, st
    assert np.array_equal(out[:, BL[0]], out[:, BL[1]])
    rest = np.delete(out, BL, axis=1)
    assert not rest.any(), "only the eyeBlink channels change"


def test_blinks_keep_what_the_model_already_closed():
    m = np.zeros((100, motion.NUM_CHANNELS), np.float32)
    m[40:45, BL] = 0.7
    out = blinks.BlinkTrack(1).apply(m, 0)
    assert (out[40:45, BL] >= 0.7).all() and (out[:, BL] >= m[:, BL]).all()


def test_the_corpus_ground_truth_blinks_with_the_same_shape():
    t = np.arange(100) / 25
    assert np.array_equal(idle._blink_track(t, [1.0, 2.3]), blinks.blink_shape(t, [1.0, 2.3]))


def test_generated_windows_blink_and_the_seed_fixes_them(media, model):  # noqa: F811
    from echo_stream import schemas
    from echo_stream.stages.diffusion import DiffusionStage

    _, wins = _windows(media, model, user_video=media["user_video"])

    def run(seed, on=True):
        ds = DiffusionStage(model=model, blinks=on)
        ds.set_seed("s1", seed)
        mw = schemas.concat([ds.process(w)[0].get(schemas.MOTION_WINDOW) for w in wins], schemas.MOTION_WINDOW)
        return schemas.column(mw, "motion")

    n = sum(w.meta["valid_frames"] for w in wins)
    seed = next(k for k in range(100) if blinks.BlinkTrack(k).values(0, n).max() >= 0.99)   # a blink in the clip
    on, again, off = run(seed), run(seed), run(seed, on=False)
    assert np.array_equal(on, again)
    expected = blinks.BlinkTrack(seed).values(0, n)
    assert on[:, BL].max() >= 0.99 and off[:, BL].max() < 0.8
    assert (on[:, BL] >= expected[:, None] - 1e-6).all()
