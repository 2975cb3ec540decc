"""Where a run starts, and whether it may: its own newest checkpoint, the one
`checkpoint.resume_from` names, or nothing (a new run, perhaps warm-started
by `model.init_from`); and every check that the checkpoint's state means the
same here (config fingerprint, data checksum, network revision, the
architecture of init_from's weights). A refused start is a ConfigError
(exit 2) before anything is built.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from job import model, storage
from job.checkpoints import RECORD, CheckpointStore
from job.config import Config
from job.errors import ConfigError


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


def starting_point(cfg: Config, store: CheckpointStore, say: Callable[[str], None]) -> Start:
    """Where the run starts, checked against `cfg`; `say` reports what it
    notices on the way."""
    latest = None if cfg.checkpoint.resume == "never" else store.latest()
    start = _resume_from(cfg, store, latest, say)
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


def already_finished(cfg: Config, start: Start) -> bool:
    """Whether the run starts from a finished run's checkpoint that meets this
    config's stop conditions, which (unlike the fingerprint) may have changed
    since: a run stopped by `train.max_steps` carries on when the limit is raised."""
    latest = start.latest
    if not (latest and latest.get("finished")):
        return False
    return latest.get("stopped_early") or latest["step"] >= target_step(cfg, latest["steps_per_epoch"])


def target_step(cfg: Config, steps_per_epoch: int) -> int:
    """The step a run stops at, early stopping aside."""
    target = steps_per_epoch * cfg.train.epochs
    return target if cfg.train.max_steps is None else min(target, cfg.train.max_steps)


def check_data(cfg: Config, latest: dict, current: str, where: str) -> None:
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


def _resume_from(cfg: Config, store: CheckpointStore, latest: dict | None, say: Callable[[str], None]) -> Start:
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
        say(f"the best checkpoint before step {record['step']} (step {best['step']}) is not in "
            f"{cfg.checkpoint.uri}; export.weights=best and restore_best count from here")
        best = None
    resumed_from = {"request": wanted, "checkpoint": where}
    return Start(source, {**record, "kept": kept, "best": best, "resumed_from": resumed_from}, where)
