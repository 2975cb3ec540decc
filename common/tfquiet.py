"""Loading TensorFlow without its start-up lines."""

from __future__ import annotations

import os
import sys
import tempfile


def import_tensorflow_quietly() -> None:
    """TensorFlow's C++ side writes its start-up lines (CUDA probes that read
    as failures on a CPU-only host, oneDNN notices) straight to file
    descriptor 2, before any log level applies; so stderr is parked in a file
    while TensorFlow loads and finds its devices, and shown only if that fails.
    Warnings after start-up are left to TF_CPP_MIN_LOG_LEVEL, set here to 2
    unless the caller chose."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as parked:
        os.dup2(parked.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
        except BaseException:
            os.dup2(saved, 2)
            parked.seek(0)
            sys.stderr.buffer.write(parked.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
