"""echo-stream: streaming interactive head generation (ECHO)."""
__version__ = "0.1.0"
