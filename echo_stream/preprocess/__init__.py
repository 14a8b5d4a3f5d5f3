"""``echo-stream preprocess``: conversations -> training shards, on Ray Data, resumable and exactly-once.

The per-conversation work is :func:`process_input`, a plain function (decode with PyAV, features with
the *same* code as the serving pipeline: :func:`echo_stream.featurize.featurize_conversation`; motion
targets from a track or a face tracker; quality checks; chunk rows as an Arrow table). It runs

* on Ray Data (``executor="ray"``): a streaming ``from_items -> map_batches(actor pool)`` dataset; the
  pool's actors hold the models (librosa/numba warm-up, the face tracker's models, an optional
  user-supplied face tracker), so those load once per worker; the driver consumes the stream and
  commits shards; or
* in this process (``executor="local"``): the plain sequential loop (``echo-stream shards``, the
  benchmark's baseline).

Exactly-once
------------
The driver is the only writer of ``OUTPUT``. It buffers finished conversations per split; when a
split holds ``shard_size`` chunk rows or more it writes them as one or more shard files (at most
``shard_size`` rows each, a conversation never split across two commits), each atomically
(temporary name + rename), and then appends one line to ``journal.jsonl`` (fsynced) naming the files
and the conversations in them. That line is the commit: on start, shard files the journal does not
name (a crash between rename and journal line) and temporary files are deleted, and a torn last
journal line is cut. Conversations named by the journal are *done* and skipped; results that arrive
twice (a retried Ray task) are dropped by conversation id. So every input ends up exactly once: in
one commit, or quarantined with a reason, whatever was interrupted (Ctrl-C, killed worker, lost
node) and however often the command is re-run. ``dataset.json`` (what ``train`` reads),
``outcomes.jsonl`` and ``dataset_card.md`` are rewritten atomically at the end of each run from the
journal.

See ``docs/preprocess.md`` for the input formats, the output layout and the cluster steps.

Modules
-------
``settings`` (:class:`Settings`, OUTPUT's file names), ``inputs`` (manifest / directory -> items),
``quality`` (the checks that quarantine), ``conversation`` (:func:`process_input`), ``output`` (the
commit protocol), ``runners`` (in-process and Ray Data), ``job`` (:func:`preprocess`), ``report``
(dataset card, summary), ``cli`` (``echo-stream preprocess``). Every public name is importable from
``echo_stream.preprocess``.
"""
from __future__ import annotations

from .cli import EPILOG, add_arguments, run, settings_from_args
from .conversation import process_input
from .inputs import (DUPLICATE_REASON, MANIFEST_NAMES, MEDIA_EXTS, PATH_FIELDS, SPLIT_DIRS, TRACK_EXTS,
                     TRANSCRIPT_EXTS, Item, make_items, read_inputs, scan_directory)
from .job import preprocess, worker_utilisation
from .output import OutputDir
from .quality import check_quality
from .report import dataset_card, summary_table
from .runners import RayOptions, make_tracker, one_thread_per_library, run_local, run_ray
from .settings import CARD, DEFAULT_SHARD_SIZE, JOURNAL, LOCK, OUTCOMES, SETTINGS_JSON, Settings

__all__ = [
    "Settings", "RayOptions", "Item", "OutputDir", "preprocess", "process_input", "check_quality",
    "read_inputs", "scan_directory", "make_items", "make_tracker", "one_thread_per_library", "run_local", "run_ray",
    "worker_utilisation", "dataset_card", "summary_table", "settings_from_args", "add_arguments", "run",
    "EPILOG", "DUPLICATE_REASON", "MANIFEST_NAMES", "MEDIA_EXTS", "PATH_FIELDS", "SPLIT_DIRS", "TRACK_EXTS",
    "TRANSCRIPT_EXTS", "CARD", "DEFAULT_SHARD_SIZE", "JOURNAL", "LOCK", "OUTCOMES", "SETTINGS_JSON",
]
