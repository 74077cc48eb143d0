"""The Vision Mamba 2 model: shapes, scans, parameters, errors, backends and the architecture check."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from einops import rearrange

from vision_mamba2 import (VisionMamba2Config, VisionMambaBlock, create_vision_mamba2_model, resolve_backend,
                           scan_orders)

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(d_model=16, num_blocks=2, d_state=8, headdim=8, dropout=0.0)


def tiny_block(*, grid=4, drop_path=0.0, local_conv=False, **config):
    """A VisionMambaBlock of width 16 on a grid x grid of tokens (patch size 1), without the local conv unless asked."""
    c = VisionMamba2Config(d_model=16, img_size=grid, patch_size=1, d_state=8, headdim=8, local_conv=local_conv,
                           **config)
    return VisionMambaBlock(c, drop_path=drop_path)


@pytest.mark.parametrize("scan", ["uni", "bi", "cross", "nc"])
def test_forward_backward_shapes(scan):
    torch.manual_seed(0)
    model = create_vision_mamba2_model(**TINY, scan=scan)
    x = torch.randn(3, 1, 28, 28)
    logits = model(x)
    assert logits.shape == (3, 10)
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_default_model_is_under_500k_parameters():
    model = create_vision_mamba2_model()
    n = sum(p.numel() for p in model.parameters())
    assert 400_000 < n <= 500_000, n
    assert (model.config.d_model, model.config.num_blocks) == (128, 4)


@pytest.mark.parametrize("local_conv", [False, True])
def test_local_conv_mixes_2d_neighbours_that_the_scan_reads_later(local_conv):
    """A one-way scan over a row-major grid: the first token's output depends on no other token, unless the
    block's 3x3 depthwise conv first mixes in its 2-D neighbours (the token to its right and the row below)."""
    torch.manual_seed(0)
    block = tiny_block(scan="uni", local_conv=local_conv).eval()
    x = torch.randn(2, 16, 4, 4)
    for i, j in [(0, 1), (1, 0), (1, 1), (2, 2)]:
        moved = x.clone()
        moved[:, :, i, j] += 1.0
        changed = not torch.allclose(block(moved)[:, :, 0, 0], block(x)[:, :, 0, 0])
        assert changed == (local_conv and max(i, j) == 1), (i, j)
    params = sum(p.numel() for p in block.parameters())
    plain = sum(p.numel() for p in tiny_block(scan="uni").parameters())
    assert params - plain == (16 * 9 + 16 if local_conv else 0)  # one 3x3 filter and a bias per channel


@pytest.mark.parametrize("scan", ["uni", "nc"])
def test_the_non_causal_scan_lets_the_first_token_read_the_last(scan):
    """One pass in one order: a causal scan's first token reads no other token (uni); VSSD's non-causal SSD (nc)
    lets every token read every other, the last included."""
    torch.manual_seed(0)
    block = tiny_block(scan=scan).eval()
    x = torch.randn(2, 16, 4, 4)
    moved = x.clone()
    moved[:, :, 3, 3] += torch.randn(2, 16)  # not a constant over the channels, which the block's LayerNorm removes
    assert torch.allclose(block(moved)[:, :, 0, 0], block(x)[:, :, 0, 0]) == (scan == "uni")
    assert block.mixer.causal == (scan == "uni") and len(block.order) == 1


@pytest.mark.parametrize("scan", ["uni", "bi", "cross"])
def test_scan_orders_are_permutations(scan):
    orders = scan_orders(scan, 3, 4)
    assert orders.shape == ({"uni": 1, "bi": 2, "cross": 4}[scan], 12)
    for order in orders:
        assert sorted(order.tolist()) == list(range(12))
    assert orders[0].tolist() == list(range(12))  # row-major first
    if scan != "uni":
        assert orders[1].tolist() == list(range(11, -1, -1))
    if scan == "cross":
        assert orders[2].tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]  # column-major


@pytest.mark.parametrize("scan", ["uni", "bi", "cross"])
def test_block_equals_mixer_run_on_each_direction(scan):
    """The block is x + mean over directions of mixer(norm(x) read in that order), put back in place."""
    torch.manual_seed(0)
    block = tiny_block(grid=5, scan=scan)
    torch.nn.init.normal_(block.direction_embed)
    x = torch.randn(2, 16, 5, 5)
    t = rearrange(x, "b c h w -> b (h w) c")
    expected = t.clone()
    for k, order in enumerate(scan_orders(scan, 5, 5)):
        y = block.mixer(block.norm(t)[:, order] + block.direction_embed[k])
        expected[:, order] += y / len(block.order)
    torch.testing.assert_close(block(x), rearrange(expected, "b (h w) c -> b c h w", h=5))


def test_uni_scan_is_causal_and_crosses_rows():
    """One sequence over the whole grid: a token reaches every later token, rows included, never earlier."""
    torch.manual_seed(0)
    # float64: at initialisation the SSM's decay makes far effects tiny, below float32 next to the residual
    block = tiny_block(scan="uni").double()
    x = torch.randn(1, 16, 4, 4, dtype=torch.float64)
    x2 = x.clone()
    x2[0, :, 1, 2] += torch.randn(16, dtype=torch.float64)  # token 6 in row-major order
    diff = (block(x2) - block(x)).abs().sum(1).flatten()  # (16,) change per token
    assert torch.all(diff[:6] == 0)
    assert torch.all(diff[6:] > 0)  # including rows 2 and 3


@pytest.mark.parametrize("shape", [(28, 28), (2, 1, 28), (2, 3, 28, 28), (2, 1, 32, 32), (1, 2, 1, 28, 28)])
def test_bad_input_shapes_raise_value_error(shape):
    model = create_vision_mamba2_model(**TINY)
    with pytest.raises(ValueError, match=r"expected input of shape \(B, 1, 28, 28\)"):
        model(torch.randn(shape))


@pytest.mark.parametrize("overrides,message", [
    (dict(headdim=12), "must be divisible by headdim"),
    (dict(d_state=7), "multiple of 8"),
    (dict(ngroups=3), "divisible by ngroups"),
    (dict(scan="diagonal"), "scan must be one of"),
    (dict(backend="cuda"), "backend must be one of"),
    (dict(patch_size=3), "divisible by patch_size"),
    (dict(num_blocks=0), "num_blocks must be a positive integer"),
    (dict(dropout=1.0), "dropout must be in"),
    (dict(drop_path=-0.1), "drop_path must be in"),
    (dict(local_conv="yes"), "local_conv must be True or False"),
    (dict(mlp_ratio=3), r"mlp_ratio must be one of \[0, 1, 2, 4\]"),
    (dict(stem_width=24, patch_size=7), "the two-layer stem .* patch_size must be even, got 7"),
])
def test_impossible_configs_say_what_to_change(overrides, message):
    with pytest.raises(ValueError, match=message):
        create_vision_mamba2_model(**{**TINY, **overrides})


def test_drop_path_skips_whole_residual_branches_in_training_only():
    """Stochastic depth: in training each sample keeps the block's branch (scaled by 1/(1-p)) or skips it whole;
    in evaluation the block is deterministic and keeps every branch."""
    torch.manual_seed(0)
    p = 0.5
    block = tiny_block(drop_path=p)
    x = torch.randn(64, 16, 4, 4)
    block.eval()
    branch = block(x) - x  # (B, C, H, W), all kept
    assert torch.equal(block(x), block(x)) and (branch.flatten(1).abs().amax(1) > 0).all()
    block.train()
    out = block(x) - x
    skipped = out.flatten(1).abs().amax(1) == 0
    assert 0 < skipped.sum() < len(x)  # 64 draws at p = 0.5: both outcomes
    torch.testing.assert_close(out[~skipped], branch[~skipped] / (1 - p))


def test_drop_path_rises_linearly_over_the_blocks():
    model = create_vision_mamba2_model(**{**TINY, "num_blocks": 4, "drop_path": 0.3})
    assert [block.drop_path.p for block in model.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_multiple_of_8_applies_only_to_the_official_kernels():
    """conv_dim = 16*2 + 2*7 = 46: refused where the official kernels may run (auto, official), built and run by the
    portable backend."""
    odd = {**TINY, "d_state": 7}
    for backend in ("auto", "official"):
        with pytest.raises(ValueError, match="= 46 to be a multiple of 8"):
            create_vision_mamba2_model(**odd, backend=backend)
    model = create_vision_mamba2_model(**odd, backend="portable")
    assert model.blocks[0].mixer.conv_dim == 46
    assert torch.isfinite(model(torch.randn(2, 1, 28, 28))).all()


def test_config_from_dict_takes_exactly_the_fields():
    fields = dataclasses.asdict(VisionMamba2Config(d_model=64))
    assert VisionMamba2Config.from_dict(fields).d_model == 64
    with pytest.raises(ValueError, match=r"unknown keys \['n_layers'\] and lacks \[\]"):
        VisionMamba2Config.from_dict({**fields, "n_layers": 3})
    with pytest.raises(ValueError, match=r"unknown keys \[\] and lacks \['scan'\]"):
        VisionMamba2Config.from_dict({k: v for k, v in fields.items() if k != "scan"})
    # a field added later: a checkpoint without it holds the model as it was before (here: no channel MLP)
    fields["mlp_ratio"] = 4
    assert VisionMamba2Config.from_dict({k: v for k, v in fields.items() if k != "mlp_ratio"}).mlp_ratio == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_backends_without_a_gpu():
    assert resolve_backend("auto", "cpu") == "portable"
    assert resolve_backend("portable", "cpu") == "portable"
    with pytest.raises(RuntimeError, match="only on a CUDA GPU"):
        resolve_backend("official", "cpu")
    with pytest.raises(RuntimeError, match="only on a CUDA GPU"):
        create_vision_mamba2_model(**TINY, backend="official")


def run_cli(*args):
    return subprocess.run([sys.executable, "vision_mamba2.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_the_channel_mlp_follows_the_mixer_in_each_block():
    torch.manual_seed(0)
    model = create_vision_mamba2_model(**TINY, mlp_ratio=2).eval()
    plain = create_vision_mamba2_model(**TINY)
    per_block = 2 * 16 + (16 * 32 + 32) + (32 * 16 + 16)  # its LayerNorm and two Linear layers
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters()) == 2 * per_block
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        before = model(x)
        model.blocks[1].mlp[-1].bias.copy_(torch.randn(16))  # a change in the last block's MLP reaches the logits
        assert not torch.allclose(model(x), before)


@pytest.mark.parametrize("patch_size", [2, 4])
def test_the_two_layer_stem_makes_the_same_token_grid(patch_size):
    torch.manual_seed(0)
    model = create_vision_mamba2_model(**TINY, stem_width=16, patch_size=patch_size).eval()
    plain = create_vision_mamba2_model(**TINY, patch_size=patch_size)
    x = torch.randn(2, 1, 28, 28)
    assert model.stem(x).shape == plain.stem(x).shape == (2, 16, 28 // patch_size, 28 // patch_size)
    extra = (9 * 16 + 16) + 2 * 16 + (9 * 16 * 16 + 16) - plain.stem.weight.numel() - 16  # conv, BatchNorm, conv
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters()) == extra
    with torch.no_grad():
        before = model(x)
        model.stem[1].bias.add_(1.0)  # the BatchNorm between the convs reaches the logits
        assert not torch.allclose(model(x), before)


def test_architecture_check_cli():
    r = run_cli("--d-model", "32", "--num-blocks", "2", "--d-state", "16", "--scan", "cross", "--local-conv",
                "--mlp-ratio", "2")
    assert r.returncode == 0, r.stderr
    assert "backend: portable" in r.stdout and "local_conv   True" in r.stdout and "mlp_ratio    2" in r.stdout
    assert "parameters:" in r.stdout and "blocks.1" in r.stdout
    assert "(4, 32, 7, 7)" in r.stdout and "forward + backward OK" in r.stdout


@pytest.mark.parametrize("args,message", [
    (("--headdim", "24"), "invalid model configuration: d_model*expand = 256 must be divisible by headdim = 24"),
    (("--scan", "zigzag"), "argument --scan: invalid choice: 'zigzag'"),
    (("--mlp-ratio", "3"), "argument --mlp-ratio: invalid choice: 3"),
    (("--batch-size", "0"), "argument --batch-size: must be >= 1, got 0"),  # it used to check an empty batch: "OK"
    (("--batch-size", "two"), "argument --batch-size: expected an integer, got 'two'"),
])
def test_architecture_check_cli_bad_config(args, message):
    """Usage errors as train.py's: one line on stderr, exit status 2, nothing checked."""
    r = run_cli(*args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.startswith("vision_mamba2.py: error: ") and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == "", r.stderr
