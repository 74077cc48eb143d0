"""Our SSD (mamba2_torch.mamba_chunk_scan_combined) against mamba_ssm's pure-PyTorch references.

References: ssd_minimal_discrete (Listing 1 of the paper), ssd_chunk_scan_combined_ref (the Triton
kernels' reference) and selective_scan_ref (the step-by-step recurrence, any length). The first two need
the length to be a multiple of the chunk size; odd lengths are compared with the recurrence.
"""

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from mamba2_torch import Mamba2, mamba_chunk_scan_combined

if importlib.util.find_spec("mamba_ssm") is None:
    pytest.skip("mamba-ssm is not installed (see README: pip install ... mamba-ssm); its reference "
                "functions are what this file compares against", allow_module_level=True)

from vision_mamba2 import load_official_kernels  # noqa: E402

load_official_kernels()  # lets mamba_ssm import without its compiled selective_scan_cuda
from mamba_ssm.modules.ssd_minimal import ssd_minimal_discrete  # noqa: E402
from mamba_ssm.ops.selective_scan_interface import selective_scan_ref  # noqa: E402
from mamba_ssm.ops.triton.ssd_combined import ssd_chunk_scan_combined_ref  # noqa: E402


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def make_inputs(b=2, l=64, h=4, p=8, g=2, n=16, *, seed=0, extras=False, dtype=torch.float32):
    """Random SSD inputs with the scales Mamba2 produces (dt = softplus(.) ~ 0.001..0.1, A in -[1, 16])."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    inp = dict(x=r(b, l, h, p), dt=r(b, l, h) - 3, A=-torch.exp(torch.rand(h, generator=gen) * 2.7),
               B=r(b, l, g, n), C=r(b, l, g, n))
    if extras:
        inp.update(D=r(h), z=r(b, l, h, p), dt_bias=r(h) * 0.5)
    else:
        inp["dt"] = F.softplus(inp["dt"])
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


@pytest.mark.parametrize("l,chunk", [(64, 16), (196, 49), (196, 196), (784, 112)])
@pytest.mark.parametrize("with_init", [False, True])
def test_matches_ssd_minimal_discrete(l, chunk, with_init):
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
    inp = make_inputs(l=l, extras=True)
    # The reference exponentiates its decay matrix before masking it: with strong decays exp(+large)
    # overflows and its gradients turn into inf * 0 = NaN. Gentle decays keep it finite.
    with torch.no_grad():
        inp["A"] *= 0.02
    args = [inp[k] for k in "x dt A B C".split()]
    kw = dict(D=inp["D"], z=inp["z"], dt_bias=inp["dt_bias"], dt_softplus=True)
    assert_close(mamba_chunk_scan_combined(*args, chunk, **kw), ssd_chunk_scan_combined_ref(*args, chunk, **kw), inp)


def sequential_ref(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """The SSD as mamba_ssm's step-by-step selective_scan_ref, one channel per (head, headdim)."""
    p, n = x.shape[-1], B.shape[-1]
    per_channel = lambda t: None if t is None else repeat(t, "h -> (h p)", p=p)  # noqa: E731
    y = selective_scan_ref(rearrange(x, "b l h p -> b (h p) l"), repeat(dt, "b l h -> b (h p) l", p=p),
                           repeat(A, "h -> (h p) n", p=p, n=n),
                           rearrange(B, "b l g n -> b g n l"), rearrange(C, "b l g n -> b g n l"),
                           D=per_channel(D), z=None if z is None else rearrange(z, "b l h p -> b (h p) l"),
                           delta_bias=per_channel(dt_bias), delta_softplus=dt_softplus)
    return rearrange(y, "b (h p) l -> b l h p", p=p)


@pytest.mark.parametrize("l", [1, 49, 196, 257, 784])
@pytest.mark.parametrize("chunk", [16, 64, 256])
def test_matches_sequential_recurrence_any_length(l, chunk):
    inp = make_inputs(b=1, l=l, h=2, p=4, g=1, n=8, extras=True)
    kw = dict(D=inp["D"], z=inp["z"], dt_bias=inp["dt_bias"], dt_softplus=True)
    y = mamba_chunk_scan_combined(*(inp[k] for k in "x dt A B C".split()), chunk, **kw)
    y_ref = sequential_ref(*(inp[k] for k in "x dt A B C".split()), **kw)
    if l in (1, 49, 257):  # the recurrence's backward is a long autograd chain: gradients at a few lengths
        assert_close(y, y_ref, inp)
    else:
        assert rel_err(y, y_ref) <= 1e-5


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
    y_ref = sequential_ref(*(a.float() for a in args), **{k: v.float() if torch.is_tensor(v) else v
                                                            for k, v in kw.items()})
    eps = torch.finfo(dtype).eps
    assert rel_err(y, y_ref) <= eps, f"{rel_err(y, y_ref):.2e} > {eps:.1e}"
    assert rel_err(y, y_ref) > 0  # the output was really rounded to the half type


def test_mamba2_state_dict_round_trip_with_official():
    """Same parameter names and shapes both ways; the same seed even gives the same initialisation."""
    from mamba_ssm.modules.mamba2 import Mamba2 as OfficialMamba2

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
