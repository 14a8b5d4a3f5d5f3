"""The synthetic dyadic corpus: file layout, decodability, and the rules it is made of (measured, not assumed)."""
import argparse
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from echo_stream import corpus, features, media, motion, transcript
from echo_stream.errors import InputError
from echo_stream.face.tracker import FaceTracker

CI = motion.CHANNEL_INDEX
FPS = 25
SR = 16000
# short conversations for the file tests: 36 s, affect within 10 s, late window from affect end + 15 s
TINY = dict(minutes=0.6, early_s=10.0, context_gap_s=15.0)
REQUIRED = {"conversation_id", "avatar_media", "user_media", "transcript", "avatar_motion", "user_motion",
            "duration_s", "split", "synthetic", "affect"}


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    path = corpus.generate_corpus(out, n_conversations=2, seed=3, size=128, progress=False, **TINY)
    return str(out), path


@pytest.fixture(scope="module")
def group0():
    """One matched group of full-length (1 min) conversations, one per affect, in memory."""
    return {a: corpus.synthesize_conversation(i, seed=0, affect=a, group=0) for i, a in enumerate(corpus.AFFECTS)}


# ----------------------------------------------------------------------------- files

def test_manifest_rows_are_valid(tiny_corpus):
    out, path = tiny_corpus
    assert path == os.path.join(out, "manifest.jsonl")
    rows = corpus.read_manifest(path)
    assert [r["conversation_id"] for r in rows] == ["conv0000", "conv0001"]
    for r in rows:
        assert REQUIRED <= set(r)
        assert r["synthetic"] is True and r["split"] in ("train", "heldout") and r["affect"] in corpus.AFFECTS
        assert r["duration_s"] == pytest.approx(36.0)
        assert r["user_media"].endswith("user.webm") and r["avatar_media"].endswith("avatar.wav")
        for key in ("avatar_media", "user_media", "transcript", "avatar_motion", "user_motion", "events"):
            assert not os.path.isabs(r[key]) and r[key].startswith(r["conversation_id"] + "/")
            assert os.path.isfile(os.path.join(out, r[key])), key
    readme = open(os.path.join(out, "README.md")).read()
    assert "SYNTHETIC" in readme and "not recorded" in readme
    assert not [n for n in os.listdir(out) if n.startswith(".")], "no temp files left behind"


def test_files_decode_and_lengths_agree(tiny_corpus):
    out, path = tiny_corpus
    for r in corpus.read_manifest(path):
        n = round(r["duration_s"] * FPS)
        avatar = media.decode_audio(os.path.join(out, r["avatar_media"]))
        assert avatar.dtype == np.float32 and avatar.size == n * SR // FPS
        assert features.num_video_frames(avatar.size) == n
        user_path = os.path.join(out, r["user_media"])
        info = media.probe(user_path, count_packets=True)
        assert info.video_codec == "vp9" and info.audio_codec == "opus" and (info.width, info.height) == (128, 128)
        assert info.video_frames == n
        user = media.decode_audio(user_path)
        assert abs(user.size - avatar.size) <= SR // FPS
        frames = [f for _, _, f in media.iter_video_frames(user_path)]
        assert len(frames) == n and frames[0].shape == (128, 128, 3)
        _, conf = FaceTracker().process(np.stack(frames[:60]))
        assert (conf > 0).mean() > 0.9, "the face tracker finds the face in the user video"
        for key in ("avatar_motion", "user_motion"):
            t = pq.read_table(os.path.join(out, r[key]))
            assert t.column_names == ["frame", "pts", *motion.CHANNELS]
            assert str(t.schema.field("frame").type) == "int64" and str(t.schema.field("pts").type) == "double"
            assert all(str(t.schema.field(c).type) == "float" for c in motion.CHANNELS)
            assert t.num_rows == n
            np.testing.assert_array_equal(t.column("frame").to_numpy(), np.arange(n))
            np.testing.assert_allclose(t.column("pts").to_numpy(), np.arange(n) / FPS)
        segs = transcript.load(os.path.join(out, r["transcript"]))
        assert segs and {s.speaker for s in segs} == {"user", "avatar"}
        assert all(0 <= s.start < s.end <= r["duration_s"] for s in segs)
        ev = json.load(open(os.path.join(out, r["events"])))
        assert ev["affect"] == r["affect"] and ev["synthetic"] is True


def test_files_equal_the_in_memory_conversation(tiny_corpus):
    out, path = tiny_corpus
    r = corpus.read_manifest(path)[1]
    conv = corpus.synthesize_conversation(1, seed=3, **TINY)
    assert conv.affect == r["affect"] and conv.split == r["split"]
    t = pq.read_table(os.path.join(out, r["avatar_motion"]))
    got = np.stack([t.column(c).to_numpy() for c in motion.CHANNELS], 1)
    np.testing.assert_array_equal(got, conv.avatar_motion)
    wav = media.decode_audio(os.path.join(out, r["avatar_media"]))
    np.testing.assert_allclose(wav, conv.avatar_audio, atol=1.5 / 32768)
    assert json.load(open(os.path.join(out, r["transcript"]))) == conv.transcript


def test_user_video_shows_the_user_motion_and_smiles(tiny_corpus):
    from echo_stream.render import PortraitRenderer

    out, path = tiny_corpus
    r = corpus.read_manifest(path)[0]
    conv = corpus.synthesize_conversation(0, seed=3, **TINY)
    frames = np.stack([f for _, _, f in media.iter_video_frames(os.path.join(out, r["user_media"]))])
    ren = PortraitRenderer(corpus.user_portrait(), size=(128, 128))
    smile_channels = [CI[c] for c in ("mouthSmileLeft", "mouthSmileRight", "cheekSquintLeft", "cheekSquintRight",
                                      "eyeSquintLeft", "eyeSquintRight", "mouthDimpleLeft", "mouthDimpleRight")]
    assert conv.events["user_smiles"]
    for s in conv.events["user_smiles"]:
        i = int((s["start_s"] + 0.5 * s["duration_s"]) * FPS)
        m = conv.user_motion[i:i + 1].copy()
        with_smile = ren.render(m)[0].astype(float)
        m[:, smile_channels] = 0
        without = ren.render(m)[0].astype(float)
        where = np.abs(with_smile - without).max(-1) > 12          # pixels the smile moves
        assert where.sum() > 50
        got = frames[i].astype(float)
        assert np.abs(got - with_smile)[where].mean() < 0.6 * np.abs(got - without)[where].mean()


def test_user_audio_in_video_is_the_user_speech(tiny_corpus):
    out, path = tiny_corpus
    r = corpus.read_manifest(path)[0]
    conv = corpus.synthesize_conversation(0, seed=3, **TINY)
    got = media.decode_audio(os.path.join(out, r["user_media"]))
    env_a = features.rms_envelope(got)[: conv.num_frames]
    env_b = features.rms_envelope(conv.user_audio)[: env_a.size]
    assert np.corrcoef(env_a, env_b)[0, 1] > 0.95


# ----------------------------------------------------------------------------- rule 1: speech and lips

def test_jaw_follows_the_audio_envelope(group0):
    for conv in group0.values():
        m = corpus.rule_metrics(conv.avatar_motion, avatar_audio=conv.avatar_audio)
        assert m["jaw_rms_corr"] > 0.7
        env = features.rms_envelope(conv.user_audio)
        assert np.corrcoef(conv.user_motion[:, CI["jawOpen"]], env)[0, 1] > 0.7


def test_articulation_targets_per_phone():
    sp = corpus.speech_with_targets("Papa, baba. Mama mimi, bibi. Tutu soso.", seed=1)
    assert sp.audio.dtype == np.float32 and sp.targets.shape == (features.num_video_frames(sp.audio.size), 58)
    tg = sp.targets

    def frames_of(symbols):
        idx = [int((p.start + p.end) / 2 * FPS) for p in sp.phones if p.symbol in symbols and p.end - p.start > 0.05]
        assert idx
        return np.array(idx)

    a, i, u, o = frames_of("a"), frames_of("i"), frames_of("u"), frames_of("o")
    bilabial = frames_of(("p", "b", "m"))
    assert tg[a, CI["jawOpen"]].mean() > 2.5 * tg[i, CI["jawOpen"]].mean()
    assert tg[a, CI["jawOpen"]].mean() > 2.0 * tg[u, CI["jawOpen"]].mean()
    assert tg[u, CI["mouthPucker"]].mean() > 0.4 and tg[a, CI["mouthPucker"]].mean() < 0.15
    assert tg[o, CI["mouthFunnel"]].mean() > 0.3
    assert tg[i, CI["mouthStretchLeft"]].mean() > 0.2 > tg[a, CI["mouthStretchLeft"]].mean()
    assert tg[bilabial, CI["mouthClose"]].mean() > 0.35 > tg[a, CI["mouthClose"]].mean()
    assert tg[bilabial, CI["mouthPressLeft"]].mean() > 0.2
    # only the lips region is set
    others = np.setdiff1d(np.arange(motion.NUM_CHANNELS), motion.REGION_SLICES["lips"])
    assert not tg[:, others].any()
    # stop closures are silent; fricatives are high-frequency noise
    closures = [p for p in sp.phones if p.symbol in ("p", "b")]
    for p in closures:
        a0, a1 = int((p.start + 0.2 * (p.end - p.start)) * SR), int((p.start + 0.6 * (p.end - p.start)) * SR)
        assert np.sqrt(np.mean(sp.audio[a0:a1] ** 2)) < 0.01
    s = [p for p in sp.phones if p.symbol == "s"][0]
    seg = sp.audio[int(s.start * SR) + 100:int(s.end * SR) - 100]
    spec = np.abs(np.fft.rfft(seg)) ** 2
    freqs = np.fft.rfftfreq(seg.size, 1 / SR)
    assert (spec * freqs).sum() / spec.sum() > 3000


def test_speech_rhythm_and_pitch(group0):
    conv = group0["neutral"]
    sp = corpus.speech_with_targets(" ".join(corpus.lexicon._USER_NEUTRAL[:6]), seed=2)
    voiced = [p for p in sp.phones if p.symbol in "aeiou"]
    speaking = sum(p.end - p.start for p in sp.phones if p.symbol != "sil")
    assert 3.8 < len(voiced) / speaking < 5.5, "syllables at ~4-5 Hz"
    for audio, lo, hi in ((conv.avatar_audio, 85, 180), (conv.user_audio, 140, 240)):
        fe = features.offline_audio_features(audio)
        f0 = 150.0 * 2.0 ** fe[:, :, 81][fe[:, :, 82] > 0.6]
        assert f0.size > 100 and lo < np.median(f0) < hi
    assert np.max(np.abs(conv.avatar_audio)) < 1.0


def test_speech_with_targets_is_deterministic_and_voiced_differently():
    a = corpus.speech_with_targets("I see. What time does it start?", seed=5)
    b = corpus.speech_with_targets("I see. What time does it start?", seed=5)
    u = corpus.speech_with_targets("I see. What time does it start?", seed=5, voice="user")
    np.testing.assert_array_equal(a.audio, b.audio)
    np.testing.assert_array_equal(a.targets, b.targets)
    assert not np.array_equal(a.audio[: u.audio.size], u.audio[: a.audio.size])
    with pytest.raises(ValueError):
        corpus.speech_with_targets("hi", voice="robot")


# ----------------------------------------------------------------------------- rules 2-4: listening

def test_nods_follow_user_pauses(group0):
    for conv in group0.values():
        ev = conv.events
        assert len(ev["user_phrase_ends"]) >= 6
        ratio = corpus.nod_power_ratio(conv.avatar_motion[:, CI["headPitch"]], ev["user_phrase_ends"])
        assert ratio > 5, (conv.affect, ratio)
        for nod in ev["avatar_nods"]:
            assert 0.2 <= nod["start_s"] - nod["trigger_s"] <= 0.5
            assert 1.8 <= nod["freq_hz"] <= 2.2 and 0.5 <= nod["duration_s"] <= 0.9
        # the end of the user's turn gets the bigger nod
        assert any(n["turn_end"] for n in ev["avatar_nods"]) and not all(n["turn_end"] for n in ev["avatar_nods"])


def test_avatar_mirrors_user_smiles_after_the_delay(group0):
    for conv in group0.values():
        assert conv.user_motion[:, CI["mouthSmileLeft"]].max() > 0.45, "the user smiles"
        assert conv.events["avatar_smiles"], "the avatar mirrors at least one smile"
        m = corpus.rule_metrics(conv.avatar_motion, user_motion=conv.user_motion)
        assert 0.5 <= m["smile_lag_s"] <= 1.0, (conv.affect, m)
        # negative affect mirrors only some smiles (and weaker): a lower but still clear correlation
        assert m["smile_xcorr"] > (0.3 if conv.affect == "negative" else 0.8), (conv.affect, m)
    rules = corpus.Rules(smile_delay_s=(1.5, 1.6))
    conv = corpus.synthesize_conversation(0, seed=0, affect="positive", group=0, rules=rules)
    lag, _ = corpus.smile_lag(conv.user_motion[:, CI["mouthSmileLeft"]], conv.avatar_motion[:, CI["mouthSmileLeft"]],
                              max_lag_s=3.0)
    assert 1.4 <= lag <= 1.7


def test_blinks_idle_motion_and_brow_raises(group0):
    conv = group0["neutral"]
    am = conv.avatar_motion
    blink = am[:, CI["eyeBlinkLeft"]]
    closed = (blink > 0.8).astype(int)
    n_blinks = int((np.diff(closed) == 1).sum())
    assert 8 <= n_blinks <= 35, n_blinks           # ~17 per minute
    assert am[:, CI["headYaw"]].std() > 0.01       # head is never frozen
    t = np.arange(conv.num_frames) / FPS
    onsets = conv.events["user_turn_onsets"]
    assert len(onsets) >= 3
    brow = am[:, CI["browOuterUpLeft"]]
    after = np.concatenate([brow[(t >= o + 0.3) & (t < o + 0.9)] for o in onsets])
    assert after.mean() > brow.mean() + 0.05


def test_listener_rules_are_measurable_and_their_metrics_follow_them():
    """Each new listener rule shows in its metric on the ground truth, and the metric vanishes without it."""
    kw = dict(seed=0, affect="neutral", group=1, minutes=1.5)
    conv = corpus.synthesize_conversation(1, **kw)
    ev = conv.events
    assert ev["user_questions"] and ev["avatar_question_brows"] and ev["user_phrase_pauses"]
    assert ev["avatar_micro_nods"] and ev["avatar_gaze_aversions"] and ev["avatar_turn_onsets"]
    for q in ev["avatar_question_brows"]:
        assert 0.1 <= q["start_s"] - q["trigger_s"] <= 0.3
    full = corpus.rule_metrics(conv.avatar_motion, events=ev)
    assert full["question_brow_rise"] > 0.1 and full["turn_brow_rise"] > 0.02
    assert full["gaze_listening_ratio"] < 0.6            # looks at the user while they talk
    assert full["gaze_aversion_rise"] > 0.05              # looks away when taking the turn
    assert full["micro_nod_power_ratio"] > 2
    none = corpus.Rules(question_brow_amp=0.0, brow_amp=0.0, listen_gaze_scale=1.0, aversion_p=0.0, micro_nod_p=0.0)
    off = corpus.rule_metrics(corpus.synthesize_conversation(1, rules=none, **kw).avatar_motion, events=ev)
    assert abs(off["question_brow_rise"]) < 0.03 and abs(off["turn_brow_rise"]) < 0.03
    assert off["gaze_listening_ratio"] > 0.7 and off["gaze_aversion_rise"] < 0.03
    assert off["micro_nod_power_ratio"] < full["micro_nod_power_ratio"] / 3


def test_blinks_close_the_eyes_at_a_human_rate(group0):
    for conv in group0.values():
        st = corpus.metrics.blink_stats(conv.avatar_motion)
        assert 10 <= st["blinks_per_min"] <= 30, st           # every 2-10 s
        assert st["blink_max_gap_s"] <= 10.0 and st["blink_max"] >= 0.9, st
        assert 0.05 <= st["blink_closure_s"] <= 0.3, st       # about a tenth of a second shut
        gaps = np.diff(conv.events["avatar_blinks"])
        assert gaps.min() >= 1.0 and gaps.max() <= 9.0


def test_long_range_affect_changes_late_behaviour(group0):
    pos, neg, neu = group0["positive"], group0["negative"], group0["neutral"]
    early = {a: " ".join(s["text"] for s in c.transcript if s["start"] < c.events["affect_established_s"])
             for a, c in group0.items()}
    assert corpus.affect_words(early["positive"]) & corpus.POSITIVE_WORDS >= {"great", "happy"}
    assert corpus.affect_words(early["negative"]) & corpus.NEGATIVE_WORDS >= {"bad", "lost", "sad"}
    assert not corpus.affect_words(early["neutral"])
    for c in group0.values():
        ev = c.events
        assert ev["affect_established_s"] <= 20.0 and ev["late_start_s"] >= ev["affect_established_s"] + 30.0
        assert c.num_frames / FPS - ev["late_start_s"] >= 5.0
        late_text = [s for s in c.transcript if s["start"] >= ev["affect_established_s"]]
        assert late_text and not any(corpus.affect_words(s["text"]) for s in late_text)
    # identical later conversation in the group: text, timing, user behaviour, avatar lips
    late = {a: [s for s in c.transcript if s["start"] >= 20.0] for a, c in group0.items()}
    assert late["positive"] == late["negative"] == late["neutral"] and len(late["positive"]) >= 6
    i0 = int(pos.events["late_start_s"] * FPS)
    np.testing.assert_allclose(pos.user_motion[i0:], neg.user_motion[i0:], atol=1e-4)
    np.testing.assert_array_equal(pos.user_audio[i0 * 640:], neg.user_audio[i0 * 640:])
    lips = motion.REGION_SLICES["lips"]
    np.testing.assert_allclose(pos.avatar_motion[i0:, lips], neg.avatar_motion[i0:, lips], atol=1e-6)
    # ... but the avatar's late baseline differs with the early affect
    mp, mn, mu = (corpus.rule_metrics(c.avatar_motion, events=c.events) for c in (pos, neg, neu))
    assert mp["late_smile"] > mu["late_smile"] > mn["late_smile"]
    assert mp["late_smile"] > mn["late_smile"] + 0.15
    assert mn["late_brow_inner_up"] > mp["late_brow_inner_up"] + 0.15
    assert mn["late_frown"] > 0.15 > mp["late_frown"]
    assert mp["late_brow_outer_up"] > mn["late_brow_outer_up"] + 0.05
    assert mp["late_nod_power"] > mn["late_nod_power"]
    slow = [np.abs(np.diff(c.avatar_motion[i0:, CI["headYaw"]])).mean() for c in (pos, neg)]
    assert slow[1] < slow[0], "negative: slower head motion"


def test_late_text_is_neutral_for_the_model_lexicon_too(group0):
    enc = pytest.importorskip("echo_stream.model.encoders")
    words = set(enc.POSITIVE_WORDS) | set(enc.NEGATIVE_WORDS)
    for c in group0.values():
        for s in c.transcript:
            if s["start"] >= c.events["affect_established_s"]:
                assert not set(enc._WORD_RE.findall(s["text"].lower())) & words, s


# ----------------------------------------------------------------------------- determinism, splits, resume

def test_deterministic_under_the_seed():
    a = corpus.synthesize_conversation(4, seed=9, **TINY)
    b = corpus.synthesize_conversation(4, seed=9, **TINY)
    c = corpus.synthesize_conversation(4, seed=10, **TINY)
    for x in ("avatar_audio", "user_audio", "avatar_motion", "user_motion"):
        np.testing.assert_array_equal(getattr(a, x), getattr(b, x))
    assert a.transcript == b.transcript and a.events == b.events
    assert not np.array_equal(a.avatar_audio, c.avatar_audio)


def test_affects_and_splits():
    for g in range(5):
        assert sorted(corpus.affect_for(3 * g + k, seed=1) for k in range(3)) == sorted(corpus.AFFECTS)
    splits = [corpus.split_for(i // 3, seed=0) for i in range(20)]
    assert 0.1 <= splits.count("heldout") / 20 <= 0.2
    assert [corpus.split_for(g, 0) for g in range(70)].count("heldout") == 10


def _no_video(out, n, **kw):
    return corpus.generate_corpus(out, n_conversations=n, seed=1, progress=False, render_video=False,
                                  **{**TINY, **kw})


def test_interrupted_run_is_consistent_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "c"
    _no_video(out, 1)
    st0 = os.stat(out / "conv0000" / "avatar_motion.parquet")
    real = corpus.synthesize_conversation

    def dies_at_2(index, **kw):
        if index == 2:
            raise KeyboardInterrupt
        return real(index, **kw)

    monkeypatch.setattr(corpus.files, "synthesize_conversation", dies_at_2)
    with pytest.raises(KeyboardInterrupt):
        _no_video(out, 3)
    rows = corpus.read_manifest(out)
    assert [r["conversation_id"] for r in rows] == ["conv0000", "conv0001"]
    assert rows[0]["user_media"] == "conv0000/user.wav"
    assert not (out / "conv0002").exists()
    monkeypatch.setattr(corpus.files, "synthesize_conversation", real)

    (out / ".conv0002.tmp-deadbeef").mkdir()               # what a killed writer leaves
    (out / ".conv0002.tmp-deadbeef" / "avatar.wav").write_bytes(b"partial")
    calls = []

    def counting(index, **kw):
        calls.append(index)
        return real(index, **kw)

    monkeypatch.setattr(corpus.files, "synthesize_conversation", counting)
    _no_video(out, 3)
    assert calls == [2], "finished conversations are skipped"
    assert [r["conversation_id"] for r in corpus.read_manifest(out)] == ["conv0000", "conv0001", "conv0002"]
    st1 = os.stat(out / "conv0000" / "avatar_motion.parquet")
    assert (st0.st_ino, st0.st_mtime_ns) == (st1.st_ino, st1.st_mtime_ns)
    assert not [n for n in os.listdir(out) if n.startswith(".")]
    with pytest.raises(InputError, match="other settings"):
        corpus.generate_corpus(out, n_conversations=3, seed=2, progress=False, render_video=False, **TINY)


def test_failed_conversation_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "c"

    def broken(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(corpus.files, "_write_user_webm", broken)
    with pytest.raises(OSError):
        corpus.generate_corpus(out, n_conversations=1, seed=1, size=64, progress=False, **TINY)
    assert corpus.read_manifest(out) == []
    assert not [n for n in os.listdir(out) if n.startswith("conv") or n.startswith(".conv")]


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="--minutes"):
        corpus.generate_corpus(tmp_path / "a", n_conversations=1, minutes=0.5, progress=False)
    with pytest.raises(InputError, match="--conversations"):
        corpus.generate_corpus(tmp_path / "a", n_conversations=0, progress=False)
    with pytest.raises(InputError, match="--size"):
        corpus.generate_corpus(tmp_path / "a", n_conversations=1, size=101, progress=False)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        corpus.generate_corpus(f, n_conversations=1, progress=False, render_video=False)


def test_cli_entry_points(tmp_path, capsys):
    p = argparse.ArgumentParser()
    corpus.add_arguments(p)
    args = p.parse_args([str(tmp_path / "cli"), "--conversations", "1", "--minutes", "0.6", "--seed", "4",
                         "--early-s", "10", "--context-gap-s", "15", "--no-video", "--quiet"])
    assert corpus.run(args) == 0
    assert "SYNTHETIC" in capsys.readouterr().err
    rows = corpus.read_manifest(tmp_path / "cli")
    assert len(rows) == 1 and rows[0]["synthetic"] is True
