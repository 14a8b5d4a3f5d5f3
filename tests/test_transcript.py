import pytest

from echo_stream import transcript
from echo_stream.errors import InputError


def test_timed_lines_and_speakers(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("[12.5-14.0] user: I got the job!\n3 4.5 avatar: hello there\nuntimed line\n")
    segs = transcript.load(str(p))
    assert [(s.start, s.speaker) for s in segs] == [(0.0, "unknown"), (3.0, "avatar"), (12.5, "user")]
    assert segs[2].text == "I got the job!" and segs[2].end == 14.0


def test_srt_and_vtt(tmp_path):
    srt = "1\n00:00:01,000 --> 00:00:02,500\nuser: so sad today\n\n2\n00:01:00,000 --> 00:01:02,000\nfine\n"
    segs = transcript.parse(srt)
    assert [(s.start, s.end, s.speaker) for s in segs] == [(1.0, 2.5, "user"), (60.0, 62.0, "unknown")]
    vtt = "WEBVTT\n\n00:05.000 --> 00:06.000\navatar: hi\n"
    assert transcript.parse(vtt)[0].start == 5.0


def test_json_and_literal_text(tmp_path):
    p = tmp_path / "t.json"
    p.write_text('[{"start": 2, "end": 3, "speaker": "user", "text": "great news"}]')
    assert transcript.load(str(p))[0].text == "great news"
    assert transcript.load("I love this")[0].text == "I love this"
    assert transcript.load(None) == []


def test_bad_transcripts(tmp_path):
    with pytest.raises(InputError, match="no such transcript file"):
        transcript.load(str(tmp_path / "missing.srt"))
    bad = tmp_path / "bin.txt"
    bad.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(InputError, match="not UTF-8"):
        transcript.load(str(bad))
    j = tmp_path / "bad.json"
    j.write_text('[{"start": 1}]')
    with pytest.raises(InputError, match="bad.json: item 0: needs a 'text' string"):
        transcript.load(str(j))


def test_deeply_nested_json_is_one_clear_error(tmp_path):
    from echo_stream import render, transcript
    from echo_stream.errors import InputError

    deep = "[" * 100000 + "]" * 100000
    with pytest.raises(InputError, match="nested too deeply"):
        transcript.parse(deep, "chat.json")
    side = tmp_path / "p.landmarks.json"
    side.write_text("{\"a\": " * 100000 + "1" + "}" * 100000)
    with pytest.raises(InputError, match="p.landmarks.json: landmarks file is nested too deeply"):
        render.load_portrait(render.SAMPLE_PORTRAIT, landmarks_path=side)
