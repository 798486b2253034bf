"""Guards against runs going wrong without anyone noticing: non-finite updates and collapse."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


class TrainingDiverged(RuntimeError):
    """Too many steps in a row had only non-finite losses or gradients."""


@dataclass
class BadStepCounter:
    """Counts steps in a row whose every mini-batch update (of every epoch) was skipped as non-finite."""

    limit: int
    in_a_row: int = 0

    def update(self, skipped: int, num_updates: int) -> bool:
        """Record a step; True when the limit of bad steps in a row is reached."""
        self.in_a_row = self.in_a_row + 1 if skipped >= num_updates else 0
        return self.limit > 0 and self.in_a_row >= self.limit


@dataclass
class CollapseMonitor:
    """Warns once when the reward or the entropy falls off a cliff.

    Both are smoothed with an exponential moving average (noise of single steps is not a
    collapse); a collapse is the smoothed value falling below `drop` times its best (reward)
    or its first (entropy) value.
    """

    smoothing: float = 0.8
    drop: float = 0.5
    min_reward: float = 0.05  # below this the best reward is noise, not a level to fall from
    warned: set[str] = field(default_factory=set)
    _ema: dict[str, float] = field(default_factory=dict)
    _reference: dict[str, float] = field(default_factory=dict)

    def update(self, reward: float, entropy: float) -> Optional[str]:
        """Feed one step; returns a warning message the first time a collapse is seen."""
        for name, value in (("reward", reward), ("entropy", entropy)):
            ema = value if name not in self._ema else self.smoothing * self._ema[name] + (1 - self.smoothing) * value
            self._ema[name] = ema
            if name == "reward":
                self._reference[name] = max(self._reference.get(name, ema), ema)
            else:
                self._reference.setdefault(name, ema)
        for name in ("reward", "entropy"):
            reference = self._reference[name]
            if name in self.warned or (name == "reward" and reference < self.min_reward) or reference <= 0:
                continue
            if self._ema[name] < self.drop * reference:
                self.warned.add(name)
                what = "best" if name == "reward" else "initial"
                return (f"warning: {name} collapsed: its moving average {self._ema[name]:.4g} is below "
                        f"{self.drop:.0%} of its {what} value {reference:.4g} (lower trainer.lr, check the reward)")
        return None
