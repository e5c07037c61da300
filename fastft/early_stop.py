"""Early stopping: the run ends after `checkpoint.patience` evaluations in which `checkpoint.best_metric` did not
improve by more than `checkpoint.min_delta` on the value of its last such improvement.

The state lives in the run's `best` record (saved in every checkpoint), so a resumed run counts on exactly where the
interrupted one was, and a run resumed after it stopped early does not train on. Every rank holds the same exact
evaluation report, so every rank takes the same decision at the same epoch without a collective.
"""

from __future__ import annotations


def mark(prev: dict, value: float, epoch: int, *, mode: str, min_delta: float) -> dict:
    """The patience mark after an evaluation at `epoch` (1-based) that measured `value`: {"mark", "improved_epoch"}.

    `prev` is the best record before this evaluation; one saved before early stopping existed has no mark, and its
    best value and epoch stand in."""
    last, since = prev.get("mark", prev.get("value")), prev.get("improved_epoch", prev.get("epoch"))
    if last is None or (value - last > min_delta if mode == "max" else last - value > min_delta):
        last, since = value, epoch
    return {"mark": last, "improved_epoch": since}


def reason(best: dict, epoch: int, *, patience: int, min_delta: float, eval_every: int) -> str | None:
    """Why the run stops after `epoch` (1-based, evaluated or not), or None to go on (patience 0: never stops)."""
    since = best.get("improved_epoch")
    if not patience or since is None:
        return None
    waited = (epoch - since) // eval_every
    if waited < patience:
        return None
    return (
        f"{best['metric']} did not improve by more than {min_delta:g} in {waited} evaluation(s) "
        f"(patience {patience}; best {best['value']:.4f} at epoch {best['epoch']})"
    )
