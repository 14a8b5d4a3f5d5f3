"""A two-node Ray cluster on one machine (ray.cluster_utils.Cluster): a worker node is removed while
`preprocess` runs, and the job still completes with every input exactly once."""
import os
import threading
import time
from pathlib import Path

import pytest

from echo_stream import preprocess
from echo_stream.dataset import read_dataset_info, read_shard

from .preprocess_helpers import write_conversation

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = str(Path(__file__).resolve().parents[1])


def _committed_ids(out: Path) -> list[str]:
    ids = []
    for s in read_dataset_info(out)["shards"]:
        t = read_shard(out / s["file"])
        ids += [c for c, i in zip(t.column("conversation_id").to_pylist(), t.column("chunk_index").to_pylist())
                if i == 0]
    return ids


def test_worker_node_removed_mid_job_completes_exactly_once(tmp_path, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    rows = [write_conversation(tmp_path / "in" / f"c{k:02d}", k, 1.6 + 0.1 * (k % 3), user="video")
            for k in range(10)]
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=2)
    try:
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        cluster.wait_for_nodes()
        assert ray.cluster_resources()["CPU"] == 3
        out = tmp_path / "out"
        result = {}

        def job():
            try:
                result["info"] = preprocess.preprocess(rows, out, root=tmp_path / "in", shard_size=1, progress=False,
                                                       executor="ray")
            except BaseException as e:  # noqa: BLE001 - reported by the assertion below
                result["error"] = e

        th = threading.Thread(target=job)
        th.start()
        journal = out / "journal.jsonl"
        deadline = time.time() + 240
        while time.time() < deadline and th.is_alive():
            if journal.is_file() and journal.read_text().count('"commit"') >= 2:
                break
            time.sleep(0.2)
        assert th.is_alive(), "the job ended before the node could be removed (too fast to test)"
        cluster.remove_node(worker)
        th.join(timeout=400)
        assert not th.is_alive(), "preprocess did not finish after the worker node was removed"
        assert "error" not in result, result.get("error")
        info = result["info"]
        run = info["run"]
        assert run["done"] == len(rows) and run["quarantined_now"] == 0, run
        assert run["results_per_node"].get(worker.node_id, 0) >= 1, run  # the removed node did part of the work
        ids = _committed_ids(out)
        assert sorted(ids) == sorted(r["conversation_id"] for r in rows)  # none missing, none twice
        assert len(ray.nodes()) >= 1 and len([n for n in ray.nodes() if n["Alive"]]) == 1
    finally:
        ray.shutdown()
        cluster.shutdown()
