"""The trainer: compiled steps and the running sums they keep.

The step is tape -> loss -> gradients -> update -> metrics and nothing else;
when to log, evaluate or checkpoint is the controller's business (controller.py).
"""

from __future__ import annotations

import keras
import tensorflow as tf


class Trainer(tf.Module):
    def __init__(self, model: keras.Model, optimizer, global_batch_size: int, label_smoothing: float = 0.0,
                 jit_compile: bool = False, lookahead=None):
        """Build it inside the strategy's scope, as its variables must be.
        `lookahead` (optim.Lookahead) runs after each step, in cross-replica
        context, so every replica's weights move as one."""
        super().__init__(name="trainer")
        self.lookahead = lookahead
        self.strategy = tf.distribute.get_strategy()
        self.model = model
        self.optimizer = optimizer
        self.global_batch_size = global_batch_size
        self.label_smoothing = label_smoothing
        self.mixed = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        # Sums rather than Keras metric objects: plain variables go into the
        # checkpoint, so an epoch resumed half-way reports the same averages.
        # One variable summed across replicas at each step, so every worker
        # holds the totals and the chief can save them without asking the others.
        self.sums = tf.Variable(tf.zeros(3), trainable=False, aggregation=tf.VariableAggregation.SUM,
                                name="loss_correct_seen")
        self.optimizer.build(model.trainable_variables)
        self._step = tf.function(self._train_step, jit_compile=jit_compile)
        self.train_loop = tf.function(self._train_loop)
        self.evaluate_batch = evaluator(model, jit_compile)

    def _train_step(self, images, labels):
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            logits = self.model(images, training=True)
            per_example = _per_example_loss(labels, logits, self.label_smoothing)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=self.global_batch_size)
            scaled = self.optimizer.scale_loss(loss) if self.mixed else loss
        grads = tape.gradient(scaled, variables)
        if self.mixed and self.strategy.num_replicas_in_sync > 1:
            grads = self._overflow_everywhere_or_nowhere(grads)
        self.optimizer.apply(grads, variables)
        seen = tf.cast(tf.shape(labels)[0], tf.float32)
        self.sums.assign_add(tf.stack([tf.reduce_sum(per_example), _count_correct(labels, logits), seen]))
        return loss

    @staticmethod
    def _overflow_everywhere_or_nowhere(grads):
        """Keras' LossScaleOptimizer decides to skip a step from the gradients
        it is given, before they are summed across replicas; when only one
        replica overflows, replicas would disagree (and across workers, wait
        on each other for ever). So an overflow anywhere counts everywhere."""
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
        overflows = tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32))
        return [tf.where(overflows == 0, g, tf.constant(float("nan"), g.dtype)) for g in grads]

    def _train_loop(self, iterator, steps):
        """`steps` steps in one compiled call (Orbit's steps_per_loop); the
        last step's loss, summed over replicas, is the global batch's mean."""
        loss = tf.constant(0.0)
        for _ in tf.range(steps):
            per_replica = self.strategy.run(self._step, args=next(iterator))
            loss = self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
            if self.lookahead is not None:
                self.lookahead.after_step(self.optimizer.iterations)
        return loss

    def reset_sums(self) -> None:
        self.sums.assign(tf.zeros(3))

    def train_averages(self) -> tuple[float, float]:
        loss_sum, correct, seen = (float(v) for v in self.sums.numpy())
        return loss_sum / max(seen, 1.0), correct / max(seen, 1.0)

    def validate(self, dataset) -> tuple[float, float, int]:
        """(mean loss, accuracy, examples) of the network as it trains, over a
        finite dataset: the validation split, between epochs."""
        return score(self.evaluate_batch, dataset)


def _per_example_loss(labels, logits, smoothing: float):
    targets = tf.one_hot(labels, tf.shape(logits)[-1])
    if smoothing:
        targets = targets * (1 - smoothing) + smoothing / tf.cast(tf.shape(logits)[-1], tf.float32)
    # log_softmax rather than softmax_cross_entropy_with_logits, which has
    # no deterministic GPU kernel.
    return -tf.reduce_sum(targets * tf.nn.log_softmax(tf.cast(logits, tf.float32)), axis=-1)


def _count_correct(labels, logits):
    hits = tf.equal(tf.argmax(logits, axis=-1, output_type=labels.dtype), labels)
    return tf.reduce_sum(tf.cast(hits, tf.float32))


def evaluator(model: keras.Model, jit_compile: bool = False):
    """`model`'s compiled evaluation step: (images, labels) -> (loss sum, correct)."""
    def step(images, labels):
        logits = model(images, training=False)
        return tf.reduce_sum(_per_example_loss(labels, logits, 0.0)), _count_correct(labels, logits)
    return tf.function(step, jit_compile=jit_compile, reduce_retracing=True)


def score(evaluate_batch, dataset) -> tuple[float, float, int]:
    """(mean loss, accuracy, examples) of an evaluator over a finite dataset."""
    total, correct, n = 0.0, 0.0, 0
    for images, labels in dataset:
        loss_sum, hits = evaluate_batch(images, labels)
        total += float(loss_sum)
        correct += float(hits)
        n += int(labels.shape[0])
    return total / max(n, 1), correct / max(n, 1), n
