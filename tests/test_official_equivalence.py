"""Our pure-PyTorch twin (mamba2_torch) vs the OFFICIAL mamba_ssm Mamba-2 Triton kernels.

The official kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py; test-only patches in tests/official_cpu.py). fp32 throughout; outputs and all
gradients must agree to a relative error ||ours - official|| / ||official|| <= 1e-5.

Skipped when mamba_ssm is not installed. The interpreter is slow: shapes are kept small.
"""

import copy
import dataclasses
import importlib.util
import os
import types

import pytest
import torch
import torch.nn.functional as F
from einops import repeat

# `import mamba_ssm` fails even when it is installed (unguarded `import selective_scan_cuda`), so
# importorskip can't be used: detect the installation by its spec.
if importlib.util.find_spec("mamba_ssm") is None:
    pytest.skip("mamba_ssm is not installed: no official kernels to compare against", allow_module_level=True)

import mamba2_torch  # noqa: E402
from official_cpu import load_official_on_cpu  # noqa: E402

RTOL = 1e-5


@pytest.fixture(scope="module")
def official():
    # mamba_ssm's __init__ needs transformers, which the Mamba-2 kernels don't: the product's import makes a bare
    # package when that __init__ fails (as on an install with --no-deps); the shim then imports under it
    import vision_mamba2

    vision_mamba2.import_official_kernels()
    return load_official_on_cpu()


def rel_err(a, b):
    """||a - b|| / ||b||, in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


# the largest relative error of any comparison, and what it compared: conftest.py prints it after the run (the
# number docs/testing.md and the README quote)
WORST = {"error": 0.0, "what": None}


def assert_close(name, ours, ref, rtol=RTOL):
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != official {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: ours has non-finite values"
    assert ref.norm() > 0, f"{name}: official is all zeros, comparison is meaningless"
    err = rel_err(ours, ref)
    if err > WORST["error"]:
        WORST.update(error=err, what=f"{name} in {os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}")
    assert err <= rtol, f"{name}: rel err {err:.3e} > {rtol:.0e}"


def _inputs(b, l, h, p, g, n, *, seed, D_shape=None, z=False, dt_bias=False, init_states=False,
            positive_dt=False):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    t = dict(
        x=r(b, l, h, p),
        dt=(F.softplus(r(b, l, h) - 1.0) if positive_dt else r(b, l, h) - 1.0),
        A=-(torch.rand(h, generator=gen) * 2 + 0.2),
        B=r(b, l, g, n),
        C=r(b, l, g, n),
    )
    if D_shape is not None:
        t["D"] = r(*D_shape)
    if z:
        t["z"] = r(b, l, h, p)
    if dt_bias:
        t["dt_bias"] = r(h) * 0.5
    if init_states:
        t["initial_states"] = r(b, h, p, n)
    return t


def _run_scan(fn, tensors, chunk_size, grad_outs, **kw):
    leaves = {k: v.clone().requires_grad_() for k, v in tensors.items()}
    out = fn(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], chunk_size,
             **{k: v for k, v in leaves.items() if k not in ("x", "dt", "A", "B", "C")}, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    names = list(leaves)
    grads = torch.autograd.grad(outs, [leaves[k] for k in names], grad_outs[:len(outs)])
    return outs, dict(zip(names, grads))


SCAN_CASES = {
    # L=100 with chunk 64: the last chunk is partial (36 steps); 2 groups of 2 heads.
    "L100_c64_D_dtbias_softplus": dict(
        shape=(2, 100, 4, 16, 2, 16), chunk_size=64,
        inputs=dict(D_shape=(4,), dt_bias=True),
        kw=dict(dt_softplus=True)),
    # z gating, D per channel (h, p), dt clamped by dt_limit.
    "L100_c64_z_Dhp_dtlimit": dict(
        shape=(1, 100, 4, 8, 1, 8), chunk_size=64,
        inputs=dict(D_shape=(4, 8), z=True, dt_bias=True),
        kw=dict(dt_softplus=True, dt_limit=(0.05, 1.0))),
    # initial_states in, final_states out (gradients flow through both), odd length 57, chunk 16.
    "L57_c16_initial_final_states": dict(
        shape=(2, 57, 4, 8, 2, 8), chunk_size=16,
        inputs=dict(D_shape=(4,), dt_bias=True, init_states=True),
        kw=dict(dt_softplus=True, return_final_states=True)),
    # no softplus (positive dt given directly), no D / dt_bias; initial + final states, L=100 c64.
    "L100_c64_nosoftplus_states": dict(
        shape=(2, 100, 2, 16, 1, 16), chunk_size=64,
        inputs=dict(init_states=True, positive_dt=True),
        kw=dict(return_final_states=True)),
}


@pytest.mark.parametrize("case", list(SCAN_CASES))
def test_chunk_scan_combined_matches_official(official, case):
    c = SCAN_CASES[case]
    b, l, h, p, g, n = c["shape"]
    tensors = _inputs(b, l, h, p, g, n, seed=list(SCAN_CASES).index(case), **c["inputs"])
    gen = torch.Generator().manual_seed(1)
    grad_outs = (torch.randn(b, l, h, p, generator=gen), torch.randn(b, h, p, n, generator=gen))

    ref_outs, ref_grads = _run_scan(official.mamba_chunk_scan_combined, tensors, c["chunk_size"], grad_outs, **c["kw"])
    our_outs, our_grads = _run_scan(mamba2_torch.mamba_chunk_scan_combined, tensors, c["chunk_size"], grad_outs,
                                    **c["kw"])

    assert len(our_outs) == len(ref_outs)
    for name, o, r in zip(["y", "final_states"], our_outs, ref_outs):
        assert_close(name, o, r)
    for k in ref_grads:
        assert_close(f"d{k}", our_grads[k], ref_grads[k])


def test_shim_official_matches_ssd_minimal(official):
    """Sanity check of the interpreter shim itself, independent of our twin: official Triton
    mamba_chunk_scan_combined vs mamba_ssm's pure-PyTorch ssd_minimal_discrete (length must be a
    multiple of the chunk size there), forward and backward."""
    b, l, h, p, g, n, cs = 1, 64, 2, 8, 1, 8, 32
    t = _inputs(b, l, h, p, g, n, seed=3, positive_dt=True)
    dy = torch.randn(b, l, h, p, generator=torch.Generator().manual_seed(4))
    (y,), grads = _run_scan(official.mamba_chunk_scan_combined, t, cs, (dy,))
    leaves = {k: v.clone().requires_grad_() for k, v in t.items()}
    x, dt, A, B, C = (leaves[k] for k in ("x", "dt", "A", "B", "C"))
    Bh, Ch = (repeat(v, "b l g n -> b l (g r) n", r=h // g) for v in (B, C))
    y_ref, _ = official.ssd_minimal_discrete(x * dt[..., None], A * dt, Bh, Ch, cs)
    ref_grads = torch.autograd.grad(y_ref, [leaves[k] for k in grads], dy)
    assert_close("y", y, y_ref)
    for k, gr in zip(grads, ref_grads):
        assert_close(f"d{k}", grads[k], gr)


MAMBA2_CASES = {
    # Defaults of the official module (ngroups=1, rmsnorm, norm_before_gate=False), odd length 49
    # with chunk 16: 4 chunks, the last one partial.
    "L49_c16": dict(ctor=dict(d_model=32, d_state=16, headdim=16, chunk_size=16), batch=2, seqlen=49),
    # Two groups, per-channel D, norm before gate, dt_limit, odd length 57 in a single chunk.
    "L57_c64_ngroups2_Dhdim_normbefore": dict(
        ctor=dict(d_model=32, d_state=8, headdim=8, ngroups=2, D_has_hdim=True, norm_before_gate=True,
                  dt_limit=(0.002, 0.1), chunk_size=64),
        batch=1, seqlen=57),
    # No RMSNorm: the gate z goes through the scan instead.
    "L33_c16_normfree": dict(ctor=dict(d_model=16, d_state=8, headdim=8, rmsnorm=False, chunk_size=16),
                             batch=2, seqlen=33),
}


@pytest.mark.parametrize("case", list(MAMBA2_CASES))
def test_mamba2_module_matches_official(official, case):
    c = MAMBA2_CASES[case]
    torch.manual_seed(0)
    ref = official.Mamba2(**c["ctor"], use_mem_eff_path=False)
    ours = mamba2_torch.Mamba2(**c["ctor"])
    ours.load_state_dict(ref.state_dict())  # strict: same parameter names and shapes
    with torch.no_grad():  # make every parameter matter (default inits: D=1, norm.weight=1, tiny conv)
        for prm in list(ref.parameters()):
            prm.add_(0.1 * torch.randn_like(prm))
    ours.load_state_dict(ref.state_dict())

    gen = torch.Generator().manual_seed(5)
    u = torch.randn(c["batch"], c["seqlen"], c["ctor"]["d_model"], generator=gen)
    dout = torch.randn(c["batch"], c["seqlen"], c["ctor"]["d_model"], generator=gen)
    u_ref, u_ours = u.clone().requires_grad_(), u.clone().requires_grad_()

    y_ref = ref(u_ref)
    y_ours = ours(u_ours)
    assert_close("output", y_ours, y_ref)

    y_ref.backward(dout)
    y_ours.backward(dout)
    assert_close("d input", u_ours.grad, u_ref.grad)
    ref_params = dict(ref.named_parameters())
    our_params = dict(ours.named_parameters())
    assert set(our_params) == set(ref_params)
    for k, prm in ref_params.items():
        assert prm.grad is not None and our_params[k].grad is not None, k
        assert_close(f"grad {k}", our_params[k].grad, prm.grad)


# ----------------------------------------------------------------------------------------------------
# The project's own wiring: vision_mamba2.Mamba2Mixer with the official kernels, as it runs on a GPU

def causal_conv1d_fwd(x, weight, bias, seq_idx, initial_states, final_states_out, silu):
    """causal-conv1d's compiled forward (cpp_functions.causal_conv1d_fwd_function) in PyTorch, for CPU tensors:
    x (b, d, l), weight (d, w) -> (b, d, l). Test-only: the fused path calls the compiled one, absent here."""
    assert seq_idx is None and initial_states is None and final_states_out is None  # what the fused path passes
    y = F.conv1d(x, weight[:, None], bias, padding=weight.shape[1] - 1, groups=weight.shape[0])[..., :x.shape[-1]]
    return F.silu(y) if silu else y


def causal_conv1d_bwd(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx, return_dinitial_states,
                      silu):
    """Its backward (causal_conv1d_bwd_function): (dx, dweight, dbias, None), dx written into the given buffer."""
    assert seq_idx is None and initial_states is None and dfinal_states is None and not return_dinitial_states
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
        grads = torch.autograd.grad(causal_conv1d_fwd(*leaves, None, None, None, silu), leaves, dout)
    if dx is not None:
        dx.copy_(grads[0])
    return (dx if dx is not None else grads[0]), grads[1], grads[2], None


@pytest.fixture(params=["unfused", "fused"])
def official_backend(request, official, monkeypatch):
    """vision_mamba2's backend 'official' running on CPU tensors: the kernels import_official_kernels found (here
    interpreted), without the conv ("unfused": what runs where causal-conv1d is not installed) or fused with it
    (mamba_split_conv1d_scan_combined, causal-conv1d's compiled functions replaced by the PyTorch ones above). Outside
    this fixture 'official' runs only on CUDA."""
    import vision_mamba2

    kernels, note = vision_mamba2.import_official_kernels()
    assert kernels is not None, note
    ssd_combined = official.ssd_combined
    assert kernels.scan is ssd_combined.mamba_chunk_scan_combined  # the interpreted kernels of the shim
    fused = None
    if request.param == "fused":
        monkeypatch.setattr(ssd_combined, "causal_conv1d_fwd_function", causal_conv1d_fwd)
        monkeypatch.setattr(ssd_combined, "causal_conv1d_bwd_function", causal_conv1d_bwd)
        fused = ssd_combined.mamba_split_conv1d_scan_combined
    on_cpu = types.SimpleNamespace(scan=kernels.scan, gated_norm=kernels.gated_norm, fused=fused)
    monkeypatch.setattr(vision_mamba2, "resolve_backend", lambda backend, device: backend)  # build it on the CPU
    # and run backend 'official' through the kernels, as Mamba2Mixer.forward does for CUDA inputs (which kernels
    # the forward picks for which device: tests/test_backend.py)
    portable_forward = vision_mamba2.Mamba2Mixer.forward
    monkeypatch.setattr(vision_mamba2.Mamba2Mixer, "forward", lambda self, u: self.forward_official(u, on_cpu)
                        if self.backend == "official" else portable_forward(self, u))
    return request.param


MIXER_CASES = {  # (the project's own settings run in the whole-model test below)
    # two groups, D per channel, norm before the gate, dt clamped, 3 chunks: each argument the fused call passes on
    "L20_c8_ngroups2_Dhdim_normbefore_dtlimit": dict(
        ctor=dict(d_model=16, d_state=8, headdim=8, ngroups=2, D_has_hdim=True, norm_before_gate=True,
                  dt_limit=(0.002, 0.1), chunk_size=8), seqlen=20),
}


def forward_backward(module, x, dout):
    """Output, input gradient and parameter gradients of module(x) against dout."""
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(dout)
    return y, x.grad, {name: p.grad for name, p in module.named_parameters()}


def assert_same_pass(official_pass, portable_pass):
    (y, dx, grads), (y_ref, dx_ref, grads_ref) = official_pass, portable_pass
    assert_close("output", y, y_ref)
    assert_close("d input", dx, dx_ref)
    for name, g in grads_ref.items():
        assert g is not None and grads[name] is not None, name
        assert_close(f"grad {name}", grads[name], g)


@pytest.mark.parametrize("case", list(MIXER_CASES))
def test_mixer_on_the_official_kernels_matches_the_portable_path(official_backend, case):
    """Mamba2Mixer.forward_official, what forward runs for a CUDA input on backend 'official' (mix with the official
    scan and gated norm, or the fused kernel), against backend 'portable', same weights: outputs, input and parameter
    gradients. (That forward hands CUDA inputs to it: tests/test_backend.py.)"""
    from vision_mamba2 import Mamba2Mixer

    c = MIXER_CASES[case]
    torch.manual_seed(0)
    mixer = Mamba2Mixer(backend="official", **c["ctor"])
    with torch.no_grad():  # make every parameter matter (D = 1 and norm.weight = 1 at initialisation)
        for prm in mixer.parameters():
            prm.add_(0.1 * torch.randn_like(prm))
    portable = copy.deepcopy(mixer)
    portable.backend = "portable"
    gen = torch.Generator().manual_seed(5)
    x, dout = (torch.randn(2, c["seqlen"], c["ctor"]["d_model"], generator=gen) for _ in range(2))
    assert_same_pass(forward_backward(mixer, x, dout), forward_backward(portable, x, dout))


@pytest.mark.parametrize("scan", ["bi", "nc"])
def test_vision_mamba2_on_the_official_kernels_matches_the_portable_path(official_backend, scan):
    """The whole image model, backend 'official' against 'portable' with the same weights: each block hands its
    directions' token sequences to the kernels as one batch (nc: the official gated norm around the non-causal SSD,
    which has no kernel of its own)."""
    from vision_mamba2 import VisionMamba2, VisionMamba2Config

    torch.manual_seed(0)
    model = VisionMamba2(VisionMamba2Config(d_model=16, num_blocks=1, d_state=8, headdim=8, dropout=0.0,
                                            backend="official", scan=scan)).eval()
    portable = VisionMamba2(dataclasses.replace(model.config, backend="portable")).eval()
    portable.load_state_dict(model.state_dict())
    assert {block.mixer.backend for block in model.blocks} == {"official"}
    gen = torch.Generator().manual_seed(6)
    x, dout = torch.randn(2, 1, 28, 28, generator=gen), torch.randn(2, 10, generator=gen)
    assert_same_pass(forward_backward(model, x, dout), forward_backward(portable, x, dout))
