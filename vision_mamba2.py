"""
Vision Mamba 2: an MNIST classifier built from Mamba-2 (SSD) blocks instead of CNN layers.

    image (B, 1, 28, 28) -> conv stem, stride 4, kernel 7 (or two 3x3 convs: stem_width) -> (B, D, 7, 7)
       + learned 2-D position embedding
    -> num_blocks x VisionMambaBlock: a residual 3x3 depthwise conv on the grid (local_conv), then the whole 7x7
       grid as one 49-token sequence, read in one ("uni"), two ("bi", as Vim) or four ("cross", as VMamba)
       directions by one Mamba-2 mixer (or "nc": VSSD's non-causal SSD, in no direction)
    -> LayerNorm -> global average pool -> MLP head -> logits (B, 10)

Two backends, one set of weights. On CUDA with mamba-ssm installed, the official Triton SSD kernels
(fused with causal-conv1d when its CUDA extension is there); everywhere else the pure-PyTorch twin in
mamba2_torch.py. The choice is made per forward pass from the tensor's device, so a model moves freely
between CPU and GPU. `python vision_mamba2.py` checks the architecture.

Sequential MNIST (sMNIST, and psMNIST with a fixed random pixel order): SequentialMamba2 reads the same
images one pixel per step, causally, with the same Mamba-2 mixer:

    image (B, 1, 28, 28) -> (B, 784, 1) pixels in row-major order (psMNIST: then a fixed permutation)
    -> Linear(1, D) -> num_blocks x pre-norm residual Mamba-2 -> LayerNorm -> mean or last step -> MLP head
"""

import dataclasses
import functools
import importlib.metadata
import importlib.util
import sys
import types
from dataclasses import dataclass

import torch
import torch.nn as nn
from einops import rearrange
from torchvision.ops import StochasticDepth

from cli import HelpFormatter, Parser, add_config_flags, int_at_least
from mamba2_torch import Mamba2, non_causal_scan, non_causal_ssd_matrix, rmsnorm_fn

SCANS = {"uni": 1, "bi": 2, "cross": 4, "nc": 1}  # scan mode -> number of directions (nc: order-free, non-causal)
BACKENDS = ("auto", "official", "portable")
READOUTS = ("mean", "last")  # SequentialMamba2's summary of the sequence: average over all steps, or the last


def knob(default, help, **metadata):
    """A config field with a help line: train.py and `python vision_mamba2.py` make it a flag (cli.add_config_flags);
    fields without one are set from the data or not worth a flag. metadata: `choices`, the values allowed; `absent`,
    what a checkpoint written before the field existed means by lacking it."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


class ModelConfig:
    """What every model config does (this file's and baselines.py's): read itself back from a checkpoint, check its
    fields, and say whether a batch has the shape the model reads."""

    @classmethod
    def from_dict(cls, d):
        # a field added after checkpoints were written says, as `absent`, the value that builds the model they hold
        absent = {f.name: f.metadata["absent"] for f in dataclasses.fields(cls) if "absent" in f.metadata}
        d = {**{k: v for k, v in absent.items() if k not in d}, **d}
        fields = {f.name for f in dataclasses.fields(cls)}
        if set(d) != fields:
            unknown, missing = sorted(set(d) - fields), sorted(fields - set(d))
            raise ValueError(f"the model config has unknown keys {unknown} and lacks {missing}")
        return cls(**d)

    def validate(self):
        """Raise ValueError naming the numbers to change if this model cannot be built."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type is int and "choices" not in f.metadata and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{f.name} must be a positive integer, got {value!r}")
            if f.type is bool and not isinstance(value, bool):
                raise ValueError(f"{f.name} must be True or False, got {value!r}")
            if f.type is float and not 0 <= value < 1:  # the rates: dropout, drop_path
                raise ValueError(f"{f.name} must be in [0, 1), got {value}")
            if "choices" in f.metadata and value not in f.metadata["choices"]:
                raise ValueError(f"{f.name} must be one of {list(f.metadata['choices'])}, got {value!r}")

    def check_input(self, shape):
        """Raise ValueError unless a batch of this shape is what the model reads: (B, in_chans, img_size, img_size)
        for the image classifiers. test_model.py asks before it evaluates."""
        if len(shape) != 4 or tuple(shape[1:]) != (self.in_chans, self.img_size, self.img_size):
            raise ValueError(f"expected input of shape (B, {self.in_chans}, {self.img_size}, {self.img_size}), "
                             f"got {tuple(shape)}")


@dataclass
class Mamba2Config(ModelConfig):
    """The Mamba-2 mixer's fields and their checks, shared by the image and the sequence model."""
    d_model: int = knob(128, "channels of the token stream")
    num_blocks: int = knob(4, "Mamba-2 blocks")
    d_state: int = knob(32, "SSM state size per head: how much each scan remembers of what it has read")
    d_conv: int = 4  # the mixer's causal depthwise conv, as Mamba's
    expand: int = knob(2, "inner width of the mixer, as a multiple of d-model")
    headdim: int = knob(32, "channels per SSM head; d-model*expand must be divisible by it")
    ngroups: int = 1  # heads sharing one B and C
    chunk_size: int = 64  # the SSD's chunk length: the same result for any value; 64 is fastest on a CPU (bench.py)
    dropout: float = 0.1  # in the classifier head: a recipe constant, not a flag
    drop_path: float = knob(0.0, "stochastic depth: the chance that the last block's branch is skipped for an image "
                                 "in training, rising linearly from 0 for the first")
    backend: str = knob("auto", "Mamba-2 implementation: official (mamba-ssm's kernels, CUDA), portable (pure "
                                "PyTorch), auto (official where it can run); the same weights either way",
                        choices=BACKENDS)

    def validate(self):
        super().validate()
        d_inner = self.d_model * self.expand
        if d_inner % self.headdim:
            raise ValueError(f"d_model*expand = {d_inner} must be divisible by headdim = {self.headdim}")
        if (d_inner // self.headdim) % self.ngroups:
            raise ValueError(f"the number of heads d_model*expand/headdim = {d_inner // self.headdim} "
                             f"must be divisible by ngroups = {self.ngroups}")
        conv_dim = d_inner + 2 * self.ngroups * self.d_state
        if self.backend != "portable" and conv_dim % 8:
            # causal-conv1d's channels-last kernel, used by the official fused path, requires it
            raise ValueError(f"the official kernels need d_model*expand + 2*ngroups*d_state = {conv_dim} to be a "
                             f"multiple of 8: change d_model, expand, ngroups or d_state, or use backend='portable'")


@dataclass
class VisionMamba2Config(Mamba2Config):
    img_size: int = 28
    in_chans: int = 1
    num_classes: int = 10
    patch_size: int = knob(4, "stride of the tokenizing conv (kernel 2p-1): 4 gives a 7x7 grid of tokens, 2 a "
                              "14x14 grid (4x the work, no more accurate)")
    scan: str = knob("bi", "directions each block reads the token grid in: uni (1), bi (2, forward and backward, "
                           "so every token sees the whole image), cross (4, rows and columns); nc: no direction, "
                           "VSSD's non-causal SSD (every token reads one state all tokens write)", choices=list(SCANS))
    local_conv: bool = knob(True, "a residual 3x3 depthwise conv on the token grid at the start of each block, so "
                                  "each token mixes with its 8 neighbours")
    mlp_ratio: int = knob(0, "a residual channel MLP after the mixer in each block, this many times d-model wide "
                             "(MetaFormer style, as VMamba's; 0: none, as Mamba's)", choices=(0, 1, 2, 4), absent=0)
    stem_width: int = knob(0, "a two-layer conv stem, its first 3x3 conv this many channels wide, as CNNs and "
                              "Xiao et al.'s early-conv ViTs begin (0: one patch conv)", choices=(0, 16, 24, 32),
                           absent=0)

    def validate(self):
        super().validate()
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} must be divisible by patch_size {self.patch_size}")
        if self.stem_width and self.patch_size % 2:
            raise ValueError(f"the two-layer stem (stem_width {self.stem_width}) halves the image first, so "
                             f"patch_size must be even, got {self.patch_size}")


@dataclass
class SequentialMamba2Config(Mamba2Config):
    # defaults for sMNIST on a GPU, not yet measured on a full run
    d_state: int = knob(64, "SSM state size per head (a long sequence: more than the image model's 49 tokens need)")
    seq_len: int = 784  # pixels per image, read one per step
    in_chans: int = 1  # values per step
    num_classes: int = 10
    readout: str = knob("mean", "what the classifier head sees: the mean of every step's features, or the last "
                                "step's", choices=list(READOUTS))
    permutation_seed: int | None = knob(None, "psmnist: seeds the fixed pixel order, stored in the checkpoint "
                                              "(default: 0 for psmnist; smnist reads in row-major order)")

    def validate(self):
        seed = self.permutation_seed
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ValueError(f"permutation_seed must be None (row-major order) or an integer >= 0, got {seed!r}")
        super().validate()

    def check_input(self, shape):
        """Any (B, in_chans, H, W) with H*W = seq_len: the steps are the pixels, row by row."""
        if len(shape) != 4 or shape[1] != self.in_chans or shape[2] * shape[3] != self.seq_len:
            raise ValueError(f"expected input of shape (B, {self.in_chans}, H, W) with H*W = seq_len = "
                             f"{self.seq_len}, got {tuple(shape)}")


# ----------------------------------------------------------------------------------------------------
# Backends


@functools.cache
def import_official_kernels():
    """(mamba_ssm's Mamba-2 kernels as a namespace or None, a few words on how they were found or why not)."""
    if importlib.util.find_spec("mamba_ssm") is None:
        return None, "mamba-ssm is not installed"
    how = ""
    try:
        import mamba_ssm  # noqa: F401
    except Exception as e:
        # the package's __init__ also imports Mamba-1 (a CUDA extension a source install may lack) and the language
        # models (transformers, huggingface_hub), none of which Mamba-2's Triton kernels need: import those alone,
        # under a bare package that does not run the __init__
        spec = importlib.util.find_spec("mamba_ssm")
        package = types.ModuleType("mamba_ssm")
        package.__path__, package.__spec__ = list(spec.submodule_search_locations), spec
        sys.modules["mamba_ssm"] = package
        how = f", imported without the package's __init__, which fails ({type(e).__name__}: {e})"
    try:
        from mamba_ssm.ops.triton import ssd_combined
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
    except Exception as e:  # e.g. a release that doesn't import with this torch or triton
        return None, f"mamba-ssm is installed but its Mamba-2 kernels do not import ({type(e).__name__}: {e})"
    # the fused conv + scan path calls causal-conv1d's compiled CUDA functions; mamba_ssm sets them to
    # None when causal-conv1d (or its extension) is missing
    has_conv_kernel = ssd_combined.causal_conv1d_fwd_function is not None
    fused = ssd_combined.mamba_split_conv1d_scan_combined if has_conv_kernel else None
    conv = "conv fused by causal-conv1d" if fused else "conv in PyTorch (causal-conv1d not installed)"
    return (types.SimpleNamespace(scan=ssd_combined.mamba_chunk_scan_combined, gated_norm=rmsnorm_fn, fused=fused),
            f"mamba-ssm {importlib.metadata.version('mamba-ssm')} Triton kernels, {conv}{how}")


@functools.cache
def official_kernels():
    """(the official kernels or None, a few words why): import_official_kernels(), and on a machine with a GPU their
    first call, made here once: a Triton that cannot build kernels for this GPU fails there, and `auto` then runs the
    portable twin, saying so in one line on stderr, instead of the run crashing at its first step. One small kernel
    (the gated RMSNorm, in fp32: compiled in seconds, with no autotuning whose choice a tiny input would skew)."""
    kernels, note = import_official_kernels()
    if kernels is None or not torch.cuda.is_available():
        return kernels, note
    failure = first_call_failure(kernels, torch.device("cuda"))
    if failure is None:
        return kernels, note
    note = f"{note.split(',')[0]} import but fail at their first call on this GPU ({failure})"
    print(f"warning: {note}: backend 'auto' runs the portable twin", file=sys.stderr)
    return None, note


def first_call_failure(kernels, device):
    """Why the official gated RMSNorm fails on `device` (a few words), or None when it runs."""
    try:
        x = torch.ones(2, 16, device=device)
        kernels.gated_norm(x, torch.ones(16, device=device), None, z=x, group_size=16, norm_before_gate=False)
        return None
    except Exception as e:  # whatever Triton or the driver raise: the run goes on without them
        return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def load_official_kernels():
    """mamba_ssm's Mamba-2 kernels as a namespace, or None when mamba-ssm is not installed, won't import or (on a
    machine with a GPU) fails at its first call."""
    return official_kernels()[0]


def describe_backend(backend, device):
    """One line: which Mamba-2 implementation runs on `device` for `backend`, and why."""
    device = torch.device(device)
    chosen = resolve_backend(backend, device)
    kernels, note = official_kernels() if device.type == "cuda" else (None, "")
    if chosen == "official":
        return f"official ({note})"
    if backend == "portable":
        return "portable (pure PyTorch, as asked)"
    why = note if device.type == "cuda" else f"the official kernels run only on CUDA, not on {device.type}"
    return f"portable (pure PyTorch): {why}"


def resolve_backend(backend, device):
    """Which Mamba-2 implementation runs on `device`: "official" or "portable"."""
    device = torch.device(device)
    if backend == "portable":
        return "portable"
    if backend == "official":
        if device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(f"backend 'official' runs only on a CUDA GPU, got device {device}"
                               f"{'' if torch.cuda.is_available() else ' and no GPU is available'}: "
                               "use backend 'auto' or 'portable'")
        if load_official_kernels() is None:
            raise RuntimeError(f"backend 'official' cannot run: {official_kernels()[1]} (the README's GPU section "
                               f"says how to install mamba-ssm)")
        return "official"
    if backend == "auto":
        return "official" if device.type == "cuda" and load_official_kernels() is not None else "portable"
    raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")


def buildable(config):
    """The config, once it is valid and its backend can run here (fail now, not at the first forward)."""
    config.validate()
    if config.backend == "official":
        resolve_backend("official", "cuda")
    return config


class Mamba2Mixer(Mamba2):
    """The Mamba-2 twin, handing its work to the official kernels when the backend says so. Which kernels run is
    settled when the backend is set, outside the forward: a compiled forward (torch.compile) then traces no import,
    cache or device lookup, and has no graph break of its own. The kernels are chosen by the input's device, so a
    model moves freely between CPU and GPU."""

    def __init__(self, *, backend, causal=True, **mamba_kwargs):
        super().__init__(**mamba_kwargs)
        self.backend, self.causal = backend, causal

    @property
    def backend(self):
        return self._backend

    @backend.setter
    def backend(self, backend):
        # the official kernels for CUDA inputs, None for the portable twin (or for an error at the first CUDA input)
        self.cuda_kernels = load_official_kernels() if backend != "portable" and torch.cuda.is_available() else None
        self._backend = backend

    def forward(self, u):
        # u : (B, L, D)
        kernels = self.cuda_kernels if u.is_cuda else None
        if kernels is None:
            if self.backend == "official":  # never the portable twin in its place: say why not (no GPU, no kernels)
                resolve_backend("official", u.device)
            if not self.causal:
                return self.mix(u, scan=non_causal_scan, gated_norm=rmsnorm_fn)
            return super().forward(u)
        return self.forward_official(u, kernels)

    def ssd_matrix(self, u):
        return super().ssd_matrix(u) if self.causal else super().ssd_matrix(u, matrix=non_causal_ssd_matrix)

    def forward_official(self, u, kernels):
        """The same computation through mamba_ssm's kernels: its SSD scan and gated norm around our projections and
        conv, or, where causal-conv1d is installed, its one fused call (conv, scan, norm and both projections)."""
        # u : (B, L, D)
        if not self.causal:  # the non-causal SSD is two matmuls in PyTorch: the official gated norm around it
            return self.mix(u, scan=non_causal_scan, gated_norm=kernels.gated_norm)
        if kernels.fused is None:
            return self.mix(u, scan=kernels.scan, gated_norm=kernels.gated_norm)
        D = rearrange(self.D, "(h p) -> h p", p=self.headdim) if self.D_has_hdim else self.D
        return kernels.fused(
            self.in_proj(u), rearrange(self.conv1d.weight, "d 1 w -> d w"), self.conv1d.bias, self.dt_bias,
            -torch.exp(self.A_log.float()), D, self.chunk_size, dt_limit=self.dt_limit, activation="silu",
            rmsnorm_weight=self.norm.weight if self.rmsnorm else None,
            rmsnorm_eps=self.norm.eps if self.rmsnorm else 1e-6,
            outproj_weight=self.out_proj.weight, outproj_bias=self.out_proj.bias,
            headdim=None if self.D_has_hdim else self.headdim, ngroups=self.ngroups,
            norm_before_gate=self.norm_before_gate)


# ----------------------------------------------------------------------------------------------------
# Model


def mamba2_mixer(c, *, causal=True):
    """The Mamba-2 mixer a Mamba2Config describes; causal=False: the non-causal SSD in place of the scan."""
    return Mamba2Mixer(d_model=c.d_model, d_state=c.d_state, d_conv=c.d_conv, expand=c.expand, headdim=c.headdim,
                       ngroups=c.ngroups, chunk_size=c.chunk_size, backend=c.backend, causal=causal)


def scan_orders(scan, h, w):
    """Token orders (k, h*w) of a scan mode's k directions over a row-major h x w grid."""
    grid = torch.arange(h * w).view(h, w)
    rows, cols = grid.flatten(), grid.t().flatten()
    orders = {"uni": [rows], "bi": [rows, rows.flip(0)], "cross": [rows, rows.flip(0), cols, cols.flip(0)],
              "nc": [rows]}
    return torch.stack(orders[scan])


def drop_path_rates(config):
    """Each block's stochastic-depth rate: rising linearly from 0 (first block) to config.drop_path (last), as
    Vim, VMamba and timm's ViTs do: the early blocks, whose features every later one builds on, are kept most."""
    n = config.num_blocks
    return [config.drop_path * i / max(n - 1, 1) for i in range(n)]


class VisionMambaBlock(nn.Module):
    """Pre-norm residual Mamba-2 block on a feature map: (B, C, H, W) -> (B, C, H, W).

    With local_conv, a residual 3x3 depthwise conv first mixes each token with its 8 grid neighbours (as CPVT's
    position encoding generator, Chu et al. 2021): a 1-D scan of the row-major grid reaches a token's vertical
    neighbours W steps away, through the SSM state only. The conv stays outside the Mamba-2 mixer, which remains
    exactly mamba_ssm's. Then the whole H x W grid is one sequence, so information crosses rows. Each direction of
    the scan is a reordering of that sequence; all directions share one mixer (batched together in one call) and
    get a learned direction embedding so the mixer knows which way it reads. Outputs are put back in grid order
    and averaged. With scan "nc" there is one pass and its SSD has no direction (VSSD's non-causal form; the mixer's
    short conv still looks back along the row-major order). With mlp_ratio, a pre-norm residual MLP on each token's
    channels follows (MetaFormer, as VMamba).
    """

    def __init__(self, config, *, drop_path=0.0):
        super().__init__()
        c, dim = config, config.d_model
        assert c.img_size % c.patch_size == 0, "the image must split into whole patches"
        self.grid_size = g = c.img_size // c.patch_size
        self.local = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim) if c.local_conv else None
        self.drop_path = StochasticDepth(drop_path, mode="row")  # per sample, in training only
        self.norm = nn.LayerNorm(dim)
        self.mixer = mamba2_mixer(c, causal=c.scan != "nc")
        # MetaFormer's second half: each token's channels mixed on their own, as in a ViT block
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, c.mlp_ratio * dim), nn.GELU(),
                                 nn.Linear(c.mlp_ratio * dim, dim)) if c.mlp_ratio else None
        self.register_buffer("order", scan_orders(c.scan, g, g), persistent=False)  # (k, L)
        self.direction_embed = nn.Parameter(torch.zeros(len(self.order), dim))
        self.direction_embed._no_weight_decay = True

    def forward(self, x):
        # x : (B, C, H, W)
        h = w = self.grid_size
        k = len(self.order)  # scan directions
        if self.local is not None:
            x = x + self.local(x)  # (B, C, H, W)
        steps = self.order.flatten()  # (k*L,): the token each direction reads at each step
        t = rearrange(x, "b c h w -> b (h w) c")  # (B, L, C), row-major
        u = rearrange(self.norm(t).index_select(1, steps), "b (k l) c -> b k l c", k=k) + self.direction_embed[:, None]
        y = self.mixer(rearrange(u, "b k l c -> (b k) l c"))  # (B*k, L, C)
        # each step's output added back onto the token it read (an index_add: several times faster on a CPU than
        # gathering each direction back into grid order), averaged over the k directions, onto the residual stream:
        # one op. Stochastic depth scales each image's outputs, all directions alike, before they are summed. (The
        # mixer's output is cast to the stream's dtype: under autocast it is bf16, the stream fp32.)
        y = self.drop_path(rearrange(y, "(b k) l c -> b (k l) c", k=k).to(t.dtype))  # (B, k*L, C)
        t = t.index_add(1, steps, y, alpha=1 / k)  # (B, L, C)
        if self.mlp is not None:
            t = t + self.drop_path(self.mlp(t))
        return rearrange(t, "b (h w) c -> b c h w", h=h, w=w)


def classifier_head(c):
    """The MLP on the pooled features, shared by the image and sequence models (and the ViT): (B, D) -> (B, classes)."""
    return nn.Sequential(nn.Linear(c.d_model, c.d_model), nn.GELU(), nn.Dropout(c.dropout),
                         nn.Linear(c.d_model, c.num_classes))


def conv_stem(c):
    """The tokenizer, (B, in_chans, H, W) -> (B, D, H/p, W/p): overlapping patches (kernel 2p-1, stride p), or with
    stem_width a 3x3 conv of stride 2 and a 3x3 conv of stride p/2 with a nonlinearity between, so each token starts
    from edges and strokes rather than a linear view of its pixels."""
    p = c.patch_size
    if not c.stem_width:
        return nn.Conv2d(c.in_chans, c.d_model, kernel_size=2 * p - 1, stride=p, padding=p - 1)
    return nn.Sequential(nn.Conv2d(c.in_chans, c.stem_width, kernel_size=3, stride=2, padding=1),
                         nn.BatchNorm2d(c.stem_width), nn.GELU(),
                         nn.Conv2d(c.stem_width, c.d_model, kernel_size=3, stride=p // 2, padding=1))


class VisionMamba2(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = c = buildable(config)
        self.grid_size = c.img_size // c.patch_size
        self.stem = conv_stem(c)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.d_model, self.grid_size, self.grid_size))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.pos_embed._no_weight_decay = True  # embeddings, like norms and the SSM's A_log/D/dt_bias
        self.blocks = nn.ModuleList(VisionMambaBlock(c, drop_path=p) for p in drop_path_rates(c))
        self.norm = nn.LayerNorm(c.d_model)
        self.head = classifier_head(c)

    def forward(self, x):
        # x : (B, in_chans, img_size, img_size)
        self.config.check_input(x.shape)
        x = self.stem(x) + self.pos_embed  # (B, D, h, w)
        for block in self.blocks:
            x = block(x)
        x = self.norm(rearrange(x, "b d h w -> b (h w) d")).mean(dim=1)  # (B, D)
        return self.head(x)  # (B, num_classes)


def pixel_permutation(seq_len, seed):
    """The order (seq_len,) in which SequentialMamba2 reads the pixels: row-major for seed None, else a fixed
    shuffle drawn from a CPU generator seeded with `seed` (so the same whatever device the model runs on)."""
    if seed is None:
        return torch.arange(seq_len)
    return torch.randperm(seq_len, generator=torch.Generator().manual_seed(seed))


class ResidualMamba2Block(nn.Module):
    """Pre-norm residual Mamba-2 block on a sequence: (B, L, D) -> (B, L, D), causal (a step sees only
    itself and the steps before it: Mamba-2's convolution and scan both look back only)."""

    def __init__(self, config, *, drop_path=0.0):
        super().__init__()
        self.drop_path = StochasticDepth(drop_path, mode="row")
        self.norm = nn.LayerNorm(config.d_model)
        self.mixer = mamba2_mixer(config)

    def forward(self, x):
        # x : (B, L, D)
        return x + self.drop_path(self.mixer(self.norm(x)))


class SequentialMamba2(nn.Module):
    """Sequential MNIST: the image model's (B, in_chans, H, W) input read one pixel per step, H*W = seq_len."""

    def __init__(self, config):
        super().__init__()
        self.config = c = buildable(config)
        # persistent: the checkpoint keeps the order the weights were trained on, and loading checks it (below)
        self.register_buffer("permutation", pixel_permutation(c.seq_len, c.permutation_seed))  # (L,)
        self.embed = nn.Linear(c.in_chans, c.d_model)
        self.blocks = nn.ModuleList(ResidualMamba2Block(c, drop_path=p) for p in drop_path_rates(c))
        self.norm = nn.LayerNorm(c.d_model)
        self.head = classifier_head(c)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        saved = state_dict.get(prefix + "permutation")
        if saved is not None and not torch.equal(saved.cpu(), self.permutation.cpu()):
            error_msgs.append(f"the checkpoint's pixel order is not the one permutation_seed "
                              f"{self.config.permutation_seed} gives here: the weights were trained on another "
                              f"permutation (or this torch draws randperm differently)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def features(self, x):
        """Per-step features (B, L, D) after the blocks: step t depends only on the pixels read at steps <= t."""
        # x : (B, in_chans, H, W)
        self.config.check_input(x.shape)
        x = rearrange(x, "b c h w -> b (h w) c")[:, self.permutation]  # (B, L, C), in reading order
        x = self.embed(x)  # (B, L, D)
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x):
        # x : (B, in_chans, H, W)
        x = self.norm(self.features(x))  # (B, L, D)
        x = x.mean(dim=1) if self.config.readout == "mean" else x[:, -1]  # (B, D)
        return self.head(x)  # (B, num_classes)

    @torch.no_grad()
    def step_logits(self, x, *, at=None):
        """The class logits while reading, pixel by pixel: a generator of (t, logits (B, num_classes)) after t steps,
        for t = 1..L or only the step counts in `at`. Each block runs Mamba2.step (the pure-PyTorch twin's, on any
        device), without gradients, so memory does not grow with t. The readout so far is the mean of the normed
        features of steps 1..t, or step t's. In eval mode, the logits at t = L are forward(x)'s."""
        # x : (B, in_chans, H, W)
        self.config.check_input(x.shape)
        L = self.config.seq_len
        steps = set(range(1, L + 1))
        at = steps if at is None else set(at)
        if not at or not at <= steps:
            raise ValueError(f"at must be step counts in 1..{L}, got {sorted(at - steps) or 'none'}")
        pixels = rearrange(x, "b c h w -> b (h w) c")[:, self.permutation]  # (B, L, C), in reading order
        states = [block.mixer.allocate_inference_cache(len(x), L) for block in self.blocks]
        total = 0
        for t in range(1, max(at) + 1):
            h = self.embed(pixels[:, t - 1:t])  # (B, 1, D)
            for block, (conv_state, ssm_state) in zip(self.blocks, states):
                h = h + block.drop_path(block.mixer.step(block.norm(h), conv_state, ssm_state)[0])
            f = self.norm(h[:, 0])  # (B, D)
            total = total + f
            if t in at:
                yield t, self.head(total / t if self.config.readout == "mean" else f)


def create_vision_mamba2_model(**config):
    """VisionMamba2 from config fields (see VisionMamba2Config); the defaults give ~475K parameters."""
    return VisionMamba2(VisionMamba2Config(**config))


# ----------------------------------------------------------------------------------------------------
# Architecture check: python vision_mamba2.py [--d-model 128 --scan cross ...]


def count_params(module):
    return sum(p.numel() for p in module.parameters())


def check_on(model, device, batch_size):
    """Shapes of each stage, then a forward and backward pass on a random batch."""
    model = model.to(device)
    c = model.config
    print(f"\n[{device}] backend: {describe_backend(c.backend, device)}")
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: shapes.append((name, tuple(o.shape))))
             for name, m in [("stem", model.stem), *((f"blocks.{i}", b) for i, b in enumerate(model.blocks)),
                             ("norm", model.norm), ("head", model.head)]]
    x = torch.randn(batch_size, c.in_chans, c.img_size, c.img_size, device=device)
    logits = model(x)
    for h in hooks:
        h.remove()
    print(f"  {'input':<10} {tuple(x.shape)}")
    for name, shape in shapes:
        print(f"  {name:<10} {shape}")
    logits.logsumexp(-1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"
    print(f"  forward + backward OK, logits {tuple(logits.shape)}, every parameter has a finite gradient")
    model.zero_grad(set_to_none=True)


def compare_backends(model, batch_size):
    """On CUDA with mamba-ssm: the official kernels against the portable twin, same weights. In fp32, as the
    check before it: Triton compiles and autotunes each kernel per dtype, which took minutes on a fresh H100."""
    c = model.config
    model = model.cuda().eval()
    x = torch.randn(batch_size, c.in_chans, c.img_size, c.img_size, device="cuda")
    outputs = {}
    for backend in ("official", "portable"):
        for block in model.blocks:
            block.mixer.backend = backend
        with torch.no_grad():
            outputs[backend] = model(x)
    for block in model.blocks:
        block.mixer.backend = c.backend
    err = (outputs["official"] - outputs["portable"]).norm() / outputs["portable"].norm()
    print(f"  official vs portable logits (fp32; the kernels may use TF32): relative error {err:.2e}")


def main():
    # usage errors as train.py's: one line and exit status 2
    parser = Parser(formatter_class=HelpFormatter,
                    description="Check the Vision Mamba 2 architecture: shapes, parameters, backend, a forward and "
                                "backward pass on CPU (and CUDA).")
    add_config_flags(parser, VisionMamba2Config, every_field=True)
    # at least 1: an empty batch would "pass" the check with nothing checked
    parser.add_argument("--batch-size", type=int_at_least(1), default=4, help="images in the check's batch")
    args = vars(parser.parse_args())
    batch_size = args.pop("batch_size")
    try:
        model = create_vision_mamba2_model(**args)
    except (ValueError, RuntimeError) as e:
        parser.error(f"invalid model configuration: {e}")

    print("Vision Mamba 2 configuration:")
    for key, value in dataclasses.asdict(model.config).items():
        print(f"  {key:<12} {value}")
    print(f"\nparameters: {count_params(model):,} total")
    for name, part in [("stem + pos", [model.stem, model.pos_embed]), *((f"blocks.{i}", [b]) for i, b in
                       enumerate(model.blocks)), ("norm + head", [model.norm, model.head])]:
        n = sum(p.numel() if isinstance(p, nn.Parameter) else count_params(p) for p in part)
        print(f"  {name:<12} {n:,}")

    try:
        if model.config.backend != "official":
            check_on(model, torch.device("cpu"), batch_size)
        if torch.cuda.is_available():
            check_on(model, torch.device("cuda"), batch_size)
            if load_official_kernels() is not None:
                compare_backends(model, batch_size)
        else:
            print("\nno CUDA device: the official kernels were not exercised")
    except (ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
