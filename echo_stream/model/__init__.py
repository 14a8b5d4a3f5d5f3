"""The ECHO model: encoders, LCU context memory, SDCM denoiser, streaming sampler, checkpoints.

Public API (what the pipeline stages, ``train`` and ``eval`` use)::

    from echo_stream.model import EchoModel, load_checkpoint, save_checkpoint, load_default_model
    model = load_default_model()               # shipped checkpoint, or seeded random init + WARNING
    mem = model.memory_init(B)
    mem = model.memory_update(mem, avatar_audio, user_audio, user_video, user_blend, user_present, text_emb)
    new = model.sample(prev_motion, avatar_audio, user_audio, user_video, user_blend, user_present,
                       mem, seeds=[window_seed(session_seed, i), ...])

See ``echo.py`` for shapes, ``denoiser.py`` for the SDCM token layout, ``lcu.py`` for
the memory and its serialisation, ``sampler.py`` for the few-step schedule.
"""
from .checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    default_checkpoint_path,
    load_checkpoint,
    load_default_model,
    read_checkpoint_config,
    save_checkpoint,
)
from .denoiser import SDCMCrossAttention, SDCMDenoiser, TokenLayout
from .echo import EchoModel, validate_config
from .encoders import AudioEncoder, HashedTranscriptEncoder, TranscriptEncoder, UserEncoder
from .lcu import ContextMemory, MemoryState, MemoryStateError
from .sampler import flow_schedule, make_noise, sample_window, window_seed

__all__ = [
    "AudioEncoder", "CONFIG_NAME", "ContextMemory", "EchoModel", "HashedTranscriptEncoder", "MemoryState",
    "MemoryStateError", "SDCMCrossAttention", "SDCMDenoiser", "TokenLayout", "TranscriptEncoder", "UserEncoder",
    "WEIGHTS_NAME", "default_checkpoint_path", "flow_schedule", "load_checkpoint", "load_default_model",
    "make_noise", "read_checkpoint_config", "sample_window", "save_checkpoint", "validate_config", "window_seed",
]
