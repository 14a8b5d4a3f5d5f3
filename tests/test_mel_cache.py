"""The mel filterbank comes from librosa once and from a per-user cache file afterwards: the same numbers bit for
bit, and a process with a warm cache does not import librosa (scipy, numba) at all."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from echo_stream import features

REPO = str(Path(__file__).resolve().parents[1])


@pytest.fixture
def fresh_tables(monkeypatch, tmp_path):
    monkeypatch.setenv(features.CACHE_ENV, str(tmp_path / "cache"))
    saved = features._Tables.mel_fb, features._Tables.window
    features._Tables.mel_fb = features._Tables.window = None
    yield tmp_path / "cache"
    features._Tables.mel_fb, features._Tables.window = saved


def _librosa_mel():
    import librosa

    return librosa.filters.mel(sr=16000, n_fft=512, n_mels=80, fmin=20.0, fmax=7600.0, dtype=np.float64)


def test_cached_table_is_librosas_bit_for_bit(fresh_tables):
    fb, _ = features._Tables.get()
    files = list(fresh_tables.glob("mel_*.npy"))
    assert len(files) == 1
    assert np.array_equal(np.load(files[0]), _librosa_mel())
    assert np.array_equal(fb, _librosa_mel().T)
    features._Tables.mel_fb = None
    again, _ = features._Tables.get()                   # now from the file
    assert np.array_equal(again, fb) and again.flags["C_CONTIGUOUS"]


def test_malformed_cache_is_recomputed_and_unwritable_cache_is_skipped(fresh_tables, monkeypatch):
    path = Path(features._mel_cache_path())
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a numpy file")
    assert np.array_equal(features._mel_filterbank(), _librosa_mel())
    assert np.array_equal(np.load(path), _librosa_mel())   # replaced by the good table
    np.save(path, np.zeros((3, 3)))
    assert np.array_equal(features._mel_filterbank(), _librosa_mel())
    path.write_bytes(b"")                                    # an empty file (numpy: EOFError)
    assert np.array_equal(features._mel_filterbank(), _librosa_mel())
    blocked = fresh_tables.parent / "blocked"
    blocked.write_text("a file where the cache directory would be")
    monkeypatch.setenv(features.CACHE_ENV, str(blocked / "sub"))
    assert np.array_equal(features._mel_filterbank(), _librosa_mel())


def test_warm_cache_process_does_not_import_librosa(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, **{features.CACHE_ENV: str(tmp_path)})
    code = ("import sys; from echo_stream import features; features.warmup(); "
            "print('librosa' in sys.modules, 'scipy' in sys.modules)")
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert first.stdout.split() == ["True", "True"]
    assert second.stdout.split() == ["False", "False"]
