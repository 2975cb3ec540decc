"""The in-process backend: the SavedModel loaded in this worker, and the
versions it watches for under the model base."""

from __future__ import annotations

import gc
import hashlib
import logging
import threading

import numpy as np

from common import layout
from common.images import BadInput
from serve import checks, metrics, rollout, store
from serve.backends import Loaded, Unavailable
from serve.settings import Settings

log = logging.getLogger("serve")

# A refused version as /readyz tells it, by rollout check (serve/checks.py's reasons).
REFUSED = {"probe": "probe answers differ", "accuracy": "test accuracy below SERVE_MIN_ACCURACY",
           "unloadable": "its files cannot be served"}


class InProcess:
    """Serves the version all the service's workers agreed on (serve/rollout.py).

    A watcher thread loads and checks what this worker would serve next
    beside what it serves, then offers it; the service switches when every
    worker holds it, and each model call answers with the version active at
    that moment. No request sees a half-loaded model, and none is answered by
    an older version after another was answered by a newer one."""

    def __init__(self, settings: Settings):
        if not settings.model_uri:
            raise ValueError("SERVE_MODEL_URI (or --model-uri) is required for the in-process backend")
        self.base = settings.model_uri
        self.name = settings.name
        self.settings = settings
        self.rollout = rollout.Rollout(settings.state_dir)
        self.held: dict[int, Loaded] = {}
        self.found: list[int] | None = None  # None until the store has been listed once
        # Why a version (None: the model store itself) is not served, while that lasts: /readyz's
        # reason, which anyone may read, so in a few words without the store's URI, endpoint or
        # error text; the log has those.
        self.problems: dict[int | None, str] = {}
        # Set once this worker holds the active version, or has tried and cannot, or none is
        # active yet: until then it takes no connections (serve/workers.py), so it does not
        # answer 503 while it loads what the others answer with, nor hang on a store it cannot read.
        self.joined = threading.Event()
        # version -> store.fingerprint of the files refused: refused (and logged) once, not at every poll.
        self._refused: dict[int, str] = {}
        # version (None: the store) -> the cause it failed with, so that a failure tried again at every
        # poll is logged when it starts or changes, not each time.
        self._failing: dict[int | None, tuple] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="model-watch", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while True:
            try:
                self.refresh()
            except Exception as exc:  # the store not answering (or a bug) must not kill the watcher
                self._failed(None, exc)
            # Whatever the store holds, the worker answers (/healthz at least) once it has looked.
            self.joined.set()
            if self._stop.wait(self.settings.poll_seconds):
                return

    def refresh(self) -> None:
        if self.rollout.active() is None:
            self.joined.set()  # nothing served yet, so nothing to hold first: answer now, however long listing takes
        found = store.versions(self.base)
        self._recovered(None)
        self.found = found
        # A withdrawn version's trouble is over; were it published again, it is tried and told again.
        self.problems = {v: why for v, why in self.problems.items() if v in found}
        self._failing = {v: cause for v, cause in self._failing.items() if v in found}
        active = self.rollout.active()
        # What the others answer with comes first: a worker that starts (or restarts)
        # mid-run takes connections once it holds it, or knows it cannot.
        if active and active.version in found:
            self._hold(active.version)
        self.joined.set()
        target = self._choose(found)
        self.rollout.publish(self.held, target)
        switched = self.rollout.try_switch()
        if switched:
            before, after = switched
            back = before is not None and after.version < before.version
            metrics.MODEL_SWITCHES.labels("back" if back else "forward").inc()
            log.info("%s: every worker switched from %s to version %d", self.name,
                     f"version {before.version}" if before else "no version", after.version)
        self._release(self.rollout.active(), target)

    def _choose(self, found: list[int]) -> int | None:
        """The version this worker would serve: the pinned one, else the newest
        that passes its checks (loaded here if it is not yet)."""
        pin = self.settings.model_version
        if pin is not None:
            if pin not in found:
                self.problems[pin] = f"version {pin} (SERVE_MODEL_VERSION) is not in the model store yet"
                return None
            found = [pin]
        for version in reversed(found):
            if self._hold(version):
                return version
        return None

    def _hold(self, version: int) -> bool:
        """Load `version` unless it is held already; False if it cannot be: its files
        refused (until they change), or the store or local disk failing (tried again at the next poll)."""
        if version in self.held:
            return True
        stamp = None
        try:
            stamp = store.fingerprint(self.base, version)
            if self._refused.get(version) == stamp:
                return False
            loaded = self._load(version)
        except store.VersionError as exc:
            self._refuse(version, stamp, exc)
            return False
        except Exception as exc:
            self._failed(version, exc)
            return False
        self._recovered(version)
        self.held = {**self.held, version: loaded}
        # TensorFlow and a loaded model leave ~340k objects for the garbage
        # collector to walk in every full collection (100+ ms holding the
        # GIL, stalling every request thread). They live as long as the
        # process, so they are moved out of its sight. Measured in
        # docs/benchmarks.md (Serving).
        gc.collect()
        gc.freeze()
        log.info("%s version %d loaded in this worker", self.name, version)
        return True

    def _refuse(self, version: int, stamp: str | None, exc: store.VersionError) -> None:
        """A version whose files cannot be served: the service logs and counts it once."""
        self._refused[version] = stamp
        reason = getattr(exc, "reason", "unloadable")
        where = store.where(self.base, version)
        self.problems[version] = f"version {version} refused: {REFUSED.get(reason, reason)}"
        metrics.MODEL_REFRESH_FAILURES.inc()
        if self.rollout.first_to_tell(f"refused-{version}-{hashlib.sha256(str(stamp).encode()).hexdigest()[:16]}"):
            metrics.MODEL_VERSIONS_REFUSED.labels(reason).inc()
            log.error("refused %s version %d at %s (%s): %s", self.name, version, where, reason, exc)

    def _failed(self, version: int | None, exc: Exception) -> None:
        """A failure tried again at the next poll: logged when it starts or its cause changes."""
        what = (f"listing {self.name} versions under {self.base}" if version is None
                else f"loading {self.name} version {version} from {store.where(self.base, version)}")
        self.problems[version] = "model store unreachable" if version is None else f"loading version {version} failed"
        metrics.MODEL_REFRESH_FAILURES.inc()
        if self._failing.get(version) != _cause(exc):
            self._failing[version] = _cause(exc)
            log.warning("%s failed (tried again every %gs): %s", what, self.settings.poll_seconds,
                        store.describe(exc))

    def _recovered(self, version: int | None) -> None:
        self.problems.pop(version, None)
        if self._failing.pop(version, None) is not None and version is None:
            log.info("listing %s versions under %s works again", self.name, self.base)

    def _release(self, active: rollout.Active | None, target: int | None) -> None:
        """Drop versions no longer needed: all but the active one and the target,
        and, with SERVE_KEEP_PREVIOUS, the newest older one, so that withdrawing
        the active version rolls back without a load."""
        keep = {v for v in (target, active and active.version) if v is not None}
        older = [v for v in self.held if active and v < active.version]
        if self.settings.keep_previous and older:
            keep.add(max(older))
        if set(self.held) - keep:
            self.held = {v: loaded for v, loaded in self.held.items() if v in keep}
            self.rollout.publish(self.held, target)

    def _load(self, version: int) -> Loaded:
        path = store.local_path(self.base, version, self.settings.cache_dir)
        with checks.loadable():
            return self._open(version, path)

    def _open(self, version: int, path) -> Loaded:
        import tensorflow as tf

        saved, signatures = checks.load(path)
        signature = signatures[layout.SIGNATURE]
        signature(images=tf.zeros([1, 32, 32, 3], tf.uint8))  # warm up before anyone waits on it
        if not checks.check(path, signature, self.settings.min_accuracy):
            log.warning("%s version %d has no probe record (exported before the job wrote one): "
                        "served unchecked", self.name, version)
        labels = layout.labels(path)
        # The SignatureDefs as saved, which is what TF Serving's metadata reports.
        return Loaded(version, signature, labels, signatures.get("predict_image_bytes"),
                      dict(saved.meta_graphs[0].signature_def), layout.read_card(path))

    def _serving(self) -> Loaded:
        loaded = self.status()
        if loaded is None:
            raise Unavailable("no model version loaded yet")
        return loaded

    def predict(self, images: np.ndarray) -> tuple[dict[str, np.ndarray], Loaded]:
        import tensorflow as tf

        loaded = self._serving()
        outputs = loaded.predict(images=tf.constant(images, dtype=tf.uint8))
        return {name: value.numpy() for name, value in outputs.items()}, loaded

    def predict_bytes(self, encoded: list[bytes]) -> tuple[dict[str, np.ndarray], Loaded]:
        """Encoded images through the model's own decoding (predict_image_bytes), as TF Serving runs it."""
        import tensorflow as tf

        loaded = self._serving()
        if loaded.predict_bytes is None:
            raise BadInput(f"version {loaded.version} has no predict_image_bytes signature")
        try:
            outputs = loaded.predict_bytes(image_bytes=tf.constant(encoded, dtype=tf.string))
        except tf.errors.InvalidArgumentError as exc:  # an image Pillow reads but TensorFlow does not
            raise BadInput(f"predict_image_bytes could not decode an image: {exc.message.splitlines()[0]}") from None
        return {name: value.numpy() for name, value in outputs.items()}, loaded

    def signature_defs(self, version: int) -> dict:
        loaded = self.status()
        if loaded is None or loaded.version != version:
            raise Unavailable(f"version {version} is not loaded")
        return loaded.signature_defs

    def card(self, version: int) -> dict:
        held = self.held.get(version)
        if held is None or held.card is None:
            raise LookupError(f"version {version} has no model card")
        return held.card

    @property
    def waiting_for(self) -> str | None:
        """Why this worker answers with no version, for /readyz; None when it answers with one."""
        if self.status() is not None:
            return None
        if self.problems:
            return "; ".join(tuple(self.problems.values()))  # a copy: the watcher thread may be adding one
        if self.found is None:
            return "looking for versions in the model store"
        if not self.found:
            return "no version in the model store yet"
        return f"loading version {self.found[-1]} in every worker"

    def status(self) -> Loaded | None:
        """The version the service answers with, as this worker holds it."""
        active = self.rollout.active()
        return self.held.get(active.version) if active else None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self.rollout.leave()


def _cause(exc: Exception) -> tuple:
    """What makes two failures the same: an OSError's message may name a fresh
    temporary path at each attempt (a full cache), its errno does not."""
    if isinstance(exc, OSError) and exc.errno:
        return type(exc).__name__, exc.errno
    return type(exc).__name__, str(exc)

