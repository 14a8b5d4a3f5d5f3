"""``echo-stream serve``'s options turned into what the server and the pipeline take: shared by the command
(:mod:`.cli`) and the Ray Serve application builder (:func:`~echo_stream.serve.serve_engine.build_app`)."""
from __future__ import annotations

import os

from ..errors import InputError


def read_input_file(path: str | None, what: str) -> bytes | None:
    """The bytes of a file named on the command line (None for no path); InputError naming it if unreadable."""
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise InputError(path, f"cannot read the {what} ({e.strerror or e})") from None


def serve_options(args):
    """``(ServeOptions, PipelineOptions)`` of ``echo-stream serve``'s parsed arguments (also what the Serve
    application builder, :func:`~echo_stream.serve.serve_engine.build_app`, takes); raises InputError naming
    the option for bad input, before anything starts."""
    from ..pipeline import PipelineOptions, parse_replicas
    from .auth import is_loopback, load_tokens
    from .wire import Limits

    from .autoscale import parse_autoscale

    replicas = parse_replicas(args.replicas)          # a bad --replicas fails before anything starts
    autoscale = parse_autoscale(args.autoscale, args.scale_target, args.scale_up_delay, args.scale_down_delay)
    both = sorted(set(replicas) & set(autoscale))
    if both:
        raise InputError("--autoscale", f"{', '.join(both)} is named in --replicas too: an autoscaled stage starts "
                                        "with its MIN replicas; name it in one of the two")
    replicas.update({stage: spec.min for stage, spec in autoscale.items()})
    resume_ttl = getattr(args, "resume_ttl", 120.0)
    if not resume_ttl >= 0:
        raise InputError("--resume-ttl", f"{resume_ttl}: seconds >= 0 (0: sessions cannot be resumed)")
    stage_idle = getattr(args, "stage_idle_timeout", 600.0)
    if not stage_idle >= max(resume_ttl, 1.0) or stage_idle == float("inf"):
        raise InputError("--stage-idle-timeout", f"{stage_idle}: seconds, at least 1 and at least --resume-ttl "
                                                 f"({resume_ttl:g})")
    call_deadline = getattr(args, "stage_call_deadline", 20.0)
    if not 1.0 <= call_deadline < float("inf"):
        raise InputError("--stage-call-deadline", f"{call_deadline}: seconds, at least 1")
    rebalance = getattr(args, "rebalance_interval", 0.0)
    if not (rebalance == 0 or 0.1 <= rebalance < float("inf")):
        raise InputError("--rebalance-interval", f"{rebalance}: seconds, at least 0.1 (0: sessions never move)")
    resume_shards = getattr(args, "resume_shards", 4)
    if not 1 <= resume_shards <= 256:
        raise InputError("--resume-shards", f"{resume_shards}: a whole number in 1..256")
    tokens = load_tokens(args.tokens_file)
    if not is_loopback(args.host) and not tokens:
        raise InputError("--host", f"binding {args.host} (beyond loopback) needs bearer tokens: give "
                                   "--tokens-file PATH or set $ECHO_STREAM_TOKENS='principal:token'")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise InputError("--tls-cert/--tls-key", "give both the certificate and the key")
    avatars = {}
    for spec in args.avatar:
        name, sep, path = spec.partition("=")
        if not sep or not name or not os.path.isfile(path):
            raise InputError(f"--avatar {spec}", "expected NAME=IMAGE with an existing image file")
        avatars[name] = os.path.abspath(path)
    from .server import ServeOptions
    opts = ServeOptions.for_model(args.config, stride=args.stride or None, motion_stride=args.motion_stride or None,
                                  host=args.host, port=args.port, max_sessions=args.max_sessions, tokens=tokens,
                        tls_cert=read_input_file(args.tls_cert, "TLS certificate"), tls_key=read_input_file(args.tls_key, "TLS key"),
                        limits=Limits(max_lead_s=args.max_lead), avatars=avatars, drain_timeout_s=args.drain_timeout,
                        max_batch=args.max_batch, batch_wait_s=args.batch_wait_ms / 1000, autoscale=autoscale,
                        resume_ttl_s=resume_ttl, resume_shards=resume_shards, stage_idle_s=stage_idle,
                        stage_call_deadline_s=call_deadline, rebalance_interval_s=rebalance)
    popts = PipelineOptions(checkpoint=args.checkpoint, config=args.config, device=args.device,
                            size=(args.size, args.size), stride=args.stride or None, replicas=replicas,
                            max_replicas={stage: spec.max for stage, spec in autoscale.items()},
                            autoscale=autoscale if args.engine == "serve" else {}, stage_idle_s=stage_idle)
    return opts, popts
