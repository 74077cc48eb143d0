# Must stay the first statement of this file, before anything imports triton (directly or via
# mamba_ssm, e.g. a test importing mamba_ssm.modules.ssd_minimal): Triton decides at `@triton.jit`
# decoration time whether a kernel is compiled or interpreted, so TRITON_INTERPRET=1 has to be in the
# environment before mamba_ssm's Triton kernels are imported. tests/test_official_equivalence.py needs
# the interpreter to run the official Mamba-2 kernels on CPU tensors (see tests/official_cpu.py).
# Harmless for our product, which never runs Triton on CPU. setdefault: an explicit value wins.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
