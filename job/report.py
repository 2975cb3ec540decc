"""What the job says while it runs.

On a terminal: one live progress line. Anywhere else (batch logs): plain
lines at `train.log_every_steps`. With `--log-format json`: one JSON object
per line, for CloudWatch, Cloud Logging and friends. Every line passes
through common/redact.py: a config's presigned URL and a storage error's
endpoint are credentials.
"""

from __future__ import annotations

import json
import sys
import time

from common.redact import redact


class Console:
    def __init__(self, fmt: str = "text", stream=None):
        self.stream = stream or sys.stdout
        self.json = fmt == "json"
        self.live = not self.json and self.stream.isatty()
        self._open_line = False

    def _emit(self, text: str) -> None:
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        self.stream.write(redact(text) + "\n")
        self.stream.flush()

    def info(self, message: str, **fields) -> None:
        if self.json:
            self._emit(json.dumps({"time": round(time.time(), 3), "event": "info", "message": message, **fields}))
        else:
            self._emit(message)

    def progress(self, *, epoch: int, epochs: int, step_in_epoch: int, steps_per_epoch: int, step: int,
                 loss: float, accuracy: float, images_per_second: float) -> None:
        if self.json:
            self._emit(json.dumps({"time": round(time.time(), 3), "event": "progress", "epoch": epoch, "step": step,
                                   "loss": round(loss, 5), "accuracy": round(accuracy, 5),
                                   "images_per_second": round(images_per_second, 1)}))
            return
        stats = f"loss {loss:.4f}  acc {accuracy:.4f}  {images_per_second:,.0f} img/s"
        if self.live:
            width = 24
            filled = int(width * step_in_epoch / max(steps_per_epoch, 1))
            bar = "#" * filled + "." * (width - filled)
            self.stream.write(f"\repoch {epoch}/{epochs} [{bar}] {step_in_epoch}/{steps_per_epoch}  {stats}")
            self.stream.flush()
            self._open_line = True
        else:
            self._emit(f"epoch {epoch}/{epochs} step {step} ({step_in_epoch}/{steps_per_epoch})  {stats}")

    def epoch_end(self, record: dict) -> None:
        if self.json:
            self._emit(json.dumps({"time": round(time.time(), 3), "event": "epoch", **record}))
        else:
            val = ""
            if record["val_loss"] is not None:
                val = f"  val_loss {record['val_loss']:.4f} val_acc {record['val_accuracy']:.4f}"
            self._emit(
                f"epoch {record['epoch']} done at step {record['step']}: loss {record['loss']:.4f} "
                f"acc {record['accuracy']:.4f}{val}  {record['images_per_second']:,.0f} img/s  "
                f"lr {record['learning_rate']:.3g}")
