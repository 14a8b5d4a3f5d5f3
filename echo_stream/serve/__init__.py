"""Multi-session serving: a gRPC (``grpc.aio``) front end on the shared stage pipeline.

=================  ===========================================================
module             what
=================  ===========================================================
``backend``        the pipeline seen from the event loop (Ray actors or inline)
``batching``       continuous cross-session batching of diffusion windows
``session``        one session (a package: ingest, replay ledger, stage link, egress, epochs)
``wire``           protobuf <-> plain values, validation and limits
``portrait_gate``  session portraits checked and decoded at the edge (header caps, budgeted child process)
``auth``           bearer tokens, principals
``metrics``        Prometheus metrics of the ingress
``server``         the gRPC service, admission, health, reflection, drain
``client``         Python client library (+ ``echo-stream client``)
``bench``          ``echo-stream bench serve``
=================  ===========================================================
"""
