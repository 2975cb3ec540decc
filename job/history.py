"""The run's record: `metrics.jsonl` and `curves.png` beside the checkpoints,
and TensorBoard summaries under `tensorboard/`."""

from __future__ import annotations

import io
import json

import tensorflow as tf

from job import storage


class History:
    def __init__(self, checkpoint_uri: str, uploader):
        self.uri = checkpoint_uri
        self.uploader = uploader
        self.backend = storage.backend(checkpoint_uri)
        self.records: list[dict] = []
        tb_uri = storage.join(checkpoint_uri, "tensorboard")
        self._tb_uri = tb_uri
        self._writer = tf.summary.create_file_writer(str(self.backend.working_dir(tb_uri)))

    def resume(self, step: int) -> None:
        """Keep the epochs a committed checkpoint covers; later lines belong to work being redone."""
        raw = self.backend.read_bytes(storage.join(self.uri, "metrics.jsonl"))
        lines = raw.decode().splitlines() if raw else []
        self.records = [r for r in map(json.loads, filter(None, lines)) if r["step"] <= step]

    def scalars(self, step: int, **values: float) -> None:
        with self._writer.as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(name, value)

    def add_epoch(self, record: dict) -> None:
        self.records.append(record)
        self.scalars(record["step"], **{f"epoch/{k}": v for k, v in record.items()
                                        if k not in ("epoch", "step") and v is not None})
        self._writer.flush()
        body = "".join(json.dumps(r) + "\n" for r in self.records)
        # Queued behind the epoch's checkpoint commit, so storage never shows
        # an epoch in metrics.jsonl that no committed checkpoint covers.
        self.uploader.submit(self.backend.write_bytes, storage.join(self.uri, "metrics.jsonl"), body.encode())
        self.uploader.submit(self.backend.write_bytes, storage.join(self.uri, "curves.png"), self._plot())
        self.uploader.submit(self.backend.sync, self._tb_uri)

    def _plot(self) -> bytes:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        epochs = [r["epoch"] for r in self.records]
        fig = Figure(figsize=(10, 4))
        for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy"), strict=True):
            ax.plot(epochs, [r[metric] for r in self.records], "o-", label="train")
            val = [r[f"val_{metric}"] for r in self.records]
            if all(v is not None for v in val):
                ax.plot(epochs, val, "o-", label="validation")
            ax.set_xlabel("epoch")
            ax.set_title(metric)
            ax.grid(alpha=0.3)
            ax.legend()
        out = io.BytesIO()
        fig.savefig(out, format="png", dpi=80, bbox_inches="tight")
        return out.getvalue()
