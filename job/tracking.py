"""MLflow tracking, off unless `tracking.mlflow_uri` or MLFLOW_TRACKING_URI names a server.

One run of the job is one MLflow run, however often it is killed and resumed:
the MLflow run's id travels in latest.json (`tracking`), and before the first
id is known, a key of the job's own (tag `cifar.run_key`, in latest.json from
the first commit on) finds the MLflow run an earlier attempt created.

No step is logged twice, and none goes missing: an epoch is handed to the
tracker only once the checkpoint covering it has committed (the epochs after
it are redone by a resume, and would be logged again); each attempt first
reads which steps the MLflow run holds, logs the committed epochs it lacks
(from metrics.jsonl) and never logs one it has. MLflow's metrics are
append-only, so a step sent twice would be two points.

Every call runs on one background thread, in order, each retried with backoff
until it lands: a tracking server that is down or refuses delays tracking and
is reported in one line, and never fails or slows training. At exit the job
waits `tracking.exit_seconds` for what is still queued, then gives up in one line.
"""

from __future__ import annotations

import json
import os
import queue
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

from common.redact import redact, redact_data
from job.config import Config
from job.errors import ConfigError

TAG_RUN_KEY = "cifar.run_key"
STEP_KEY = "epoch"  # logged with every epoch: which steps the MLflow run holds
QUEUE_SIZE = 1000
BACKOFF_SECONDS = (0.5, 10.0)  # first wait between attempts, and the most


def tracking_uri(cfg: Config, environ: Mapping[str, str] = os.environ) -> str | None:
    """The MLflow server this run reports to: the config's, else MLFLOW_TRACKING_URI; None for no tracking."""
    return cfg.tracking.mlflow_uri or environ.get("MLFLOW_TRACKING_URI") or None


def flatten(tree: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested mappings as dotted keys with text values (lists as JSON): MLflow's params and tags."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value if isinstance(value, str) else json.dumps(value)
    return flat


def clipped(values: Mapping[str, str], limit: int) -> dict[str, str]:
    """Each value redacted and cut to MLflow's `limit` characters (a longer one is refused, whole batch and all)."""
    out = {}
    for key, value in values.items():
        value = redact(value)
        out[key] = value if len(value) <= limit else value[:limit - 3] + "..."
    return out


def params(cfg: Config) -> dict[str, str]:
    """The resolved config as dotted keys, redacted: a presigned data.uri is a credential."""
    return flatten(redact_data(cfg.model_dump(mode="json")))


def lineage_tags(lineage: Mapping) -> dict[str, str]:
    """A model card's lineage (whatever fields it has) as `lineage.`-prefixed tags."""
    return flatten(redact_data(dict(lineage)), "lineage.")


def epoch_metrics(record: Mapping) -> dict[str, float]:
    """What metrics.jsonl holds for an epoch, as MLflow metrics at its step."""
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}


def run_fields(latest: dict | None, restarted: bool) -> dict:
    """latest.json's `tracking` for this attempt: the run's own, or, for a new run or one restarted from a
    chosen checkpoint (another MLflow run: its metrics from there on differ), a new key."""
    kept = (latest or {}).get("tracking")
    if kept and not restarted:
        return dict(kept)
    return {"run_key": uuid.uuid4().hex}


class Tracker:
    """The MLflow run of one attempt, fed from the training thread, sent from a worker thread."""

    def __init__(self, uri: str, experiment: str, fields: dict, say: Callable[[str], None],
                 exit_seconds: float):
        # The worker retries with its own backoff; the client's (7 retries, 120 s timeouts) would hold
        # the queue for minutes per call.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        # Its own "View run ... at" lines go to stdout unredacted; the job says where in one line of its own.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        try:  # only where tracking is on: the client is an extra, of the training image
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError(f"tracking is on ({redact(uri)}) but the mlflow client is not installed: "
                              f"pip install 'cifar10-pipeline[tracking]', or unset MLFLOW_TRACKING_URI and "
                              f"tracking.mlflow_uri") from None

        self.uri, self.experiment, self.say, self.exit_seconds = uri, experiment, say, exit_seconds
        self.client = MlflowClient(tracking_uri=uri)
        self._fields, self._lock = dict(fields), threading.Lock()
        self._logged: set[int] = set()
        self._queue: queue.Queue = queue.Queue(QUEUE_SIZE)
        self._failing = self._dropped = False
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._work, name="tracking", daemon=True)
        self._thread.start()

    @property
    def fields(self) -> dict:
        """latest.json's `tracking`, as far as known now: the MLflow run id once the run is open."""
        with self._lock:
            return dict(self._fields)

    # -- From the training thread: each call queues and returns at once --

    def open(self, config: Config, tags: Mapping[str, str], committed: list[dict]) -> None:
        """Open (or find) the run, log the config and `tags`, and the `committed` epochs it lacks."""
        self._put(self._open, config, dict(tags))
        for record in committed:
            self.log_epoch(record)

    def log_epoch(self, record: dict) -> None:
        """An epoch's line of metrics.jsonl, once the checkpoint covering it has committed."""
        self._put(self._log_epoch, dict(record))

    def finish(self, card: dict, curves: bytes | None, version: int, uri: str) -> None:
        card = redact_data(card)
        tags = {**lineage_tags(card.get("lineage") or {}), "export.version": str(version),
                "export.uri": redact(uri)}
        self._put(self._finish, card, curves, tags)

    def close(self, status: str) -> None:
        """Wait up to exit_seconds for what is queued, then end the MLflow run (`status`) or give up."""
        self._put(self._terminate, status)
        self._put(None)
        self._thread.join(self.exit_seconds)
        if self._thread.is_alive():
            self._closed.set()
            self.say(f"tracking: {redact(self.uri)} did not take the run's last records within "
                     f"tracking.exit_seconds ({self.exit_seconds:g}s); not waiting longer (metrics.jsonl and the "
                     f"model card hold them all)")

    def _put(self, call, *args) -> None:
        try:
            self._queue.put_nowait((call, args))
        except queue.Full:
            if not self._dropped:
                self._dropped = True
                self.say(f"tracking: more than {QUEUE_SIZE} records waiting for {redact(self.uri)}; dropping "
                         f"new ones (metrics.jsonl holds them; a resumed attempt logs the epochs missing)")

    # -- On the worker thread --

    def _work(self) -> None:
        while True:
            call, args = self._queue.get()
            if call is None:
                return
            self._retry(call, *args)

    def _retry(self, call, *args) -> None:
        """`call` until it lands or the job stops waiting; one line when tracking starts failing, one when it mends."""
        wait = BACKOFF_SECONDS[0]
        while not self._closed.is_set():
            try:
                call(*args)
            except Exception as exc:  # noqa: BLE001 - whatever the server or the network does, training goes on
                if not self._failing:
                    self._failing = True
                    reason = redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:300]
                    self.say(f"tracking: {redact(self.uri)} failed ({type(exc).__name__}: {reason}); training "
                             f"goes on, and tracking retries in the background")
                self._closed.wait(wait)
                wait = min(2 * wait, BACKOFF_SECONDS[1])
                continue
            if self._failing:
                self._failing = False
                self.say(f"tracking: {redact(self.uri)} answers again; catching up")
            return

    def _run_id(self) -> str:
        return self._fields["mlflow_run_id"]

    def _open(self, config: Config, tags: dict) -> None:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

        run = self._find_run()
        run_id = run.info.run_id
        if run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        # Params are immutable in MLflow: a resume that changed a stop condition keeps the first value.
        fresh = {k: v for k, v in clipped(params(config), MAX_PARAM_VAL_LENGTH).items() if k not in run.data.params}
        self._log(params=fresh, tags=clipped(tags, MAX_TAG_VAL_LENGTH))
        self._logged = self._steps()
        self.say(f"tracking: MLflow run {run_id} (experiment {self.experiment!r}) at {redact(self.uri)}"
                 f"{f', which holds {len(self._logged)} of its epochs' if self._logged else ''}")

    def _find_run(self):
        """The run latest.json names, else the one an earlier attempt created under this run's key, else a new one."""
        if "mlflow_run_id" in self._fields:
            return self.client.get_run(self._fields["mlflow_run_id"])
        key = self._fields["run_key"]
        experiment = self.client.get_experiment_by_name(self.experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(self.experiment)
        found = self.client.search_runs([experiment_id], f"tags.`{TAG_RUN_KEY}` = '{key}'", max_results=1)
        run = found[0] if found else self.client.create_run(experiment_id, tags={TAG_RUN_KEY: key})
        with self._lock:
            self._fields.update(mlflow_run_id=run.info.run_id, experiment_id=experiment_id)
        return run

    def _steps(self) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self._run_id(), STEP_KEY)}

    def _log_epoch(self, record: dict) -> None:
        if "mlflow_run_id" not in self._fields:
            return  # the run never opened: nothing of this attempt is logged (the next one catches up)
        if record["step"] in self._logged:
            return
        # A call that failed may have landed all the same (a timeout after the server wrote it).
        self._logged = self._steps()
        if record["step"] in self._logged:
            return
        self._log(metrics={k: (v, record["step"]) for k, v in epoch_metrics(record).items()})
        self._logged.add(record["step"])

    def _finish(self, card: dict, curves: bytes | None, tags: dict) -> None:
        from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

        if "mlflow_run_id" not in self._fields:
            return
        self._log(tags=clipped(tags, MAX_TAG_VAL_LENGTH))
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "model_card.json").write_text(json.dumps(card, indent=2, sort_keys=True))
            if curves is not None:
                (Path(tmp) / "curves.png").write_bytes(curves)
            self.client.log_artifacts(self._run_id(), tmp)

    def _terminate(self, status: str) -> None:
        if "mlflow_run_id" in self._fields:
            self.client.set_terminated(self._run_id(), status)

    def _log(self, metrics: dict | None = None, params: dict | None = None, tags: dict | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH as most

        now = int(time.time() * 1000)
        metrics_ = [Metric(k, v, now, step) for k, (v, step) in (metrics or {}).items()]
        params_ = [Param(k, v) for k, v in (params or {}).items()]
        tags_ = [RunTag(k, v) for k, v in (tags or {}).items()]
        # A batch holds at most 100 params and 100 tags (re-logging a param's same value is no error).
        for i in range(0, max(len(params_), len(tags_), 1), most):
            self.client.log_batch(self._run_id(), metrics=metrics_ if i == 0 else [], params=params_[i:i + most],
                                  tags=tags_[i:i + most])
