"""A whole node lost mid-session, its ingress with it: the deployed Ray Serve application (``build_app``, as
``serve deploy`` runs it) on a two-node ``ray.cluster_utils.Cluster`` on this machine, one ingress per node on
one port (gRPC binds with SO_REUSEPORT, so the kernel spreads the clients' connections over the two ingresses
as a TCP load balancer would), every stage with a replica on each node.

The worker node is killed (not drained) while sessions stream real TTS speech in real time. Sessions whose
ingress was on it lose their stream and resume through the same address (now the head's ingress) from their
resume record; sessions on the head's ingress whose stage replicas were on it recover as after a stage fault.
Every session completes with every frame exactly once, in order.
"""
import asyncio
import json
import os
import re
import socket
import time

import numpy as np
import pytest

from echo_stream import config, media
from echo_stream.protos import echo_stream_pb2 as pb

from .served import two_node_cluster

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow]
SIZE = 96
APP = "echo-nodes"
TTS = os.path.join(os.path.dirname(__file__), "data", "tts")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _sessions_by_node(ingress, asks: int = 24) -> dict:
    """{node id: session ids} of every ingress replica (a handle's calls go to either replica: ask often)."""
    out: dict = {}
    for _ in range(asks):
        got = await ingress.sessions.remote()
        out[got["node_id"]] = set(got["sessions"])
    return out


def test_sessions_outlive_a_lost_node_and_its_ingress():
    from ray import serve

    from echo_stream.serve.client import AvatarClient, Inputs, stream_inputs
    from echo_stream.serve.serve_engine import build_app

    # two utterances, 8.6 s: long enough that the first session still runs when the node is lost, however many
    # connections it took until both ingresses held a session (up to 8, 0.4 s apart)
    audio = np.concatenate([media.decode_audio(os.path.join(TTS, f"tts{i}.ogg")) for i in (2, 3)])
    n = int(np.ceil(len(audio) / config.SAMPLES_PER_FRAME - 1e-6))
    port = _free_port()
    system = json.loads(os.environ.get("ECHO_STREAM_RAY_SYSTEM_CONFIG") or "{}")    # (scripts/measure_node_loss.py)
    head_cpus = int(os.environ.get("ECHO_STREAM_NODE_LOSS_HEAD_CPUS") or 8)           # (scripts/measure_node_loss.py)
    with two_node_cluster(head_cpus=head_cpus, worker_cpus=4, system_config=system) as (cluster, worker):
        try:
            serve.start(proxy_location="Disabled")
            serve.run(build_app({"port": port, "size": SIZE, "ingress_replicas": 2, "max_sessions": 8,
                                 "replicas": "decode=2,features=2,memory=2,diffusion=2,render=2"}),
                      name=APP, route_prefix=None)
            ingress = serve.get_deployment_handle("ingress", APP)

            async def main():
                target = f"127.0.0.1:{port}"
                clients, runs, where = [], [], {}
                # new connections until both ingresses hold a session (the kernel picks one per connection)
                while len(runs) < 3 or len([ids for ids in where.values() if ids]) < 2:
                    assert len(runs) < 8, f"the connections all went to one ingress: {where}"
                    c = AvatarClient(target, own_connection=True)
                    clients.append(c)
                    runs.append(asyncio.get_running_loop().create_task(stream_inputs(
                        c, Inputs(audio), output="motion", seed=len(runs), realtime=True, resume_through=[c])))
                    await asyncio.sleep(0.4)
                    where = await _sessions_by_node(ingress)
                await asyncio.sleep(1.0)
                t_loss = time.monotonic()
                await asyncio.get_running_loop().run_in_executor(
                    None, lambda: cluster.remove_node(worker, allow_graceful=False))
                results = await asyncio.gather(*runs)
                for c in clients:
                    await c.close()
                return results, where, t_loss
            results, where, t_loss = asyncio.run(main())
        finally:
            serve.shutdown()
    on_worker = where.get(worker.node_id, set())
    assert on_worker and set().union(*where.values()) == {r.session_id for r in results}, where
    figures = []
    for res in results:
        frames = res.motion_frames
        assert frames == list(range(n)), (res.session_id[:8], [(e.kind, e.first_frame, e.message) for e in res.events])
        assert res.events[-1].kind == pb.Event.ENDED
        gaps = [e for e in res.events if e.kind == pb.Event.GAP]
        assert all(e.frames == 0 for e in gaps)
        arrivals = sorted(t for t in res.frame_arrival.values() if t > t_loss)
        fig = {"session": res.session_id[:8], "ingress_lost": res.session_id in on_worker,
               "longest_wait_for_a_frame_after_the_loss_s": round(max(np.diff([t_loss] + arrivals)), 3),
               "gap_events": [e.message for e in gaps]}
        if res.session_id in on_worker:              # its ingress was lost: resumed through the other one
            assert len(res.resumes) == 1 and res.resumes[0].resumed and gaps, res.events
            seam = gaps[-1].first_frame
            fig.update(stream_broke_after_loss_s=round(res.breaks[0] - t_loss, 3),
                       resumed_open_after_break_s=round(res.resumed_at[0] - res.breaks[0], 3),
                       next_frame_after_break_s=round(res.frame_arrival[seam] - res.breaks[0], 3))
            print(f"session {res.session_id[:8]} (ingress lost): stream broke {res.breaks[0] - t_loss:.2f} s after "
                  f"the node was removed, resumed stream open {res.resumed_at[0] - res.breaks[0]:.2f} s after the break,"
                  f" frame {seam} {res.frame_arrival[seam] - res.breaks[0]:.2f} s after it; GAP: {gaps[-1].message}")
        else:
            assert not res.resumes
            for e, t_gap in zip(res.events, res.event_arrival):      # when the ingress noticed the loss: the
                if e.kind == pb.Event.GAP:                           # GAP event says how long recovering took
                    took = float(re.search(r"output stalled ([0-9.]+) s", e.message).group(1))
                    fig.setdefault("next_frame_after_fault_noticed_s", round(
                        min(t for f, t in res.frame_arrival.items() if f >= e.first_frame) - (t_gap - took), 3))
            print(f"session {res.session_id[:8]} (ingress kept): {len(gaps)} GAP event(s)",
                  [e.message for e in gaps], f"longest wait for a frame after the loss "
                  f"{fig['longest_wait_for_a_frame_after_the_loss_s']:.2f} s")
        figures.append(fig)
    out = os.environ.get("ECHO_STREAM_NODE_LOSS_FIGURES")                          # (scripts/measure_node_loss.py)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({"sessions": figures}) + "\n")
