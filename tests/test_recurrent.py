"""Mamba-2's other exact forms: the recurrence (Mamba2.step, SequentialMamba2.step_logits) and the matrix
(Mamba2.ssd_matrix) give what the chunked parallel forward gives; our step gives what the official mamba_ssm step
gives (those tests skip without mamba-ssm; its Triton kernels run under TRITON_INTERPRET, see tests/official_cpu.py).
The SSD function ssd_matrix itself is checked in test_ssd.py."""

import pytest
import torch

from mamba2_torch import Mamba2, mamba_chunk_scan_combined, rmsnorm_fn
from official_cpu import load_official_on_cpu, mamba_ssm_installed
import vision_mamba2
from vision_mamba2 import SequentialMamba2, SequentialMamba2Config

TINY = dict(d_model=16, d_state=8, headdim=8)  # 4 heads of 8 channels


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def perturbed(module):
    """The module with every parameter moved off its initial value (D = 1, norm weight = 1), so each one matters."""
    torch.manual_seed(1)
    with torch.no_grad():
        for prm in module.parameters():
            prm.add_(0.1 * torch.randn_like(prm))
    return module


def step_through(mixer, u):
    """Outputs (B, L, d_model) and the final states of mixer.step over u (B, L, d_model), one token at a time."""
    conv_state, ssm_state = mixer.allocate_inference_cache(len(u), u.shape[1])
    ys = [mixer.step(u[:, t:t + 1], conv_state, ssm_state)[0] for t in range(u.shape[1])]
    return torch.cat(ys, dim=1), conv_state, ssm_state


def scan_recorder(calls):
    """A scan for Mamba2.mix that records its arguments and output and computes what forward() computes."""
    def scan(*args, **kwargs):
        y = mamba_chunk_scan_combined(*args, **kwargs)
        calls.append((args, kwargs, y))
        return y
    return scan


STEP_CASES = {
    # the official defaults (one group, RMSNorm after the gate), 3 chunks of 13
    "L37_c16": dict(ctor=dict(chunk_size=16), seqlen=37),
    # two groups, D per channel, norm before the gate, dt clamped; 4 chunks
    "L29_c8_ngroups2_Dhdim_dtlimit": dict(
        ctor=dict(chunk_size=8, ngroups=2, D_has_hdim=True, norm_before_gate=True, dt_limit=(0.002, 0.05)),
        seqlen=29),
    # no RMSNorm (z gates inside the scan), no conv bias; one chunk
    "L49_c64_normfree": dict(ctor=dict(chunk_size=64, rmsnorm=False, conv_bias=False), seqlen=49),
    # shorter than the conv window: the conv state keeps zeros at its start
    "L3_c16": dict(ctor=dict(chunk_size=16, ngroups=2), seqlen=3),
}


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_step_through_a_sequence_is_the_parallel_forward(case):
    c = STEP_CASES[case]
    mixer = perturbed(Mamba2(**TINY, **c["ctor"]))
    u = torch.randn(2, c["seqlen"], TINY["d_model"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = mixer(u)  # the parallel forward
        calls = []  # the arguments of its scan, to ask the scan for the final state too
        mixer.mix(u, scan=scan_recorder(calls), gated_norm=rmsnorm_fn)
        (args, kwargs, _), = calls
        _, final_state = mamba_chunk_scan_combined(*args, **kwargs, return_final_states=True)
        y_step, conv_state, ssm_state = step_through(mixer, u)
        xBC = torch.split(mixer.in_proj(u), [mixer.d_inner, mixer.conv_dim, mixer.nheads], dim=-1)[1]
    assert rel_err(y_step, y) <= 1e-5, f"outputs: {rel_err(y_step, y):.2e}"
    assert rel_err(ssm_state, final_state) <= 1e-5, f"ssm state: {rel_err(ssm_state, final_state):.2e}"
    # the conv state holds the conv's last d_conv inputs, oldest first, zeros before the sequence's start
    window = torch.nn.functional.pad(xBC.transpose(1, 2), (mixer.d_conv, 0))[..., -mixer.d_conv:]
    assert conv_state.shape == (2, mixer.conv_dim, mixer.d_conv)
    torch.testing.assert_close(conv_state, window)


def test_step_updates_the_states_in_place_and_returns_them():
    mixer = perturbed(Mamba2(**TINY))
    conv_state, ssm_state = mixer.allocate_inference_cache(3, 10)
    assert ssm_state.shape == (3, mixer.nheads, mixer.headdim, mixer.d_state) and not ssm_state.any()
    out, conv_out, ssm_out = mixer.step(torch.randn(3, 1, TINY["d_model"]), conv_state, ssm_state)
    assert out.shape == (3, 1, TINY["d_model"])
    assert conv_out is conv_state and ssm_out is ssm_state and ssm_state.any() and conv_state.any()


def test_the_layers_ssd_matrix_gives_its_scan_output():
    """Mamba2.ssd_matrix(u) is the matrix of the very scan forward(u) runs: M x + D x is its output."""
    mixer = perturbed(Mamba2(**TINY, ngroups=2, D_has_hdim=True, dt_limit=(0.002, 0.05), chunk_size=16))
    u = torch.randn(2, 41, TINY["d_model"], generator=torch.Generator().manual_seed(0))
    calls = []
    with torch.no_grad():
        mixer.mix(u, scan=scan_recorder(calls), gated_norm=rmsnorm_fn)
        M = mixer.ssd_matrix(u)
    (args, kwargs, y), = calls
    x, D = args[0], kwargs["D"]
    assert M.shape == (2, mixer.nheads, 41, 41)
    assert rel_err(torch.einsum("bhij,bjhp->bihp", M, x) + x * D, y) <= 1e-5


@pytest.fixture(scope="module")
def official():
    if not mamba_ssm_installed():
        pytest.skip("mamba_ssm is not installed: no official step to compare against")
    # mamba_ssm's __init__ needs transformers, which Mamba-2 doesn't: the product's import makes a bare package when
    # that __init__ fails (as on an install with --no-deps); the shim then imports under it
    vision_mamba2.import_official_kernels()
    return load_official_on_cpu()


OFFICIAL_CASES = {
    "defaults": dict(),
    # the official step takes ngroups > 1 through its selective_state_update kernel
    "ngroups2_norm_before_gate": dict(ngroups=2, norm_before_gate=True),
    "normfree": dict(rmsnorm=False),
    # (not compared: D_has_hdim, which the official step rejects, and dt_limit, which it ignores)
}


@pytest.mark.parametrize("case", list(OFFICIAL_CASES))
def test_step_matches_official_step(official, case):
    """A state dict from the official Mamba2 steps the same in both; the states match after every step."""
    ctor = dict(**TINY, chunk_size=16, **OFFICIAL_CASES[case])
    torch.manual_seed(0)
    ref = perturbed(official.Mamba2(**ctor, use_mem_eff_path=False))
    ours = Mamba2(**ctor)
    ours.load_state_dict(ref.state_dict())
    u = torch.randn(2, 9, TINY["d_model"], generator=torch.Generator().manual_seed(0))
    states_ref, states_ours = ref.allocate_inference_cache(2, 9), ours.allocate_inference_cache(2, 9)
    assert [(s.shape, s.stride()) for s in states_ours] == [(s.shape, s.stride()) for s in states_ref]
    with torch.no_grad():
        for t in range(u.shape[1]):
            y_ref, y_ours = ref.step(u[:, t:t + 1], *states_ref)[0], ours.step(u[:, t:t + 1], *states_ours)[0]
            assert rel_err(y_ours, y_ref) <= 1e-5, f"step {t}: {rel_err(y_ours, y_ref):.2e}"
            for name, s_ours, s_ref in zip(("conv", "ssm"), states_ours, states_ref):
                assert rel_err(s_ours, s_ref) <= 1e-5, f"step {t}, {name} state: {rel_err(s_ours, s_ref):.2e}"


@pytest.mark.parametrize("readout", ["mean", "last"])
def test_step_logits_read_the_forward_pass_one_pixel_at_a_time(readout):
    """psMNIST on a 3 x 5 image, 4 chunks of 4 steps: after step t, the logits of the first t steps' features (all
    normed features so far, averaged, or the latest); at t = L, forward(x)'s."""
    torch.manual_seed(0)
    config = SequentialMamba2Config(seq_len=15, d_model=16, num_blocks=2, d_state=8, headdim=8, chunk_size=4,
                                    permutation_seed=0, readout=readout)
    model = perturbed(SequentialMamba2(config)).eval()
    x = torch.randn(3, 1, 3, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f = model.norm(model.features(x))  # (B, L, D)
        so_far = f.cumsum(1) / torch.arange(1, 16)[:, None] if readout == "mean" else f
        expected = model.head(so_far)  # (B, L, num_classes)
        logits = model(x)
    steps = list(model.step_logits(x))
    assert [t for t, _ in steps] == list(range(1, 16))
    for t, step_logits in steps:
        assert rel_err(step_logits, expected[:, t - 1]) <= 1e-5, f"step {t}"
    assert rel_err(steps[-1][1], logits) <= 1e-5
    chosen = dict(model.step_logits(x, at=[9, 4]))
    assert list(chosen) == [4, 9] and torch.equal(chosen[9], steps[8][1])
    with pytest.raises(ValueError, match="1..15"):
        next(model.step_logits(x, at=[0, 16]))
