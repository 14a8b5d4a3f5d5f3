"""Atomic writes: all or nothing, temporary files recognisable, finished files with ordinary permissions."""
import os

import pytest

from echo_stream import atomic


def test_write_is_all_or_nothing_and_leaves_no_temporary_file(tmp_path):
    out = tmp_path / "a.json"
    atomic.write_text(out, "one")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(out) as tmp:
            assert atomic.is_temp_name(os.path.basename(tmp)) and os.path.dirname(tmp) == str(tmp_path)
            with open(tmp, "w") as f:
                f.write("two, half written")
            raise RuntimeError("killed")
    assert out.read_text() == "one" and os.listdir(tmp_path) == ["a.json"]


def test_finished_file_has_the_umask_permissions_of_a_plain_open(tmp_path):
    atomic.write_bytes(tmp_path / "atomic.bin", b"x")
    (tmp_path / "plain.bin").write_bytes(b"x")
    mode = lambda name: (tmp_path / name).stat().st_mode & 0o777  # noqa: E731
    assert mode("atomic.bin") == mode("plain.bin")


def test_pending_file_commits_or_discards(tmp_path):
    p = atomic.PendingFile(tmp_path / "v.mp4")
    with open(p.tmp, "wb") as f:
        f.write(b"data")
    assert not (tmp_path / "v.mp4").exists()
    p.commit()
    assert (tmp_path / "v.mp4").read_bytes() == b"data" and os.listdir(tmp_path) == ["v.mp4"]
    q = atomic.PendingFile(tmp_path / "w.mp4")
    q.discard()
    q.discard()
    assert os.listdir(tmp_path) == ["v.mp4"]


def test_temporary_names():
    assert atomic.is_temp_name(".train-00001.parquet.tmp-a1b2c3d4")
    assert atomic.is_temp_name(".train-00001.parquet.x8k2.tmp")          # earlier versions' names
    assert not atomic.is_temp_name("train-00001.parquet") and not atomic.is_temp_name(".hidden")
