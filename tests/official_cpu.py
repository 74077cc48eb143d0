"""TEST-ONLY shim: run the official mamba_ssm Mamba-2 Triton kernels on CPU tensors.

The official `mamba_ssm.modules.mamba2.Mamba2` (with `use_mem_eff_path=False`) and
`mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined` are Triton kernels written for
CUDA. Under Triton's interpreter (`TRITON_INTERPRET=1`) they can execute on CPU tensors, which
lets the tests compare our pure-PyTorch twin (`mamba2_torch`) against the real kernels, forward
and backward, on a machine with no GPU.

Obstacles and how this shim handles each one (all patches are applied by
`load_official_on_cpu()`, are idempotent, and only change behaviour in cases that would
otherwise raise on a GPU-less machine):

1. `mamba_ssm/ops/selective_scan_interface.py` does an unguarded `import selective_scan_cuda`
   (the Mamba-1 CUDA extension, never used by Mamba-2), and the package `__init__` reaches it,
   so `import mamba_ssm` fails in a pure-Python install. -> an empty stub module of that name
   is put in `sys.modules` (only if no real extension is importable).
2. Whether a kernel runs in the interpreter is decided when `@triton.jit` decorates it (i.e.
   when mamba_ssm's ops modules, and triton's own library, are imported): it then builds an
   `InterpretedFunction` instead of a `JITFunction`. So `TRITON_INTERPRET=1` must be in
   os.environ before triton is imported, for the whole process (tests/conftest.py sets it on a
   machine without CUDA; with a GPU the tests using this shim skip unless it is given). We check
   both the variable and the type of the kernel objects; we never set it ourselves, because by
   then it may already be too late.
3. The Python wrappers do `with torch.cuda.device(x.device.index):`; for a CPU tensor the index
   is None, and `torch.cuda.device(None)` raises "invalid argument to exchangeDevice" without
   a CUDA driver. -> `torch.cuda.device` is replaced by a subclass that maps None to -1 (a
   documented no-op) when CUDA is unavailable; every other argument behaves as before.
4. `@triton.autotune` with more than one config benchmarks each config through the active
   driver ("0 active drivers" on CPU). In triton 3.8, an Autotuner with exactly one config
   skips benchmarking entirely and runs `configs[0]` (still calling that config's `pre_hook`,
   which mamba_ssm uses to zero-initialise `torch.empty` accumulators such as ddt/dD, and
   still setting `.best_config`, which `_chunk_scan_bwd_dcb` reads). -> every Autotuner found
   in the already-imported `mamba_ssm.ops.triton.*` modules gets `configs = configs[:1]`.
   Doing it on the decorated objects (rather than patching `triton.autotune` before import)
   also works when another test imported mamba_ssm first.
5. The backward wrappers compute a work split from
   `torch.cuda.get_device_properties(dev).multi_processor_count`, which raises for a CPU
   device. -> for CPU devices (only) it returns an object with `multi_processor_count=132`
   (an H100's SM count; the value only changes how heads are split across programs, not the
   result beyond fp32 summation order).
6. If a *compiled* causal-conv1d were installed, Mamba2.forward would call it with CPU tensors
   ("Expected x.is_cuda() to be true"). -> `mamba_ssm.modules.mamba2.causal_conv1d_fn` is set
   to None so the module uses its own nn.Conv1d path (a no-op when causal-conv1d is absent,
   as on our machines).

Never import this from product code: the product never uses Triton on CPU.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

_LOADED = None


class OfficialUnavailable(RuntimeError):
    """The official kernels can't be run in this process (see message)."""


def mamba_ssm_installed() -> bool:
    # `import mamba_ssm` fails even when installed (obstacle 1), so detect it by spec.
    return importlib.util.find_spec("mamba_ssm") is not None


def _require_interpret_env():
    import torch

    if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available():
        import pytest

        pytest.skip("this machine has a GPU, so the suite runs Triton compiled (tests/conftest.py): run the official "
                    "kernels on CPU in a process of their own, TRITON_INTERPRET=1 python -m pytest "
                    "tests/test_official_equivalence.py tests/test_recurrent.py")
    if os.environ.get("TRITON_INTERPRET") != "1":
        where = ("triton is ALREADY imported, so setting it now is too late"
                 if "triton" in sys.modules else "triton is not imported yet")
        raise OfficialUnavailable(
            "Running the official mamba_ssm Triton kernels on CPU needs TRITON_INTERPRET=1 in "
            "os.environ before triton (and mamba_ssm) are first imported -- tests/conftest.py "
            f"sets it where there is no GPU; got TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} "
            f"({where}).")


def _stub_selective_scan_cuda():
    # Obstacle 1: Mamba-1's CUDA extension, imported unguarded; Mamba-2 never uses it.
    if "selective_scan_cuda" not in sys.modules and importlib.util.find_spec("selective_scan_cuda") is None:
        sys.modules["selective_scan_cuda"] = types.ModuleType(
            "selective_scan_cuda", "test-only stub (tests/official_cpu.py): Mamba-2 never calls it")


def _patch_cuda_device():
    # Obstacle 3: `torch.cuda.device(None)` raises without a CUDA driver; -1 is a no-op.
    import torch

    if getattr(torch.cuda.device, "_official_cpu_shim", False):
        return
    orig = torch.cuda.device

    class device(orig):
        _official_cpu_shim = True

        def __init__(self, device):
            if device is None and not torch.cuda.is_available():
                device = -1
            super().__init__(device)

    device.__doc__ = orig.__doc__
    torch.cuda.device = device


def _patch_device_properties(sm_count: int = 132):
    # Obstacle 5: backward wrappers read multi_processor_count for CPU tensors' device.
    import torch

    if getattr(torch.cuda.get_device_properties, "_official_cpu_shim", False):
        return
    orig = torch.cuda.get_device_properties

    def get_device_properties(device=None):
        if isinstance(device, torch.device) and device.type == "cpu":
            return types.SimpleNamespace(multi_processor_count=sm_count, name="cpu (test shim)")
        return orig(device)

    get_device_properties._official_cpu_shim = True
    torch.cuda.get_device_properties = get_device_properties


def _kernel_chain(obj):
    """Yield obj and the objects it wraps (Heuristics/Autotuner -> ... -> jit function)."""
    seen = set()
    while obj is not None and id(obj) not in seen:
        seen.add(id(obj))
        yield obj
        obj = getattr(obj, "fn", None)


def _interpreted_and_single_config():
    """Obstacles 2 and 4: check kernels are interpreted; keep one autotune config each."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    n_kernels = 0
    compiled = []
    for name, mod in list(sys.modules.items()):
        if not name.startswith("mamba_ssm.ops.triton.") or mod is None:
            continue
        for attr, obj in list(vars(mod).items()):
            chain = list(_kernel_chain(obj))
            if not any(isinstance(o, (Autotuner, InterpretedFunction, JITFunction)) for o in chain):
                continue
            n_kernels += 1
            for o in chain:
                if isinstance(o, Autotuner) and len(o.configs) > 1:
                    o.configs = o.configs[:1]
                if isinstance(o, JITFunction):
                    compiled.append(f"{name}.{attr}")
    if compiled:
        raise OfficialUnavailable(
            "mamba_ssm's Triton kernels were decorated as compiled JITFunctions, i.e. mamba_ssm was "
            "imported before TRITON_INTERPRET=1 was set; set it before anything imports triton "
            f"(tests/conftest.py does where there is no GPU). Compiled kernels: {compiled[:3]}...")
    if n_kernels == 0:
        raise OfficialUnavailable("found no Triton kernels in mamba_ssm.ops.triton.*")
    return n_kernels


def load_official_on_cpu():
    """Apply the test-only patches (idempotent) and return the official objects.

    Returns a SimpleNamespace with: Mamba2, mamba_chunk_scan_combined, ssd_minimal_discrete,
    ssd_chunk_scan_combined_ref, rmsnorm_fn, and the modules mamba2 / ssd_combined.
    Raises ImportError if mamba_ssm isn't installed, OfficialUnavailable if TRITON_INTERPRET=1
    wasn't set early enough.
    """
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    if not mamba_ssm_installed():
        raise ImportError("mamba_ssm is not installed")
    _require_interpret_env()
    _stub_selective_scan_cuda()
    # the Mamba-2 modules need neither transformers nor the Mamba-3 packages the package's __init__ imports: the
    # product's import makes a bare package when that __init__ fails, as it does on an install with --no-deps
    import vision_mamba2

    vision_mamba2.import_official_kernels()
    import mamba_ssm.modules.mamba2 as mamba2_mod
    import mamba_ssm.ops.triton.ssd_combined as ssd_combined
    from mamba_ssm.modules.ssd_minimal import ssd_minimal_discrete
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn

    _interpreted_and_single_config()
    _patch_cuda_device()
    _patch_device_properties()
    # Obstacle 6: a compiled causal-conv1d can't take CPU tensors; use Mamba2's nn.Conv1d path.
    mamba2_mod.causal_conv1d_fn = None

    _LOADED = types.SimpleNamespace(
        Mamba2=mamba2_mod.Mamba2,
        mamba_chunk_scan_combined=ssd_combined.mamba_chunk_scan_combined,
        ssd_minimal_discrete=ssd_minimal_discrete,
        ssd_chunk_scan_combined_ref=ssd_combined.ssd_chunk_scan_combined_ref,
        rmsnorm_fn=rmsnorm_fn,
        mamba2=mamba2_mod,
        ssd_combined=ssd_combined,
    )
    return _LOADED
