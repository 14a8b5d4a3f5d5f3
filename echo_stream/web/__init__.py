"""``echo-stream web``: talk to the avatar from a browser over WebRTC (extra ``[web]``)."""
