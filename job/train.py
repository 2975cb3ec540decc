"""The controller: owns the cadence of a run around the trainer's compiled
steps — progress, evaluation, early stopping, checkpoints, SIGTERM, export.

A run is a function of its config: stopped anywhere and restarted, it
carries on from the last committed checkpoint and, with
`train.deterministic`, ends exactly where an uninterrupted run ends.
"""

from __future__ import annotations

import math
import re
import signal
import time
from dataclasses import dataclass

import tensorflow as tf

from job import data, distribute, export, model, optim, sources, storage
from job.checkpoints import RECORD, CheckpointStore, Lease, Uploader
from job.config import Config
from job.errors import ConfigError, DivergedError, PeerLost, Preempted, StorageError
from job.history import History
from job.trainer import Trainer
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
    if cfg.train.mixed_precision and not tf.config.list_physical_devices("GPU"):
        # Measured in docs/benchmarks.md ("Recipes"): ResNet-20 trains at 5 images/s in float16 on
        # this project's 2-core CPU host, 560 in float32. Allowed (it is correct), but said.
        console.info("warning: train.mixed_precision is on but this host has no GPU: CPUs run float16 "
                     "convolutions about 100x slower than float32; set train.mixed_precision=false here")
    configure_determinism(cfg)
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
    latest = None if cfg.checkpoint.resume == "never" else store.latest()
    # From here `latest` is the record of the checkpoint this run continues
    # from: its own newest, or the one checkpoint.resume_from names.
    source, latest, restarted_from = _starting_point(cfg, store, latest, console)
    if cfg.checkpoint.resume == "required" and latest is None:
        raise ConfigError(f"checkpoint.resume is 'required' but {cfg.checkpoint.uri} holds no committed checkpoint")
    if latest is not None:
        _check_fingerprint(cfg, latest, restarted_from or source.uri)
    init_store = init_record = None
    if latest is None and cfg.model.init_from:
        # Only a new run is warm-started: a retried one resumes its own checkpoint.
        init_store, init_record = _checkpoint_at(cfg.model.init_from, "model.init_from", store)
        _check_architecture(cfg, init_record, storage.join(init_store.uri, init_record["checkpoint"]))
    if latest and latest.get("finished") and _reached_stop(cfg, latest):
        ex = latest["export"]
        console.info(f"run already finished at step {latest['step']}; model version {ex['version']} "
                     f"at {ex['uri']}; nothing to do")
        return Result(latest["step"], ex.get("test_accuracy", math.nan), ex.get("test_loss", math.nan),
                      ex["version"], ex["uri"])

    splits = sources.load(cfg)
    if latest is not None:
        _check_data(cfg, latest, splits.checksum, restarted_from or source.uri)
    console.info(f"data: {len(splits.x_train)} train, {len(splits.x_val)} validation, {len(splits.x_test)} test "
                 f"examples ({cfg.data.source}, {splits.checksum[:19]})")
    stream = data.TrainStream(splits.x_train, splits.y_train, cfg.seed, cfg.train.batch_size, cfg.data.augment,
                              cfg.data.translate)
    spe = stream.steps_per_epoch
    with cluster.strategy.scope():
        # The whitening layer of airbench reads the first 5,000 training images.
        net = model.build(cfg.model.name, cfg.train.mixed_precision, cfg.model.width, splits.x_train[:5000],
                          seed=cfg.seed)
        schedule = optim.Schedule(cfg.train, spe)
        optimizer = optim.build_optimizer(cfg.train, schedule)
        trainer = Trainer(net, optimizer, cfg.train.batch_size, cfg.train.label_smoothing, cfg.train.jit_compile)
    progress = Progress()
    checkpoint = tf.train.Checkpoint(model=net, optimizer=optimizer, trainer=trainer, progress=progress,
                                     lr_scale=schedule.scale)
    history = None
    if cluster.is_chief:
        history = History(cfg.checkpoint.uri, store.uploader)
        store.backend.write_bytes(storage.join(cfg.checkpoint.uri, "config.yaml"), cfg.dump().encode())

    if latest is not None:
        source.restore(checkpoint, latest["step"])
        if history:
            history.resume(latest["step"])
        console.info(f"resumed from step {latest['step']}"
                     + (f" ({restarted_from}, checkpoint.resume_from)" if restarted_from else ""))
    elif init_record is not None:
        init_store.restore(tf.train.Checkpoint(model=net), init_record["step"])
        console.info(f"initialised weights from {storage.join(init_store.uri, init_record['checkpoint'])} "
                     f"(model.init_from); a new optimizer, training from step 0")
    record = {**(latest or {}), "fingerprint": cfg.fingerprint(), "data_checksum": splits.checksum}

    target = _target_step(cfg, spe)
    val_ds = data.eval_batches(splits.x_val, splits.y_val) if len(splits.x_val) else None
    es = cfg.train.early_stopping

    clock_start, elapsed_before = time.perf_counter(), float(progress.elapsed.numpy())
    last_commit = time.monotonic()

    def training_seconds() -> float:
        return elapsed_before + time.perf_counter() - clock_start

    def commit(**fields) -> None:
        nonlocal record, last_commit
        last_commit = time.monotonic()
        progress.elapsed.assign(training_seconds())
        if not cluster.is_chief:
            return
        if lease.lost:
            raise StorageError(f"another run took the lease on {cfg.checkpoint.uri}; stopping without writing")
        record = store.save(checkpoint, int(progress.step.numpy()), record, finished=False, steps_per_epoch=spe,
                            stopped_early=bool(progress.stopped_early.numpy()), **fields)

    if source is not store:
        # A checkpoint of its own at once: from here the run needs nothing
        # of the one it restarted from.
        commit()

    first_call = None
    while int(progress.step.numpy()) < target and not bool(progress.stopped_early.numpy()):
        epoch = int(progress.epochs_done.numpy())
        in_epoch = int(progress.step.numpy()) - epoch * spe
        if in_epoch == 0:
            trainer.reset_sums()
        iterator = iter(cluster.strategy.distribute_datasets_from_function(
            lambda ctx, epoch=epoch, in_epoch=in_epoch: stream.epoch(epoch, in_epoch, ctx)))
        epoch_images, epoch_seconds = 0, 0.0
        while in_epoch < spe and int(progress.step.numpy()) < target:
            step = int(progress.step.numpy())
            # Chunks end on checkpoint boundaries so checkpoints land on
            # the same steps however steps_per_loop is set.
            n = min(cfg.train.steps_per_loop, spe - in_epoch, target - step,
                    cfg.checkpoint.every_steps - step % cfg.checkpoint.every_steps)
            started = time.perf_counter()
            loss = float(trainer.train_loop(iterator, tf.constant(n)))
            elapsed = time.perf_counter() - started
            if first_call is None:
                # The first call traces and compiles; counting it would
                # report the compiler's speed rather than training's,
                # unless it is all an epoch has.
                first_call = (n * cfg.train.batch_size, elapsed)
                console.info(f"compiled the training step in {elapsed:.1f}s")
            else:
                epoch_images += n * cfg.train.batch_size
                epoch_seconds += elapsed
            if not math.isfinite(loss):
                raise DivergedError(
                    f"loss became {loss} at step {step + n}; stopping without checkpointing it "
                    f"(last committed checkpoint: step {record.get('step', 'none')}). "
                    f"Try a lower train.learning_rate.")
            progress.step.assign_add(n)
            in_epoch += n
            step += n
            if step % cfg.train.log_every_steps < n or in_epoch == spe:
                tl, ta = trainer.train_averages()
                console.progress(epoch=epoch + 1, epochs=cfg.train.epochs, step_in_epoch=in_epoch,
                                 steps_per_epoch=spe, step=step, loss=tl, accuracy=ta,
                                 images_per_second=epoch_images / max(epoch_seconds, 1e-9))
                if history:
                    history.scalars(step, **{"train/loss": tl, "train/accuracy": ta,
                                             "train/learning_rate": float(schedule(optimizer.iterations))})
            # On spot capacity what a reclaim costs is time, which a step count
            # does not bound; time is looked at only between compiled calls.
            time_due = (cfg.checkpoint.every_seconds is not None
                        and time.monotonic() - last_commit >= cfg.checkpoint.every_seconds)
            if (step % cfg.checkpoint.every_steps == 0 or time_due) and in_epoch < spe:
                commit()
            if cluster.any_worker(sigterm.raised):
                commit()
                _preempted(store, cfg, step, cluster.is_chief)
        if in_epoch < spe:
            break  # max_steps reached inside the epoch
        if epoch_images == 0 and first_call is not None:
            epoch_images, epoch_seconds = first_call
        tl, ta = trainer.train_averages()
        vl, va = trainer.evaluate(val_ds)[:2] if val_ds is not None else (None, None)
        fields = {}
        if val_ds is not None:
            fields.update(_after_validation(cfg, progress, schedule, vl, va, step, console))
        progress.epochs_done.assign(epoch + 1)
        commit(**fields)
        entry = {"epoch": epoch + 1, "step": step, "loss": tl, "accuracy": ta, "val_loss": vl,
                 "val_accuracy": va, "seconds": round(epoch_seconds, 3),
                 "images_per_second": epoch_images / max(epoch_seconds, 1e-9),
                 "learning_rate": float(schedule(optimizer.iterations)),
                 "elapsed_seconds": round(float(progress.elapsed.numpy()), 3)}
        if history:
            history.add_epoch(entry)
        console.epoch_end(entry)
        if cluster.any_worker(sigterm.raised):
            _preempted(store, cfg, step, cluster.is_chief)

    step = int(progress.step.numpy())
    if not cluster.is_chief:
        console.info(f"trained to step {step}; the chief evaluates and exports")
        return Result(step, math.nan, math.nan, None, None)
    if int(record.get("step", -1)) != step:
        commit()
    train_seconds = float(progress.elapsed.numpy())
    store.uploader.flush()
    best = record.get("best")
    weights_step = step
    if best and (cfg.export.weights == "best" or (bool(progress.stopped_early.numpy()) and es.restore_best)):
        why = "export.weights=best" if cfg.export.weights == "best" else "early stopping"
        console.info(f"{why}: restoring the best weights, from step {best['step']} "
                     f"({best['monitor']} {best['value']:.4f})")
        store.restore(tf.train.Checkpoint(model=net), best["step"])
        weights_step = best["step"]
    elif cfg.export.weights == "best":
        console.info("export.weights=best: this run holds no best checkpoint (no validation yet, or the best "
                     "was not among the checkpoints it restarted with); exporting the last weights")
    test_loss, test_acc, n_test = trainer.evaluate(data.eval_batches(splits.x_test, splits.y_test))
    console.info(f"test: accuracy {test_acc:.4f}, loss {test_loss:.4f} on {n_test} examples")
    card = {
        "model": cfg.model.name,
        "step": step,
        # Not `step` where export.weights or early stopping chose the best checkpoint.
        "weights_step": weights_step,
        "epochs_done": int(progress.epochs_done.numpy()),
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "train_seconds": round(train_seconds, 3),
        "data_checksum": splits.checksum,
        "class_names": list(splits.class_names),
        "config": cfg.model_dump(mode="json"),
        "tensorflow": tf.__version__,
        "distribution": {"strategy": cluster.name, "workers": cluster.workers, "replicas": cluster.replicas},
    }
    version, uri = export.export(net, cfg.export.uri, cfg.export.model_name, card, splits.x_test[:64],
                                 splits.class_names)
    console.info(f"exported model version {version} to {uri}")
    store.update(record, finished=True, export={"version": version, "uri": uri, "test_accuracy": test_acc,
                                                "test_loss": test_loss})
    store.uploader.flush()
    return Result(step, test_acc, test_loss, version, uri)


def _preempted(store: CheckpointStore, cfg: Config, step: int, is_chief: bool):
    if not is_chief:
        raise Preempted(f"SIGTERM: stopping at step {step}, where the chief commits a checkpoint; "
                        f"exiting to be retried")
    if store.uploader.flush(timeout=cfg.checkpoint.grace_seconds):
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


def _check_architecture(cfg: Config, record: dict, where: str) -> None:
    stored = record.get("fingerprint", {})
    for key, value in (("model.name", cfg.model.name), ("model.width", cfg.model.width)):
        if stored.get(key, value) != value:
            raise ConfigError(f"model.init_from: the weights at {where} are of another network ({key} "
                              f"{stored[key]!r}, this run {value!r}); set {key} to match or drop model.init_from")


def _checkpoint_at(uri: str, field: str, store: CheckpointStore) -> tuple[CheckpointStore, dict]:
    """A checkpoint named by URI, as the store holding it and its record: a
    run's checkpoint.uri means its newest checkpoint, `.../ckpt-<step>` that one."""
    named = re.fullmatch(r"(.+)/ckpt-(\d+)/?", uri)
    run_uri = named.group(1) if named else uri
    holder = store if run_uri.rstrip("/") == store.uri.rstrip("/") else \
        CheckpointStore(run_uri, store.keep, store.uploader)
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


def _starting_point(cfg: Config, store: CheckpointStore, latest: dict | None,
                    console: Console) -> tuple[CheckpointStore, dict | None, str | None]:
    """The store and record this run continues from, and the checkpoint's URI
    where that is checkpoint.resume_from's rather than the run's own newest."""
    wanted = cfg.checkpoint.resume_from
    # A run that has restarted from `wanted` and was then stopped (SIGTERM,
    # a lost node) carries on from its own checkpoints when retried.
    if wanted is None or (latest and latest.get("resumed_from", {}).get("request") == wanted):
        return store, latest, None
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
    available = set(store.backend.published(store.uri)) if source is store else {record["checkpoint"]}
    kept = [s for s in record["kept"] if f"ckpt-{s}" in available]
    best = record.get("best")
    if best and f"ckpt-{best['step']}" not in available:
        console.info(f"the best checkpoint before step {record['step']} (step {best['step']}) is not in "
                     f"{cfg.checkpoint.uri}; export.weights=best and restore_best count from here")
        best = None
    resumed_from = {"request": wanted, "checkpoint": where}
    return source, {**record, "kept": kept, "best": best, "resumed_from": resumed_from}, where
