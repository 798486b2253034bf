"""Tests of `gspo_cli.report.logs`: metrics.jsonl, offline W&B (read back from disk) and the console."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import wandb
from wandb_files import history_by_step, read_finished_wandb_log

from gspo_cli.config import LoggerConfig
from gspo_cli.report.logs import RunLogger, default_netrc_path, resolve_wandb_mode


@pytest.fixture(autouse=True)
def offline_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep W&B offline, quiet and inside tmp_path; make stdout a non-terminal for rich."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.setenv("TTY_COMPATIBLE", "0")  # rich: plain-line console unless a test opts in


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def make_logger(tmp_path: Path, **kwargs) -> RunLogger:
    cfg = kwargs.pop("cfg", LoggerConfig(wandb=False, console_every=5))
    args = dict(config={"lr": 0.1}, run_name="test-run", total_steps=12)
    args.update(kwargs)
    return RunLogger(tmp_path / "run", cfg, **args)


def test_metrics_jsonl_one_line_per_call(tmp_path: Path) -> None:
    with make_logger(tmp_path) as logger:
        for step in range(3):
            logger.log({"reward/mean": 0.5 + step, "loss": step * 2}, step=step)
        assert logger.wandb_run is None and logger.wandb_dir is None
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert rows == [{"step": s, "reward/mean": 0.5 + s, "loss": float(s * 2)} for s in range(3)]
    assert isinstance(rows[1]["loss"], float)


def test_fresh_run_replaces_and_resumed_run_continues_an_earlier_log(tmp_path: Path, capsys) -> None:
    for _ in range(2):  # the same directory twice, as a fixed hydra.run.dir gives
        with make_logger(tmp_path) as logger:
            for step in range(3):
                logger.log({"loss": float(step)}, step=step)
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [0, 1, 2]
    assert "3 logged records of an earlier run removed" in capsys.readouterr().out
    with make_logger(tmp_path, start_step=2) as logger:  # resumed from the checkpoint of step 2
        logger.log({"loss": 9.0}, step=3)
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [0, 1, 3]


def test_offline_wandb_run_records_metrics(tmp_path: Path) -> None:
    cfg = LoggerConfig(wandb=True, project="p", tags=["t"], console_every=5)
    logger = make_logger(tmp_path, cfg=cfg)
    assert logger.wandb_run is not None
    for step in range(5):
        metrics = {"reward/mean": 0.1 * step, "clip/fraction": 0.01 * step}
        if step in (0, 4):
            metrics["eval/accuracy"] = 0.25 + step / 10
        logger.log(metrics, step=step)
    logger.log_samples(4, [{"prompt": "1+1=", "completion": "2", "answer": "2", "reward": 1.0}])
    wandb_dir = logger.wandb_dir
    logger.close()
    logger.close()  # idempotent

    assert wandb_dir is not None and wandb_dir.is_relative_to(tmp_path / "run")
    (store,) = wandb_dir.parent.glob("run-*.wandb")
    records = read_finished_wandb_log(store)
    history = history_by_step(records)
    assert sorted(history) == [0, 1, 2, 3, 4]
    assert history[2]["reward/mean"] == pytest.approx(0.2)  # not just the last step
    assert history[0]["eval/accuracy"] == pytest.approx(0.25)
    assert "eval/accuracy" not in history[1]
    assert history[4]["samples/_type"] == "table-file"  # the table shares step 4's row
    (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run_record.display_name == "test-run" and list(run_record.tags) == ["t"]
    config = {i.key: json.loads(i.value_json) for i in run_record.config.update}
    assert config["lr"] == 0.1
    (table,) = (wandb_dir / "media" / "table").glob("samples_4_*.table.json")
    content = json.loads(table.read_text())
    assert content["columns"] == ["prompt", "completion", "answer", "reward"]
    assert content["data"] == [["1+1=", "2", "2", 1.0]]
    samples = read_jsonl(tmp_path / "run" / "samples.jsonl")
    assert samples == [{"step": 4, "prompt": "1+1=", "completion": "2", "answer": "2",
                        "reward": 1.0}]


def test_disabled_logger_does_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(wandb, "init", lambda **_: pytest.fail("wandb.init called"))
    cfg = LoggerConfig(wandb=True)
    with make_logger(tmp_path, cfg=cfg, enabled=False) as logger:
        logger.log({"reward/mean": 1.0}, step=1)
        logger.log_samples(1, [{"prompt": "a"}])
        logger.print("hello")
    assert not (tmp_path / "run").exists()
    assert capsys.readouterr().out == ""


def test_wandb_init_failure_does_not_stop_training(tmp_path: Path, monkeypatch, capsys) -> None:
    def broken_init(**_: object) -> None:
        raise RuntimeError("no network\nsecond line")

    monkeypatch.setattr(wandb, "init", broken_init)
    with make_logger(tmp_path, cfg=LoggerConfig(wandb=True, mode="online")) as logger:
        for step in range(1, 4):
            logger.log({"reward/mean": float(step)}, step=step)
        logger.log_samples(3, [{"prompt": "a"}])
        assert logger.wandb_run is None
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 3
    out = capsys.readouterr().out
    warning = "W&B unavailable (RuntimeError: no network); continuing with metrics.jsonl only"
    assert out.count("W&B unavailable") == 1 and warning in out


def test_wandb_log_failure_warns_once_and_finishes(tmp_path: Path, monkeypatch, capsys) -> None:
    class BrokenRun:
        dir = str(tmp_path / "fake")
        finished = 0

        def log(self, *args: object, **kwargs: object) -> None:
            raise ConnectionError("lost")

        def finish(self, *args: object, **kwargs: object) -> None:
            BrokenRun.finished += 1

    monkeypatch.setattr(wandb, "init", lambda **_: BrokenRun())
    with make_logger(tmp_path, cfg=LoggerConfig(wandb=True)) as logger:
        logger.log({"reward/mean": 1.0}, step=1)
        logger.log({"reward/mean": 2.0}, step=2)
    assert BrokenRun.finished == 1
    assert capsys.readouterr().out.count("W&B unavailable (ConnectionError: lost)") == 1
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 2


def test_plain_console_lines(tmp_path: Path, capsys) -> None:
    with make_logger(tmp_path) as logger:
        for step in range(1, 13):
            metrics = {"reward/mean": step / 10, "clip/fraction": 0.125, "other": 3.0}
            if step == 7:
                metrics["eval/accuracy"] = 0.52
            logger.log(metrics, step=step)
        logger.print("a message")
    lines = capsys.readouterr().out.splitlines()
    steps = [line.split(" | ")[0] for line in lines if line.startswith("step ")]
    assert steps == ["step 1/12", "step 5/12", "step 7/12", "step 10/12", "step 12/12"]
    assert lines[0].startswith("step 1/12 | reward/mean 0.1 | clip/fraction 0.125 | ")
    assert lines[0].endswith(" s/step")
    assert "eval/accuracy" not in lines[1]
    assert "eval/accuracy 0.52" in lines[2] and "eval/accuracy 0.52" in lines[4]  # kept
    assert "other" not in lines[0]
    assert lines[-1] == "a message"


def test_terminal_console_shows_progress(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("COLUMNS", "200")  # at 80 columns the metrics text is cut short
    with make_logger(tmp_path, total_steps=3) as logger:
        assert logger._progress is not None
        logger.log({"reward/mean": 0.25, "eval/accuracy": 0.5}, step=1)
        logger.print("between steps")
        logger.log({"reward/mean": 0.75}, step=3)
    out = capsys.readouterr().out
    assert "between steps" in out and "3/3" in out
    assert "reward/mean 0.75" in out and "eval/accuracy 0.5" in out


@pytest.mark.parametrize(
    ("cfg_mode", "env", "netrc_text", "expected"),
    [
        ("Disabled", {"WANDB_MODE": "online", "WANDB_API_KEY": "k"}, None, "disabled"),
        (None, {"WANDB_MODE": "offline", "WANDB_API_KEY": "k"}, None, "offline"),
        (None, {"WANDB_API_KEY": "k"}, None, "online"),
        (None, {}, "machine api.wandb.ai\n  login user\n  password abc\n", "online"),
        (None, {}, "machine example.com login u password p\n", "offline"),
        (None, {"WANDB_BASE_URL": "https://wb.corp"}, "machine wb.corp password p\n", "online"),
        (None, {}, "", "offline"),
        (None, {}, None, "offline"),  # no netrc file at all
    ],
)
def test_resolve_wandb_mode(tmp_path, cfg_mode, env, netrc_text, expected) -> None:
    netrc_path = tmp_path / "netrc"
    if netrc_text is not None:
        netrc_path.write_text(netrc_text)
        netrc_path.chmod(0o600)
    assert resolve_wandb_mode(cfg_mode, env, netrc_path) == expected


def test_resolve_wandb_mode_without_netrc_path() -> None:
    assert resolve_wandb_mode(None, {}, None) == "offline"


def test_default_netrc_path_prefers_env(tmp_path: Path) -> None:
    assert default_netrc_path({"NETRC": str(tmp_path / "n")}) == tmp_path / "n"
    assert default_netrc_path({}).name in (".netrc", "_netrc")
