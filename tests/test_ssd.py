"""Our SSD (mamba2_torch.mamba_chunk_scan_combined, and its matrix form ssd_matrix) against references.

On every machine: `recurrence` below, the SSM by its definition, one step at a time in float64 (any length,
initial and final states). With mamba-ssm installed, also its pure-PyTorch references: ssd_minimal_discrete (Listing 1
of the paper), ssd_chunk_scan_combined_ref (the Triton kernels' reference) and selective_scan_ref (its step-by-step
recurrence); the first two need the length to be a multiple of the chunk size. Only those comparisons skip without
mamba-ssm.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from mamba2_torch import (Mamba2, mamba_chunk_scan_combined, non_causal_scan, non_causal_ssd_matrix, rmsnorm_fn,
                          ssd_matrix)
from vision_mamba2 import load_official_kernels


def mamba_ssm_module(name):
    """mamba_ssm's module `name`, imported; the calling test skips where mamba-ssm is not installed."""
    load_official_kernels()  # lets mamba_ssm import without its compiled selective_scan_cuda
    return pytest.importorskip(name, reason="mamba-ssm is not installed (see README: pip install ... mamba-ssm)")


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def make_inputs(b=2, l=64, h=4, p=8, g=2, n=16, *, seed=0, extras=False, D_hdim=False, init=False,
                dtype=torch.float32):
    """Random SSD inputs with the scales Mamba2 produces (dt = softplus(.) ~ 0.001..0.1, A in -[1, 16]). extras: D
    ((h, p) with D_hdim, else (h,)), z and dt_bias, with dt to go through softplus; init: initial_states."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    inp = dict(x=r(b, l, h, p), dt=r(b, l, h) - 3, A=-torch.exp(torch.rand(h, generator=gen) * 2.7),
               B=r(b, l, g, n), C=r(b, l, g, n))
    if extras:
        inp.update(D=r(h, p) if D_hdim else r(h), z=r(b, l, h, p), dt_bias=r(h) * 0.5)
    else:
        inp["dt"] = F.softplus(inp["dt"])
    if init:
        inp["initial_states"] = r(b, h, p, n)
    return {k: v.to(dtype).requires_grad_() for k, v in inp.items()}


def grads(out, inputs):
    """Gradients of a fixed random projection of `out` with respect to every input."""
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return torch.autograd.grad((out.float() * w).sum(), list(inputs.values()))


def assert_close(ours, ref, inputs, tol=1e-5):
    assert rel_err(ours, ref) <= tol, f"forward: {rel_err(ours, ref):.2e}"
    for name, g_ours, g_ref in zip(inputs, grads(ours, inputs), grads(ref, inputs)):
        assert torch.isfinite(g_ours).all(), f"grad {name} is not finite"
        assert rel_err(g_ours, g_ref) <= tol, f"grad {name}: {rel_err(g_ours, g_ref):.2e}"


def heads(t, h):
    return repeat(t, "b l g n -> b l (g r) n", r=h // t.shape[2])


def recurrence(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, *, dt_softplus=False,
               dt_limit=(0.0, math.inf)):
    """The SSD by its definition, one step at a time in float64, with mamba_chunk_scan_combined's arguments:
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,  y_t = h_t C_t + D x_t (then * silu(z_t)), where
    dt = softplus(dt + dt_bias) clamped to dt_limit. Returns y (b, l, h, p) and the last state (b, h, p, n)."""
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    b, l, h, p = x.shape
    if dt_bias is not None:
        dt = dt + dt_bias.double()
    if dt_softplus:
        dt = F.softplus(dt)
    dt = dt.clamp(*dt_limit)
    B, C = heads(B, h), heads(C, h)  # (b, l, h, n)
    state = x.new_zeros(b, h, p, B.shape[-1]) if initial_states is None else initial_states.double()
    ys = []
    for t in range(l):
        state = (torch.exp(dt[:, t] * A)[..., None, None] * state
                 + torch.einsum("bh,bhp,bhn->bhpn", dt[:, t], x[:, t], B[:, t]))
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + x * (D.double()[:, None] if D.dim() == 1 else D.double())
    if z is not None:
        y = y * F.silu(z.double())
    return y, state


def scan_args(inp):
    """inp as mamba_chunk_scan_combined's positional x, dt, A, B, C and keyword arguments (softplus with dt_bias)."""
    kw = {k: inp[k] for k in ("D", "z", "dt_bias", "initial_states") if k in inp}
    return [inp[k] for k in "x dt A B C".split()], {**kw, "dt_softplus": "dt_bias" in inp}


@pytest.mark.parametrize("l,chunk", [(64, 16), (196, 49), (196, 196), (784, 112)])
@pytest.mark.parametrize("with_init", [False, True])
def test_matches_ssd_minimal_discrete(l, chunk, with_init):
    ssd_minimal_discrete = mamba_ssm_module("mamba_ssm.modules.ssd_minimal").ssd_minimal_discrete
    inp = make_inputs(l=l)
    h, p, n = inp["x"].shape[2], inp["x"].shape[3], inp["B"].shape[3]
    if with_init:
        inp["init"] = torch.randn(2, h, p, n, generator=torch.Generator().manual_seed(2)).requires_grad_()
    init = inp.get("init")

    y, final = mamba_chunk_scan_combined(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], chunk,
                                         initial_states=init, return_final_states=True)
    y_ref, final_ref = ssd_minimal_discrete(inp["x"] * inp["dt"][..., None], inp["A"] * inp["dt"],
                                            heads(inp["B"], h), heads(inp["C"], h), chunk,
                                            initial_states=None if init is None else init[:, None])
    # one backward through both outputs
    assert_close(torch.cat([y.flatten(), final.flatten()]), torch.cat([y_ref.flatten(), final_ref.flatten()]), inp)


@pytest.mark.parametrize("l,chunk", [(64, 16), (128, 64), (196, 49), (256, 256)])
def test_matches_ssd_chunk_scan_combined_ref(l, chunk):
    ssd_chunk_scan_combined_ref = mamba_ssm_module("mamba_ssm.ops.triton.ssd_combined").ssd_chunk_scan_combined_ref
    inp = make_inputs(l=l, extras=True)
    # The reference exponentiates its decay matrix before masking it: with strong decays exp(+large)
    # overflows and its gradients turn into inf * 0 = NaN. Gentle decays keep it finite.
    with torch.no_grad():
        inp["A"] *= 0.02
    args = [inp[k] for k in "x dt A B C".split()]
    kw = dict(D=inp["D"], z=inp["z"], dt_bias=inp["dt_bias"], dt_softplus=True)
    assert_close(mamba_chunk_scan_combined(*args, chunk, **kw), ssd_chunk_scan_combined_ref(*args, chunk, **kw), inp)


@pytest.mark.parametrize("l", [1, 49, 196, 257, 784])
@pytest.mark.parametrize("chunk", [16, 64, 256])
def test_matches_recurrence_any_length(l, chunk):
    """Two groups of two heads, D, z, dt_bias + softplus, initial states in and final states out."""
    inp = make_inputs(b=1, l=l, h=4, p=4, g=2, n=8, extras=True, init=True)
    args, kw = scan_args(inp)
    y, final = mamba_chunk_scan_combined(*args, chunk, **kw, return_final_states=True)
    y_ref, final_ref = recurrence(*args, **kw)
    out, ref = torch.cat([y.flatten(), final.flatten()]), torch.cat([y_ref.flatten(), final_ref.flatten()])
    if l in (1, 49, 257):  # the recurrence's backward is a long autograd chain: gradients at a few lengths
        assert_close(out, ref, inp)
    else:
        assert rel_err(out, ref) <= 1e-5


RECURRENCE_CASES = {
    "D_per_channel_dt_limit": dict(inputs=dict(extras=True, D_hdim=True), kw=dict(dt_limit=(0.01, 0.05))),
    "a_group_per_head": dict(inputs=dict(g=4, extras=True, init=True), kw={}),
    "one_group_no_softplus_no_D": dict(inputs=dict(g=1, init=True), kw={}),
}


@pytest.mark.parametrize("case", list(RECURRENCE_CASES))
def test_matches_recurrence_options(case):
    c = RECURRENCE_CASES[case]
    inp = make_inputs(l=100, **c["inputs"])
    args, kw = scan_args(inp)
    kw.update(c["kw"])
    y, final = mamba_chunk_scan_combined(*args, 32, **kw, return_final_states=True)
    y_ref, final_ref = recurrence(*args, **kw)
    assert_close(torch.cat([y.flatten(), final.flatten()]), torch.cat([y_ref.flatten(), final_ref.flatten()]), inp)


def test_recurrence_matches_selective_scan_ref():
    """The float64 reference above agrees with mamba_ssm's own (fp32) recurrence, one channel per head and headdim."""
    selective_scan_ref = mamba_ssm_module("mamba_ssm.ops.selective_scan_interface").selective_scan_ref
    inp = {k: v.detach() for k, v in make_inputs(l=49, extras=True).items()}
    x, dt, A, B, C, D, z, dt_bias = (inp[k] for k in "x dt A B C D z dt_bias".split())
    p, n = x.shape[-1], B.shape[-1]
    y = selective_scan_ref(rearrange(x, "b l h p -> b (h p) l"), repeat(dt, "b l h -> b (h p) l", p=p),
                           repeat(A, "h -> (h p) n", p=p, n=n),
                           rearrange(B, "b l g n -> b g n l"), rearrange(C, "b l g n -> b g n l"),
                           D=repeat(D, "h -> (h p)", p=p), z=rearrange(z, "b l h p -> b (h p) l"),
                           delta_bias=repeat(dt_bias, "h -> (h p)", p=p), delta_softplus=True)
    y_ref, _ = recurrence(x, dt, A, B, C, D, z, dt_bias, dt_softplus=True)
    assert rel_err(rearrange(y, "b (h p) l -> b l h p", p=p), y_ref) <= 1e-6


@pytest.mark.parametrize("l,split", [(257, 100), (49, 1), (196, 150)])
def test_initial_and_final_states_chain_at_odd_lengths(l, split):
    """Running [0, split) then [split, l) from the carried state equals one pass over [0, l)."""
    inp = make_inputs(l=l, extras=True)
    args = lambda sl: [inp[k][:, sl] for k in "x dt".split()] + [inp["A"]] + [inp[k][:, sl] for k in "B C".split()]  # noqa: E731
    kw = lambda sl: dict(D=inp["D"], z=inp["z"][:, sl], dt_bias=inp["dt_bias"], dt_softplus=True)  # noqa: E731
    y, final = mamba_chunk_scan_combined(*args(slice(None)), 64, **kw(slice(None)), return_final_states=True)
    y1, state = mamba_chunk_scan_combined(*args(slice(0, split)), 64, **kw(slice(0, split)), return_final_states=True)
    y2, final2 = mamba_chunk_scan_combined(*args(slice(split, None)), 64, **kw(slice(split, None)),
                                           initial_states=state, return_final_states=True)
    assert_close(torch.cat([y1, y2], dim=1), y, inp)
    assert rel_err(final2, final) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_rounding(dtype):
    """bf16/fp16 inputs are accumulated in fp32: the only error left is rounding the output."""
    inp = make_inputs(l=196, extras=True, dtype=dtype)
    args = [inp[k] for k in "x dt A B C".split()]
    kw = dict(D=inp["D"], z=inp["z"], dt_bias=inp["dt_bias"], dt_softplus=True)
    y = mamba_chunk_scan_combined(*args, 64, **kw)
    assert y.dtype == dtype
    y_ref, _ = recurrence(*args, **kw)
    eps = torch.finfo(dtype).eps
    assert rel_err(y, y_ref) <= eps, f"{rel_err(y, y_ref):.2e} > {eps:.1e}"
    assert rel_err(y, y_ref) > 0  # the output was really rounded to the half type


def test_mamba2_state_dict_round_trip_with_official():
    """Same parameter names and shapes both ways; the same seed even gives the same initialisation."""
    OfficialMamba2 = mamba_ssm_module("mamba_ssm.modules.mamba2").Mamba2

    kw = dict(d_model=64, d_state=16, headdim=16, ngroups=2, D_has_hdim=True)
    torch.manual_seed(0)
    official = OfficialMamba2(**kw, use_mem_eff_path=False)
    torch.manual_seed(0)
    ours = Mamba2(**kw)
    sd_official, sd_ours = official.state_dict(), ours.state_dict()
    assert {k: v.shape for k, v in sd_ours.items()} == {k: v.shape for k, v in sd_official.items()}
    for k in sd_ours:
        assert torch.equal(sd_ours[k], sd_official[k]), k
    ours.load_state_dict({k: torch.randn_like(v) for k, v in sd_official.items()})
    official.load_state_dict(ours.state_dict())
    for k, v in official.state_dict().items():
        assert torch.equal(v, ours.state_dict()[k])


@pytest.mark.parametrize("l,chunk,g", [(49, 64, 1), (49, 16, 2), (100, 32, 2), (100, 64, 1)])
@pytest.mark.parametrize("extras", [False, True])
def test_ssd_matrix_is_the_scan(l, chunk, g, extras):
    """M x + D x is the scan's output (without z), at lengths that are not a multiple of the chunk size; with
    extras dt goes through dt_bias, softplus and dt_limit. M is zero above the diagonal: causal."""
    inp = {k: v.detach() for k, v in make_inputs(l=l, g=g, extras=extras).items()}
    x, dt, A, B, C = (inp[k] for k in "x dt A B C".split())
    D = inp.get("D", torch.randn(x.shape[2]))
    kw = dict(dt_bias=inp["dt_bias"], dt_softplus=True, dt_limit=(0.01, 0.05)) if extras else {}
    M = ssd_matrix(dt, A, B, C, **kw)
    assert M.shape == (x.shape[0], x.shape[2], l, l)
    assert (M.triu(diagonal=1) == 0).all() and (M.diagonal(dim1=-2, dim2=-1) != 0).all()
    y = torch.einsum("bhij,bjhp->bihp", M, x) + x * D[:, None]
    assert rel_err(y, mamba_chunk_scan_combined(x, dt, A, B, C, chunk, D=D, **kw)) <= 1e-5


@pytest.mark.parametrize("g", [1, 2])
@pytest.mark.parametrize("extras", [False, True])
def test_non_causal_scan_by_its_definition_and_order_free(g, extras):
    """non_causal_scan against its definition in float64, y_i = C_i^T sum_j (dt_j A) B_j x_j^T + D x_i (then
    * silu(z)), forward and gradients; its matrix form gives the same y (without z); and reading the tokens in
    another order gives the same outputs, reordered."""
    inp = make_inputs(l=49, g=g, extras=extras)
    x, dt, A, B, C = (inp[k] for k in "x dt A B C".split())
    D, z = inp.get("D"), inp.get("z")
    kw = dict(dt_bias=inp["dt_bias"], dt_softplus=True) if extras else {}
    dt_eff = F.softplus(dt.double() + inp["dt_bias"].double()) if extras else dt.double()
    dA = dt_eff * A.double()  # (b, l, h)
    state = torch.einsum("bjhn,bjhp,bjh->bhpn", heads(B, x.shape[2]).double(), x.double(), dA)
    ref = torch.einsum("bhpn,bihn->bihp", state, heads(C, x.shape[2]).double())
    if D is not None:
        ref = ref + x.double() * D.double()[:, None]
    if z is not None:
        ref = ref * F.silu(z.double())
    assert_close(non_causal_scan(x, dt, A, B, C, None, D=D, z=z, **kw), ref, inp)
    with torch.no_grad():
        M = non_causal_ssd_matrix(dt, A, B, C, **kw)
        y = non_causal_scan(x, dt, A, B, C, None, D=D, **kw)
        assert rel_err(torch.einsum("bhij,bjhp->bihp", M, x) + (0 if D is None else x * D[:, None]), y) <= 1e-5
        perm = torch.randperm(49, generator=torch.Generator().manual_seed(2))
        shuffled = non_causal_scan(x[:, perm], dt[:, perm], A, B[:, perm], C[:, perm], None, D=D,
                                   z=None if z is None else z[:, perm], **kw)
        assert rel_err(shuffled, non_causal_scan(x, dt, A, B, C, None, D=D, z=z, **kw)[:, perm]) <= 1e-6


@pytest.mark.parametrize("group_size", [None, 32, 8])
@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("gated", [True, False])
def test_gated_rmsnorm_matches_rms_norm_ref(group_size, norm_before_gate, gated):
    """Our gated RMSNorm (an autograd Function with its own backward pass) against mamba_ssm's pure-PyTorch
    reference, forward and gradients, per group, gate before or after the norm, with a bias."""
    rms_norm_ref = mamba_ssm_module("mamba_ssm.ops.triton.layernorm_gated").rms_norm_ref
    gen = torch.Generator().manual_seed(0)
    inp = dict(x=torch.randn(3, 5, 32, generator=gen), weight=torch.randn(32, generator=gen),
               bias=torch.randn(32, generator=gen), z=torch.randn(3, 5, 32, generator=gen) if gated else None)
    inp = {k: v.requires_grad_() for k, v in inp.items() if v is not None}
    kw = dict(z=inp.get("z"), eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate)
    ours = rmsnorm_fn(inp["x"], inp["weight"], inp["bias"], **kw)
    assert_close(ours, rms_norm_ref(inp["x"], inp["weight"], inp["bias"], **kw, upcast=True), inp)
