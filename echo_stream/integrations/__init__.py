"""Adapters that put an echo-stream avatar into voice-agent frameworks.

* :mod:`echo_stream.integrations.pipecat` — a Pipecat frame processor (extra ``[pipecat]``);
* :mod:`echo_stream.integrations.livekit` — a LiveKit Agents ``VideoGenerator`` (extra ``[livekit]``).

Both drive a :class:`echo_stream.live.LiveAvatar` (one ``echo-stream serve`` session).
"""
