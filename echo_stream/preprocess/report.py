"""What a run reports: the dataset card (``dataset_card.md``) and the summary printed at the end."""
from __future__ import annotations

import numpy as np

from .. import motion


def dataset_card(info: dict) -> str:
    """A human-readable dataset card: counts, hours, feature statistics, quarantine list."""
    t = info["total"]
    lines = [
        "# Dataset card (echo-stream training shards)", "",
        f"Written by echo-stream {info['code_version']} `preprocess` from `{info['source']}`; shard format "
        f"`{info['format']}` schema version {info['schema_version']} (see docs/preprocess.md).", "",
        "## Counts", "",
        "| split | conversations | chunks (rows) | frames (25 fps) | hours |", "|---|---:|---:|---:|---:|",
    ]
    for split, c in sorted(info["splits"].items()):
        lines.append(f"| {split} | {c['conversations']} | {c['chunks']} | {c['frames']} | {c['hours']:.3f} |")
    lines += [f"| **total** | {t['conversations']} | {t['chunks']} | {t['frames']} | {t['hours']:.3f} |", "",
              f"{len(info['shards'])} shard files; {len(info['quarantined'])} inputs quarantined.", "",
              f"## Feature statistics (split `{info['stats']['split']}`, {info['stats']['frames']} frames)", "",
              "Motion targets, the 10 channels with the largest standard deviation:", "",
              "| channel | mean | std |", "|---|---:|---:|"]
    st = info["stats"]
    order = np.argsort(st["motion_std"])[::-1][:10]
    for i in order:
        lines.append(f"| {motion.CHANNELS[i]} | {st['motion_mean'][i]:.4f} | {st['motion_std'][i]:.4f} |")
    lines += ["", "Audio features (avatar and user audio), summary over the 83 features:", "",
              "| | min | median | max |", "|---|---:|---:|---:|"]
    for key in ("audio_mean", "audio_std"):
        a = np.asarray(st[key])
        lines.append(f"| {key.split('_')[1]} | {a.min():.3f} | {np.median(a):.3f} | {a.max():.3f} |")
    if info["quarantined"]:
        lines += ["", "## Quarantined inputs", "", "| conversation | reason |", "|---|---|"]
        for q in info["quarantined"]:
            lines.append(f"| {q['conversation_id']} | {q['reason'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def summary_table(info: dict) -> str:
    """The final summary printed after a run."""
    r = info["run"]
    wall = max(r["wall_s"], 1e-9)
    rows = [
        ("inputs", f"{r['inputs']}"),
        ("done this run", f"{r['done']}  ({r['media_s'] / 3600:.3f} h of media)"),
        ("skipped (done before)", f"{r['skipped']}"),
        ("quarantined", f"{r['quarantined_now']} this run, {r['quarantined_before']} from earlier runs"),
    ]
    if r["duplicate_rows"]:
        rows.append(("duplicate rows", f"{r['duplicate_rows']} (a conversation_id repeated; ignored)"))
    if r["not_run"]:
        rows.append(("not run (--limit)", f"{r['not_run']}: re-run the same command to continue"))
    rows += [
        ("wall time", f"{r['wall_s']:.1f} s  ({r['executor']}, {r['passes']} pass(es))"),
        ("throughput", f"{r['media_s'] / wall:.1f} media-h/h, {r['done'] / wall:.3f} files/s"),
        ("dataset", f"{info['total']['conversations']} conversations, {info['total']['hours']:.3f} h, "
                    f"{len(info['shards'])} shards"),
    ]
    if r["pass_errors"]:
        rows.append(("recovered from", "; ".join(r["pass_errors"])[:200]))
    w = max(len(k) for k, _ in rows)
    out = ["", "preprocess summary", "-" * (w + 40)] + [f"{k:<{w}}  {v}" for k, v in rows]
    if info["quarantined"]:
        out += ["", "quarantined (reason):"] + [f"  {q['conversation_id']}: {q['reason']}"
                                                for q in info["quarantined"][:20]]
        if len(info["quarantined"]) > 20:
            out.append(f"  ... and {len(info['quarantined']) - 20} more in outcomes.jsonl")
    return "\n".join(out)
