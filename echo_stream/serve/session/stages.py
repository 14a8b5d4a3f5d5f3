"""The session's link to the shared stage pipeline: its replicas, its epoch's state id, opening and closing.

:class:`StageLink` owns

* ``route`` — this session's replica of each stage (session affinity, from the backend's
  :class:`~echo_stream.serve.routing.Router`; it changes only when a replica is lost and
  ``backend.wait_ready`` moves the session to one that answers); every call goes to it (:meth:`call`) and
  the session's windows go to that diffusion replica's batcher (:attr:`batcher`);
* ``epoch`` / ``iid`` — stage state lives under ``<session id>/<epoch>`` (``<session id>.<generation>/<epoch>``
  for a session resumed on a new stream: its earlier streams' state, if a lost ingress left any, is not touched); :meth:`new_epoch` switches to the
  next one and closes the old one's state in every stage, :meth:`open_epoch` prepares it there (from a
  :class:`~.ledger.Restore` after an interrupt or a fault);
* ``incarnations`` — which process of each stage replica holds the epoch's state (a restarted one
  does not);
* :meth:`discard` — fetching results nobody will use, so that Ray does not log them.
"""
from __future__ import annotations

import asyncio

from ...pipeline import BATCHED, STAGES
from .failures import failure_from
from .ledger import Restore


def portrait_key(spec) -> str | None:
    """What identifies a video session's portrait for the render replicas' caches (None: no portrait)."""
    if not spec.wants_video or spec.portrait is None:
        return None
    p = spec.portrait
    if isinstance(p, (bytes, bytearray)):
        import hashlib
        return hashlib.sha1(p).hexdigest()
    return getattr(p, "digest", None) or str(p)


class StageLink:
    def __init__(self, session_id: str, spec, backend, batchers, redact: dict[str, str], generation: int = 0):
        self.session_id = session_id
        self._prefix = f"{session_id}.{generation}" if generation else session_id
        self.spec = spec
        self.backend = backend
        #: the batcher of each diffusion replica (a single batcher: replica 0's); the server's own list, which
        #: grows and shrinks with autoscaling
        self.batchers = batchers if isinstance(batchers, list) else list(batchers) if isinstance(batchers, tuple) \
            else [batchers]
        self.route = backend.assign(session_id, warm={"render": portrait_key(spec)})
        self.epoch = 0
        self.iid = self.iid_of(0)
        self.incarnations: dict = {}
        self._redact = redact
        self._portrait_ref = None
        self._released = False

    @property
    def batcher(self):
        """The batcher of the diffusion replica that holds this session's state."""
        return self.batchers[self.route[BATCHED] % len(self.batchers)]

    def call(self, stage: str, method: str, *args, num_returns: int = 1, iid: str | None = None):
        """``backend.call`` on this session's replica of ``stage`` (every call of the session goes through here),
        ordered with the epoch's other calls there (on Serve: the stream of the epoch ``iid``, default the
        current one: a new epoch — a recovery — starts new streams, so a call of a failed epoch that never
        reached its replica cannot hold the new epoch's calls back)."""
        return self.backend.call(stage, method, *args, num_returns=num_returns, replica=self.route[stage],
                                 session=iid or self.iid)

    def iid_of(self, epoch: int) -> str:
        """The stages' id of epoch ``epoch`` of this session."""
        return f"{self._prefix}/{epoch}"

    def _close_state(self, iid: str) -> None:
        for stage in STAGES:                         # after the epoch's queued calls (its stream's order)
            try:
                self.call(stage, "close_session", iid, iid=iid)
            except Exception:  # noqa: BLE001
                pass

    def new_epoch(self) -> None:
        """Switch to the next epoch; the old one's state is closed in every stage."""
        old = self.iid
        self.epoch += 1
        self.iid = self.iid_of(self.epoch)
        self._close_state(old)
        end = getattr(self.backend, "end_stream", None)
        if end is not None:                          # (Serve) the old epoch's streams end after its close
            end(old)

    async def open_epoch(self, stride: int, restore: Restore | None) -> None:
        """Prepare every stage for the current epoch (``restore``: the state it continues from). A stage
        fault is raised as it is; anything else as :class:`~.failures.SessionFailed`."""
        b, iid, call = self.backend, self.iid, self.call
        hs = [call("memory", "set_stride", iid, stride),        # before import_state: same actor, in order
              call("decode", "open_stream", iid), call("diffusion", "set_seed", iid, self.spec.seed)]
        if restore is not None:
            if restore.checkpoint is not None:
                hs.append(call("memory", "import_state", iid, restore.checkpoint))
            if restore.prev_motion is not None:
                hs.append(call("diffusion", "import_state", iid, {"prev": restore.prev_motion}))
        if self.spec.wants_video:
            if self._portrait_ref is None:         # stored once (an edge-decoded image is up to 12 MB), not per epoch
                self._portrait_ref = b.put(self.spec.portrait)
            hs.append(call("render", "open_session", iid, self._portrait_ref, (self.spec.width, self.spec.height)))
        for h in hs:
            try:
                await b.get(h)
            except Exception as e:
                if b.is_fault(e):
                    raise
                raise failure_from(e, "session open", self._redact) from None
        # which process of each stage holds this epoch's state (asked after the opens: same actor order)
        self.incarnations = await b.incarnations(route=self.route)

    def close(self) -> None:
        """Drop the session's state in every stage and give its replicas back (best effort, once)."""
        self._close_state(self.iid)
        if not self._released:
            self._released = True
            self.backend.release(self.route, self.iid)

    def discard(self, handles) -> None:
        """Fetch results nobody will use, quietly, in the background: Ray logs every failed result that is never
        fetched ("Unhandled error", with its traceback), and the chains of a session that failed on its input
        (or was interrupted) would otherwise fill the server's log with the client's mistake."""
        handles = [h for h in handles if h is not None]
        if not handles:
            return

        async def fetch():
            for h in handles:
                try:
                    await asyncio.wait_for(self.backend.get(h), 120)
                except (Exception, asyncio.CancelledError):  # noqa: BLE001 - consuming the error is the point
                    pass                                     # (a cancelled handle raises CancelledError)
        asyncio.get_running_loop().create_task(fetch(), name=f"discard-{self.session_id[:8]}")
