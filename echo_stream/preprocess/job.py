"""The job: :func:`preprocess` runs the pending inputs, commits shards as they fill, quarantines bad
inputs, retries a failed Ray pass, and writes ``dataset.json``, ``outcomes.jsonl`` and the dataset card."""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Sequence

from .. import atomic, shards
from ..errors import EchoStreamError, InputError
from .inputs import DUPLICATE_REASON, Item, make_items, read_inputs
from .output import OutputDir
from .report import dataset_card
from .runners import RayOptions, _ensure_ray, run_local, run_ray
from .settings import CARD, DEFAULT_SHARD_SIZE, OUTCOMES, Settings

#: set by the CLI's SIGINT handler: a Ctrl-C that Ray turns into another error must still stop the run
_interrupted = threading.Event()

log = logging.getLogger(__name__)


class _Progress:
    """tqdm bar over the pending inputs: files/s, ETA, media hours per wall-clock hour, quarantined count."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        self.t0 = time.perf_counter()
        self.media_s = 0.0
        self.quarantined = 0
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc="preprocess", unit="conv", dynamic_ncols=True)

    def update(self, r: dict) -> None:
        self.media_s += r.get("media_s") or 0.0
        self.quarantined += r["status"] == "quarantined"
        if self.bar is not None:
            wall = max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{self.media_s / wall:.1f} media-h/h, quarantined {self.quarantined}",
                                     refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def preprocess(inputs: str | os.PathLike | Sequence[dict], output: str | os.PathLike, *,
               root: str | os.PathLike | None = None, settings: Settings | None = None,
               shard_size: int = DEFAULT_SHARD_SIZE, executor: str = "ray", ray_options: RayOptions | None = None,
               progress: bool = True, fresh: bool = False, retry_quarantined: bool = False,
               on_error: str = "quarantine", max_passes: int = 3, limit: int | None = None) -> dict:
    """Preprocess ``inputs`` into OUTPUT; returns the run summary (``dataset.json`` content + ``run``).

    ``inputs``: manifest path / directory (see :func:`read_inputs`) or rows (then ``root`` is needed).
    ``on_error="raise"`` stops at the first bad conversation instead of quarantining it (nothing of
    it is written). ``limit`` processes at most that many pending inputs (then stops, resumable; for
    tests and trials). ``max_passes``: when workers die and a Ray pass fails, the inputs not yet
    accounted for are run again, up to this many passes.
    """
    settings = settings or Settings()
    settings.check()
    if shard_size < 1:
        raise InputError("--shard-size", f"must be >= 1, got {shard_size}")
    if executor not in ("ray", "local"):
        raise ValueError(f"executor must be 'ray' or 'local', got {executor!r}")
    if on_error not in ("quarantine", "raise"):
        raise ValueError(f"on_error must be 'quarantine' or 'raise', got {on_error!r}")
    t_start = time.perf_counter()
    if isinstance(inputs, (str, os.PathLike)):
        rows, mroot = read_inputs(inputs)
        root = root if root is not None else mroot
        source = str(inputs)
    else:
        rows = list(inputs)
        if root is None:
            raise ValueError("root: needed when the inputs are given as rows")
        source = "<rows>"
    items, dups = make_items(rows, root)
    if dups and on_error == "raise":
        raise InputError(dups[0][1], DUPLICATE_REASON)
    for _, cid in dups:
        log.warning("%s: %s", cid, DUPLICATE_REASON)
    out = OutputDir(output)
    outcome: dict[str, dict] = {}
    try:
        out.open(settings, fresh=fresh)
        pending = []
        for it in items:
            d = out.done.get(it.conversation_id)
            q = out.quarantined.get(it.conversation_id)
            if d is not None:
                if d.get("row_hash") != it.row_hash:
                    raise InputError(it.conversation_id, f"its manifest row changed since it was preprocessed into "
                                                         f"{output}: use another OUTPUT or --fresh")
                outcome[it.conversation_id] = {"status": "skipped", "reason": "already done", "split": d["split"],
                                               "shards": d.get("files") or _files_of(out, it.conversation_id)}
            elif q is not None and not retry_quarantined and q.get("row_hash") == it.row_hash:
                outcome[it.conversation_id] = {"status": "quarantined", "reason": q["reason"], "earlier_run": True}
            else:
                if q is not None:
                    out.forget_quarantine(it.conversation_id)
                pending.append(it)
        if limit is not None:
            pending = pending[:max(0, int(limit))]
        bar = _Progress(len(pending), progress)
        stats = {"passes": 0, "pass_errors": [], "media_s": 0.0, "done": 0, "quarantined": 0, "duplicates": 0,
                 "nodes": {}, "featurise_s": 0.0, "first_result_s": None, "busy": []}
        buffers: dict[str, list[dict]] = {}
        started_ray = False
        t_proc = None
        try:
            todo = list(pending)
            while todo and stats["passes"] < max_passes:
                stats["passes"] += 1
                try:
                    if executor == "ray":
                        started_ray = _ensure_ray(ray_options or RayOptions()) or started_ray
                        t_proc = t_proc or time.perf_counter()
                        stream = run_ray(todo, settings, ray_options or RayOptions())
                    else:
                        t_proc = t_proc or time.perf_counter()
                        stream = run_local(todo, settings)
                    for r in stream:
                        if _interrupted.is_set():  # Ctrl-C that Ray's threads swallowed: stop before committing more
                            raise KeyboardInterrupt
                        cid = r["conversation_id"]
                        if stats["first_result_s"] is None:
                            stats["first_result_s"] = time.perf_counter() - t_proc
                        stats["featurise_s"] += r.get("elapsed_s") or 0.0
                        if r.get("busy"):
                            stats["busy"].append(r["busy"])
                        if cid in outcome:        # a result delivered twice (retried task): drop it
                            stats["duplicates"] += 1
                            continue
                        if r["status"] == "done":
                            buf = buffers.setdefault(r["split"], [])
                            buf.append(r)
                            outcome[cid] = {"status": "done", "split": r["split"], "media_s": r["media_s"]}
                            stats["done"] += 1
                            stats["media_s"] += r["media_s"]
                            if sum(x["chunks"] for x in buf) >= shard_size:
                                _flush(out, outcome, r["split"], buf, shard_size)
                        else:
                            if on_error == "raise":
                                what, _, problem = r["reason"].partition(": ")
                                raise InputError(what, problem or r["reason"])
                            out.quarantine(cid, r["reason"], r["row_hash"])
                            outcome[cid] = {"status": "quarantined", "reason": r["reason"]}
                            stats["quarantined"] += 1
                        if r.get("node"):
                            stats["nodes"][r["node"]] = stats["nodes"].get(r["node"], 0) + 1
                        bar.update(r)
                except (EchoStreamError, KeyboardInterrupt):
                    raise
                except Exception as e:  # a failed Ray pass (lost node, dead actors): keep what is done, go again
                    if executor != "ray":
                        raise
                    if _interrupted.is_set():  # Ctrl-C surfaced as Ray's own error: stop, do not retry
                        raise KeyboardInterrupt from e
                    log.warning("preprocess pass %d failed (%s: %s); resuming the %d inputs not yet accounted for",
                                stats["passes"], type(e).__name__, str(e).splitlines()[0] if str(e) else "",
                                len([i for i in todo if i.conversation_id not in outcome]))
                    stats["pass_errors"].append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                todo = [i for i in todo if i.conversation_id not in outcome]
            for split, buf in buffers.items():
                if buf:
                    _flush(out, outcome, split, buf, shard_size)
            for it in todo:
                reason = (f"{it.conversation_id}: not processed after {stats['passes']} passes "
                          f"(worker failures: {'; '.join(stats['pass_errors'][-1:])})")
                out.quarantine(it.conversation_id, reason, it.row_hash)
                outcome[it.conversation_id] = {"status": "quarantined", "reason": reason}
                stats["quarantined"] += 1
        finally:
            bar.close()
            if started_ray:
                import ray
                ray.shutdown()
        not_run = [it for it in items if it.conversation_id not in outcome]  # beyond --limit
        seconds = time.perf_counter() - t_start
        _write_outcomes(out, items, dups, outcome)
        if not out.commits and not not_run:
            raise InputError(source, "no usable conversations: nothing to write"
                                     + (f" ({len(out.quarantined)} quarantined, see {Path(output) / OUTCOMES})"
                                        if out.quarantined else ""))
        info = out.dataset_info(settings, shard_size, source, seconds)
        if not not_run:
            atomic.write_text(out.path / shards.DATASET_JSON, json.dumps(info, indent=1) + "\n")
            atomic.write_text(out.path / CARD, dataset_card(info))
        info["run"] = {
            "inputs": len(items), "done": stats["done"], "quarantined_now": stats["quarantined"],
            "skipped": sum(1 for o in outcome.values() if o["status"] == "skipped"),
            "quarantined_before": sum(1 for o in outcome.values() if o.get("earlier_run")),
            "not_run": len(not_run), "complete": not not_run, "duplicate_rows": len(dups),
            "media_s": stats["media_s"], "wall_s": seconds,
            "processing_s": time.perf_counter() - (t_proc or t_start), "passes": stats["passes"],
            "pass_errors": stats["pass_errors"], "duplicates_dropped": stats["duplicates"],
            "executor": executor, "results_per_node": stats["nodes"],
            "featurise_s": stats["featurise_s"], "first_result_s": stats["first_result_s"],
            "workers": worker_utilisation(stats["busy"]),
        }
        return info
    finally:
        out.close()


def worker_utilisation(busy: Sequence[Sequence]) -> dict | None:
    """How busy the featuriser workers were, from their ``(worker, start, end)`` intervals (Ray runs only):
    ``utilisation`` = busy time / (workers x the span from the first start to the last end), and the mean
    idle gap between one conversation and the next on the same worker."""
    if not busy:
        return None
    per: dict[str, list[tuple[float, float]]] = {}
    for w, a, b in busy:
        per.setdefault(w, []).append((a, b))
    span = max(b for _, _, b in busy) - min(a for _, a, _ in busy)
    gaps = [max(0.0, iv[k + 1][0] - iv[k][1]) for iv in map(sorted, per.values()) for k in range(len(iv) - 1)]
    total = sum(b - a for _, a, b in busy)
    return {"workers": len(per), "span_s": round(span, 2), "busy_s": round(total, 2),
            "utilisation": round(total / max(len(per) * span, 1e-9), 3),
            "mean_gap_s": round(sum(gaps) / len(gaps), 3) if gaps else None}


def _flush(out: OutputDir, outcome: dict, split: str, buf: list[dict], shard_size: int) -> None:
    files = out.commit(split, buf, shard_size)
    for r in buf:
        outcome[r["conversation_id"]]["shards"] = files
    buf.clear()


def _files_of(out: OutputDir, cid: str) -> list[str]:
    for e in out.commits:
        if any(c["conversation_id"] == cid for c in e["conversations"]):
            return [f["file"] for f in e["files"]]
    return []


def _write_outcomes(out: OutputDir, items: Sequence[Item], dups: Sequence[tuple[int, str]], outcome: dict) -> None:
    lines = []
    order = list(items)
    for i, cid in dups:  # back in manifest order
        order.insert(i, cid)
    for it in order:
        if isinstance(it, str):
            lines.append(json.dumps({"conversation_id": it, "status": "quarantined", "reason": DUPLICATE_REASON,
                                     "duplicate_row": True}))
            continue
        o = outcome.get(it.conversation_id, {"status": "not_run", "reason": "beyond --limit; re-run to process"})
        rec = {"conversation_id": it.conversation_id, "status": o["status"]}
        if o.get("reason") and o["status"] != "done":
            rec["reason"] = o["reason"]
        if o.get("shards"):
            rec["shards"] = o["shards"]
        if o.get("earlier_run"):
            rec["earlier_run"] = True
        lines.append(json.dumps(rec))
    atomic.write_text(out.path / OUTCOMES, "\n".join(lines) + "\n")
