"""--resume=auto without run.name: the run folder is named from the config, so the same command finds it again."""

from __future__ import annotations

import pytest

from fastft.config import FinetuneConfig
from fastft.errors import ConfigError
from fastft.outputs import open_run_dir
from fastft.parallel.env import DistEnv
from fastft.train import _restarting, default_run_name, prepare_run_dir


def _cfg(out, **changes) -> FinetuneConfig:
    cfg = FinetuneConfig()
    cfg.model.name, cfg.data.root, cfg.run.out_dir, cfg.checkpoint.resume = "resnet18", "/data/x", str(out), "auto"
    for key, value in changes.items():
        section, field = key.split("__")
        setattr(getattr(cfg, section), field, value)
    return cfg


def test_the_name_ignores_what_does_not_change_training_and_follows_what_does(tmp_path) -> None:
    name = default_run_name(_cfg(tmp_path))
    assert name.startswith("resnet18-") and name == default_run_name(_cfg(tmp_path))
    same = [
        {"data__workers": 7},
        {"log__every_steps": 1},
        {"checkpoint__every_steps": 5},
        {"run__out_dir": str(tmp_path / "elsewhere")},
        {"checkpoint__resume": ""},
        {"run__overwrite": True},
        {"parallel__timeout_s": 30},
    ]
    for change in same:
        assert default_run_name(_cfg(tmp_path, **change)) == name, change
    for change in ({"optim__lr": 0.5}, {"data__batch_size": 9}, {"run__seed": 1}, {"data__root": "/data/y"}):
        assert default_run_name(_cfg(tmp_path, **change)) != name, change


def test_the_same_command_finds_its_checkpoint(tmp_path) -> None:
    cfg = _cfg(tmp_path)
    run_dir, resume = prepare_run_dir(cfg, DistEnv())
    assert run_dir == tmp_path / default_run_name(cfg) and resume is None
    run_dir.mkdir()  # made by the run once every check has passed
    (run_dir / "last.pt").write_bytes(b"x")
    assert prepare_run_dir(_cfg(tmp_path, data__workers=3), DistEnv()) == (run_dir, run_dir / "last.pt")


def test_a_run_stopped_before_its_first_save_starts_again_but_a_users_file_is_never_cleared(tmp_path) -> None:
    cfg = _cfg(tmp_path)
    run_dir = tmp_path / default_run_name(cfg)
    run_dir.mkdir()
    (run_dir / "config.toml").write_text("x")
    (run_dir / "events.jsonl").write_text("x")
    assert prepare_run_dir(cfg, DistEnv()) == (run_dir, None)
    assert _restarting(cfg, run_dir)  # so the run clears the stale outputs once every check has passed
    open_run_dir(run_dir, overwrite=_restarting(cfg, run_dir))
    assert not (run_dir / "events.jsonl").exists()  # the stale log of the attempt that saved nothing
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        prepare_run_dir(cfg, DistEnv())
    assert (run_dir / "notes.txt").read_text() == "mine"
