"""Our pure-PyTorch twin (mamba2_torch) vs the OFFICIAL mamba_ssm Mamba-2 Triton kernels.

The official kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py; test-only patches in tests/official_cpu.py). fp32 throughout; outputs and all
gradients must agree to a relative error ||ours - official|| / ||official|| <= 1e-5.

Skipped when mamba_ssm is not installed. The interpreter is slow: shapes are kept small.
"""

import importlib.util

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
    return load_official_on_cpu()


def rel_err(a, b):
    """||a - b|| / ||b||, in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def assert_close(name, ours, ref, rtol=RTOL):
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != official {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: ours has non-finite values"
    assert ref.norm() > 0, f"{name}: official is all zeros, comparison is meaningless"
    err = rel_err(ours, ref)
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
