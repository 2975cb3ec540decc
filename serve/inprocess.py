"""The in-process backend: the SavedModel loaded in this worker, and the
versions it watches for under the model base."""

from __future__ import annotations

import gc
import hashlib
import logging
import threading

import numpy as np

from serve import checks, metrics, models, rollout
from common import layout
from serve.backends import Loaded, Unavailable
from serve.images import BadInput
from serve.settings import Settings

log = logging.getLogger("serve")


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
        self.last_error: str | None = None
        # Why nothing is served yet, for /readyz: a pinned version not there yet, refused versions.
        self.waiting_for: str | None = None
        # Set once this worker holds the active version, or none is active yet: until then
        # it takes no connections (serve/workers.py), so it never answers 503 while it loads.
        self.joined = threading.Event()
        # version -> models.fingerprint of the files refused: refused (and logged) once, not at every poll.
        self._refused: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="model-watch", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while True:
            try:
                self.refresh()
            except Exception as exc:  # a bad version or a storage hiccup must not kill the watcher
                self.last_error = f"{type(exc).__name__}: {exc}"
                metrics.MODEL_REFRESH_FAILURES.inc()
                log.warning("model refresh failed: %s", self.last_error)
            if self._stop.wait(self.settings.poll_seconds):
                return

    def refresh(self) -> None:
        found = models.versions(self.base)
        active = self.rollout.active()
        # What the others answer with comes first: a worker that starts (or restarts)
        # mid-run takes connections only once it holds it.
        if active and active.version in found:
            self._hold(active.version)
        if active is None or active.version in self.held:
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
        active = self.rollout.active()
        if active and active.version in self.held:
            self.joined.set()
            self.last_error = self.waiting_for = None
        self._release(active, target)

    def _choose(self, found: list[int]) -> int | None:
        """The version this worker would serve: the pinned one, else the newest
        that passes its checks (loaded here if it is not yet)."""
        pin = self.settings.model_version
        if pin is not None:
            if pin not in found:
                self.waiting_for = f"version {pin} (SERVE_MODEL_VERSION) is not under {self.base} yet"
                return None
            found = [pin]
        for version in reversed(found):
            if self._hold(version):
                return version
        return None

    def _hold(self, version: int) -> bool:
        """Load `version` unless it is held already; False if its checks refuse it."""
        if version in self.held:
            return True
        stamp = models.fingerprint(self.base, version)
        if self._refused.get(version) == stamp:
            return False
        try:
            loaded = self._load(version)
        except checks.Refused as exc:
            self._refused[version] = stamp
            self.waiting_for = f"version {version} refused: {exc}"
            if self.rollout.first_to_tell(f"refused-{version}-{hashlib.sha256(stamp.encode()).hexdigest()[:16]}"):
                metrics.MODEL_VERSIONS_REFUSED.labels(exc.reason).inc()
                log.error("refused %s version %d (%s): %s", self.name, version, exc.reason, exc)
            return False
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
        import tensorflow as tf

        path = models.local_path(self.base, version, self.settings.cache_dir)
        signatures = tf.saved_model.load(str(path)).signatures
        signature = signatures[layout.SIGNATURE]
        signature(images=tf.zeros([1, 32, 32, 3], tf.uint8))  # warm up before anyone waits on it
        if not checks.check(path, signature, self.settings.min_accuracy):
            log.warning("%s version %d has no probe record (exported before the job wrote one): "
                        "served unchecked", self.name, version)
        labels = layout.labels(path)
        # The SignatureDefs as saved, which is what TF Serving's metadata reports.
        from tensorflow.core.protobuf import saved_model_pb2

        saved = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
        return Loaded(version, signature, labels, signatures.get("predict_image_bytes"),
                      dict(saved.meta_graphs[0].signature_def))

    def _serving(self) -> Loaded:
        loaded = self.status()
        if loaded is None:
            raise Unavailable(f"no model loaded yet from {self.base}")
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

    def status(self) -> Loaded | None:
        """The version the service answers with, as this worker holds it."""
        active = self.rollout.active()
        return self.held.get(active.version) if active else None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self.rollout.leave()
