"""Tasks: the arithmetic split, prompt sets read from files, chat templates, and clear file errors."""

import json

import pytest
from conftest import compose_train

from gspo_cli.config import TaskConfig
from gspo_cli.data.files import TaskFileError
from gspo_cli.data.tasks import build_task
from gspo_cli.models.build import build_char_tokenizer
from gspo_cli.models.loading import load_tokenizer

GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "A box holds 6 eggs. How many in 2 boxes?", "answer": "6 * 2 = 12\n#### 12"},
    {"question": "Sam had 10 pens and lost 3. How many left?", "answer": "10 - 3 = 7\n#### 7"},
    {"question": "What is 1,000 plus 1?", "answer": "#### 1,001"},
    {"question": "Half of 9?", "answer": "9 / 2 = 4.5\n#### 4.5"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_arithmetic_split_is_unchanged():
    # The first problems of the default split (seed 1234), fixed since the first release: the
    # held-out set must never move, or earlier evaluations stop being comparable.
    task = build_task(TaskConfig())
    assert (len(task.train), len(task.eval)) == (10_000 - 256, 256)
    assert [(p.prompt, p.answer) for p in task.train[:3]] == [("21+40=", "61"), ("11+37=", "48"), ("16+71=", "87")]
    assert [(p.prompt, p.answer) for p in task.eval[:2]] == [("13+54=", "67"), ("26+16=", "42")]
    assert not {p.prompt for p in task.train} & {p.prompt for p in task.eval}
    assert task.reward("61", "61") == 1.0 and task.reward("6", "61") == 0.0


def test_gsm8k_reads_questions_and_the_answer_after_hashes(tmp_path):
    path = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    cfg = compose_train(["task=gsm8k", f"task.path={path}", "task.num_eval=2"]).task
    task = build_task(cfg)
    assert (len(task.train), len(task.eval)) == (3, 2)
    problems = {p.prompt.split("\n")[0]: p for p in task.train + task.eval}
    assert problems[GSM8K_ROWS[0]["question"]].answer == "7"
    assert problems[GSM8K_ROWS[3]["question"]].answer == "1,001"
    assert problems["Half of 9?"].prompt.endswith("put your final answer within \\boxed{}.")
    assert task.reward("so \\boxed{1001}", "1,001") == 1.0  # the math reward of task=gsm8k
    # Deterministic: the same file and seed give the same held-out problems.
    assert build_task(cfg).eval == task.eval


def test_math_task_from_parquet_with_a_separate_eval_file(tmp_path):
    import datasets

    rows = [{"problem": f"Compute {n}/4.", "solution": f"We get $\\boxed{{\\frac{{{n}}}{{4}}}}$."} for n in range(1, 6)]
    datasets.Dataset.from_list(rows[:3]).to_parquet(str(tmp_path / "train.parquet"))
    write_jsonl(tmp_path / "test.jsonl", rows[3:])
    cfg = compose_train(["task=math", f"task.path={tmp_path / 'train.parquet'}",
                         f"task.eval_path={tmp_path / 'test.jsonl'}"]).task
    task = build_task(cfg)
    assert [p.answer for p in task.train] == ["\\frac{1}{4}", "\\frac{2}{4}", "\\frac{3}{4}"]
    assert [p.answer for p in task.eval] == ["\\frac{4}{4}", "\\frac{5}{4}"]
    assert task.reward("\\boxed{0.5}", task.train[1].answer) == 1.0


def test_saved_dataset_dict_with_an_eval_split(tmp_path):
    import datasets

    def split(n):
        return datasets.Dataset.from_list([{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(n)])

    datasets.DatasetDict(train=split(4), test=split(2)).save_to_disk(str(tmp_path / "saved"))
    task = build_task(TaskConfig(name="jsonl", path=str(tmp_path / "saved"), eval_split="test"))
    assert [p.prompt for p in task.train] == ["0+1=", "1+1=", "2+1=", "3+1="]
    assert [(p.prompt, p.answer) for p in task.eval] == [("0+1=", "1"), ("1+1=", "2")]
    with pytest.raises(TaskFileError, match=r"no split 'validation'; its splits are \['test', 'train'\]"):
        build_task(TaskConfig(name="jsonl", path=str(tmp_path / "saved"), split="validation"))


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n\n{"prompt": "2+2=", "answer": "4"}\n'
                    '{"prompt": "3+3=", "answer": "6"\n')  # line 4 lacks its closing brace
    with pytest.raises(TaskFileError, match=f"{path}:4: not valid JSON"):
        build_task(TaskConfig(name="jsonl", path=str(path), num_eval=1))


def test_a_record_without_its_field_names_the_line(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="}\n{"prompt": "3+3=", "answer": "6"}\n')
    with pytest.raises(TaskFileError, match=f"{path}:2: field 'answer' is None"):
        build_task(TaskConfig(name="jsonl", path=str(path), num_eval=1))
    gsm = write_jsonl(tmp_path / "nohash.jsonl", GSM8K_ROWS[:2] + [{"question": "Q?", "answer": "no marker"}])
    with pytest.raises(TaskFileError, match=f"{gsm}:3: no reference answer"):
        build_task(compose_train(["task=gsm8k", f"task.path={gsm}", "task.num_eval=1"]).task)


def test_file_errors_name_the_file_and_the_choices(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"q": "1+1=", "a": "2"}, {"q": "2+2=", "a": "4"}])
    with pytest.raises(TaskFileError, match=r"no field 'prompt' \(task.prompt_key\); its fields are \['q', 'a'\]"):
        build_task(TaskConfig(name="jsonl", path=str(path), num_eval=1))
    with pytest.raises(TaskFileError, match="no such file"):
        build_task(TaskConfig(name="jsonl", path=str(tmp_path / "missing.jsonl")))
    with pytest.raises(TaskFileError, match="unknown file type"):
        build_task(TaskConfig(name="jsonl", path=str(write_jsonl(tmp_path / "q.csv", []))))
    with pytest.raises(ValueError, match="set task.path"):
        build_task(TaskConfig(name="gsm8k"))
    with pytest.raises(ValueError, match="use task=jsonl"):
        build_task(TaskConfig(path=str(path)))
    with pytest.raises(ValueError, match="must contain"):
        build_task(TaskConfig(template="Question:"))


def test_chat_template_wraps_prompts_after_the_tokenizer_is_known(tmp_path, real_base_dir):
    # The tokenizer of a checkpoint laid out like Qwen3's, with Qwen3's chat template for plain
    # messages (`tests/real_checkpoint.py`), loaded with `from_pretrained` as a run loads it.
    tokenizer = load_tokenizer(real_base_dir)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}])
    cfg = TaskConfig(name="jsonl", path=str(path), eval_path=str(path), template="Q: {prompt}", chat_template=True,
                     system_prompt="Be brief.", chat_template_kwargs={"enable_thinking": False})
    task = build_task(cfg)
    assert task.train[0].prompt == "Q: 1+1="  # plain text until the tokenizer is loaded
    chat = task.for_tokenizer(tokenizer)
    # Qwen3's layout; enable_thinking=false closes an empty think block after the generation prompt.
    turns = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ: {}<|im_end|>\n"
    reply = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert chat.train[0].prompt == turns.format("1+1=") + reply
    assert chat.eval[1].prompt == turns.format("2+2=") + reply
    assert chat.for_tokenizer(tokenizer) is chat  # applied once
    assert build_task(TaskConfig()).for_tokenizer(tokenizer).train[0].prompt == "21+40="  # off by default
    # Special tokens stay single tokens in the encoded prompt.
    ids = tokenizer(chat.train[0].prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids)[:2] == ["<|im_start|>", "system"]
    with pytest.raises(ValueError, match="no chat template"):
        task.for_tokenizer(build_char_tokenizer())


def test_custom_reward_by_import_path_from_the_command_line(tmp_path, monkeypatch):
    (tmp_path / "cli_rewards_mod.py").write_text(
        "def ends_in_answer(completion, answer):\n    return float(completion.endswith(answer))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = compose_train(["task.max_operand=9", "task.num_eval=10",
                         "+task.reward._target_=cli_rewards_mod.ends_in_answer"])
    task = build_task(cfg.task)
    assert task.reward("so 12", "12") == 1.0 and task.reward("12 so", "12") == 0.0
    rewards, metrics = task.score(["x 7", "7 x"], ["7", "7"])
    assert rewards == [1.0, 0.0] and metrics["reward/ends_in_answer/mean"] == 0.5


# ---------------------------------------------------------------------------- data sets by hub id


def write_hub_layout(root, splits: dict[str, list[dict]], config: str = "main"):
    """A directory laid out like openai/gsm8k's hub repository: `main/<split>-00000-of-00001.parquet`
    per split and a README whose YAML header declares the configuration."""
    import datasets

    (root / config).mkdir(parents=True)
    for split, rows in splits.items():
        datasets.Dataset.from_list(rows).to_parquet(str(root / config / f"{split}-00000-of-00001.parquet"))
    files = "".join(f"  - split: {split}\n    path: {config}/{split}-*\n" for split in splits)
    (root / "README.md").write_text(f"---\nconfigs:\n- config_name: {config}\n  data_files:\n{files}---\n")
    return root


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
    """`datasets` offline, its cache in a temporary folder."""
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read from the environment at import
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def test_a_data_set_repository_loads_through_load_dataset(tmp_path, offline_datasets):
    repo = write_hub_layout(tmp_path / "gsm8k", {"train": GSM8K_ROWS[:3], "test": GSM8K_ROWS[3:]})
    cfg = compose_train(["task=gsm8k", f"task.path={repo}", "task.config_name=main", "task.eval_split=test"]).task
    task = build_task(cfg)
    assert [p.answer for p in task.train] == ["7", "12", "7"] and [p.answer for p in task.eval] == ["1,001", "4.5"]
    assert task.train[0].prompt.startswith(GSM8K_ROWS[0]["question"])
    with pytest.raises(TaskFileError, match=r"load_dataset\(name='main', split='validation'\) failed .*Unknown split"):
        build_task(TaskConfig(name="gsm8k", path=str(repo), config_name="main", split="validation",
                              prompt_key="question"))
    with pytest.raises(TaskFileError, match=r"BuilderConfig 'socratic' not found"):
        build_task(TaskConfig(name="gsm8k", path=str(repo), config_name="socratic", prompt_key="question"))


def test_a_hub_id_goes_to_load_dataset_with_its_config_and_splits(tmp_path, offline_datasets, monkeypatch):
    import datasets

    repo = write_hub_layout(tmp_path / "gsm8k", {"train": GSM8K_ROWS[:3], "test": GSM8K_ROWS[3:]})
    calls, load_dataset = [], datasets.load_dataset

    def from_the_local_copy(path, name=None, split=None):  # stands in for the hub, offline
        calls.append((path, name, split))
        return load_dataset(str(repo) if path == "openai/gsm8k" else path, name=name, split=split)

    monkeypatch.setattr(datasets, "load_dataset", from_the_local_copy)
    cfg = compose_train(["task=gsm8k", "task.path=openai/gsm8k", "task.config_name=main", "task.eval_split=test"]).task
    task = build_task(cfg)
    assert calls == [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test")]
    assert (len(task.train), len(task.eval)) == (3, 2)
    assert task.eval[0].answer == "1,001"
    # Unreachable offline: one line naming the data set, what was asked and why.
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(TaskFileError, match=r"^nobody/nothing: datasets.load_dataset\(name=None, split='train'\) failed"):
        build_task(TaskConfig(name="jsonl", path="nobody/nothing"))
    # A relative file name that does not exist is not taken for a hub id.
    with pytest.raises(TaskFileError, match="data/missing.jsonl: no such file or directory"):
        build_task(TaskConfig(name="jsonl", path="data/missing.jsonl"))
