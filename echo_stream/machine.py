"""What a figure was measured on: the machine and the library versions (benchmark JSON, training summary)."""
from __future__ import annotations

import os
import platform
import socket
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """The machine and the library versions, written into every benchmark's JSON."""
    import av
    import numpy
    import pyarrow
    import torch

    env = {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
           "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
           "torch": torch.__version__, "numpy": numpy.__version__, "pyarrow": pyarrow.__version__,
           "av": av.__version__, "torch_threads": torch.get_num_threads(),
           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import ray
        env["ray"] = ray.__version__
    except ImportError:
        pass
    try:
        import librosa
        env["librosa"] = librosa.__version__
    except ImportError:
        pass
    return env
