"""The controller: owns the cadence of a run around the trainer's compiled
steps — progress, evaluation, early stopping, checkpoints, SIGTERM, export.

A run is a function of its config: stopped anywhere and restarted, it
carries on from the last committed checkpoint and, with
`train.deterministic`, ends exactly where an uninterrupted run ends.

`_run` reads top to bottom in phases: resume (or find the run finished),
build, train, finish. The benches build and step through `build` and
`chunks` too, so that they measure what the job runs.
"""

from __future__ import annotations

import math
import re
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import keras
import tensorflow as tf

from job import data, distribute, export, model, optim, sources, storage
from job.checkpoints import RECORD, CheckpointStore, Lease, Uploader
from job.config import Config
from job.errors import ConfigError, DivergedError, PeerLost, Preempted, StorageError
from job.history import History
from job.trainer import Trainer, evaluate, evaluator
from job.report import Console


class Progress(tf.Module):
    """Everything besides weights and optimizer slots that a resume needs."""

    def __init__(self):
        super().__init__(name="progress")
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.epochs_done = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.best = tf.Variable(math.nan, dtype=tf.float64, trainable=False)
        self.since_best = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.plateau_best = tf.Variable(math.nan, dtype=tf.float64, trainable=False)
        self.plateau_wait = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.stopped_early = tf.Variable(False, trainable=False)
        # Wall-clock seconds of training so far, over every attempt: time to
        # accuracy survives a resume (the work lost since the last commit is
        # not counted, as it is redone).
        self.elapsed = tf.Variable(0.0, dtype=tf.float64, trainable=False)


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


def _improved(value: float, best: float, monitor: str, min_delta: float = 0.0) -> bool:
    if math.isnan(best):
        return True
    return value < best - min_delta if monitor == "val_loss" else value > best + min_delta


def configure_determinism(cfg: Config) -> None:
    # The seed is not set here: whatever runs between here and the model
    # build (a download) may draw from global random state. model.build seeds.
    if cfg.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    else:
        # Determinism is process-wide and TF has no public switch back; a
        # notebook or test that runs several jobs in one process needs it.
        from tensorflow.python.framework import config as tf_config

        tf_config.disable_op_determinism()


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
            return _run(cfg, console, cluster, store, lease, sigterm)
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


def _run(cfg: Config, console: Console, cluster: distribute.Cluster, store: CheckpointStore, lease: Lease | None,
         sigterm: _SigtermFlag) -> Result:
    # Resume or finished: where the run starts, and whether it has anything left to do.
    start = _starting_point(cfg, store, console)
    if start.latest and start.latest.get("finished") and _reached_stop(cfg, start.latest):
        return _already_finished(start.latest, console)

    # Build: the data, what trains on it, and the state a resume restores.
    splits = sources.load(cfg)
    if start.latest is not None:
        _check_data(cfg, start.latest, splits.checksum, start.where)
    console.info(f"data: {len(splits.x_train)} train, {len(splits.x_val)} validation, {len(splits.x_test)} test "
                 f"examples ({cfg.data.source}, {splits.checksum[:19]})")
    parts = build(cfg, splits, cluster.strategy)
    history = None
    if cluster.is_chief:
        store.clean_staging()  # before this run stages anything
        history = History(store)
        store.write("config.yaml", cfg.dump().encode())
    _restore(start, parts, history, console)

    # Train: epochs of compiled calls up to the target step or an early stop.
    val_ds = data.eval_batches(splits.x_val, splits.y_val) if len(splits.x_val) else None
    checkpointer = Checkpointer(cfg, store, parts, start.latest, splits.checksum, cluster.is_chief, lease)
    if start.source is not store:
        # A checkpoint of its own at once: from here the run needs nothing
        # of the one it restarted from.
        checkpointer.commit()
    _train(cfg, console, cluster, parts, checkpointer, history, val_ds, sigterm)

    # Finish: the chief evaluates, exports and records the export.
    step = int(parts.progress.step.numpy())
    if not cluster.is_chief:
        console.info(f"trained to step {step}; the chief evaluates and exports")
        return Result(step, math.nan, math.nan, None, None)
    return _finish(cfg, console, cluster, store, parts, checkpointer, splits)


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


# -- Resume or finished ------------------------------------------------------

@dataclass
class Start:
    """The store and checkpoint record a run continues from (no record: a new
    run), and for a new run warm-started by model.init_from, the store and
    record of the checkpoint holding its first weights."""

    source: CheckpointStore
    latest: dict | None
    # The checkpoint's URI where checkpoint.resume_from chose it rather than
    # the run's own newest.
    restarted_from: str | None = None
    init: tuple[CheckpointStore, dict] | None = None

    @property
    def where(self) -> str:
        return self.restarted_from or self.source.uri


def _starting_point(cfg: Config, store: CheckpointStore, console: Console) -> Start:
    latest = None if cfg.checkpoint.resume == "never" else store.latest()
    start = _resume_from(cfg, store, latest, console)
    if cfg.checkpoint.resume == "required" and start.latest is None:
        raise ConfigError(f"checkpoint.resume is 'required' but {cfg.checkpoint.uri} holds no committed checkpoint")
    if start.latest is not None:
        _check_fingerprint(cfg, start.latest, start.where)
    elif cfg.model.init_from:
        # Only a new run is warm-started: a retried one resumes its own checkpoint.
        init_store, init_record = _checkpoint_at(cfg.model.init_from, "model.init_from", store)
        _check_architecture(cfg, init_record, storage.join(init_store.uri, init_record["checkpoint"]))
        start.init = (init_store, init_record)
    return start


def _already_finished(latest: dict, console: Console) -> Result:
    ex = latest["export"]
    console.info(f"run already finished at step {latest['step']}; model version {ex['version']} "
                 f"at {ex['uri']}; nothing to do")
    return Result(latest["step"], ex.get("test_accuracy", math.nan), ex.get("test_loss", math.nan),
                  ex["version"], ex["uri"])


# -- Build -------------------------------------------------------------------

@dataclass
class Parts:
    """What a run trains, and the checkpoint that holds all of it."""

    stream: data.TrainStream
    model: keras.Model
    schedule: optim.Schedule
    optimizer: keras.optimizers.Optimizer
    trainer: Trainer
    progress: Progress
    checkpoint: tf.train.Checkpoint


def build(cfg: Config, splits: sources.Splits, strategy: tf.distribute.Strategy | None = None) -> Parts:
    """A run's parts as the job builds them (the benches build theirs here
    too, so that they measure what the job runs)."""
    stream = data.TrainStream(splits.x_train, splits.y_train, cfg.seed, cfg.train.batch_size, cfg.data.augment,
                              cfg.data.translate, cfg.data.flip)
    with (strategy or tf.distribute.get_strategy()).scope():
        # The whitening layer of airbench reads the first 5,000 training images.
        net = model.build(cfg.model.name, cfg.train.dtype_policy, cfg.model.width, splits.x_train[:5000],
                          seed=cfg.seed, tta=cfg.model.tta)
        schedule = optim.Schedule(cfg.train, stream.steps_per_epoch)
        optimizer = optim.build_optimizer(cfg.train, schedule)
        lookahead = (optim.Lookahead(cfg.train.lookahead, net, cfg.train.epochs * stream.steps_per_epoch)
                     if cfg.train.lookahead.enabled else None)
        trainer = Trainer(net, optimizer, cfg.train.batch_size, cfg.train.label_smoothing, cfg.train.jit_compile,
                          lookahead)
    progress = Progress()
    checkpoint = tf.train.Checkpoint(model=net, optimizer=optimizer, trainer=trainer, progress=progress,
                                     lr_scale=schedule.scale)
    return Parts(stream, net, schedule, optimizer, trainer, progress, checkpoint)


def _restore(start: Start, parts: Parts, history: History | None, console: Console) -> None:
    if start.latest is not None:
        start.source.restore(parts.checkpoint, start.latest["step"])
        if history:
            history.resume(start.latest["step"])
        console.info(f"resumed from step {start.latest['step']}"
                     + (f" ({start.restarted_from}, checkpoint.resume_from)" if start.restarted_from else ""))
    elif start.init is not None:
        init_store, init_record = start.init
        init_store.restore(tf.train.Checkpoint(model=parts.model), init_record["step"])
        console.info(f"initialised weights from {storage.join(init_store.uri, init_record['checkpoint'])} "
                     f"(model.init_from); a new optimizer, training from step 0")


# -- Train -------------------------------------------------------------------

@dataclass
class Chunk:
    """One compiled call: the steps it ran, where they ended, its last loss and its time."""

    steps: int
    step: int
    in_epoch: int
    ends_epoch: bool
    loss: float
    seconds: float


def chunks(cfg: Config, parts: Parts, epoch: int, in_epoch: int, target: int) -> Iterator[Chunk]:
    """The rest of `epoch` from its step `in_epoch` on, up to step `target`,
    in compiled calls of up to `train.steps_per_loop` steps, each timed and
    its loss read back."""
    spe = parts.stream.steps_per_epoch
    iterator = iter(parts.trainer.strategy.distribute_datasets_from_function(
        lambda ctx, epoch=epoch, in_epoch=in_epoch: parts.stream.epoch(epoch, in_epoch, ctx)))
    step = epoch * spe + in_epoch
    while in_epoch < spe and step < target:
        # Chunks end on checkpoint boundaries so checkpoints land on
        # the same steps however steps_per_loop is set.
        n = min(cfg.train.steps_per_loop, spe - in_epoch, target - step,
                cfg.checkpoint.every_steps - step % cfg.checkpoint.every_steps)
        started = time.perf_counter()
        loss = float(parts.trainer.train_loop(iterator, tf.constant(n)))
        seconds = time.perf_counter() - started
        step, in_epoch = step + n, in_epoch + n
        yield Chunk(n, step, in_epoch, in_epoch == spe, loss, seconds)


class Throughput:
    """Images per second of an epoch's compiled calls. The run's first call
    traces and compiles; counting it would report the compiler's speed
    rather than training's, unless it is all an epoch has."""

    def __init__(self, batch_size: int, say):
        self.batch_size, self.say = batch_size, say
        self.first_call: tuple[int, float] | None = None
        self.images, self.seconds = 0, 0.0

    def start_epoch(self) -> None:
        self.images, self.seconds = 0, 0.0

    def add(self, chunk: Chunk) -> None:
        if self.first_call is None:
            self.first_call = (chunk.steps * self.batch_size, chunk.seconds)
            self.say(f"compiled the training step in {chunk.seconds:.1f}s")
        else:
            self.images += chunk.steps * self.batch_size
            self.seconds += chunk.seconds

    def rate(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    def epoch(self) -> tuple[int, float]:
        """The epoch's (images, seconds)."""
        if self.images == 0 and self.first_call is not None:
            return self.first_call
        return self.images, self.seconds


class Checkpointer:
    """When a checkpoint is due, and committing one: every worker keeps the
    run's training time in its progress, the chief writes the checkpoint."""

    def __init__(self, cfg: Config, store: CheckpointStore, parts: Parts, latest: dict | None, data_checksum: str,
                 is_chief: bool = True, lease: Lease | None = None):
        self.cfg, self.store, self.parts, self.is_chief, self.lease = cfg, store, parts, is_chief, lease
        self.record = {**(latest or {}), "fingerprint": cfg.fingerprint(), "data_checksum": data_checksum,
                       "network_revision": model.REVISIONS[cfg.model.name]}
        self._started, self._before = time.perf_counter(), float(parts.progress.elapsed.numpy())
        self._last_commit = time.monotonic()

    def due(self, chunk: Chunk) -> bool:
        """At `checkpoint.every_steps`, or `checkpoint.every_seconds` after the
        last commit; not at an epoch's end, which commits once validated."""
        ckpt = self.cfg.checkpoint
        # On spot capacity what a reclaim costs is time, which a step count
        # does not bound; time is looked at only between compiled calls.
        time_due = ckpt.every_seconds is not None and time.monotonic() - self._last_commit >= ckpt.every_seconds
        return (chunk.step % ckpt.every_steps == 0 or time_due) and not chunk.ends_epoch

    def commit(self, **fields) -> None:
        """A checkpoint of the step reached, `fields` added to its record."""
        self._last_commit = time.monotonic()
        progress = self.parts.progress
        progress.elapsed.assign(self._before + time.perf_counter() - self._started)
        if not self.is_chief:
            return
        if self.lease is not None and self.lease.lost:
            raise StorageError(f"another run took the lease on {self.cfg.checkpoint.uri}; stopping without writing")
        self.record = self.store.save(self.parts.checkpoint, int(progress.step.numpy()), self.record,
                                      finished=False, steps_per_epoch=self.parts.stream.steps_per_epoch,
                                      stopped_early=bool(progress.stopped_early.numpy()), **fields)


def _train(cfg: Config, console: Console, cluster: distribute.Cluster, parts: Parts, checkpointer: Checkpointer,
           history: History | None, val_ds: tf.data.Dataset | None, sigterm: _SigtermFlag) -> None:
    progress, spe = parts.progress, parts.stream.steps_per_epoch
    target = _target_step(cfg, spe)
    meter = Throughput(cfg.train.batch_size, console.info)
    while int(progress.step.numpy()) < target and not bool(progress.stopped_early.numpy()):
        epoch = int(progress.epochs_done.numpy())
        in_epoch = int(progress.step.numpy()) - epoch * spe
        if in_epoch == 0:
            parts.trainer.reset_sums()
        meter.start_epoch()
        for chunk in chunks(cfg, parts, epoch, in_epoch, target):
            meter.add(chunk)
            if not math.isfinite(chunk.loss):
                raise DivergedError(
                    f"loss became {chunk.loss} at step {chunk.step}; stopping without checkpointing it "
                    f"(last committed checkpoint: step {checkpointer.record.get('step', 'none')}). "
                    f"Try a lower train.learning_rate.")
            progress.step.assign_add(chunk.steps)
            if chunk.step % cfg.train.log_every_steps < chunk.steps or chunk.ends_epoch:
                _log_progress(cfg, console, history, parts, meter, epoch, chunk)
            if checkpointer.due(chunk):
                checkpointer.commit()
            if cluster.any_worker(sigterm.raised):
                checkpointer.commit()
                _preempted(checkpointer.store, cfg, chunk.step, cluster.is_chief)
        if int(progress.step.numpy()) < (epoch + 1) * spe:
            break  # max_steps reached inside the epoch
        _end_epoch(cfg, console, parts, checkpointer, history, val_ds, meter, epoch)
        if cluster.any_worker(sigterm.raised):
            _preempted(checkpointer.store, cfg, int(progress.step.numpy()), cluster.is_chief)


def _log_progress(cfg: Config, console: Console, history: History | None, parts: Parts, meter: Throughput,
                  epoch: int, chunk: Chunk) -> None:
    loss, accuracy = parts.trainer.train_averages()
    console.progress(epoch=epoch + 1, epochs=cfg.train.epochs, step_in_epoch=chunk.in_epoch,
                     steps_per_epoch=parts.stream.steps_per_epoch, step=chunk.step, loss=loss, accuracy=accuracy,
                     images_per_second=meter.rate())
    if history:
        history.scalars(chunk.step, **{"train/loss": loss, "train/accuracy": accuracy,
                                       "train/learning_rate": _learning_rate(parts)})


def _end_epoch(cfg: Config, console: Console, parts: Parts, checkpointer: Checkpointer, history: History | None,
               val_ds: tf.data.Dataset | None, meter: Throughput, epoch: int) -> None:
    """Validation and what hangs on it, the epoch's commit, and its report."""
    progress, step = parts.progress, int(parts.progress.step.numpy())
    tl, ta = parts.trainer.train_averages()
    vl, va = parts.trainer.evaluate(val_ds)[:2] if val_ds is not None else (None, None)
    fields = _after_validation(cfg, progress, parts.schedule, vl, va, step, console) if val_ds is not None else {}
    progress.epochs_done.assign(epoch + 1)
    checkpointer.commit(**fields)
    images, seconds = meter.epoch()
    entry = {"epoch": epoch + 1, "step": step, "loss": tl, "accuracy": ta, "val_loss": vl,
             "val_accuracy": va, "seconds": round(seconds, 3),
             "images_per_second": images / max(seconds, 1e-9),
             "learning_rate": _learning_rate(parts),
             "elapsed_seconds": round(float(progress.elapsed.numpy()), 3)}
    if history:
        history.add_epoch(entry)
    console.epoch_end(entry)


def _learning_rate(parts: Parts) -> float:
    return float(parts.schedule(parts.optimizer.iterations))


def _preempted(store: CheckpointStore, cfg: Config, step: int, is_chief: bool):
    if not is_chief:
        raise Preempted(f"SIGTERM: stopping at step {step}, where the chief commits a checkpoint; "
                        f"exiting to be retried")
    if store.flush(timeout=cfg.checkpoint.grace_seconds):
        raise Preempted(f"SIGTERM: committed checkpoint at step {step}; exiting to be retried")
    raise Preempted(f"SIGTERM: the checkpoint of step {step} did not commit within checkpoint.grace_seconds "
                    f"({cfg.checkpoint.grace_seconds:g}s); the last committed checkpoint stands. Exiting to be retried")


def _after_validation(cfg: Config, progress: Progress, schedule: optim.Schedule, val_loss: float,
                      val_acc: float, step: int, console: Console) -> dict:
    """Early stopping and reduce-on-plateau bookkeeping; returns latest.json fields."""
    fields = {}
    es = cfg.train.early_stopping
    monitor = es.monitor if es.enabled else "val_loss"
    value = val_loss if monitor == "val_loss" else val_acc
    if _improved(value, float(progress.best.numpy()), monitor, es.min_delta):
        progress.best.assign(value)
        progress.since_best.assign(0)
        fields["best"] = {"step": step, "monitor": monitor, "value": value}
    else:
        progress.since_best.assign_add(1)
        if es.enabled and int(progress.since_best.numpy()) >= es.patience:
            console.info(f"early stopping: {monitor} has not improved for {es.patience} epochs")
            progress.stopped_early.assign(True)
    s = cfg.train.lr_schedule
    if s.name == "reduce_on_plateau":
        pv = val_loss if s.monitor == "val_loss" else val_acc
        if _improved(pv, float(progress.plateau_best.numpy()), s.monitor):
            progress.plateau_best.assign(pv)
            progress.plateau_wait.assign(0)
        else:
            progress.plateau_wait.assign_add(1)
            if int(progress.plateau_wait.numpy()) > s.patience:
                floor = s.min_lr / cfg.train.learning_rate
                schedule.scale.assign(max(float(schedule.scale.numpy()) * s.factor, floor))
                progress.plateau_wait.assign(0)
                lr = cfg.train.learning_rate * float(schedule.scale.numpy())
                console.info(f"reduce on plateau: learning rate now {lr:.3g}")
    return fields


# -- Finish ------------------------------------------------------------------

def _finish(cfg: Config, console: Console, cluster: distribute.Cluster, store: CheckpointStore, parts: Parts,
            checkpointer: Checkpointer, splits: sources.Splits) -> Result:
    step = int(parts.progress.step.numpy())
    if int(checkpointer.record.get("step", -1)) != step:
        checkpointer.commit()
    train_seconds = float(parts.progress.elapsed.numpy())
    store.flush()
    weights_step = _weights_to_export(cfg, console, store, parts, checkpointer.record)
    served, evaluate_batch = parts.model, parts.trainer.evaluate_batch
    if cfg.train.dtype_policy != "float32":
        served = model.float32_twin(parts.model, cfg.model.name, cfg.model.width, cfg.model.tta)
        evaluate_batch = evaluator(served, cfg.train.jit_compile)
        console.info(f"evaluating and exporting in float32 (trained in {cfg.train.dtype_policy})")
    test_loss, test_acc, n_test = evaluate(evaluate_batch, data.eval_batches(splits.x_test, splits.y_test))
    console.info(f"test: accuracy {test_acc:.4f}, loss {test_loss:.4f} on {n_test} examples")
    card = {
        "model": cfg.model.name,
        "step": step,
        # Not `step` where export.weights or early stopping chose the best checkpoint.
        "weights_step": weights_step,
        "epochs_done": int(parts.progress.epochs_done.numpy()),
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "train_seconds": round(train_seconds, 3),
        "data_checksum": splits.checksum,
        "class_names": list(splits.class_names),
        "config": cfg.model_dump(mode="json"),
        "tensorflow": tf.__version__,
        "distribution": {"strategy": cluster.name, "workers": cluster.workers, "replicas": cluster.replicas},
    }
    version, uri = export.export(served, cfg.export.uri, cfg.export.model_name, card, splits.x_test[:64],
                                 splits.class_names, cfg.checkpoint.retry_seconds)
    console.info(f"exported model version {version} to {uri}")
    store.update(checkpointer.record, finished=True, export={"version": version, "uri": uri,
                                                             "test_accuracy": test_acc, "test_loss": test_loss})
    store.flush()
    return Result(step, test_acc, test_loss, version, uri)


def _weights_to_export(cfg: Config, console: Console, store: CheckpointStore, parts: Parts, record: dict) -> int:
    """Restores the best checkpoint's weights where export.weights or early
    stopping asks for them; returns the step the model's weights are from."""
    best = record.get("best")
    stopped_early = bool(parts.progress.stopped_early.numpy())
    if best and (cfg.export.weights == "best" or (stopped_early and cfg.train.early_stopping.restore_best)):
        why = "export.weights=best" if cfg.export.weights == "best" else "early stopping"
        console.info(f"{why}: restoring the best weights, from step {best['step']} "
                     f"({best['monitor']} {best['value']:.4f})")
        store.restore(tf.train.Checkpoint(model=parts.model), best["step"])
        return best["step"]
    if cfg.export.weights == "best":
        console.info("export.weights=best: this run holds no best checkpoint (no validation yet, or the best "
                     "was not among the checkpoints it restarted with); exporting the last weights")
    return int(parts.progress.step.numpy())


# -- Checks and helpers ------------------------------------------------------

def _target_step(cfg: Config, steps_per_epoch: int) -> int:
    target = steps_per_epoch * cfg.train.epochs
    return target if cfg.train.max_steps is None else min(target, cfg.train.max_steps)


def _reached_stop(cfg: Config, latest: dict) -> bool:
    """Whether a finished run's checkpoint already meets this config's stop conditions,
    which (unlike the fingerprint) may have changed since: a run stopped by
    `train.max_steps` carries on when the limit is raised."""
    return latest.get("stopped_early") or latest["step"] >= _target_step(cfg, latest["steps_per_epoch"])


def _check_data(cfg: Config, latest: dict, current: str, where: str) -> None:
    """The data a checkpoint was trained on, by checksum: a data set replaced
    under the same data.uri is another problem, which the config cannot show."""
    stored = latest.get("data_checksum")
    if stored is not None and stored != current:
        raise ConfigError(
            f"data: the checkpoint at {where} was trained on other data than "
            f"{cfg.data.uri or cfg.data.source} holds now (checksum {stored} -> {current}); its state would mean "
            f"something else here. Use another checkpoint.uri, or checkpoint.resume=never to start over.")


def _check_revision(cfg: Config, record: dict, where: str, field: str, remedy: str) -> None:
    """After the checks that the record is of cfg.model.name's network at all."""
    stored, current = record.get("network_revision", 1), model.REVISIONS[cfg.model.name]
    if stored != current:
        raise ConfigError(f"{field}: the checkpoint at {where} holds {cfg.model.name} revision {stored}, and this "
                          f"version of the job builds revision {current}, with other variables. {remedy}")


def _check_fingerprint(cfg: Config, latest: dict, where: str) -> None:
    stored = latest.get("fingerprint", {})
    current = cfg.fingerprint()
    changed = [k for k in current if k in stored and stored[k] != current[k]]
    if changed:
        details = ", ".join(f"{k}: {stored[k]!r} -> {current[k]!r}" for k in changed)
        horizon = ""
        if "train.epochs" in changed:
            horizon = (f" train.epochs is fixed for a run whose schedule spans it "
                       f"({cfg.train.lr_schedule.name}): to stop earlier, set train.max_steps; to train longer, "
                       f"start a new run with another checkpoint.uri, warm-started by model.init_from={where} "
                       f"if you like.")
        raise ConfigError(
            f"the checkpoint at {where} was made with a different config ({details}); "
            f"its state would mean something else here. Use another checkpoint.uri, or "
            f"checkpoint.resume=never to start over.{horizon}")
    _check_revision(cfg, latest, where, "checkpoint.uri", "Finish that run with the job version that started it, "
                    "or start over with another checkpoint.uri or checkpoint.resume=never.")


def _check_architecture(cfg: Config, record: dict, where: str) -> None:
    stored = record.get("fingerprint", {})
    for key, value in (("model.name", cfg.model.name), ("model.width", cfg.model.width)):
        if stored.get(key, value) != value:
            raise ConfigError(f"model.init_from: the weights at {where} are of another network ({key} "
                              f"{stored[key]!r}, this run {value!r}); set {key} to match or drop model.init_from")
    _check_revision(cfg, record, where, "model.init_from", "Drop model.init_from, or warm-start from a checkpoint "
                    "of this version.")


def _checkpoint_at(uri: str, field: str, store: CheckpointStore) -> tuple[CheckpointStore, dict]:
    """A checkpoint named by URI, as the store holding it and its record: a
    run's checkpoint.uri means its newest checkpoint, `.../ckpt-<step>` that one."""
    named = re.fullmatch(r"(.+)/ckpt-(\d+)/?", uri)
    run_uri = named.group(1) if named else uri
    holder = store if run_uri.rstrip("/") == store.uri.rstrip("/") else store.at(run_uri, field)
    if named:
        step = int(named.group(2))
    else:
        newest = holder.latest()
        if newest is None:
            raise ConfigError(f"{field}: {uri} holds no committed checkpoint (no latest.json)")
        step = newest["step"]
    record = holder.record_at(step)
    if record is None:
        raise ConfigError(f"{field}: {storage.join(run_uri, f'ckpt-{step}')} is not a checkpoint this job can "
                          f"restart from (it has no {RECORD})")
    return holder, record


def _resume_from(cfg: Config, store: CheckpointStore, latest: dict | None, console: Console) -> Start:
    """Where the run continues from: its own newest checkpoint (`latest`), or
    the one checkpoint.resume_from names."""
    wanted = cfg.checkpoint.resume_from
    # A run that has restarted from `wanted` and was then stopped (SIGTERM,
    # a lost node) carries on from its own checkpoints when retried.
    if wanted is None or (latest and latest.get("resumed_from", {}).get("request") == wanted):
        return Start(store, latest)
    if isinstance(wanted, int):
        kept = sorted({*latest["kept"], *([latest["best"]["step"]] if latest.get("best") else [])}) if latest else []
        if wanted not in kept:
            raise ConfigError(f"checkpoint.resume_from: step {wanted} is not a kept checkpoint of "
                              f"{cfg.checkpoint.uri} (kept: {', '.join(map(str, kept)) or 'none'})")
        wanted_uri = storage.join(store.uri, f"ckpt-{wanted}")
    else:
        wanted_uri = wanted
    source, record = _checkpoint_at(wanted_uri, "checkpoint.resume_from", store)
    where = storage.join(source.uri, record["checkpoint"])
    # The record names checkpoints the run may hold no more (pruned since, or
    # in the other run's checkpoint.uri): keep those it can restore.
    available = set(store.published()) if source is store else {record["checkpoint"]}
    kept = [s for s in record["kept"] if f"ckpt-{s}" in available]
    best = record.get("best")
    if best and f"ckpt-{best['step']}" not in available:
        console.info(f"the best checkpoint before step {record['step']} (step {best['step']}) is not in "
                     f"{cfg.checkpoint.uri}; export.weights=best and restore_best count from here")
        best = None
    resumed_from = {"request": wanted, "checkpoint": where}
    return Start(source, {**record, "kept": kept, "best": best, "resumed_from": resumed_from}, where)
