"""Kernel launches per training step (bench.py profile): on a GPU the default model is bound by launching its
kernels, so the count of ops one training step runs is held down. (The numbers themselves are pinned by the
equivalence tests against mamba-ssm and the float64 recurrence: tests/test_official_equivalence.py, tests/test_ssd.py.)"""

import torch

import bench
from vision_mamba2 import create_vision_mamba2_model


def test_default_training_step_runs_at_most_490_aten_ops():
    """bench.py profile: the top-level non-view aten ops of one training step (482); batch 8, whose count is that of
    train.py's batch 128 (no op depends on the batch size), in a fraction of the time. Copies that an op makes
    inside itself (a matmul's of an operand in the wrong layout) are not counted: the SSD's explicit .contiguous()
    counts here, and replaces more copies than it adds."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 28, 28, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    ops = bench.launched_ops(bench.profiled_step(create_vision_mamba2_model(backend="portable"), x, y))
    assert sum(ops.values()) <= 490, sorted(ops.items(), key=lambda kv: -kv[1])
    assert ops["aten::_fused_adamw_"] == 1 and ops["aten::convolution_backward"] == 9  # all of the step: stem + 2 x 4


def test_views_are_not_counted_and_copies_are():
    assert all(map(bench.returns_a_view, ["aten::view", "aten::reshape", "aten::transpose", "aten::expand",
                                          "aten::slice", "aten::split_with_sizes", "aten::detach", "aten::to"]))
    assert not any(map(bench.returns_a_view, ["aten::mul", "aten::add_", "aten::clone", "aten::index_select"]))
    x = torch.randn(4, 6)
    model = torch.nn.Linear(6, 3)
    ops = bench.launched_ops(bench.profiled_step(torch.nn.Sequential(model), x, torch.tensor([0, 1, 2, 0])))
    assert "aten::t" not in ops and ops["aten::linear"] == 1  # a view; and the linear's nested ops are not counted
