"""Prometheus metrics of the gRPC ingress (``prometheus-client``); stage actors report through
``ray.util.metrics`` (``echo_stream_actor_*``, see ``echo_stream.actors``).

Latencies are histograms in seconds, counters end in ``_total``; no label
carries a session id (bounded cardinality). One set per process: metrics are
module globals in the default registry (``start_http_server`` serves them).
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)

SESSIONS_ACTIVE = Gauge("echo_stream_sessions_active", "sessions currently streaming")
SESSIONS = Counter("echo_stream_sessions_total", "sessions by outcome", ["outcome"])
# outcome: opened, completed, rejected_capacity, rejected_draining, unauthenticated, invalid, failed, cancelled
FRAMES = Counter("echo_stream_frames_total", "frames delivered to clients", ["kind"])  # kind: motion, video
ERRORS = Counter("echo_stream_errors_total", "errors returned to clients by gRPC status", ["code"])
GAPS = Counter("echo_stream_gap_frames_total", "frames announced as gaps after a stage failure")
RECOVERIES = Counter("echo_stream_recoveries_total", "session recoveries after a stage failure")
MOVES = Counter("echo_stream_session_moves_total", "planned moves of running sessions to another stage replica "
                "(--rebalance-interval)", ["why"])
INTERRUPTS = Counter("echo_stream_interrupts_total", "session interrupts")
MESSAGES_IN = Counter("echo_stream_messages_received_total", "client messages received", ["kind"])
STAGE_LATENCY = Histogram("echo_stream_stage_latency_seconds",
                          "submit -> result of a stage call as seen by the ingress", ["stage"], buckets=_LAT)
FRAME_LATENCY = Histogram("echo_stream_frame_latency_seconds",
                          "avatar audio arrival at the ingress -> that frame leaving the egress", buckets=_LAT)
FIRST_FRAME_LATENCY = Histogram("echo_stream_first_frame_latency_seconds",
                                "first avatar audio arrival -> first frame leaving the egress", buckets=_LAT)
QUEUE_DEPTH = Gauge("echo_stream_queue_depth", "items waiting, summed over sessions", ["queue"])
# queue: input (client messages not yet handed to the pipeline), inflight (chains in the pipeline),
# diffusion (windows waiting for the next batch)
DIFFUSION_BATCH = Histogram("echo_stream_diffusion_batch_size", "session windows per diffusion model call",
                            buckets=(1, 2, 4, 8, 16, 32, 64, 128))
REPLICAS = Gauge("echo_stream_replicas", "replicas of an autoscaled stage", ["stage"])
DIFFUSION_WAIT = Histogram("echo_stream_diffusion_queue_seconds", "window ready -> its batch starts", buckets=_LAT)


def serve_metrics(port: int, addr: str = "127.0.0.1"):
    """Start the /metrics HTTP endpoint (a daemon thread); returns the server."""
    server, _thread = start_http_server(port, addr=addr)
    return server
