"""The controller: owns the cadence of a run around the trainer's compiled
steps — progress, evaluation, early stopping, checkpoints, SIGTERM, export.

A run is a function of its config: stopped anywhere and restarted, it
carries on from the last committed checkpoint and, with
`train.deterministic`, ends exactly where an uninterrupted run ends.

`run` sets up what every attempt at a run needs (the cluster, the checkpoint
store and its lease, the SIGTERM flag); `Controller.run` reads top to bottom
in phases: resume (or find the run finished; resume.py decides), build,
train, finish.
"""

from __future__ import annotations

import math
import re
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import tensorflow as tf

from common.redact import redact
from job import data, distribute, export, lineage, model, resume, sources, storage, tracking
from job.checkpoints import Checkpointer, CheckpointStore, Lease, Uploader
from job.config import Config
from job.errors import DivergedError, PeerLost, Preempted, StorageError
from job.history import History
from job.parts import Chunk, Parts, Throughput, build, chunks, configure_determinism
from job.report import Console
from job.trainer import evaluator, score


@dataclass
class Result:
    step: int
    test_accuracy: float
    test_loss: float
    version: int | None
    model_uri: str | None


class _SigtermFlag:
    """Turns SIGTERM into a flag the loop checks between compiled calls."""

    def __init__(self):
        self.raised = False

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous)


def run(cfg: Config, console: Console) -> Result:
    cluster = distribute.resolve(cfg.distribute)
    console.info(cluster.describe())
    cluster.check_global_batch(cfg.train.batch_size)
    if cfg.train.dtype_policy == "mixed_float16" and not tf.config.list_physical_devices("GPU"):
        # Measured in docs/benchmarks.md ("Recipes"): ResNet-20 trains at 5 images/s in float16 on
        # this project's 2-core CPU host, 560 in float32. Allowed (it is correct), but said.
        console.info("warning: train.mixed_precision is on but this host has no GPU: CPUs run float16 "
                     "convolutions about 100x slower than float32; set train.mixed_precision=false here")
    configure_determinism(cfg)
    if cluster.is_chief:  # the only worker that writes
        check_locations(cfg, console)
    uploader = Uploader(cfg.checkpoint.retry_seconds)
    store = CheckpointStore(cfg.checkpoint.uri, cfg.checkpoint.keep, uploader)
    # Only the chief writes; the other workers read the committed checkpoint
    # it names and train in step with it.
    lease = Lease(cfg.checkpoint.uri, cfg.checkpoint.lease_seconds, console.info) if cluster.is_chief else None
    if lease:
        lease.acquire()
    try:
        # From the start, so that a SIGTERM while data loads still ends in
        # a committed checkpoint and exit 75 at the first step boundary.
        with _SigtermFlag() as sigterm:
            return Controller(cfg, console, cluster, store).run(lease, sigterm)
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError) as exc:
        # MultiWorkerMirroredStrategy aborts its collectives when a peer stops
        # answering; the job is retried as a whole and resumes.
        peer = re.search(r"/job:\w+/replica:\d+/task:(\d+)", exc.message)
        who = f"worker {peer.group(1)}" if peer else "another worker"
        raise PeerLost(f"{who} of the cluster stopped answering ({type(exc).__name__}); exiting so the job "
                       f"is retried and every worker resumes from the last committed checkpoint") from exc
    finally:
        # Commits already queued are good checkpoints: give them the grace
        # budget to land, whatever ended the run.
        try:
            uploader.flush(timeout=cfg.checkpoint.grace_seconds)
        except StorageError:
            pass
        if lease:
            lease.release()


# -- Locations ---------------------------------------------------------------

def locations(cfg: Config) -> list[tuple[str, str]]:
    """(config key, URI) of every location a run writes: checkpoints,
    latest.json, the lease, metrics.jsonl, curves.png and TensorBoard's files
    under checkpoint.uri; versions under export.uri's model folder; and, for
    s3://, the local folder where files are staged before they go up."""
    found = [("checkpoint.uri", cfg.checkpoint.uri),
             ("export.uri", storage.join(cfg.export.uri, cfg.export.model_name))]
    if any(storage.is_object_store(uri) for _, uri in found):
        found.append(("TMPDIR", tempfile.gettempdir()))
    return found


def check_locations(cfg: Config, console: Console) -> None:
    """Write (and remove) a marker in every location the run will write,
    before anything is built: a location it cannot write then costs seconds
    (exit 4, naming its key), not a whole training run that cannot be kept."""
    started = time.perf_counter()
    for key, uri in locations(cfg):
        storage.backend(uri, key).probe(uri)
    console.info(f"storage: can write {', '.join(key for key, _ in locations(cfg))} "
                 f"(checked in {time.perf_counter() - started:.2f}s)")


class Controller:
    """One attempt at a run: the parts it trains, what it records, and its
    phases, which share them here rather than pass them around."""

    # Built by _build; history and tracker are the chief's alone.
    splits: sources.Splits
    parts: Parts
    history: History | None
    tracker: tracking.Tracker | None = None
    _tracking_open: Callable[[], None] | None = None  # until the first commit
    val_ds: tf.data.Dataset | None
    checkpointer: Checkpointer

    def __init__(self, cfg: Config, console: Console, cluster: distribute.Cluster, store: CheckpointStore):
        self.cfg, self.console, self.cluster, self.store = cfg, console, cluster, store

    def run(self, lease: Lease | None, sigterm: _SigtermFlag) -> Result:
        """Resume (or find the run finished), build, train, finish."""
        start = resume.starting_point(self.cfg, self.store, self.console.info)
        if resume.already_finished(self.cfg, start):
            return _nothing_to_do(start.latest, self.console)
        status = "FAILED"  # the MLflow run's, should this attempt end here
        try:
            self._build(start, lease)
            self._train(sigterm)
            if not self.cluster.is_chief:
                step = int(self.parts.progress.step.numpy())
                self.console.info(f"trained to step {step}; the chief evaluates and exports")
                return Result(step, math.nan, math.nan, None, None)
            result, status = self._finish(), "FINISHED"
            return result
        except Preempted:
            status = "KILLED"  # and retried: the same MLflow run goes on
            raise
        finally:
            if self.tracker:
                self.tracker.close(status)

    # -- Build: the data, what trains on it, and the state a resume restores --

    def _build(self, start: resume.Start, lease: Lease | None) -> None:
        cfg, uri = self.cfg, tracking.tracking_uri(self.cfg)
        if uri and self.cluster.is_chief:  # before the data loads: a missing client costs seconds
            self.tracker = tracking.Tracker(uri, cfg.tracking.experiment,
                                            tracking.run_fields(start.latest, start.restarted_from is not None),
                                            self.console.info, cfg.tracking.exit_seconds)
        splits = sources.load(cfg)
        if start.latest is not None:
            resume.check_data(cfg, start.latest, splits.checksum, start.where)
        self.console.info(f"data: {len(splits.x_train)} train, {len(splits.x_val)} validation, "
                          f"{len(splits.x_test)} test examples ({cfg.data.source}, {splits.checksum[:19]})")
        self.splits = splits
        self.parts = build(cfg, splits, self.cluster.strategy)
        self.history = None
        if self.cluster.is_chief:
            self.store.clean_staging()  # before this run stages anything
            self.history = History(self.store)
            self.store.write("config.yaml", cfg.dump().encode())
        self._restore(start)
        self.val_ds = data.eval_batches(splits.x_val, splits.y_val) if len(splits.x_val) else None
        self.checkpointer = Checkpointer(cfg, self.store, self.parts, start.latest, splits.checksum,
                                         self.cluster.is_chief, lease, self._tracking_fields)
        if self.tracker:
            self._open_tracking(start, splits.checksum)
        if start.source is not self.store:
            # A checkpoint of its own at once: from here the run needs nothing
            # of the one it restarted from.
            self._commit()

    def _tracking_fields(self) -> dict:
        return {"tracking": self.tracker.fields} if self.tracker else {}

    def _commit(self, **fields) -> None:
        self.checkpointer.commit(**fields)
        self._commit_tracking()

    def _commit_tracking(self) -> None:
        """Open the MLflow run after the commits queued so far, if it waits for one."""
        opening, self._tracking_open = self._tracking_open, None
        if opening:
            self.store.after_commits(opening)

    def _open_tracking(self, start: resume.Start, checksum: str) -> None:
        """The MLflow run opens once a committed checkpoint holds its key (now, for a run that tracked
        before): an attempt killed before its first commit leaves no MLflow run the next could not find."""
        cfg, tracker = self.cfg, self.tracker
        # The lineage as the card will hold it, tagged from the start: a run killed before it
        # exports still says which code, image, job and data it ran.
        known = lineage.collect(cfg, checksum, tf.__version__).model_dump(mode="json")
        tags = {**tracking.lineage_tags(known),
                **({"restarted_from": redact(start.restarted_from)} if start.restarted_from else {})}
        committed = list(self.history.records)
        self._tracking_open = lambda: tracker.open(cfg, tags, committed)
        if (start.latest or {}).get("tracking", {}).get("run_key") == tracker.fields["run_key"]:
            self._commit_tracking()

    def _restore(self, start: resume.Start) -> None:
        if start.latest is not None:
            start.source.restore(self.parts.checkpoint, start.latest["step"])
            if self.history:
                self.history.resume(start.latest["step"])
            chosen = f" ({start.restarted_from}, checkpoint.resume_from)" if start.restarted_from else ""
            self.console.info(f"resumed from step {start.latest['step']}{chosen}")
        elif start.init is not None:
            init_store, init_record = start.init
            init_store.restore(tf.train.Checkpoint(model=self.parts.model), init_record["step"])
            self.console.info(f"initialised weights from {storage.join(init_store.uri, init_record['checkpoint'])} "
                              f"(model.init_from); a new optimizer, training from step 0")

    # -- Train: epochs of compiled calls up to the target step or an early stop --

    def _train(self, sigterm: _SigtermFlag) -> None:
        cfg, progress, steps_per_epoch = self.cfg, self.parts.progress, self.parts.stream.steps_per_epoch
        target = resume.target_step(cfg, steps_per_epoch)
        meter = Throughput(cfg.train.batch_size, self.console.info)
        while int(progress.step.numpy()) < target and not bool(progress.stopped_early.numpy()):
            epoch = int(progress.epochs_done.numpy())
            in_epoch = int(progress.step.numpy()) - epoch * steps_per_epoch
            if in_epoch == 0:
                self.parts.trainer.reset_sums()
            meter.start_epoch()
            for chunk in chunks(cfg, self.parts, epoch, in_epoch, target):
                meter.add(chunk)
                if not math.isfinite(chunk.loss):
                    raise DivergedError(
                        f"loss became {chunk.loss} at step {chunk.step}; stopping without checkpointing it "
                        f"(last committed checkpoint: step {self.checkpointer.record.get('step', 'none')}). "
                        f"Try a lower train.learning_rate.")
                progress.step.assign_add(chunk.steps)
                if chunk.step % cfg.train.log_every_steps < chunk.steps or chunk.ends_epoch:
                    self._log_progress(meter, epoch, chunk)
                if self.checkpointer.due(chunk):
                    self._commit()
                if self.cluster.any_worker(sigterm.raised):
                    self._commit()
                    self._raise_preempted(chunk.step)
            if int(progress.step.numpy()) < (epoch + 1) * steps_per_epoch:
                break  # max_steps reached inside the epoch
            self._end_epoch(meter, epoch)
            if self.cluster.any_worker(sigterm.raised):
                self._raise_preempted(int(progress.step.numpy()))

    def _log_progress(self, meter: Throughput, epoch: int, chunk: Chunk) -> None:
        loss, accuracy = self.parts.trainer.train_averages()
        self.console.progress(epoch=epoch + 1, epochs=self.cfg.train.epochs, step_in_epoch=chunk.in_epoch,
                              steps_per_epoch=self.parts.stream.steps_per_epoch, step=chunk.step, loss=loss,
                              accuracy=accuracy, images_per_second=meter.rate())
        if self.history:
            self.history.scalars(chunk.step, **{"train/loss": loss, "train/accuracy": accuracy,
                                                "train/learning_rate": self._learning_rate()})

    def _end_epoch(self, meter: Throughput, epoch: int) -> None:
        """Validation and what hangs on it, the epoch's commit, and its report."""
        progress, step = self.parts.progress, int(self.parts.progress.step.numpy())
        train_loss, train_accuracy = self.parts.trainer.train_averages()
        val_loss = val_accuracy = None
        fields = {}
        if self.val_ds is not None:
            val_loss, val_accuracy = self.parts.trainer.validate(self.val_ds)[:2]
            fields = self._after_validation(val_loss, val_accuracy, step)
        progress.epochs_done.assign(epoch + 1)
        self._commit(**fields)
        images, seconds = meter.epoch()
        entry = {"epoch": epoch + 1, "step": step, "loss": train_loss, "accuracy": train_accuracy,
                 "val_loss": val_loss, "val_accuracy": val_accuracy, "seconds": round(seconds, 3),
                 "images_per_second": images / max(seconds, 1e-9), "learning_rate": self._learning_rate(),
                 "elapsed_seconds": round(float(progress.elapsed.numpy()), 3)}
        if self.history:
            self.history.add_epoch(entry)
        if self.tracker:
            self.store.after_commits(lambda: self.tracker.log_epoch(entry))
        self.console.epoch_end(entry)

    def _after_validation(self, val_loss: float, val_accuracy: float, step: int) -> dict:
        """The best checkpoint, early stopping and reduce-on-plateau, each
        keeping its own count; returns the fields latest.json records."""
        stopping = self.parts.early_stopping
        value = val_loss if stopping.monitor == "val_loss" else val_accuracy
        fields = {}
        if stopping.improved(value):
            fields["best"] = {"step": step, "monitor": stopping.monitor, "value": value}
        if stopping.update(value):
            self.console.info(f"early stopping: {stopping.monitor} has not improved for {stopping.patience} epochs")
            self.parts.progress.stopped_early.assign(True)
        learning_rate = self.parts.schedule.after_validation(val_loss, val_accuracy)
        if learning_rate is not None:
            self.console.info(f"reduce on plateau: learning rate now {learning_rate:.3g}")
        return fields

    def _learning_rate(self) -> float:
        return float(self.parts.schedule(self.parts.optimizer.iterations))

    def _raise_preempted(self, step: int) -> NoReturn:
        """Exit for SIGTERM, once the chief's checkpoint of `step` is committed or the grace time is up."""
        if not self.cluster.is_chief:
            raise Preempted(f"SIGTERM: stopping at step {step}, where the chief commits a checkpoint; "
                            f"exiting to be retried")
        grace = self.cfg.checkpoint.grace_seconds
        if self.store.flush(timeout=grace):
            raise Preempted(f"SIGTERM: committed checkpoint at step {step}; exiting to be retried")
        raise Preempted(f"SIGTERM: the checkpoint of step {step} did not commit within checkpoint.grace_seconds "
                        f"({grace:g}s); the last committed checkpoint stands. Exiting to be retried")

    # -- Finish: the chief evaluates, exports and records the export --

    def _finish(self) -> Result:
        cfg, parts, splits, store = self.cfg, self.parts, self.splits, self.store
        step = int(parts.progress.step.numpy())
        if int(self.checkpointer.record.get("step", -1)) != step:
            self._commit()
        train_seconds = float(parts.progress.elapsed.numpy())
        store.flush()
        weights_step = self._weights_to_export()
        served, evaluate_batch = parts.model, parts.trainer.evaluate_batch
        if cfg.train.dtype_policy != "float32":
            served = model.float32_twin(parts.model, cfg.model.name, cfg.model.width, cfg.model.tta)
            evaluate_batch = evaluator(served, cfg.train.jit_compile)
            self.console.info(f"evaluating and exporting in float32 (trained in {cfg.train.dtype_policy})")
        test_loss, test_acc, n_test = score(evaluate_batch, data.eval_batches(splits.x_test, splits.y_test))
        self.console.info(f"test: accuracy {test_acc:.4f}, loss {test_loss:.4f} on {n_test} examples")
        card = {"model": cfg.model.name, "step": step,
                # Not `step` where export.weights or early stopping chose the best checkpoint.
                "weights_step": weights_step, "epochs_done": int(parts.progress.epochs_done.numpy()),
                "test_accuracy": test_acc, "test_loss": test_loss, "train_seconds": round(train_seconds, 3),
                "data_checksum": splits.checksum, "class_names": list(splits.class_names),
                "config": cfg.model_dump(mode="json"), "tensorflow": tf.__version__,
                "distribution": {"strategy": self.cluster.name, "workers": self.cluster.workers,
                                 "replicas": self.cluster.replicas},
                "lineage": lineage.collect(cfg, splits.checksum, tf.__version__).model_dump(mode="json")}
        version, uri = export.export(served, cfg.export.uri, cfg.export.model_name, card, splits.x_test[:64],
                                     splits.class_names, cfg.checkpoint.retry_seconds)
        self.console.info(f"exported model version {version} to {uri}")
        if self.tracker:
            self.tracker.finish(card, store.read("curves.png"), version, uri)
        store.update(self.checkpointer.record, finished=True, export={"version": version, "uri": uri,
                                                                      "test_accuracy": test_acc,
                                                                      "test_loss": test_loss},
                     **self._tracking_fields())
        store.flush()
        return Result(step, test_acc, test_loss, version, uri)

    def _weights_to_export(self) -> int:
        """Restores the best checkpoint's weights where export.weights or early
        stopping asks for them; returns the step the model's weights are from."""
        cfg, parts = self.cfg, self.parts
        best = self.checkpointer.record.get("best")
        stopped_early = bool(parts.progress.stopped_early.numpy())
        if best and (cfg.export.weights == "best" or (stopped_early and cfg.train.early_stopping.restore_best)):
            why = "export.weights=best" if cfg.export.weights == "best" else "early stopping"
            self.console.info(f"{why}: restoring the best weights, from step {best['step']} "
                              f"({best['monitor']} {best['value']:.4f})")
            self.store.restore(tf.train.Checkpoint(model=parts.model), best["step"])
            return best["step"]
        if cfg.export.weights == "best":
            self.console.info("export.weights=best: this run holds no best checkpoint (no validation yet, or the "
                              "best was not among the checkpoints it restarted with); exporting the last weights")
        return int(parts.progress.step.numpy())


def _nothing_to_do(latest: dict, console: Console) -> Result:
    ex = latest["export"]
    console.info(f"run already finished at step {latest['step']}; model version {ex['version']} "
                 f"at {ex['uri']}; nothing to do")
    return Result(latest["step"], ex.get("test_accuracy", math.nan), ex.get("test_loss", math.nan),
                  ex["version"], ex["uri"])
