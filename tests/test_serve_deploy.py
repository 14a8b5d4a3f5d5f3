"""The deployable Serve application: ``deploy/serve_config.yaml`` and the KubeRay RayService embedding it validate
as Serve deploy configs, ``build_app`` checks its arguments, and the built application, run on a local Ray Serve,
serves a gRPC session end to end through its own ingress (health, reflection-free client, every frame once)."""
import asyncio
import socket
from pathlib import Path

import numpy as np
import pytest
import yaml

from echo_stream import config
from echo_stream.errors import InputError

from . import mediagen

ray = pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[1]


def _validate(cfg: dict):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(cfg)
    (app,) = schema.applications
    assert app.import_path == "echo_stream.serve.serve_engine:build_app"
    return app


def _built(args: dict):
    """``build_app(args)``'s deployments: {name: (num_replicas, ray_actor_options)} (no cluster: no GPU check)."""
    from echo_stream.serve.serve_engine import build_app

    out, stack = {}, [build_app(args)]
    while stack:
        d = stack.pop()._bound_deployment
        out[d.name] = (d.num_replicas, d.ray_actor_options)
        stack += [v for v in d.init_kwargs.values() if hasattr(v, "_bound_deployment")]   # the stages
    return out


def _expect_built(deps: dict, args: dict):
    assert deps["ingress"][0] == args["ingress_replicas"]
    for stage in ("decode", "features", "memory"):
        assert deps[stage][0] == 1 and "num_gpus" not in deps[stage][1]
    for stage in ("diffusion", "render"):                # replicas=diffusion=2,render=2 with device cuda
        assert deps[stage][0] == 2 and deps[stage][1]["num_gpus"] == 0.5


def test_serve_config_yaml_is_a_serve_deploy_config_and_builds(tmp_path, monkeypatch):
    from echo_stream.serve.serve_engine import app_arguments, parse_app_arguments

    app = _validate(yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text()))
    args = dict(app.args)
    assert args["replicas"] == "diffusion=2,render=2" and args["ingress_replicas"] >= 2
    ns = parse_app_arguments(app_arguments(args))      # every arg is an `echo-stream serve` option
    assert (ns.port, ns.host, ns.device, ns.engine) == (50051, "0.0.0.0", "cuda", "serve")
    tokens = tmp_path / "tokens.txt"                   # the node's tokens file, here
    tokens.write_text("ops:" + "t" * 32 + "\n")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("ECHO_STREAM_TOKENS", raising=False)
    _expect_built(_built({**args, "tokens_file": str(tokens)}), args)


def test_rayservice_embeds_a_valid_serve_config_with_head_and_gpu_workers(monkeypatch):
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kuberay" / "rayservice.yaml").read_text()))
    svc = next(d for d in docs if d["kind"] == "RayService")
    app = _validate(yaml.safe_load(svc["spec"]["serveConfigV2"]))
    assert app.args["device"] == "cuda"
    cluster = svc["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"          # no stage replica on the head
    (gpu,) = cluster["workerGroupSpecs"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1 and gpu["minReplicas"] >= app.args["ingress_replicas"]
    # proxy_location Disabled: KubeRay's default worker probe would wait for a Serve proxy that never starts
    assert yaml.safe_load(svc["spec"]["serveConfigV2"])["proxy_location"] == "Disabled"
    probe = gpu["template"]["spec"]["containers"][0]["readinessProbe"]
    assert probe["grpc"]["port"] == app.args["port"]              # the ingress's own gRPC health
    lb = next(d for d in docs if d["kind"] == "Service")
    assert lb["spec"]["ports"][0]["targetPort"] == app.args["port"]
    assert lb["spec"]["selector"].items() <= gpu["template"]["metadata"]["labels"].items()
    # it builds with the tokens the pods get from the Secret (no tokens file)
    env = {e["name"] for e in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert "ECHO_STREAM_TOKENS" in env
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setenv("ECHO_STREAM_TOKENS", "ops:" + "t" * 32)
    _expect_built(_built(dict(app.args)), dict(app.args))


def test_build_app_names_bad_arguments():
    from echo_stream.serve.serve_engine import build_app

    for args, says in [({"replicas": "difusion=2"}, "--replicas: unknown stage 'difusion'"),
                       ({"prot": 50051}, "args: not options of echo-stream serve: --prot 50051"),
                       ({"ingress_replicas": 0}, "args.ingress_replicas: must be a whole number >= 1"),
                       ({"host": "0.0.0.0"}, "needs bearer tokens"),
                       ({"autoscale": "diffusion=1:2", "replicas": "diffusion=2"},
                        "--autoscale: diffusion is named in --replicas too"),
                       ({"engine": "actors"}, "args.engine: the Serve application runs the stages on Serve"),
                       ({"port": "fifty"}, "args.port: invalid int value: 'fifty'")]:
        with pytest.raises(InputError) as e:
            build_app(args)
        assert says in str(e.value), (args, str(e.value))


def test_autoscaled_stage_deploys_with_the_sessions_policy():
    """``autoscale: diffusion=1:3`` gives the diffusion deployment Serve's autoscaling on the sessions its replicas
    hold (our policy class, our target and delays); the other stages keep fixed counts."""
    from echo_stream.serve.serve_engine import build_app
    from echo_stream.serve.serve_scaling import SessionsPolicy

    stack, found = [build_app({"autoscale": "diffusion=1:3", "scale_target": 2, "scale_down_delay": 7})], {}
    while stack:
        d = stack.pop()._bound_deployment
        found[d.name] = d._deployment_config.autoscaling_config
        stack += [v for v in d.init_kwargs.values() if hasattr(v, "_bound_deployment")]
    cfg = found["diffusion"]
    assert (cfg.min_replicas, cfg.max_replicas, cfg.initial_replicas, cfg.downscale_delay_s) == (1, 3, 1, 7.0)
    assert cfg.policy.policy_kwargs == {"target": 2.0}
    assert cfg.policy.get_policy() is SessionsPolicy
    assert all(found[s] is None for s in ("decode", "features", "memory", "render"))
    # the policy: ceil(sessions / target), never under MIN
    ctx = type("Ctx", (), {"aggregated_metrics": {"sessions": {"r1": 3.0, "r2": 2.0}},
                           "capacity_adjusted_min_replicas": 1})()
    assert SessionsPolicy(2.0)(ctx)[0] == 3
    ctx.aggregated_metrics = {}
    assert SessionsPolicy(2.0)(ctx)[0] == 1


def test_build_app_waits_for_gpu_nodes_to_join_then_refuses_naming_the_gpus(monkeypatch):
    """On a cluster whose GPU workers join after the head (a RayService, an autoscaled cluster) the build does
    not fail at once; a cluster whose GPUs never come is still refused, naming what was asked for."""
    from echo_stream.serve import serve_engine

    joined = iter([{"GPU": 0.0}, {"GPU": 0.0}, {"GPU": 2.0}])
    monkeypatch.setattr(serve_engine, "GPU_NODES_POLL_S", 0.0)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: next(joined))
    args = {"device": "cuda", "replicas": "diffusion=2,render=2"}
    assert serve_engine.build_app(args) is not None            # built once the two GPUs are there
    monkeypatch.setattr(serve_engine, "GPU_NODES_WAIT_S", 0.0)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"GPU": 1.0})
    with pytest.raises(InputError, match="asks for 2 GPU .* the Ray cluster has 1"):
        serve_engine.build_app(args)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
@pytest.mark.slow
def test_built_app_serves_a_grpc_session_through_its_ingress():
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from ray import serve

    from echo_stream.protos import echo_stream_pb2 as pb
    from echo_stream.serve.client import AvatarClient, Inputs, stream_inputs
    from echo_stream.serve.serve_engine import build_app

    port = _free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             object_store_memory=160 * 1024 * 1024)
    try:
        serve.start(proxy_location="Disabled")
        serve.run(build_app({"port": port, "size": 96}), name="echo-deploy", route_prefix=None)

        async def main():
            async with AvatarClient(f"127.0.0.1:{port}") as c:
                health = await health_pb2_grpc.HealthStub(c.channel).Check(health_pb2.HealthCheckRequest())
                res = await stream_inputs(c, Inputs(mediagen.speech_like(1.2, 16000, seed=5)), output="motion",
                                          realtime=False)
                return health.status, res
        status, res = asyncio.run(main())
        assert status == health_pb2.HealthCheckResponse.SERVING
        assert res.motion_frames == list(range(int(np.ceil(1.2 * config.FPS))))
        assert res.events[-1].kind == pb.Event.ENDED
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
