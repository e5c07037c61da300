"""torch.compile on the trainable part: a ragged last evaluation batch must not trigger a recompile."""

from __future__ import annotations

import torch
from torch import nn

from fastft.compile import apply_compile, resolve_target
from fastft.config import CompileConfig
from fastft.evaluation import run_evaluation
from fastft.precision import Precision


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _eval(module, batches, pad_to):
    return run_evaluation(
        module,
        batches,
        num_classes=5,
        device=torch.device("cpu"),
        precision=Precision(torch.float32, "cpu"),
        pad_to=pad_to,
    )


def test_padded_eval_does_not_recompile_on_ragged_batch() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    head = nn.Linear(16, 5)
    compiled = apply_compile(head, CompileConfig(target="head", backend="eager"))
    x, y = torch.randn(19, 16), torch.randint(0, 5, (19,))
    batches = [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])]  # last batch has 3
    first = _eval(compiled, batches, pad_to=8)
    after_first = _graphs()
    second = _eval(compiled, batches, pad_to=8)
    assert _graphs() == after_first  # the ragged batch was padded: no new graph
    reference = _eval(head, batches, pad_to=0)
    assert first["num_samples"] == second["num_samples"] == 19  # padding never reaches the metrics
    assert first["confusion_matrix"] == reference["confusion_matrix"]
    assert abs(first["loss"] - reference["loss"]) < 1e-6

    # Control: without padding the same loader does add a graph (the counter can see a recompile).
    torch._dynamo.reset()
    fresh = apply_compile(nn.Linear(16, 5), CompileConfig(target="head", backend="eager"))
    _eval(fresh, batches[:2], pad_to=0)
    full_only = _graphs()
    _eval(fresh, batches, pad_to=0)
    assert _graphs() > full_only


def test_auto_target_compiles_on_cuda_only() -> None:
    assert resolve_target(CompileConfig(target="auto"), torch.device("cpu")) == "none"
    assert resolve_target(CompileConfig(target="auto"), torch.device("cuda", 0)) == "head"
    assert resolve_target(CompileConfig(target="all"), torch.device("cpu")) == "all"
