"""How long sessions wait when a whole node is lost with its ingress (docs/serving.md, "A whole node lost").

    .venv/bin/python scripts/measure_node_loss.py --runs 5
    .venv/bin/python scripts/measure_node_loss.py --runs 5 --fast-node-death

Runs ``tests/test_serve_node_loss.py`` (the deployed application on a two-node ``ray.cluster_utils.Cluster``,
the worker node killed mid-session) ``--runs`` times; each run's per-session figures (written by the test when
``ECHO_STREAM_NODE_LOSS_FIGURES`` names a file) are gathered into one JSON under ``bench/results/``:

- a session whose ingress was on the lost node: when its stream broke, when the resumed stream opened, and
  when its next frame came, after the break;
- a session on the kept ingress with stage replicas on the lost node: its next frame after the ingress noticed
  the loss (a call failed, or the stage monitor saw the replica gone; the GAP event says how long recovering
  took from then);
- every session: the longest wait for a frame after the node was removed (the frames of a real-time session
  come a window at a time, 0.64 s apart at stride 16, so that is the floor).

``--fast-node-death`` starts the cluster with Ray's GCS health check of nodes every 0.5 s, 3 misses (Ray's
default: every 3 s, 5 misses, so a node is declared dead ~15 s after it stopped answering); a live replica
that was answering a call of the lost node's ingress can be held until then. The test's own assertions
(every frame once, in order) hold in every run, or the script stops.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FAST = {"health_check_period_ms": 500, "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}


def _summary(values: list[float]) -> dict:
    if not values:
        return {}
    return {"n": len(values), "min": min(values), "median": round(statistics.median(values), 3), "max": max(values)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="times to run the test (each ~1 min on 2 cores)")
    ap.add_argument("--fast-node-death", action="store_true",
                    help="Ray's GCS declares a silent node dead after 3 x 0.5 s instead of 5 x 3 s")
    ap.add_argument("--head-cpus", type=int, default=8,
                    help="the head node's CPUs (default 8). 3 leaves room for its own replicas (2.5 CPUs) and "
                         "little more, so Serve cannot start most replacements of the lost node's replicas there: "
                         "as on a cluster whose replacements go to another machine, they do not compete with the "
                         "recovering sessions for the same cores")
    ap.add_argument("--out", default=None, help="JSON to write (default bench/results/node_loss_2cpu[_fast].json)")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs: at least 1")
    from echo_stream.machine import environment

    out = Path(args.out or REPO / "bench" / "results" /
               f"node_loss_{os.cpu_count()}cpu{'_fast_node_death' if args.fast_node_death else ''}"
               f"{'' if args.head_cpus == 8 else f'_head{args.head_cpus}'}.json")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        figures = Path(tmp) / "figures.jsonl"
        env = dict(os.environ, ECHO_STREAM_NODE_LOSS_FIGURES=str(figures),
                   ECHO_STREAM_NODE_LOSS_HEAD_CPUS=str(args.head_cpus),
                   ECHO_STREAM_RAY_SYSTEM_CONFIG=json.dumps(FAST if args.fast_node_death else {}))
        for k in range(args.runs):
            t = time.perf_counter()
            got = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                                  "tests/test_serve_node_loss.py"], cwd=REPO, env=env, capture_output=True, text=True)
            if got.returncode != 0:
                log = out.with_suffix(f".run{k + 1}.failed.log")
                log.write_text(got.stdout + got.stderr)
                print(f"run {k + 1}: the test failed (rc {got.returncode}); its output is in {log}", file=sys.stderr)
                return 1
            runs.append(json.loads(figures.read_text().splitlines()[-1])["sessions"])
            print(f"run {k + 1}/{args.runs}: {time.perf_counter() - t:.0f} s, "
                  f"{sum(s['ingress_lost'] for s in runs[-1])} of {len(runs[-1])} sessions resumed", flush=True)
    lost = [s for r in runs for s in r if s["ingress_lost"]]
    kept = [s for r in runs for s in r if not s["ingress_lost"]]
    doc = {"benchmark": "whole node lost with its ingress (tests/test_serve_node_loss.py)",
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "environment": environment(),
           "config": {"runs": args.runs, "ray_system_config": FAST if args.fast_node_death else "Ray's defaults",
                      "cluster": f"ray.cluster_utils.Cluster: head {args.head_cpus} CPUs + worker 4 CPUs on one machine",
                      "replicas": "decode=2,features=2,memory=2,diffusion=2,render=2, ingress 2 (one port)",
                      "session": "real-time TTS speech, motion output, stride 16 (a window every 0.64 s)"},
           "summary": {
               "resumed_next_frame_after_break_s": _summary([s["next_frame_after_break_s"] for s in lost]),
               "resumed_stream_open_after_break_s": _summary([s["resumed_open_after_break_s"] for s in lost]),
               "stream_broke_after_loss_s": _summary([s["stream_broke_after_loss_s"] for s in lost]),
               "ingress_kept_next_frame_after_fault_noticed_s": _summary(
                   [s["next_frame_after_fault_noticed_s"] for s in kept if "next_frame_after_fault_noticed_s" in s]),
               "ingress_kept_longest_wait_for_a_frame_s": _summary(
                   [s["longest_wait_for_a_frame_after_the_loss_s"] for s in kept]),
               "ingress_lost_longest_wait_for_a_frame_s": _summary(
                   [s["longest_wait_for_a_frame_after_the_loss_s"] for s in lost])},
           "runs": runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(doc, indent=1) + "\n")
    tmp_out.replace(out)
    print(json.dumps(doc["summary"], indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
