"""Resuming with a changed config: every key is classified (must-match / may-change / may-change-noted), a must-match
change is one line naming the key and both values, the others are applied (and the noted ones logged)."""

from __future__ import annotations

import dataclasses
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "reliability"))
from _reliability import FAST, cli, error_line, events, mentions, trained_run

from fastft import resume
from fastft.config import FinetuneConfig
from fastft.errors import ConfigError

# --------------------------------------------------------------------------------------------------------------------
# The table


def test_every_config_field_is_classified_and_nothing_else() -> None:
    # Fails when a field is added to fastft/config.py without deciding what a change means on resume.
    keys = resume.config_keys()
    assert len(keys) > 60
    assert sorted(set(keys) - set(resume.RULES)) == [], "unclassified: add them to fastft.resume.RULES and the README"
    assert sorted(set(resume.RULES) - set(keys)) == [], "stale entries in fastft.resume.RULES"
    assert {r.kind for r in resume.RULES.values()} == {resume.MUST, resume.MAY, resume.NOTED}
    assert all(r.why for r in resume.RULES.values() if r.kind != resume.MAY), "a refusal or a note must say why"


def test_the_readme_lists_every_key_under_its_class() -> None:
    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text.split("### Resuming with a changed config", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and "`" in line:
            cells = [c.strip() for c in line.strip("|").split("|")]
            for key in cells[1].replace("`", "").split(", "):
                rows[key] = cells[0]
    assert {k: rows.get(k) for k in resume.RULES} == {k: r.kind for k, r in resume.RULES.items()}


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        # the cases the issue reported (each a traceback before), and the ones it names as applied or noted
        ("model.freeze", resume.MUST),
        ("optim.name", resume.MUST),
        ("optim.layer_decay", resume.MUST),
        ("optim.unfreeze", resume.MUST),
        ("head.sweep_lr", resume.MUST),
        ("data.batch_size", resume.MUST),
        ("optim.epochs", resume.MAY),
        ("optim.max_steps", resume.MAY),
        ("optim.lr", resume.MAY),
        ("log.every_steps", resume.MAY),
        ("run.eval_every_epochs", resume.MAY),
        ("precision.dtype", resume.NOTED),
    ],
)
def test_classes_of_the_keys_the_issue_names(key, kind) -> None:
    assert resume.classify(key).kind == kind


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 3
    if isinstance(value, float):
        return value / 2 + 0.3  # no float default is its fixed point 0.6 (0.25 would leave eval.threshold 0.5 as is)
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, list):
        return [*value, value[-1]] if value else ["x"]
    raise TypeError(value)


def _state(saved: FinetuneConfig, *, batch: int = 0, world: int = 1) -> dict:
    return {
        "meta": {"config": dataclasses.asdict(saved), "world_size": world},
        "batch": batch,
        "best": {"metric": "f1_macro", "value": 0.5, "epoch": 1},
    }


@pytest.mark.parametrize("key", resume.config_keys())
def test_a_change_of_any_key_does_what_its_class_says(key, caplog) -> None:
    section, name = key.split(".")
    now = FinetuneConfig()
    old = getattr(now, section).__dict__[name]
    new = _changed(old)
    setattr(getattr(now, section), name, new)
    state = _state(FinetuneConfig())
    rule = resume.classify(key)
    if rule.kind == resume.MUST and not (rule.same and rule.same(old, new)):
        with pytest.raises(ConfigError) as exc:
            resume.reconcile(state, now, world_size=1, path=Path("r/last.pt"))
        assert mentions(str(exc.value), "r/last.pt", f"{key}={old!r}", repr(new))
        assert "\n" not in str(exc.value)
        return
    with caplog.at_level("WARNING", logger="fastft"):
        notes = resume.reconcile(state, now, world_size=1, path=Path("r/last.pt"))
    if rule.kind == resume.NOTED:
        assert len(notes) == 1 and key in notes[0] and notes[0] in caplog.text
    else:
        assert notes == [] and caplog.text == ""


def test_a_key_the_checkpoint_predates_counts_as_its_default() -> None:
    """A checkpoint saved before data.sampler existed shuffled: resuming it with the balanced sampler is a must-match
    change (the epoch's order), and resuming with the default is not."""
    state = _state(FinetuneConfig())
    del state["meta"]["config"]["data"]["sampler"]
    now = FinetuneConfig()
    now.data.sampler = "balanced"
    with pytest.raises(ConfigError, match=re.escape("saved with data.sampler='shuffle', this run has 'balanced'")):
        resume.reconcile(state, now, world_size=1, path=Path("last.pt"))
    assert resume.reconcile(state, FinetuneConfig(), world_size=1, path=Path("last.pt")) == []
    del state["meta"]["config"]["features"]  # a whole section it predates: its keys at their defaults
    assert resume.reconcile(state, FinetuneConfig(), world_size=1, path=Path("last.pt")) == []


def test_a_changed_best_metric_resets_the_best_so_far() -> None:
    now = FinetuneConfig()
    now.checkpoint.best_metric = "top1"
    state = _state(FinetuneConfig())
    resume.reconcile(state, now, world_size=1, path=Path("last.pt"))
    assert state["best"] == {"metric": "top1", "value": None, "epoch": None}


def test_a_mid_epoch_checkpoint_needs_the_same_world_size() -> None:
    with pytest.raises(ConfigError, match="saved mid-epoch by 2 processes, resumed by 1"):
        resume.reconcile(_state(FinetuneConfig(), batch=3, world=2), FinetuneConfig(), world_size=1, path=Path("x"))
    resume.reconcile(_state(FinetuneConfig(), batch=0, world=2), FinetuneConfig(), world_size=1, path=Path("x"))


def test_the_optimizer_state_loads_with_this_runs_hyperparameters() -> None:
    w = torch.nn.Parameter(torch.ones(3))
    old = torch.optim.SGD([{"params": [w], "weight_decay": 0.1}], lr=0.1, momentum=0.9)
    w.grad = torch.ones(3)
    old.step()
    new = torch.optim.SGD([{"params": [w], "weight_decay": 0.3}], lr=0.1, momentum=0.5)
    resume.load_optimizer_state(new, old.state_dict())
    assert new.param_groups[0]["weight_decay"] == 0.3 and new.param_groups[0]["momentum"] == 0.5
    torch.testing.assert_close(new.state[w]["momentum_buffer"], torch.full((3,), 1.1))  # grad + wd * w, carried over


# --------------------------------------------------------------------------------------------------------------------
# End to end, through the CLI, from a real run's last.pt


@pytest.fixture(scope="module")
def run(shapes4, tmp_path_factory):
    return trained_run(shapes4, tmp_path_factory)["result"]


def _resume(run, shapes4, dst: Path, *extra: str) -> tuple[int, str, Path]:
    dst.mkdir()
    shutil.copy(run.paths["last"], dst / "last.pt")
    # the trained run's settings (tests/conftest.py tiny_config + trained_run), then the change under test
    rc, err = cli(
        "train",
        f"--data.root={shapes4}",
        *FAST,
        "--data.batch_size=8",
        "--data.workers=0",
        "--optim.epochs=2",
        "--optim.lr=0.01",
        "--model.freeze=until:layer3",
        "--checkpoint.every_steps=4",
        "--checkpoint.every_epochs=2",
        f"--resume={dst / 'last.pt'}",
        *extra,
    )
    return rc, err, dst


@pytest.mark.parametrize(
    ("change", "key", "saved", "new"),
    [
        ("--model.freeze=backbone", "model.freeze", "'until:layer3'", "'backbone'"),
        ("--optim.name=adamw", "optim.name", "'sgd'", "'adamw'"),
        ("--optim.layer_decay=0.5", "optim.layer_decay", "1.0", "0.5"),
        ("--optim.unfreeze=['3:layer3']", "optim.unfreeze", "[]", "['3:layer3']"),
        ("--head.sweep_lr=[0.1, 0.01]", "head.sweep_lr", "[]", "[0.1, 0.01]"),
    ],
)
def test_a_must_match_change_is_one_line_naming_key_and_values(run, shapes4, tmp_path, change, key, saved, new):
    rc, err, dst = _resume(run, shapes4, tmp_path / "r", change)
    assert rc == 2 and mentions(error_line(err), str(dst / "last.pt"), f"{key}={saved}", new)
    assert sorted(p.name for p in dst.iterdir()) == ["last.pt"]


def test_may_change_keys_apply_and_noted_ones_are_logged(run, shapes4, tmp_path) -> None:
    # one more epoch at another LR (constant schedule), judged by another metric
    rc, err, dst = _resume(
        run,
        shapes4,
        tmp_path / "r",
        "--optim.epochs=3",
        "--optim.lr=0.02",
        "--optim.schedule=constant",
        "--log.every_steps=1",
        "--checkpoint.best_metric=top1",
    )
    assert rc == 0, err[-3000:]
    assert "checkpoint.best_metric changed from 'f1_macro' to 'top1' on resume" in err
    steps = [e for e in events(dst) if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(13, 19))  # 6 steps of epoch 3, after the saved 12
    assert {e["lr"] for e in steps} == {0.02}
    best = torch.load(dst / "best.pt", weights_only=True)
    assert best["best"]["metric"] == "top1" and best["best"]["epoch"] == 3  # reset, so epoch 3 is the best so far
