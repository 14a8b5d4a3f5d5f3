"""One conversation: :func:`process_input` featurises it into shard rows, or says why it is quarantined."""
from __future__ import annotations

import logging
import time

import numpy as np

from .. import shards
from ..errors import InputError
from ..featurize import featurize_conversation
from .inputs import Item
from .quality import check_quality
from .settings import Settings

log = logging.getLogger(__name__)


def _moments(x: np.ndarray) -> list:
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1] if x.ndim > 1 else 1)
    return [int(x.shape[0]), x.sum(0).tolist(), (x * x).sum(0).tolist()]


def process_input(item: Item, settings: Settings, tracker=None) -> dict:
    """Featurise one conversation into its shard rows, or say why it is quarantined. Never raises for bad input.

    Returns ``{"conversation_id", "row_hash", "status": "done"|"quarantined", "reason", "split", "frames",
    "media_s", "chunks", "table": pyarrow.Table (done only), "moments": {"motion", "audio"}, "elapsed_s"}``.
    """
    t0 = time.perf_counter()
    row = item.row
    out = {"conversation_id": item.conversation_id, "row_hash": item.row_hash, "status": "quarantined",
           "reason": item.problem, "split": str(row.get("split") or "train"), "frames": 0, "media_s": 0.0,
           "chunks": 0, "table": None, "moments": None}
    if item.problem is None:
        try:
            feats = featurize_conversation(row, item.root, tracker=tracker, livelink_fps=settings.livelink_fps)
            check_quality(row, feats, settings)
            rows = shards.chunk_rows(row, feats, out["split"], settings.chunk_frames)
            out["table"] = shards.rows_to_table(rows)
            audio = [feats["avatar_audio"]] + ([feats["user_audio"]] if feats["has_user_audio"] else [])
            out["moments"] = {"motion": _moments(feats["motion"]),
                              "audio": _moments(np.concatenate([a.reshape(-1, a.shape[-1]) for a in audio]))}
            out.update(status="done", reason=None, frames=int(feats["frames"]), media_s=feats["media"]["avatar_s"],
                       chunks=len(rows))
        except InputError as e:
            out["reason"] = str(e)
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as e:  # a decoder/library failure on a weird file must not stop the job
            log.warning("%s: unexpected %s", item.conversation_id, type(e).__name__, exc_info=True)
            out["reason"] = f"{item.conversation_id}: unexpected error {type(e).__name__}: {e}"
    out["elapsed_s"] = time.perf_counter() - t0
    return out
