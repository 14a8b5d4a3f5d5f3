"""Multi-session serving: a gRPC (``grpc.aio``) front end on the shared stage pipeline.

=================  ===========================================================
module             what
=================  ===========================================================
``backend``        the pipeline seen from the event loop (Ray actors or inline)
``serve_engine``   the same on Ray Serve (``--engine serve``), and the deployable app (``build_app``)
``pinning``        what a pinned Serve call carries; per-session call order; slot re-binding
``options``        ``echo-stream serve``'s options -> server / pipeline options (CLI and ``build_app``)
``batching``       continuous cross-session batching of diffusion windows
``session``        one session (a package: ingest, replay ledger, stage link, egress, epochs)
``wire``           protobuf <-> plain values, validation and limits
``portrait_gate``  session portraits checked and decoded at the edge (header caps, budgeted child process)
``auth``           bearer tokens, principals
``metrics``        Prometheus metrics of the ingress
``server``         the gRPC service, admission, health, reflection, drain
``client``         Python client library (+ ``echo-stream client``)
``bench``          ``echo-stream bench serve``
``hop_bench``      ``echo-stream bench hop``: a stage actor call vs a Serve call
=================  ===========================================================
"""
