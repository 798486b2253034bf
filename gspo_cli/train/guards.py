"""Guards against runs going wrong without anyone noticing: non-finite updates, collapse, and
runs that cannot learn because no group's rewards differ."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from gspo_cli.algo.batch_shaping import informative_groups


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


@dataclass
class NoSignalMonitor:
    """Warns once when the rewards of every group were equal for `steps` steps in a row.

    Group-relative advantages are then all 0, so the policy gradient is 0: the run spends its
    compute and cannot learn. The usual causes show in the numbers, and the warning names
    them: responses cut at max_new_tokens (no stop token reached), a reward that never
    matches (mean 0), or a task already solved (mean 1).
    """

    steps: int = 5
    """Steps in a row without signal before the warning; 0 turns the monitor off."""
    in_a_row: int = 0
    warned: bool = False
    _seen: list[tuple[float, Optional[float]]] = field(default_factory=list)  # (reward mean, truncated fraction)

    def update(self, rewards: torch.Tensor, group_size: int, record: dict[str, Any]) -> Optional[str]:
        """Feed one step: its [N] rewards (G of a prompt contiguous) and its metrics record
        (`reward/mean`, `response/truncated_fraction`); returns the warning the first time."""
        if self.steps <= 0 or self.warned:
            return None
        if bool(informative_groups(rewards.detach().float().cpu(), group_size).any()):
            self.in_a_row, self._seen = 0, []
            return None
        self.in_a_row += 1
        self._seen.append((float(record["reward/mean"]), record.get("response/truncated_fraction")))
        if self.in_a_row < self.steps:
            return None
        self.warned = True
        return self.message(group_size)

    def message(self, group_size: int) -> str:
        """The warning, with the likely causes the observed numbers point to."""
        rewards = [r for r, _ in self._seen]
        mean = sum(rewards) / len(rewards)
        fractions = [t for _, t in self._seen if t is not None]
        truncated = sum(fractions) / len(fractions) if fractions else None
        causes = []
        if truncated is not None and truncated >= 0.5:
            causes.append(f"responses are cut at trainer.max_new_tokens before any stop token (truncated "
                          f"fraction {truncated:.2f}): raise trainer.max_new_tokens, or check that the model's "
                          "end-of-turn token is among its stop tokens (generation_config.json's eos_token_id, "
                          "trainer.stop_strings)")
        if max(rewards) <= 0.0:
            causes.append(f"the reward never matches (reward mean {mean:.3g}): check task.reward against the "
                          "answer format the prompt asks for (task.template, task.chat_template)")
        elif min(rewards) >= 1.0:
            causes.append(f"every response is already right (reward mean {mean:.3g}): the task is too easy "
                          "for this model")
        else:
            causes.append(f"the reward does not tell a prompt's responses apart (reward mean {mean:.3g})")
        observed = f"reward mean {mean:.3g}" + ("" if truncated is None else f", truncated fraction {truncated:.2f}")
        return (f"warning: no learning signal for {len(rewards)} steps in a row: the {group_size} rewards of "
                f"every prompt were equal ({observed}), so every advantage is 0 and the run cannot learn. "
                f"Likely cause{'s' if len(causes) > 1 else ''}: " + "; ".join(causes)
                + ". (trainer.no_signal_warn_steps=0 turns this warning off)")
