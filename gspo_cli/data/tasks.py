"""Tasks: prompt sets with reference answers, a held-out split, and the reward wiring.

`arithmetic` and `arithmetic-chain` are generated in memory; every other task (`gsm8k`, `math`, `jsonl`, or your
own `conf/task/*.yaml`) reads `task.path` (a file, a directory, or a hub id) through `data.files`. Prompts are kept
as plain text; `Task.for_tokenizer` wraps them in a chat template once the tokenizer is loaded.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from gspo_cli.config import TaskConfig
from gspo_cli.data.files import TaskFileError, read_rows
from gspo_cli.data.rewards import RewardScorer, after_hashes, last_boxed, reward_terms


@dataclass(frozen=True)
class Problem:
    """One prompt with its reference answer."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class ChatFormat:
    """How prompts become chat conversations (`task.chat_template=true`)."""

    system_prompt: Optional[str] = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Task:
    """A task: the training problems, the held-out problems, and the reward."""

    name: str
    train: list[Problem]
    eval: list[Problem]
    scorer: RewardScorer
    chat: Optional[ChatFormat] = None
    """Set until `for_tokenizer` has applied the chat template."""

    def reward(self, completion: str, answer: str) -> float:
        """Score one completion against its reference answer (terms that need its length are left out)."""
        return self.scorer.score([completion], [answer])[0][0]

    def score(self, completions: list[str], answers: list[str], num_tokens: Optional[list[int]] = None,
              max_tokens: Optional[int] = None) -> tuple[list[float], dict[str, float]]:
        """Rewards of N completions and their metrics (`reward/<name>/mean`, `reward/errors`)."""
        return self.scorer.score(completions, answers, num_tokens, max_tokens)

    def for_tokenizer(self, tokenizer) -> Task:
        """This task with its prompts in the tokenizer's chat template, if the task asks for one."""
        if self.chat is None:
            return self
        chat = self.chat

        def wrap(problems: list[Problem]) -> list[Problem]:
            return [Problem(chat_prompt(tokenizer, p.prompt, chat), p.answer) for p in problems]

        return dataclasses.replace(self, train=wrap(self.train), eval=wrap(self.eval), chat=None)


def chat_prompt(tokenizer, text: str, chat: ChatFormat) -> str:
    """`text` as the user turn of a conversation, ending where the assistant's reply begins."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("task.chat_template=true, but this model's tokenizer has no chat template")
    messages = [{"role": "system", "content": chat.system_prompt}] if chat.system_prompt else []
    messages.append({"role": "user", "content": text})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **chat.template_kwargs)


OPERATIONS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
}


def arithmetic_problems(max_operand: int, operators: str) -> list[Problem]:
    """Every `a <op> b` with operands in [0, max_operand], e.g. Problem("12+34=", "46")."""
    unknown = set(operators) - set(OPERATIONS)
    if unknown or not operators:
        raise ValueError(f"task.operators={operators!r}: choose from {''.join(OPERATIONS)}")
    return [
        Problem(f"{a}{op}{b}=", str(OPERATIONS[op](a, b)))
        for op in operators
        for a in range(max_operand + 1)
        for b in range(max_operand + 1)
    ]


CHAIN_TOTAL_MAX = 99  # the running total of an arithmetic chain stays in [0, 99]: two digits at most


def chain_problem(rng: random.Random, steps: int, max_operand: int, operators: str) -> Problem:
    """One chain of `steps` operations with its worked solution as the reference.

    The prompt lists the operations; the reference writes one line per operation with the
    running total, then the final answer after `####` (the marker `final_answer_match` reads):

        Problem("37+5-3=", "37+5=42\n42-3=39\n#### 39")

    Each operand is drawn from [0, max_operand], clamped so the total stays in [0, 99]; a
    line is 6-8 characters plus its newline, so the reference is about 8 tokens of the
    character tokenizer per operation, plus 7 for the answer line.
    """
    total = rng.randint(0, CHAIN_TOTAL_MAX)
    prompt, lines = [str(total)], []
    for _ in range(steps):
        op = rng.choice(operators)
        room = CHAIN_TOTAL_MAX - total if op == "+" else total
        operand = rng.randint(0, min(max_operand, room))
        new = OPERATIONS[op](total, operand)
        prompt.append(f"{op}{operand}")
        lines.append(f"{total}{op}{operand}={new}")
        total = new
    return Problem("".join(prompt) + "=", "\n".join(lines) + f"\n#### {total}")


REPEATED_START_MAX = 199  # start totals of a repeated chain: enough distinct prompts for a 512-problem probe


def repeated_chain_problem(rng: random.Random, steps: int, max_operand: int, operators: str) -> Problem:
    """One operation applied `steps` times, each line numbered by a countdown:

        Problem("37+5x3=", "3:37+5=42\n2:42+5=47\n1:47+5=52\n#### 52")

    Every line follows from the line before it alone (the count goes down by one, the total
    moves by the same operand), so a small model can learn chains of any length; in the listed
    form each line must find its own operand in the prompt, which the embedded models could not
    learn beyond a few operations (docs/experiments/paper.md). The operand is drawn from
    [1, max_operand]; a subtracting chain starts high enough to stay at or above 0.
    """
    op = rng.choice(operators)
    operand = rng.randint(1, max_operand)
    total = rng.randint(0, REPEATED_START_MAX) + (operand * steps if op == "-" else 0)
    prompt, lines = f"{total}{op}{operand}x{steps}=", []
    for count in range(steps, 0, -1):
        new = OPERATIONS[op](total, operand)
        lines.append(f"{count}:{total}{op}{operand}={new}")
        total = new
    return Problem(prompt, "\n".join(lines) + f"\n#### {total}")


CHAIN_FORMS = {"listed": chain_problem, "repeated": repeated_chain_problem}


def arithmetic_chain_problems(num_problems: int, steps: int, max_operand: int, operators: str,
                              seed: int, form: str = "listed") -> list[Problem]:
    """`num_problems` distinct chains of `steps` operations (`CHAIN_FORMS[form]`), seeded."""
    if form not in CHAIN_FORMS:
        raise ValueError(f"task.chain_form={form!r}: choose from {sorted(CHAIN_FORMS)}")
    if steps < 1:
        raise ValueError(f"task.chain_length={steps}: at least one operation")
    if not operators or set(operators) - {"+", "-"}:
        raise ValueError(f"task.operators={operators!r}: arithmetic-chain uses + and - (choose from '+-')")
    if max_operand < 1:
        raise ValueError(f"task.max_operand={max_operand}: at least 1")
    rng, problems, seen = random.Random(seed), [], set()
    for _ in range(20 * num_problems):  # short chains have few distinct prompts; do not loop forever
        problem = CHAIN_FORMS[form](rng, steps, max_operand, operators)
        if problem.prompt not in seen:
            seen.add(problem.prompt)
            problems.append(problem)
            if len(problems) == num_problems:
                break
    return problems


def split_heldout(problems: list[Problem], num_eval: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """Deterministic shuffle, then the first `num_eval` problems are held out: (train, eval)."""
    if not 0 < num_eval < len(problems):
        raise ValueError(f"task.num_eval={num_eval} must be between 1 and {len(problems) - 1}")
    shuffled = list(problems)
    random.Random(seed).shuffle(shuffled)
    return shuffled[num_eval:], shuffled[:num_eval]


# How the reference answer is read from a file's answer field (`task.answer_extract`).
ANSWER_EXTRACTORS: dict[str, Callable[[str], Optional[str]]] = {
    "none": lambda text: text.strip() or None,
    "hashes": after_hashes,  # GSM8K: "...reasoning...\n#### 72"
    "boxed": last_boxed,  # MATH: a worked solution ending in \boxed{...}
}


def file_problems(cfg: TaskConfig, path: str, split: str) -> list[Problem]:
    """The problems of one file: prompt through `task.template`, reference through `task.answer_extract`."""
    extract = ANSWER_EXTRACTORS[cfg.answer_extract]
    problems = []
    for row in read_rows(path, split, cfg.prompt_key, cfg.answer_key, cfg.config_name):
        reference = extract(row.answer)
        if reference is None:
            raise TaskFileError(f"{row.where}: no reference answer in field {cfg.answer_key!r} "
                                f"(task.answer_extract={cfg.answer_extract}): {row.answer[-200:]!r}")
        problems.append(Problem(cfg.template.replace("{prompt}", row.prompt), reference))
    return problems


def build_task(cfg: TaskConfig) -> Task:
    """Build the task named in the config."""
    scorer = RewardScorer(reward_terms(cfg.reward))
    if "{prompt}" not in cfg.template:
        raise ValueError(f"task.template={cfg.template!r} must contain {{prompt}}")
    if cfg.answer_extract not in ANSWER_EXTRACTORS:
        raise ValueError(f"task.answer_extract={cfg.answer_extract!r} is not one of {sorted(ANSWER_EXTRACTORS)}")
    if cfg.name == "arithmetic":
        if cfg.path is not None:
            raise ValueError("task.path is set, but task=arithmetic generates its prompts: use task=jsonl")
        problems = arithmetic_problems(cfg.max_operand, cfg.operators)
        train, held_out = split_heldout(problems, cfg.num_eval, cfg.seed)
        train, held_out = ([Problem(cfg.template.replace("{prompt}", p.prompt), p.answer) for p in part]
                           for part in (train, held_out))
    elif cfg.name == "arithmetic-chain":
        if cfg.path is not None:
            raise ValueError("task.path is set, but task=arithmetic-chain generates its prompts: use task=jsonl")
        problems = arithmetic_chain_problems(cfg.num_problems, cfg.chain_length, cfg.max_operand, cfg.operators,
                                             cfg.seed, cfg.chain_form)
        train, held_out = split_heldout(problems, cfg.num_eval, cfg.seed)
        train, held_out = ([Problem(cfg.template.replace("{prompt}", p.prompt), p.answer) for p in part]
                           for part in (train, held_out))
    elif cfg.path is None:
        raise ValueError(f"task={cfg.name} reads its prompts from a file: set task.path= "
                         "(JSONL, JSON, Parquet, a save_to_disk directory, or a hub id such as openai/gsm8k)")
    elif cfg.eval_path is not None or cfg.eval_split is not None:
        train = file_problems(cfg, cfg.path, cfg.split)
        held_out = file_problems(cfg, cfg.eval_path or cfg.path, cfg.eval_split or cfg.split)
    else:
        train, held_out = split_heldout(file_problems(cfg, cfg.path, cfg.split), cfg.num_eval, cfg.seed)
    chat = ChatFormat(cfg.system_prompt, dict(cfg.chat_template_kwargs)) if cfg.chat_template else None
    return Task(name=cfg.name, train=train, eval=held_out, scorer=scorer, chat=chat)


class PromptStream:
    """Endless, seeded stream of training problems: reshuffled every epoch, never repeating within one.

    Its position (`epoch`, `index`) is all the state needed to continue the stream exactly.
    """

    def __init__(self, problems: list[Problem], seed: int) -> None:
        self.problems = problems
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.problems)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def state(self) -> dict[str, int]:
        """The position in the stream, for checkpoints."""
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict[str, int]) -> None:
        """Continue from a position saved by `state()`."""
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._shuffled(self.epoch)

    def next_batch(self, n: int) -> list[Problem]:
        """The next `n` problems."""
        batch = []
        while len(batch) < n:
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._shuffled(self.epoch)
            batch.append(self.problems[self._order[self.index]])
            self.index += 1
        return batch
