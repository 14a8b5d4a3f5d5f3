"""`echo-stream bench preprocess`: speed-ups within a round, the per-size summary, the figure, --plot."""
import argparse
import json

import pytest

from echo_stream import bench_preprocess as bp


def _run(executor, threads, n, rnd, wall, pss=500.0, cpus=None):
    return {"executor": executor, "library_threads": threads, "num_cpus": cpus, "conversations": n, "round": rnd,
            "wall_s": wall, "processing_s": wall - (4.0 if executor == "ray" else 0.0), "done": n,
            "media_s": 60.0 * n, "peak_tree_pss_mb": pss, "files_per_s": n / wall,
            "media_h_per_h": 60.0 * n / wall}


def _runs():
    runs = []
    for rnd, (seq1, seqd, ray) in enumerate([(100.0, 80.0, 50.0), (120.0, 90.0, 80.0), (110.0, 85.0, 55.0)]):
        runs += [_run("sequential", "1", 16, rnd, seq1), _run("sequential", "default", 16, rnd, seqd),
                 _run("ray", "1 per actor", 16, rnd, ray, pss=1500.0, cpus=2)]
    runs += [_run("sequential", "1", 48, 0, 300.0), _run("ray", "1 per actor", 48, 0, 160.0, pss=1600.0, cpus=2)]
    return runs


def test_speedups_are_taken_against_the_baselines_of_the_same_round_and_size():
    runs = _runs()
    bp._speedups(runs)
    ray16 = [r for r in runs if r["executor"] == "ray" and r["conversations"] == 16]
    assert [r["speedup_vs_sequential_1thread"] for r in ray16] == [2.0, 1.5, 2.0]
    assert [r["speedup_vs_sequential_default_threads"] for r in ray16] == [1.6, 1.125, round(85 / 55, 3)]
    ray48 = next(r for r in runs if r["executor"] == "ray" and r["conversations"] == 48)
    assert ray48["speedup_vs_sequential_1thread"] == 1.875
    assert "speedup_vs_sequential_default_threads" not in ray48          # no such baseline at 48
    assert ray48["speedup_vs_sequential_1thread_processing"] == round(300 / 156, 3)


def test_summary_takes_medians_over_rounds_and_the_largest_peak():
    runs = _runs()
    runs[2]["peak_tree_pss_mb"] = 1700.0
    bp._speedups(runs)
    s = {(x["conversations"], x["runner"]): x for x in bp._summary(runs)}
    ray16 = s[(16, "ray num_cpus=2")]
    assert ray16["rounds"] == 3
    assert ray16["wall_s_median"] == 55.0 and ray16["wall_s"] == [50.0, 80.0, 55.0]
    assert ray16["speedup_vs_sequential_1thread_median"] == 2.0
    assert ray16["peak_tree_pss_mb_max"] == 1700.0
    assert s[(48, "sequential, library threads 1")]["rounds"] == 1
    two = bp._summary([_run("ray", "x", 8, 0, 50.0, cpus=2), _run("ray", "x", 8, 1, 80.0, cpus=2)])
    assert two[0]["wall_s_median"] == 65.0                          # even count: the middle two averaged


def test_plot_of_an_earlier_result(tmp_path, capsys):
    runs = _runs()
    bp._speedups(runs)
    src = tmp_path / "preprocess_2cpu.json"
    src.write_text(json.dumps({"benchmark": "preprocess", "time": "2026-11-24T00:00:00+0000",
                               "environment": {"cpu_count": 2, "ray": "x"}, "runs": runs}))
    assert bp.run(argparse.Namespace(one=None, plot=str(src))) == 0
    png = tmp_path / "preprocess_2cpu.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = capsys.readouterr().out.splitlines()
    assert len(table) == len(runs) and "x2.00 (1 thread)" in table[2]


def test_plot_refuses_what_is_not_a_preprocess_result(tmp_path):
    with pytest.raises(SystemExit, match="is not a file"):
        bp.run(argparse.Namespace(one=None, plot=str(tmp_path / "missing.json")))
    other = tmp_path / "serve.json"
    other.write_text(json.dumps({"benchmark": "serve", "runs": []}))
    with pytest.raises(SystemExit, match="not a preprocess benchmark result"):
        bp.run(argparse.Namespace(one=None, plot=str(other)))


def test_plot_reads_results_written_before_the_one_thread_baseline(tmp_path, capsys):
    old = [{k: v for k, v in r.items() if k not in ("library_threads", "round")}
           for r in (_run("sequential", "default", 48, 0, 300.0), _run("ray", "x", 48, 0, 200.0, cpus=2))]
    old[1]["speedup_vs_sequential"] = 1.5
    src = tmp_path / "old.json"
    src.write_text(json.dumps({"benchmark": "preprocess", "runs": old}))
    assert bp.run(argparse.Namespace(one=None, plot=str(src))) == 0
    table = capsys.readouterr().out.splitlines()
    assert "sequential, library threads default" in table[0] and "x1.50 (default threads)" in table[1]
    assert (tmp_path / "old.png").is_file()


def test_plot_refuses_a_file_that_is_not_json(tmp_path):
    bad = tmp_path / "half.json"
    bad.write_text('{"benchmark": "preprocess", "runs": [')
    with pytest.raises(SystemExit, match="is not JSON"):
        bp.run(argparse.Namespace(one=None, plot=str(bad)))


@pytest.mark.parametrize("field,value,message", [
    ("sizes", "16,x", "--sizes: comma-separated whole numbers"),
    ("sizes", "0", "--sizes: comma-separated whole numbers"),
    ("cpus", "", "--cpus: comma-separated whole numbers"),
    ("repeat", 0, "--repeat: at least 1 round"),
])
def test_bad_numbers_are_named_before_anything_runs(field, value, message):
    args = dict(one=None, plot=None, sizes="16,48", cpus="2", repeat=1)
    args[field] = value
    with pytest.raises(SystemExit, match=message):
        bp.run(argparse.Namespace(**args))


def test_a_failed_ideal_split_part_says_why(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"conversation_id": f"c{k}", "avatar_media": f"missing{k}.wav"})
                                   for k in range(2)) + "\n")
    with pytest.raises(RuntimeError, match=r"ideal-split part \d of 2 failed \(exit \d+\):\n(.|\n)*usable"):
        bp._one_split({"manifest": str(manifest), "output": str(tmp_path / "out"), "num_cpus": 2})
