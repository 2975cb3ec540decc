"""The run's record: `metrics.jsonl` and `curves.png` beside the checkpoints,
and TensorBoard summaries under `tensorboard/`."""

from __future__ import annotations

import io
import json

import tensorflow as tf

from job.checkpoints import CheckpointStore

METRICS, TENSORBOARD = "metrics.jsonl", "tensorboard"


class History:
    """Written through the run's CheckpointStore, behind its commits."""

    def __init__(self, store: CheckpointStore):
        self.store = store
        self.records: list[dict] = []
        self._dir = store.working_dir(TENSORBOARD)
        with store.writing(self._dir):
            self._writer = tf.summary.create_file_writer(str(self._dir))

    def resume(self, step: int) -> None:
        """Keep the epochs a committed checkpoint covers; later lines belong to work being redone."""
        raw = self.store.read(METRICS)
        lines = raw.decode().splitlines() if raw else []
        self.records = [r for r in map(json.loads, filter(None, lines)) if r["step"] <= step]

    def scalars(self, step: int, **values: float) -> None:
        with self.store.writing(self._dir), self._writer.as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(name, value)

    def add_epoch(self, record: dict) -> None:
        self.records.append(record)
        self.scalars(record["step"], **{f"epoch/{k}": v for k, v in record.items()
                                        if k not in ("epoch", "step") and v is not None})
        with self.store.writing(self._dir):
            self._writer.flush()
        body = "".join(json.dumps(r) + "\n" for r in self.records)
        # Queued behind the epoch's checkpoint commit, so storage never shows
        # an epoch in metrics.jsonl that no committed checkpoint covers.
        self.store.write_later(METRICS, body.encode())
        self.store.write_later("curves.png", self._plot())
        self.store.sync_later(TENSORBOARD)

    def _plot(self) -> bytes:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        fig = Figure(figsize=(15, 4))
        # Time to accuracy is what a user of a training job feels, so the
        # third panel puts accuracy against wall-clock minutes. Lines written
        # before runs recorded elapsed time have none and are left out there.
        timed = [r for r in self.records if r.get("elapsed_seconds") is not None]
        panels = [("loss", "epoch", self.records, lambda r: r["epoch"]),
                  ("accuracy", "epoch", self.records, lambda r: r["epoch"]),
                  ("accuracy", "training time (minutes)", timed, lambda r: r["elapsed_seconds"] / 60)]
        for ax, (metric, xlabel, rows, x) in zip(fig.subplots(1, 3), panels, strict=True):
            xs = [x(r) for r in rows]
            ax.plot(xs, [r[metric] for r in rows], "o-", label="train")
            val = [r[f"val_{metric}"] for r in rows]
            if all(v is not None for v in val):
                ax.plot(xs, val, "o-", label="validation")
            ax.set_xlabel(xlabel)
            ax.set_title(metric)
            ax.grid(alpha=0.3)
            ax.legend()
        out = io.BytesIO()
        fig.savefig(out, format="png", dpi=80, bbox_inches="tight")
        return out.getvalue()
