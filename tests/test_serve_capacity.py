"""``echo-stream bench capacity`` at a small scale: the real ingress (Session, the server's reader and output
loop, the Router, one WindowBatcher per diffusion replica) over stand-in stages that sleep their costs. The
outputs must be consistent — every window generated once, every frame delivered once and in order, batches
within the batcher's limit, sessions spread evenly — not fast: no timing is asserted."""
import json

import pytest

from echo_stream import cli
from echo_stream.errors import InputError
from echo_stream.geometry import default_geometry
from echo_stream.serve import capacity

#: hand-written costs (ms), about the tiny model's on a CPU core; the test needs no model
COSTS = capacity.StageCosts("test: hand-written", push_ms=0.5, features_ms=2.0, memory_ms=2.0,
                            diffusion_ms={1: 20.0, 4: 40.0, 16: 100.0}, render_ms=0.1)


def test_small_fleet_serves_every_window_once():
    reps = capacity.auto_replicas(12, COSTS, default_geometry(), 8, 16, {"diffusion": 3})
    assert reps["diffusion"] == 3 and all(n >= 1 for n in reps.values())
    out = capacity.simulate(capacity.Scenario(12, reps, COSTS, duration_s=1.5, ramp_s=0.3, stride=8, max_batch=2))
    c = out["checks"]
    assert c["sessions_failed"] == []
    assert c["frames_expected_per_session"] == capacity.client_frames(1.5) == 38
    assert c["every_frame_once_in_order"]
    assert c["every_window_once"] and c["windows_generated"] == c["windows_expected"] == 12 * 5
    assert c["batches_within_max_batch"] and c["batcher_max_seen"] <= 2
    b = out["diffusion_batches"]
    assert sum(int(k) * v for k, v in b["histogram"].items()) == c["windows_generated"]
    assert b["replicas_used"] == 3 and 1 <= b["max"] <= 2
    assert out["sessions_per_diffusion_replica"] == {"min": 4, "max": 4, "mean": 4.0}
    assert out["ingress"]["cpu_per_session"] > 0 and out["frame_latency_s"]["p50"] > 0


def test_interpolated_costs_and_bad_arguments_named(tmp_path, capsys):
    assert COSTS.diffusion_s(1) == pytest.approx(0.020) and COSTS.diffusion_s(2) == pytest.approx(0.020 + 0.020 / 3)
    assert COSTS.diffusion_s(32) == pytest.approx(0.100 + 16 * 0.060 / 12)      # the last slope beyond
    gpu = COSTS.with_gpu_diffusion(8, 0.5)
    assert gpu.diffusion_s(10) == pytest.approx(0.013) and gpu.source.startswith("ASSUMED GPU diffusion")
    with pytest.raises(InputError, match="--gpu-batch-ms: '8' is not BASE,PER_WINDOW"):
        capacity._gpu_ms("8")
    with pytest.raises(InputError, match="name the diffusion replicas"):
        capacity.auto_replicas(10, COSTS, default_geometry(), None, 16, {})
    costs_file = tmp_path / "c.json"
    costs_file.write_text(json.dumps({"costs": vars(COSTS)}))
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    for argv, says in [(["--sessions", "0"], "--sessions: '0' is not a comma-separated list"),
                       (["--replicas", "difusion=2"], "--replicas: unknown stage 'difusion'"),
                       (["--costs", str(tmp_path / "nope.json")], "--costs: "),
                       (["--costs", str(costs_file), "--time-scale", "0.5"], "--time-scale: 0.5: must be a number >= 1"),
                       (["--plot", str(costs_file)], "--plot: "),
                       # refused before anything is measured (the default --costs measure would take a minute)
                       (["--time-scale", "0"], "--time-scale: 0.0: must be a number >= 1"),
                       (["--max-batch", "0"], "--max-batch: 0: must be 1 or more"),
                       (["--duration", "nan"], "--duration: nan:"),
                       (["--config", "bogus"], "--config: "),
                       (["--costs", str(listed)], "--costs: "),
                       (["--costs", str(costs_file), "--out", str(costs_file)], "--out: ")]:
        assert cli.main(["bench", "capacity", "--out", str(tmp_path), *argv]) == 1
        assert says in capsys.readouterr().err


def test_hop_bench_refuses_bad_arguments_before_starting_ray(tmp_path, capsys):
    """``bench hop``'s arguments are checked before Ray starts (``--num-cpus 0`` crashed Ray; an unwritable
    ``--out`` failed only after the whole measurement)."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    for argv, says in [(["--num-cpus", "0"], "--num-cpus: 0: give 1 or more"),
                       (["--sizes-kb", "1,x"], "--sizes-kb: 'x' is not a positive size"),
                       (["--sizes-kb", "-3"], "--sizes-kb: '-3' is not a positive size"),
                       (["--hops", "0"], "--hops: 0: give 1 or more"),
                       (["--repeat", "0"], "--repeat: 0: give 1 or more"),
                       (["--out", str(blocker / "sub")], "--out: ")]:
        assert cli.main(["bench", "hop", "--out", str(tmp_path), *argv]) == 1
        assert says in capsys.readouterr().err
    import ray
    assert not ray.is_initialized()
