"""The window geometry: one object from the model config, asked by the stages and by serving alike."""
import pytest

from echo_stream.config import get_config
from echo_stream.errors import InputError
from echo_stream.geometry import WindowGeometry, default_geometry
from echo_stream.serve.server import ServeOptions
from echo_stream.stages.memory import window_geometry


@pytest.mark.parametrize("name", ["tiny", "base"])
def test_geometry_follows_the_config(name):
    cfg = get_config(name)
    g = WindowGeometry.of(cfg)
    assert g.split() == (cfg.overlap_frames, cfg.new_frames, cfg.lookahead_frames) == window_geometry(cfg)
    assert g.user_frames == cfg.user_frames
    for s in (1, 6, cfg.new_frames):
        k, s2, _ = g.split(s)
        assert s2 == s and k + s == cfg.window_frames == g.known(s) + s


def test_a_bad_stride_names_what_was_asked():
    g = default_geometry()
    for bad in (0, -1, g.max_stride + 1):
        with pytest.raises(InputError, match="stride_frames: .*between 1 and 16.*tiny") as e:
            g.stride(bad, "stride_frames")
        assert isinstance(e.value, ValueError)       # the stages' callers catch ValueError
    with pytest.raises(InputError, match="stride_frames"):
        ServeOptions.for_model("tiny", stride=40)


def test_windows_are_ready_once_their_audio_and_lookahead_are_in():
    g = default_geometry()
    extra = g.ready_extra_s()
    assert extra == pytest.approx(g.lookahead_frames / 25 + 0.010)
    # with stride 6 (0.24 s) windows end at 0.24, 0.48, ...: each is ready 'extra' after its end
    assert g.ready_s(6, 0.0) == pytest.approx(extra)
    assert g.ready_s(6, 0.24 + extra - 1e-6) == pytest.approx(extra)
    assert g.ready_s(6, 0.24 + extra + 1e-6) == pytest.approx(0.24 + extra)
    assert g.ready_s(16, 1.0) == pytest.approx(0.64 + extra)
