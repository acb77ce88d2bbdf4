"""The divergence guard: stop a run whose loss or accuracy says it has broken, before it is saved.

A finite loss can still mean a destroyed run: a classifier head that overshoots until the backbone's
features die (every image embeds to the same point, kNN accuracy at chance, for good), or SimCLR's
collapse (loss stuck exactly at log(2B - 1)). None of these recover by training on, so the guard
stops the run with the step and the reason, and the last checkpoint written before the trouble
began is kept (no checkpoint is written while a signal is over its threshold).

Signals, each read only where the loop already has the values on the host: the loss and train
accuracy after every optimizer step on CPU (log steps only on CUDA, where a read stalls the GPU),
the kNN monitor at its readings. A "point" below is one such checked step:
- loss far above its start: the last `window` checked losses are each at least twice the
  start's (and at least 1 above it), the start being the median of the first `window` checked losses;
- loss stuck: the last `stuck_points` checked losses are equal to 1e-4 of their size (a constant embedding);
- train accuracy at chance (objectives with a classifier): the mean of the last `window` values is
  at most 1.5 x chance after a window mean of at least 3 x chance;
- kNN monitor at chance: top-1 at most 1.5 x chance at an epoch end, after starting at 3 x chance
  or more (from random initial weights kNN starts near chance, and that is not a collapse).
"""

from __future__ import annotations

import statistics
from collections import deque


def _all_equal(values: list[float]) -> bool:
    """The values agree to 1e-4 of their size (relative: a loss converging towards 0, such as 7e-5 then 6e-5,
    is not stuck, and with the guard reading every step on CPU it would otherwise look so; all exactly 0 is)."""
    return max(values) - min(values) <= 1e-4 * max(abs(v) for v in values)


class DivergenceGuard:
    """Watches logged losses, train accuracy and kNN monitor values; `check_*` return a reason to stop or None.

    Args:
        accuracy_chance: chance level of the train accuracy the method logs (1 / classes), or None.
        window: logged points averaged by the loss and accuracy signals.
        stuck_points: logged losses that must be equal for the loss to count as stuck.
    """

    def __init__(self, *, accuracy_chance: float | None = None, window: int = 5, stuck_points: int = 8):
        self.accuracy_chance = accuracy_chance
        self.window, self.stuck_points = window, stuck_points
        self.first_losses: list[float] = []
        self.losses: deque[float] = deque(maxlen=max(window, stuck_points))
        self.accuracies: deque[float] = deque(maxlen=window)
        self.best_accuracy = float("-inf")
        self.knn_start: float | None = None
        self.suspicious = False  # a signal is over its threshold: hold checkpoints back

    def check_step(self, step: int, loss: float, accuracy: float | None = None) -> str | None:
        """After a logged optimizer step: its loss (and train accuracy); a reason to stop, or None."""
        if len(self.first_losses) < self.window:
            self.first_losses.append(loss)
        self.losses.append(loss)
        reasons = [self._loss_far_above(), self._loss_stuck()]
        if accuracy is not None and self.accuracy_chance is not None:
            reasons.append(self._accuracy_at_chance(accuracy))
        return self._verdict(step, reasons)

    def check_monitor(self, epoch: int, step: int, knn_top1: float | None, chance: float | None) -> str | None:
        """At an epoch end: the kNN monitor's top-1 (epoch 0 is the start); a reason to stop, or None."""
        if knn_top1 is None or chance is None:
            return None
        if self.knn_start is None:
            self.knn_start = knn_top1
            return None
        reason = None
        if self.knn_start >= 3 * chance and knn_top1 <= 1.5 * chance:
            reason = (f"kNN top-1 fell to {knn_top1:.3f} at epoch {epoch} (chance {chance:.3f}; it was "
                      f"{self.knn_start:.3f} at the start): the embedding collapsed")
        return self._verdict(step, [reason])

    def _verdict(self, step: int, reasons: list[str | None]) -> str | None:
        found = [r for r in reasons if r]
        self.suspicious = bool(found) or self._over_threshold()
        return f"{found[0]} (step {step})" if found else None

    def _over_threshold(self) -> bool:
        """A signal already over its threshold but not yet for long enough to stop: the last loss far
        above the start, or the last three losses equal (the start of a stuck loss)."""
        if len(self.losses) >= 3 and _all_equal(list(self.losses)[-3:]):
            return True
        return len(self.first_losses) >= self.window and bool(self.losses) and self._far_above(self.losses[-1])

    def _far_above(self, value: float) -> bool:
        start = statistics.median(self.first_losses)
        return value >= start + max(1.0, abs(start))

    def _loss_far_above(self) -> str | None:
        if len(self.first_losses) < self.window or len(self.losses) < self.window:
            return None
        recent = list(self.losses)[-self.window:]
        if len(self.losses) > self.window and all(self._far_above(v) for v in recent):
            start = statistics.median(self.first_losses)
            return (f"the loss climbed to {statistics.fmean(recent):.4g} over the last {self.window} logged steps, "
                    f"far above its start {start:.4g}")
        return None

    def _loss_stuck(self) -> str | None:
        if len(self.losses) < self.stuck_points:
            return None
        recent = list(self.losses)[-self.stuck_points:]
        if _all_equal(recent):
            return (f"the loss has stayed at {recent[-1]:.6g} for {self.stuck_points} logged steps: the embedding "
                    f"is constant (for SimCLR, log(2B - 1) means every image embeds to the same point)")
        return None

    def _accuracy_at_chance(self, accuracy: float) -> str | None:
        self.accuracies.append(accuracy)
        if len(self.accuracies) < self.window:
            return None
        mean = statistics.fmean(self.accuracies)
        self.best_accuracy = max(self.best_accuracy, mean)
        chance = self.accuracy_chance
        if self.best_accuracy >= 3 * chance and mean <= 1.5 * chance:
            return (f"train accuracy fell to {mean:.3f} over the last {self.window} logged steps (chance {chance:.3f}, "
                    f"it had reached {self.best_accuracy:.3f})")
        return None
