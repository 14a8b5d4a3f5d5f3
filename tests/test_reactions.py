"""Listener reactions (echo_stream/model/reactions.py): onset detection, the head, the per-session track,
and the diffusion stage adding them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from echo_stream import motion, schemas
from echo_stream.config import CONFIGS
from echo_stream.corpus import listener
from echo_stream.corpus.idle import _bump
from echo_stream.model import EchoModel
from echo_stream.model import reactions as R

FPS = motion.FPS
PITCH = motion.CHANNEL_INDEX["headPitch"]


def _track(seconds=60.0, nods=(), micro=(), raises=(), flashes=(), seed=0):
    """Slow random head motion and brows (as idle faces move) with the corpus's own gestures at known times."""
    rng = np.random.default_rng(seed)
    n = int(seconds * FPS)
    t = np.arange(n) / FPS
    m = np.tile(motion.neutral_motion(1), (n, 1)).astype(np.float64)
    for ch, amp in ((PITCH, 0.02), (motion.CHANNEL_INDEX["browOuterUpLeft"], 0.03)):   # below 0.5 Hz
        slow = np.convolve(rng.standard_normal(n + 200), np.hanning(100) / np.hanning(100).sum(), "same")[100:100 + n]
        m[:, ch] += amp * slow / (slow.std() + 1e-9)
    m[:, motion.CHANNEL_INDEX["browOuterUpRight"]] = m[:, motion.CHANNEL_INDEX["browOuterUpLeft"]]
    for t0 in nods:
        tau = t - t0
        sel = (tau >= 0) & (tau <= 0.7)
        m[sel, PITCH] += 0.06 * listener._nod_shape(tau[sel], 0.7, 2.0)
    for t0 in micro:
        tau = t - t0
        sel = (tau >= 0) & (tau <= 0.42)
        m[sel, PITCH] += 0.02 * np.sin(np.pi * tau[sel] / 0.42) ** 2
    am = np.zeros((n, motion.NUM_CHANNELS))
    for t0 in raises:
        listener._brow(am, t, t0, 0.8, 0.3)
    for t0 in flashes:
        listener._brow(am, t, t0, 0.7, 0.12)
    return (m + am).astype(np.float32)


def _glances(seconds=60.0, at=(), seed=0):
    """Gaze wandering slowly (as idle eyes do), with glances away at known times, alternately right and left
    (the corpus's: 0.22 out, 0.13 up, over 0.8 s)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * FPS)
    t = np.arange(n) / FPS
    m = np.tile(motion.neutral_motion(1), (n, 1)).astype(np.float64)
    ci = motion.CHANNEL_INDEX
    slow = np.convolve(rng.standard_normal(n + 200), np.hanning(100) / np.hanning(100).sum(), "same")[100:100 + n]
    h = 0.03 * slow / (slow.std() + 1e-9)
    v = np.zeros(n)
    for j, t0 in enumerate(at):
        b = _bump(t, t0, 0.8, 0.15, 0.3)
        side = 1.0 if j % 2 == 0 else -1.0
        h = h * (1 - b) + side * 0.22 * b
        v = v * (1 - b) + 0.13 * b
    right, left = np.clip(h, 0, None), np.clip(-h, 0, None)
    m[:, ci["eyeLookOutRight"]], m[:, ci["eyeLookInLeft"]] = right, right
    m[:, ci["eyeLookOutLeft"]], m[:, ci["eyeLookInRight"]] = left, left
    m[:, ci["eyeLookUpLeft"]] = m[:, ci["eyeLookUpRight"]] = np.clip(v, 0, None)
    return m.astype(np.float32)


def test_detects_glances_away_and_measures_them_towards_one_side():
    at = tuple(np.arange(3.0, 57.0, 4.5))
    m = _glances(at=at)
    on = R.detect_onsets(m)
    assert len(on["gaze_away"]) == len(at)
    assert all(abs(int(f) - round(x * FPS)) <= 4 for f, x in zip(on["gaze_away"], at)), on["gaze_away"]
    assert len(R.detect_onsets(_glances(seed=3))["gaze_away"]) == 0        # wandering eyes: none
    templates, _ = R.measure_templates([m], [on])
    g = templates[R.KINDS.index("gaze_away")]
    ci = motion.CHANNEL_INDEX
    look = np.zeros(motion.NUM_CHANNELS, bool)
    look[[i for c, i in ci.items() if c.startswith("eyeLook")]] = True
    assert np.abs(g[:, ~look]).max() == 0.0                            # the gaze only: never the lids or the head
    # left glances were mirrored before averaging: one side, not both eyes crossing
    assert g[:, ci["eyeLookOutRight"]].max() > 0.12 and g[:, ci["eyeLookOutLeft"]].max() < 0.03
    mirrored = g[:, R.MIRROR]
    np.testing.assert_array_equal(mirrored[:, ci["eyeLookOutLeft"]], g[:, ci["eyeLookOutRight"]])


def test_own_voice_reads_the_frame_its_lookahead_and_four_frames_before():
    audio = torch.zeros(1, 30, 2, 83)
    audio[..., 80] = R.SILENT[0]
    audio[:, 12:, :, 80] = -2.0            # the avatar starts speaking at frame 12
    audio[:, 12:, :, 82] = 0.9
    own = R.own_voice(audio, lookahead=2)[0]
    assert own.shape == (28, R.ReactionHead.OWN_DIM)
    assert float(own[9, 0]) == pytest.approx(R.SILENT[0]) and float(own[10, 0]) > R.SILENT[0]   # seen 2 frames early
    assert float(own[12, 2]) == pytest.approx(R.SILENT[0]) and float(own[16, 2]) == pytest.approx(-2.0)
    earlier = audio.clone()
    earlier[:, :5, :, 80] = 3.0            # rows more than 4 before frame 10: not read for it
    np.testing.assert_array_equal(R.own_voice(earlier, 2)[0, 9:], own[9:])


def test_calibration_scales_each_kind_to_the_onsets_of_unseen_conversations():
    from types import SimpleNamespace

    from echo_stream.train_reactions import _calibrate

    head = _head("brow_raise", float(np.log(0.01 / 0.99)))          # p = 0.01 a frame for brow raises only
    convs, own = [], {}
    for j in range(2):
        n = 1500
        m = _track(seconds=n / FPS, raises=(10.0, 30.0, 50.0), seed=j)
        a, v, bl, pr, o = (x[0].numpy() for x in _user(1, n, seed=j))
        c = SimpleNamespace(frames=n, arrays={"motion": m, "user_audio": a, "user_video": v, "user_blend": bl,
                                              "user_present": pr})
        convs.append(c)
        own[id(c)] = torch.from_numpy(o)
    got = _calibrate(head, convs, own)
    assert got["brow_raise"]["true_onsets"] == 6
    assert got["brow_raise"]["expected_onsets"] == pytest.approx(30.0, rel=1e-3)   # 3000 frames x 0.01
    assert float(head.calibration[R.KINDS.index("brow_raise")]) == pytest.approx(0.5)   # 6 / 30, clipped
    assert float(head.calibration[R.KINDS.index("nod")]) == 1.0                          # no onsets, no evidence


def test_a_checkpoint_with_an_earlier_reaction_head_loads_without_reactions(tmp_path, caplog):
    import dataclasses

    from safetensors.torch import load_file, save_file

    from echo_stream.model.checkpoint import load_checkpoint, save_checkpoint

    model = EchoModel(dataclasses.replace(CONFIGS["tiny"], reactions=True)).eval()
    model.reactions.trained.fill_(1.0)
    save_checkpoint(model, tmp_path / "c")
    weights = next((tmp_path / "c").glob("*.safetensors"))
    earlier = {}                   # the 4-kind head: one network, no own-voice path, no members
    for k, v in load_file(weights).items():
        if not k.startswith("reactions.members."):
            if not k.startswith("reactions.own"):
                earlier[k] = v
        elif k.startswith("reactions.members.0.") and ".own." not in k:
            earlier[k.replace("members.0.", "")] = v
    t = earlier
    save_file(t, weights)
    got = load_checkpoint(tmp_path / "c")
    assert float(got.reactions.trained) == 0.0                           # never fires
    assert torch.equal(got.motion_std, model.motion_std)
    assert "earlier layout" in caplog.text and "--stage reactions" in caplog.text


def _close(found, truth, tol=2):
    return len(found) == len(truth) and all(abs(int(f) - round(x * FPS)) <= tol for f, x in zip(found, truth))


def test_detects_each_kind_at_its_onset_and_nothing_in_idle_motion():
    nods, micro, raises, flashes = (3.0, 11.2, 20.4, 33.0), (7.1, 15.5, 41.0), (25.0, 47.3), (29.0, 52.2)
    on = R.detect_onsets(_track(nods=nods, micro=micro, raises=raises, flashes=flashes))
    assert _close(on["nod"], nods), on["nod"]
    assert _close(on["micro_nod"], micro), on["micro_nod"]
    assert _close(on["brow_raise"], raises), on["brow_raise"]
    assert _close(on["brow_flash"], flashes), on["brow_flash"]
    idle = R.detect_onsets(_track(seed=3))
    assert sum(len(v) for v in idle.values()) == 0, idle


def test_templates_are_the_event_triggered_mean_in_their_own_region():
    nods = tuple(np.arange(2.0, 58.0, 3.0))
    m = _track(nods=nods)
    m[:, motion.CHANNEL_INDEX["jawOpen"]] += 0.3 * np.sin(np.arange(len(m)) / 3.0)   # speech moves the lips
    for t0 in nods:                                                   # and the eyes look away at each nod
        i = int(t0 * FPS)
        m[i: i + 10, motion.CHANNEL_INDEX["eyeLookOutLeft"]] += 0.3
    on = R.detect_onsets(m)
    templates, gain_std = R.measure_templates([m], [on])
    nod = templates[R.KINDS.index("nod")]
    assert nod.shape == (R.TEMPLATE_FRAMES, motion.NUM_CHANNELS)
    others = np.setdiff1d(np.arange(motion.NUM_CHANNELS), motion.REGION_SLICES["head"])
    assert np.abs(nod[:, others]).max() == 0.0                        # a nod moves the head only
    want = 0.06 * listener._nod_shape(np.arange(18) / FPS, 0.7, 2.0)
    assert np.corrcoef(nod[:18, PITCH], want)[0, 1] > 0.95
    assert abs(nod[:, PITCH].max() - want.max()) < 0.015
    assert abs(nod[-1]).max() < 1e-6                                  # faded out: no step left behind
    assert np.abs(templates[R.KINDS.index("brow_raise")]).max() == 0.0   # none seen: nothing added
    assert 0 <= gain_std[0] < 0.5


def _head(bias_kind: str | None = None, bias: float = 0.0) -> R.ReactionHead:
    head = R.ReactionHead(CONFIGS["tiny"])
    head.trained.fill_(1.0)
    if bias_kind is not None:
        with torch.no_grad():
            for m in head.members:
                m.out.weight.zero_()
                m.out.bias.fill_(-30.0)
                m.out.bias[R.KINDS.index(bias_kind)] = bias
                m.own[-1].weight.zero_()
                m.own[-1].bias.fill_(-30.0)
    return head.eval()


def _user(b, t, present=1.0, seed=0):
    """The head's inputs: the user's voice, face and presence, then the avatar's own voice (``own_voice``)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, t, 2, 83, generator=g), torch.randn(b, t, 16, generator=g),
            torch.randn(b, t, motion.NUM_CHANNELS, generator=g) * 0.1, torch.full((b, t, 3), present),
            torch.randn(b, t, R.ReactionHead.OWN_DIM, generator=g))


def test_head_is_causal_silent_without_a_user_and_untrained():
    head = _head()
    a, v, bl, pr, own = _user(1, 40)
    p = head.probabilities(a, v, bl, pr, own)
    a2 = a.clone()
    a2[:, 30:] += 5.0                   # change the future
    p2 = head.probabilities(a2, v, bl, pr, own)
    assert torch.equal(p[:, :30], p2[:, :30]) and not torch.equal(p[:, 30:], p2[:, 30:])
    own2 = own.clone()
    own2[:, 30] += 3.0                  # the own voice is read frame by frame: only that frame changes
    p3 = head.probabilities(a, v, bl, pr, own2)
    changed = (p3 != p).any(-1)[0]
    assert changed[30] and int(changed.sum()) == 1
    assert float(p.min()) > 0
    off = head.probabilities(a * float("nan"), v, bl, torch.zeros(1, 40, 3), own)
    assert float(off.abs().max()) == 0.0
    fresh = R.ReactionHead(CONFIGS["tiny"])
    assert float(fresh.probabilities(a, v, bl, pr, own).abs().max()) == 0.0


def _spread(n=60, at=20, width=8, total=0.9):
    p = np.zeros((n, len(R.KINDS)))
    p[at:at + width, 0] = total / width
    return p


def test_track_fires_a_spread_reaction_with_its_total_chance_and_once():
    templates = np.zeros((len(R.KINDS), R.TEMPLATE_FRAMES, motion.NUM_CHANNELS), np.float32)
    fired = []
    for seed in range(400):
        tr = R.ReactionTrack(seed, templates, np.zeros(len(R.KINDS)))
        tr.step(_spread(), 0)
        fired.append(len(tr.events))
    fired = np.array(fired)
    assert fired.max() == 1                       # one gesture per episode
    assert 0.82 <= fired.mean() <= 0.97           # the density's total (0.9), not 1 - (1 - 0.1125)^8 = 0.61


def test_track_is_the_same_however_the_frames_are_cut():
    templates = np.random.default_rng(0).normal(0, 0.01, (len(R.KINDS), R.TEMPLATE_FRAMES, motion.NUM_CHANNELS))
    p = np.random.default_rng(1).uniform(0, 0.08, (200, len(R.KINDS)))
    m = np.zeros((200, motion.NUM_CHANNELS), np.float32) + motion.neutral_motion(1)
    whole = R.ReactionTrack(5, templates, np.full(len(R.KINDS), 0.2))
    whole.step(p, 0)
    a = whole.apply(m, 0)
    cut = R.ReactionTrack(5, templates, np.full(len(R.KINDS), 0.2))
    parts = []
    for f0 in range(0, 200, 6):
        cut.step(p[f0:f0 + 6], f0)
        parts.append(cut.apply(m[f0:f0 + 6], f0))
        if f0 == 96:    # a restored session continues identically
            restored = R.ReactionTrack(5, templates, np.full(len(R.KINDS), 0.2))
            restored.restore(cut.state())
            cut = restored
    np.testing.assert_allclose(np.concatenate(parts), a, atol=1e-6)
    assert len(whole.events) > 3
    heads = [e["frame"] for e in whole.events if R.GROUPS[e["kind"]] == "head"]
    assert all(b - a >= int(0.8 * R.TEMPLATE_FRAMES) for a, b in zip(heads, heads[1:]))   # one head gesture at a time


def _feats(frames=150, present=1.0, seed=0):
    rng = np.random.default_rng(seed)
    a, v, bl, pr, _ = (x[0].numpy() for x in _user(1, frames, present, seed=seed))
    return {"avatar_audio": rng.normal(0, 1, (frames, 2, 83)).astype(np.float32), "user_audio": a,
            "user_video": v, "user_blend": bl, "user_present": pr}


def _run(model, present, reactions=True, stride=None):
    from echo_stream.evaluate import rollout

    return rollout(model, _feats(present=present), seed=3, blinks=False, reactions=reactions, stride=stride)


def test_diffusion_stage_adds_reactions_only_when_the_user_is_there(monkeypatch):
    import dataclasses

    fired = []
    step = R.ReactionTrack.step

    def spy(self, p, f0):
        n = len(self.events)
        step(self, p, f0)
        if self.seed == 3:     # the rolled-out session (not the stage's warm-up one)
            fired.extend(e["frame"] for e in self.events[n:])
    monkeypatch.setattr(R.ReactionTrack, "step", spy)

    torch.manual_seed(0)
    model = EchoModel(dataclasses.replace(CONFIGS["tiny"], reactions=True)).eval()
    head = model.reactions
    head.load_state_dict(_head("nod", 0.0).state_dict())      # p = 0.5 a frame: nods as soon as allowed
    tmpl = np.zeros((len(R.KINDS), R.TEMPLATE_FRAMES, motion.NUM_CHANNELS), np.float32)
    tmpl[0, :, PITCH] = 0.05 * np.sin(np.linspace(0, np.pi, R.TEMPLATE_FRAMES))
    head.templates.copy_(torch.from_numpy(tmpl))
    with_r = _run(model, 1.0)
    without = _run(model, 1.0, reactions=False)
    assert len(fired) >= 4 and all(b - a == int(0.8 * R.TEMPLATE_FRAMES) + 1 for a, b in zip(fired, fired[1:]))
    first = fired[0]
    np.testing.assert_array_equal(with_r[:first], without[:first])
    np.testing.assert_allclose(with_r[first: first + 10, PITCH] - without[first: first + 10, PITCH],
                               tmpl[0, :10, PITCH], atol=1e-5)     # the template, from the onset on
    fired.clear()
    np.testing.assert_array_equal(_run(model, 0.0), _run(model, 0.0, reactions=False))   # no user: none
    assert fired == []


@pytest.mark.parametrize("bad", ["nan", "absent"])
def test_head_ignores_absent_or_broken_inputs_of_a_modality(bad):
    head = _head()
    a, v, bl, pr, own = _user(1, 30)
    ref = head.probabilities(a, v, bl, pr.clone().index_fill_(-1, torch.tensor([1]), 0.0), own)
    v2 = v * float("nan") if bad == "nan" else torch.zeros_like(v)
    got = head.probabilities(a, v2, bl, pr.clone().index_fill_(-1, torch.tensor([1]), 0.0), own)
    assert torch.equal(ref, got) and torch.isfinite(got).all()


def test_head_low_pass_removes_sway_keeps_slow_motion_and_touches_only_the_head():
    from scipy.signal import welch

    from echo_stream.stages.diffusion import smooth_head

    rng = np.random.default_rng(0)
    n = 1500
    t = np.arange(n) / FPS
    m = np.tile(motion.neutral_motion(1), (n, 1)).astype(np.float32)
    slow = 0.05 * np.sin(2 * np.pi * 0.1 * t)
    sway = 0.01 * np.sin(2 * np.pi * 1.6 * t)                         # in the nod band
    m[:, PITCH] = slow + sway + 0.01 * rng.standard_normal(n)          # + jitter
    m[:, motion.CHANNEL_INDEX["jawOpen"]] = rng.uniform(0, 1, n)       # lips: left alone

    def run(cut):
        out, st, f0 = [], None, 0
        for size in cut:
            o, st = smooth_head(m[f0:f0 + size], st, 0.4)
            out.append(o)
            f0 += size
        return np.concatenate(out)

    out = run([6] * (n // 6))                                           # window by window, as served
    np.testing.assert_array_equal(run([n]), out)                         # however the frames are cut
    np.testing.assert_allclose(run([5, 7, 12, 1] * (n // 25)), out, atol=1e-6)
    np.testing.assert_array_equal(out[:, motion.CHANNEL_INDEX["jawOpen"]], m[:, motion.CHANNEL_INDEX["jawOpen"]])
    f, p_in = welch(m[:, PITCH], fs=FPS, nperseg=250)
    _, p_out = welch(out[:, PITCH], fs=FPS, nperseg=250)
    band = (f >= 1.2) & (f <= 3.0)
    assert p_out[band].sum() < p_in[band].sum() / 50                     # the nod band is cleared of sway
    lag = int(np.argmax([np.dot(out[200:1200, PITCH], slow[200 - k:1200 - k]) for k in range(25)]))
    assert lag <= 15                                                     # the slow motion stays, late < 0.6 s
    np.testing.assert_allclose(out[200:, PITCH].std(), slow[200:].std(), rtol=0.1)
    const = np.tile(motion.neutral_motion(1), (12, 1)).astype(np.float32)
    const[:, PITCH] = 0.1
    np.testing.assert_allclose(smooth_head(const, None, 0.4)[0], const, atol=1e-6)   # settled from frame 0


def test_a_reopened_session_continues_the_head_low_pass_from_its_last_frame():
    import dataclasses

    from echo_stream.stages.diffusion import DiffusionStage, smooth_head

    stage = DiffusionStage(model=EchoModel(dataclasses.replace(CONFIGS["tiny"], reactions=True)).eval())
    prev = np.tile(motion.neutral_motion(1), (19, 1)).astype(np.float32)
    prev[-1, PITCH] = 0.12                                               # the last frame the session sent
    stage.import_state("s", {"prev": prev})
    head = stage.export_state("s")["head_filter"]
    same = np.tile(prev[-1:], (5, 1))
    np.testing.assert_allclose(smooth_head(same, np.asarray(head), stage.head_cutoff_hz)[0], same, atol=1e-6)
    stage.import_state("t", {"prev": prev, "head_filter": head})           # a carried state is taken as it is
    np.testing.assert_array_equal(stage.export_state("t")["head_filter"], head)


def test_a_glance_is_a_floor_under_the_gaze_towards_a_drawn_side():
    ci = motion.CHANNEL_INDEX
    g = R.KINDS.index("gaze_away")
    templates = np.zeros((len(R.KINDS), R.TEMPLATE_FRAMES, motion.NUM_CHANNELS), np.float32)
    templates[g, :, ci["eyeLookOutRight"]] = templates[g, :, ci["eyeLookInLeft"]] = 0.2
    templates[g, :, ci["eyeLookOutLeft"]] = -0.05            # the other side eases (relative to before the onset)
    p = np.zeros((40, len(R.KINDS)))
    p[5, g] = 1.0
    sides = set()
    for seed in range(12):
        tr = R.ReactionTrack(seed, templates, np.zeros(len(R.KINDS)))
        tr.step(p, 0)
        m = np.tile(motion.neutral_motion(1), (40, 1)).astype(np.float32)
        m[:, PITCH] = -0.1                                    # head pose untouched by a glance
        m[:, ci["eyeLookOutLeft"]] = 0.1
        out = tr.apply(m, 0)
        np.testing.assert_array_equal(out[:5], m[:5])
        right = out[10, ci["eyeLookOutRight"]] == pytest.approx(0.2)
        left = out[10, ci["eyeLookOutLeft"]] == pytest.approx(0.2)
        assert right != left
        sides.add("right" if right else "left")
        assert out[10, ci["eyeLookOutLeft" if right else "eyeLookOutRight"]] == pytest.approx(0.1 if right else 0.0)
        np.testing.assert_array_equal(out[:, PITCH], m[:, PITCH])
    assert sides == {"right", "left"}                         # either side, drawn per glance
    tr = R.ReactionTrack(0, templates, np.zeros(len(R.KINDS)))
    tr.step(p, 0)
    away = np.tile(motion.neutral_motion(1), (40, 1)).astype(np.float32)
    away[:, [ci["eyeLookOutRight"], ci["eyeLookInLeft"], ci["eyeLookOutLeft"], ci["eyeLookInRight"]]] = 0.5
    np.testing.assert_array_equal(tr.apply(away, 0), away)    # the model already looks further away: nothing added
