"""How a Mamba-2 mixer picks its kernels, checked on a CPU: the choice is made when the backend is set, never inside
the forward (which torch.compile traces), and official kernels that import but fail at their first call leave `auto`
on the portable twin with one line saying why. And the suite leaves Triton compiled on a machine with a GPU."""

import subprocess
import sys
import types

import pytest
import torch

import vision_mamba2
from helpers import PROC_ENV, REPO
from official_cpu import mamba_ssm_installed
from vision_mamba2 import create_vision_mamba2_model

TINY = dict(d_model=16, num_blocks=1, d_state=8, headdim=8, dropout=0.0)
LOOKUPS = ("resolve_backend", "describe_backend", "load_official_kernels", "official_kernels",
           "import_official_kernels")
NOTE = "mamba-ssm 2.3.2.post1 Triton kernels, conv in PyTorch (causal-conv1d not installed)"
NO_IMAGE = "RuntimeError: CUDA error: no kernel image is available for execution on the device"


def test_the_forward_looks_nothing_up_and_compiles_as_one_graph(monkeypatch):
    """A backend lookup in the forward (an import behind functools.cache, on CUDA) is what broke the compiled graph:
    every lookup function fails here once the model is built, eagerly and under fullgraph=True."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = create_vision_mamba2_model(**TINY).eval()

    def looked_up(*args, **kwargs):
        raise AssertionError("the forward looked the backend up")

    for name in LOOKUPS:
        monkeypatch.setattr(vision_mamba2, name, looked_up)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    torch._dynamo.reset()
    assert torch.allclose(compiled, eager, atol=1e-5)


@pytest.fixture
def gpu_with(monkeypatch):
    """A pretend GPU machine where mamba-ssm imports (fake kernels) and their first call fails with `failure`
    (None: it runs); official_kernels() is looked up afresh, and forgotten after the test."""

    def install(failure):
        kernels = types.SimpleNamespace(scan=None, gated_norm=None, fused=None)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(vision_mamba2, "import_official_kernels", lambda: (kernels, NOTE))
        monkeypatch.setattr(vision_mamba2, "first_call_failure", lambda kernels, device: failure)
        vision_mamba2.official_kernels.cache_clear()
        return kernels

    yield install
    vision_mamba2.official_kernels.cache_clear()


def test_auto_falls_back_when_the_first_call_fails(gpu_with, capsys):
    gpu_with(NO_IMAGE)
    assert vision_mamba2.load_official_kernels() is None
    assert vision_mamba2.resolve_backend("auto", "cuda") == "portable"
    assert "fail at their first call on this GPU" in vision_mamba2.describe_backend("auto", "cuda")
    with pytest.raises(RuntimeError, match="no kernel image"):
        vision_mamba2.resolve_backend("official", "cuda")
    model = create_vision_mamba2_model(**TINY)
    assert model.blocks[0].mixer.cuda_kernels is None  # CUDA inputs would run the portable twin
    lines = capsys.readouterr().err.splitlines()  # once, however often asked
    assert len(lines) == 1 and "no kernel image" in lines[0] and "portable" in lines[0], lines


def test_auto_takes_the_official_kernels_when_they_run(gpu_with, capsys):
    kernels = gpu_with(None)
    assert vision_mamba2.resolve_backend("auto", "cuda") == "official"
    assert vision_mamba2.describe_backend("auto", "cuda") == f"official ({NOTE})"
    model = create_vision_mamba2_model(**TINY)
    assert model.blocks[0].mixer.cuda_kernels is kernels
    model.blocks[0].mixer.backend = "portable"
    assert model.blocks[0].mixer.cuda_kernels is None
    assert capsys.readouterr().err == ""


class OnCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: the mixer's dispatch, seen without a GPU."""

    @property
    def is_cuda(self):
        return True


@pytest.mark.parametrize("scan", ["bi", "nc"])
def test_a_cuda_input_goes_to_the_kernels_the_mixer_holds_and_a_cpu_input_to_the_twin(gpu_with, scan, monkeypatch):
    """Mamba2Mixer.forward on backend 'auto' where the official kernels run: a CUDA input goes to forward_official
    with the kernels settled when the model was built (no lookup on the way, as test_the_forward_looks_nothing_up
    needs on a GPU), a CPU input to the portable twin; the non-causal SSD (scan nc) as the causal one."""
    kernels = gpu_with(None)
    model = create_vision_mamba2_model(**TINY, scan=scan)
    official = []

    def forward_official(self, u, kernels):
        official.append(kernels)
        return torch.zeros(u.shape)
    mixer, u = model.blocks[0].mixer, torch.randn(2, 49, 16)
    with monkeypatch.context() as patch:  # undone before gpu_with's teardown, which clears a lookup's cache
        for name in LOOKUPS:
            patch.setattr(vision_mamba2, name, lambda *args, **kwargs: pytest.fail("the forward looked up"))
        patch.setattr(vision_mamba2.Mamba2Mixer, "forward_official", forward_official)
        assert not mixer(u).eq(0).all() and official == []
        assert mixer(u.as_subclass(OnCuda)).eq(0).all() and official == [kernels]


def test_first_call_failure_runs_the_official_kernel():
    """The real gated RMSNorm kernel (interpreted on the CPU) runs; one that raises is named with its error."""
    official_cpu = pytest.importorskip("official_cpu")
    if not official_cpu.mamba_ssm_installed():
        pytest.skip("mamba_ssm is not installed")
    official = official_cpu.load_official_on_cpu()
    cpu = torch.device("cpu")
    assert vision_mamba2.first_call_failure(types.SimpleNamespace(gated_norm=official.rmsnorm_fn), cpu) is None

    def no_image(*args, **kwargs):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device\n(details)")

    assert vision_mamba2.first_call_failure(types.SimpleNamespace(gated_norm=no_image), cpu) == f"{NO_IMAGE} (details)"


def test_the_suite_runs_triton_compiled_on_a_gpu_machine():
    """tests/conftest.py turns the interpreter on only without CUDA: on a pretend GPU machine the tests that need it
    skip, saying how to run them, instead of the whole run (the CUDA tests too) running interpreted kernels."""
    if not mamba_ssm_installed():
        pytest.skip("mamba_ssm is not installed: no test needs the interpreter")
    env = {k: v for k, v in PROC_ENV.items() if k != "TRITON_INTERPRET"}
    code = ("import sys, pytest, torch; torch.cuda.is_available = lambda: True; "
            "sys.exit(pytest.main(['tests/test_official_equivalence.py', '-q', '-rs', '-p', 'no:cacheprovider']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and " passed" not in proc.stdout, proc.stdout[-2000:]
    assert "skipped" in proc.stdout and "TRITON_INTERPRET=1 python -m pytest" in proc.stdout, proc.stdout[-2000:]
