"""
Mamba-2 in pure PyTorch: a twin of `mamba_ssm.modules.mamba2.Mamba2` that runs anywhere.

Same constructor arguments (for everything that affects training), same parameter names, shapes and
initialisation, so `ours.load_state_dict(official.state_dict())` works both ways. The SSD (state space
duality) layer is computed by the chunked algorithm of the Mamba-2 paper (Dao & Gu, 2024, Listing 1):
within a chunk the SSM is a masked "attention" matrix (quadratic, matmul-friendly); across chunks only
the (headdim x d_state) states are carried by a short recurrence. No Python loop over time steps.

The same layer has two other exact forms (the "duality"), for looking inside it: `ssd_matrix` writes the whole
sequence map as one lower-triangular (l x l) matrix per head, y = M x + D x with M = L o (C B^T), an attention
matrix whose mask L holds the decays; `Mamba2.step` runs the recurrence one token at a time on a fixed-size
state, as mamba_ssm's inference does.

Notation (as in the paper and mamba_ssm): b batch, l length, h heads, p headdim, g groups, n d_state,
c chunks, s/t positions inside a chunk.
"""

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat
from torch.utils.checkpoint import checkpoint


def causal_bias(n, device):
    """(n, n) fp32, 0 on and below the diagonal, -inf above: added to log-decays before exp(), it keeps step i
    from seeing any step j > i (an add, whose backward pass costs nothing). Built once per size and device; under
    torch.compile, as a constant of the graph (dynamo traces through caches, with a warning)."""
    return (cached_causal_bias.__wrapped__ if torch.compiler.is_compiling() else cached_causal_bias)(n, device)


@functools.lru_cache
def cached_causal_bias(n, device):
    return torch.full((n, n), -torch.inf, dtype=torch.float32, device=device).triu(1)


def segsum(x):
    """Stable segment sum: out[..., i, j] = x[..., j+1] + ... + x[..., i] for j <= i, -inf above.

    exp(segsum(a)) decays a state from step j to step i. Summing the masked terms (rather than subtracting
    two cumulative sums) avoids cancellation between large cumsums: used across chunks, where the sums run
    over the whole sequence (inside a chunk the cheaper difference is accurate enough).
    """
    # x : (..., T)
    T = x.size(-1)
    x = x[..., :, None].expand(*x.shape, T)  # x[..., i, j] = x_i
    x = torch.cumsum(x.tril(-1), dim=-2)  # the terms j < i only
    return x + causal_bias(T, x.device)


def decay_matrix(dA_cs):
    """L[..., t, s] = exp(dA_cs[..., t] - dA_cs[..., s]), the decay from step s to step t <= s of a chunk (the caller
    masks above the diagonal). Inside one chunk the difference of cumsums is accurate enough; as in the official
    kernels the exponent is capped at 0, which keeps the unused upper triangle finite. It is also floored at -80
    (exp(-80) ~ 2e-35, lost in the rounding of any sum it enters): a CPU's exp() is 25x slower on arguments whose
    result is denormal (below ~-87). Three passes over the (s x s) matrices, in place."""
    # dA_cs : (..., s)
    return torch.sub(dA_cs[..., :, None], dA_cs[..., None, :]).clamp_(-80.0, 0.0).exp_()


class ChunkDiagonal(torch.autograd.Function):
    """The SSD inside each chunk (the diagonal blocks): y[t] = sum_{s <= t} (C[t] . B[s]) L[t, s] xdt[s].

    The (t x s) matrices per head are the largest tensors of the layer. Autograd would keep three of them for the
    backward pass and run a dozen passes over them; this keeps only the inputs and C B^T (shared by the heads),
    recomputes the decays in the backward pass (as the official kernels do) and updates them in place.

    C, B: (b, g, c, t|s, n)  dA_cs: (b, g, r, c, s), cumsums of dt A inside each chunk  xdt: (b, g, r, c, s, p), fp32.
    Returns y (b, g, r, c, t, p)."""

    @staticmethod
    def forward(ctx, C, B, dA_cs, xdt):
        # the decays in matmul's order (b, g, r, c, s), a small copy: the decay matrices take dA_cs's layout, and a
        # matmul copies each operand whose batch dimensions are not in its order, forward and back. (xdt, which the
        # matmuls copy too, is not: a copy saved here would double what a long sequence keeps for the backward pass.)
        dA_cs = dA_cs.contiguous()
        with torch.autocast(xdt.device.type, enabled=False):  # fp32 matmuls under autocast too
            CB = (C @ B.transpose(-1, -2)).tril_()  # (b, g, c, t, s), causal: no head dimension, small
            ctx.save_for_backward(C, B, CB, dA_cs, xdt)
            return decay_matrix(dA_cs).mul_(CB[:, :, None]) @ xdt  # (b, g, r, c, t, s) @ (b, g, r, c, s, p)

    @staticmethod
    def backward(ctx, dy):
        # dy : (b, g, r, c, t, p)
        with torch.autocast(dy.device.type, enabled=False):
            return ChunkDiagonal.gradients(*ctx.saved_tensors, dy.float().contiguous())  # (one copy for both matmuls)

    @staticmethod
    def gradients(C, B, CB, dA_cs, xdt, dy):
        CB = CB[:, :, None]  # (b, g, 1, c, t, s)
        L = decay_matrix(dA_cs)
        dxdt = (L * CB).transpose(-1, -2) @ dy
        dscores = (dy @ xdt.transpose(-1, -2)).mul_(L)  # d(CB) summed over the group's heads
        dCB = dscores.sum(2).tril_()  # (b, g, c, t, s)
        dlog = dscores.mul_(CB)  # d(dA_cs[t] - dA_cs[s]) = dscores o CB o L, zero above the diagonal
        ddA_cs = dlog.sum(-1) - dlog.sum(-2)
        return dCB @ B, dCB.transpose(-1, -2) @ C, ddA_cs, dxdt


def off_diagonal(xdt, Bc, Cc, dA_cs, initial_states=None):
    """The SSD's off-diagonal blocks: what each chunk's output owes to the state carried in from the chunks before
    it (and from initial_states). xdt: (b, g, c, s, r, p)  Bc, Cc: (b, g, c, s, n)  dA_cs: (b, g, r, c, s)
    initial_states: (b, g, r, 1, p, n) or None (zeros). Returns y_off (b, g, r, c, t, p), final_states (b, g, r, p, n)."""
    p = xdt.shape[-1]
    # 2. Each chunk's final state from its own inputs (right factor of the off-diagonal blocks)
    decay_states = rearrange(torch.exp(dA_cs[..., -1:] - dA_cs), "b g r c s -> b g c s r 1")
    states = rearrange(xdt * decay_states, "b g c s r p -> b g c (r p) s") @ Bc  # (b, g, c, rp, n)

    # 3. Inter-chunk recurrence: the true state at every chunk boundary (middle factor)
    states = rearrange(states, "b g c (r p) n -> b g r c p n", p=p)
    init = torch.zeros_like(states[:, :, :, :1]) if initial_states is None else initial_states
    states = torch.cat([init, states], dim=3)  # (b, g, r, c+1, p, n)
    decay_chunk = torch.exp(segsum(F.pad(dA_cs[..., -1], (1, 0))))  # (b, g, r, c+1, c+1)
    states = torch.einsum("bgrzc,bgrcpn->bgrzpn", decay_chunk, states)
    states, final_states = states[:, :, :, :-1], states[:, :, :, -1]

    # 4. State -> output inside each chunk (left factor)
    y_off = Cc @ rearrange(states, "b g r c p n -> b g c n (r p)")  # (b, g, c, t, rp)
    return rearrange(y_off, "b g c t (r p) -> b g r c t p", p=p) * torch.exp(dA_cs)[..., None], final_states


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              *, dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False):
    """SSD with the calling convention of mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined.

    x: (b, l, h, p)  dt: (b, l, h)  A: (h,)  B, C: (b, l, g, n)  D: (h,) or (h, p)  z: (b, l, h, p)
    dt_bias: (h,)  initial_states: (b, h, p, n).  Returns y (b, l, h, p) [, final_states (b, h, p, n)].
    Any length l works; bf16/fp16 inputs are computed in fp32 and y is cast back to x.dtype.
    """
    b, l, h, p = x.shape
    g = B.shape[2]
    assert h % g == 0, f"nheads ({h}) must be divisible by ngroups ({g})"
    out_dtype = x.dtype
    x, B, C, A = x.float(), B.float(), C.float(), A.float()  # no-ops (no copy) on fp32 inputs

    dt = discretize_dt(dt, dt_bias, dt_softplus, dt_limit)

    # Balanced chunks: c = ceil(l / chunk_size) chunks of equal size q <= chunk_size, so at most c - 1
    # padded steps (chunk_size 64: 196 -> 4 chunks of 49, 784 -> 13 of 61). Padded steps have dt = 0:
    # no decay and no input, so neither the outputs nor the final state change. The chunk size never
    # changes the math, only the speed.
    c = math.ceil(l / chunk_size)
    q = math.ceil(l / c)
    pad = c * q - l

    def chunked(t, pattern, **sizes):  # (b, l, ...) -> padded to c * q steps, rearranged by pattern
        return rearrange(F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) if pad else t, pattern, s=q, **sizes)

    # Heads of a group share B and C: where only B or C meets x, the group's heads (r) and headdim (p)
    # fold into one matmul dimension; only the intra-chunk mixing needs each head's own decay matrix.
    xdt = chunked(x * dt[..., None], "b (c s) (g r) p -> b g c s r p", g=g)
    Bc, Cc = (chunked(t, "b (c s) g n -> b g c s n") for t in (B, C))
    # (summed in dt's own layout: its gradient then comes back in that layout, which a traced linear layer needs)
    dA_cs = rearrange(torch.cumsum(chunked(dt * A, "b (c s) h -> b c s h"), dim=2), "b c s (g r) -> b g r c s", g=g)

    # 1. Intra-chunk output (diagonal blocks): y = (C B^T o L) (x dt), L[t, s] = exp(dA_cs[t] - dA_cs[s]) for s <= t
    y = ChunkDiagonal.apply(Cc, Bc, dA_cs, rearrange(xdt, "b g c s r p -> b g r c s p"))  # (b, g, r, c, t, p)

    # 2.-4. The states carried across chunks (off-diagonal blocks): nothing to add when a single chunk starts
    # from zero and its final state is not asked for (49 tokens in one chunk of 64: the image model's case).
    # Recomputed in the backward pass rather than stored (as the official kernels do): they held a third of what
    # a 784-step sequence kept for the backward pass, and cost a few matmuls to redo.
    if c > 1 or initial_states is not None or return_final_states:
        if initial_states is not None:
            initial_states = rearrange(initial_states.float(), "b (g r) p n -> b g r 1 p n", g=g)
        y_off, final_states = checkpoint(off_diagonal, xdt, Bc, Cc, dA_cs, initial_states, use_reentrant=False)
        y = y + y_off

    y = skip_and_gate(rearrange(y, "b g r c t p -> b (c t) (g r) p")[:, :l], x, D, z, out_dtype)
    if return_final_states:
        return y, rearrange(final_states, "b g r p n -> b (g r) p n")
    return y


def non_causal_scan(x, dt, A, B, C, chunk_size=None, D=None, z=None, dt_bias=None, *, dt_softplus=False,
                    dt_limit=(0.0, float("inf"))):
    """VSSD's order-free SSD (Shu et al. 2024, "non-causal SSD"), with mamba_chunk_scan_combined's calling convention
    (chunk_size unused): the causal mask and the decays between tokens dropped, every token writes into one state,
    weighted by its dA = dt A, and every token reads that whole state:

        y_i = C_i^T (sum_j dA_j B_j x_j^T) + D x_i

    Linear attention with C as queries and B as keys (VSSD's "linear attention duality"): two matmuls, any token
    order gives the same outputs, reordered. Shapes as mamba_chunk_scan_combined's.
    """
    b, l, h, p = x.shape
    g = B.shape[2]
    out_dtype = x.dtype
    x, B, C = x.float(), B.float(), C.float()
    dA = discretize_dt(dt, dt_bias, dt_softplus, dt_limit) * A.float()  # (b, l, h)
    xdA = rearrange(x * dA[..., None], "b l (g r) p -> b l g (r p)", g=g)
    state = torch.einsum("blgn,blgq->bgnq", B, xdA)  # (b, g, n, r*p): the whole sequence's state
    y = rearrange(torch.einsum("blgn,bgnq->blgq", C, state), "b l g (r p) -> b l (g r) p", p=p)
    return skip_and_gate(y, x, D, z, out_dtype)


def skip_and_gate(y, x, D, z, out_dtype):
    """The SSD's output y (b, l, h, p) with its skip connection D x added and, where given, the silu(z) gate, cast
    back to the inputs' dtype: the end of both scans."""
    if D is not None:
        # x D first: the sum takes x's (b, l, h, p) layout, so the caller's (b, l, h*p) view copies nothing
        y = x * (D.float()[:, None] if D.dim() == 1 else D.float()) + y
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(out_dtype)


def non_causal_ssd_matrix(dt, A, B, C, *, dt_bias=None, dt_softplus=False, dt_limit=(0.0, float("inf"))):
    """non_causal_scan as one matrix per head, as ssd_matrix for the causal SSD: M[b, h, i, j] = C_i . B_j dA_j,
    no mask. Returns (b, h, l, l), fp32."""
    g = B.shape[2]
    dA = discretize_dt(dt, dt_bias, dt_softplus, dt_limit) * A.float()  # (b, l, h)
    CB = torch.einsum("bign,bjgn->bgij", C.float(), B.float())  # (b, g, l, l)
    return repeat(CB, "b g i j -> b (g r) i j", r=dA.shape[-1] // g) * rearrange(dA, "b l h -> b h 1 l")


def discretize_dt(dt, dt_bias=None, dt_softplus=False, dt_limit=(0.0, float("inf"))):
    """dt as the kernels compute it, in fp32: + dt_bias, softplus (threshold 20, as the kernels), clamped to dt_limit
    (after a softplus, whose output is >= 0, the default limits (0, inf) change nothing: that clamp is skipped)."""
    # dt : (..., h)
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    return dt if dt_softplus and tuple(dt_limit) == (0.0, float("inf")) else dt.clamp(dt_limit[0], dt_limit[1])


def ssd_matrix(dt, A, B, C, *, dt_bias=None, dt_softplus=False, dt_limit=(0.0, float("inf"))):
    """The SSD as one matrix per head (state space duality): the M with y[b, i, h] = sum_j M[b, h, i, j] x[b, j, h]
    (+ D x), y as mamba_chunk_scan_combined computes it from the same arguments (without z).

    dt: (b, l, h)  A: (h,)  B, C: (b, l, g, n), shared by the h/g heads of a group.  Returns M (b, h, l, l), fp32:
    M = L o (C B^T), L[i, j] = exp(dA_{j+1} + ... + dA_i) dt_j with dA = dt A, zero above the diagonal (causal).
    A masked attention matrix whose "softmax" is the decay mask L. Quadratic in l: for looking, not for computing.
    """
    g = B.shape[2]
    dt = discretize_dt(dt, dt_bias, dt_softplus, dt_limit)  # (b, l, h)
    # segsum, not a difference of cumsums: exact for decays over the whole sequence (exp(-inf) = 0 above it)
    L = torch.exp(segsum(rearrange(dt * A.float(), "b l h -> b h l"))) * rearrange(dt, "b l h -> b h 1 l")
    CB = torch.einsum("bign,bjgn->bgij", C.float(), B.float())  # (b, g, l, l)
    return L * repeat(CB, "b g i j -> b (g r) i j", r=dt.shape[-1] // g)


def rmsnorm_fn(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """Gated RMSNorm with the convention of mamba_ssm.ops.triton.layernorm_gated.rmsnorm_fn.

    norm_before_gate: norm(x) * silu(z), else norm(x * silu(z)). Normalised per group of group_size.
    """
    # x, z : (..., d)
    d = group_size or x.shape[-1]
    groups = lambda t: None if t is None else rearrange(t.float(), "... (g d) -> ... g d", d=d)  # noqa: E731
    out = GatedRMSNorm.apply(groups(x), groups(z), groups(weight), groups(bias), eps, norm_before_gate)
    return rearrange(out, "... g d -> ... (g d)").to(x.dtype)


class GatedRMSNorm(torch.autograd.Function):
    """rmsnorm_fn on (..., g, d) groups in fp32, keeping only x, z and the inverse norms for the backward pass, which
    recomputes silu(z) and the normalised x (as the official kernel does): autograd would keep four more tensors of
    x's size and make twice as many passes over them."""

    @staticmethod
    def forward(ctx, x, z, weight, bias, eps, norm_before_gate):
        # x, z : (..., g, d)  weight, bias : (g, d)
        gated = x if z is None or norm_before_gate else x * F.silu(z)
        rstd = torch.rsqrt(torch.linalg.vector_norm(gated, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps))
        out = torch.mul(gated, rstd).mul_(weight)
        if bias is not None:
            out += bias
        if z is not None and norm_before_gate:
            out *= F.silu(z)
        ctx.save_for_backward(x, z, weight, bias, rstd)
        ctx.norm_before_gate = norm_before_gate
        return out

    @staticmethod
    def backward(ctx, dout):
        x, z, weight, bias, rstd = ctx.saved_tensors
        gate = None if z is None else F.silu(z)
        gate_after = z is not None and ctx.norm_before_gate
        xhat = x * rstd if z is None or gate_after else (x * gate).mul_(rstd)
        dz = None
        if gate_after:  # out = (xhat w + bias) silu(z)
            normed = xhat * weight if bias is None else torch.addcmul(bias, xhat, weight)
            dz = torch.ops.aten.silu_backward(dout * normed, z)
            dout = dout * gate
        rows = tuple(range(dout.dim() - 2))
        dweight = (dout * xhat).sum(rows)
        dbias = None if bias is None else dout.sum(rows)
        dxhat = dout * weight
        # d(gated) = rstd (dxhat - xhat mean(dxhat xhat)): the derivative of x / rms(x)
        dgated = dxhat.addcmul_(xhat, torch.linalg.vecdot(dxhat, xhat, dim=-1)[..., None], value=-1 / x.shape[-1])
        dgated.mul_(rstd)
        if z is None or gate_after:
            return dgated, dz, dweight, dbias, None, None
        return dgated * gate, torch.ops.aten.silu_backward(dgated * x, z), dweight, dbias, None, None


class RMSNormGated(nn.Module):
    """Parameters as mamba_ssm's layernorm_gated.RMSNorm (weight; bias registered as None)."""

    def __init__(self, hidden_size, *, eps=1e-5, group_size=None, norm_before_gate=True):
        super().__init__()
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.register_parameter("bias", None)

    def forward(self, x, z=None):
        return rmsnorm_fn(x, self.weight, self.bias, z=z, eps=self.eps, group_size=self.group_size,
                          norm_before_gate=self.norm_before_gate)


def causal_conv1d_silu(x, weight, bias=None):
    """silu(depthwise causal conv1d) on x (b, l, d) with a conv1d's weight (d, 1, w) and bias (d,), returned as
    (b, l, d): mamba_ssm's causal_conv1d_fn(x.transpose(1, 2), ..., activation="silu"), transposed back.
    Computed as a (1 x w) conv2d on x's own memory layout (channels-last: no transposed copy either way), x padded
    with w - 1 zeros in front in that layout too (with the conv's own padding, its backward pass copied the
    gradient into that layout), the bias added apart (the conv's own bias gradient is the slowest part of its
    backward pass on a CPU): three times as fast as conv1d on (b, d, l), backward pass included. Recomputed in
    the backward pass from x, which the layer keeps anyway, rather than keeping the conv's output (as the official
    kernels do): a quarter of what a 784-step sequence kept for the backward pass, for 2 % more time."""
    return checkpoint(conv_silu, x, weight, bias, use_reentrant=False)


def conv_silu(x, weight, bias):
    # x : (b, l, d)  weight : (d, 1, w)  bias : (d,) or None
    d, w = x.shape[-1], weight.shape[-1]
    x = F.pad(x, (0, 0, w - 1, 0))  # (b, w - 1 + l, d): the causal zeros in front
    out = rearrange(F.conv2d(rearrange(x, "b l d -> b d 1 l"), weight[:, :, None], groups=d), "b d 1 l -> b l d")
    return F.silu(out if bias is None else out + bias)


class Mamba2(nn.Module):
    """in_proj -> depthwise causal conv + SiLU -> SSD -> gated RMSNorm -> out_proj (mamba_ssm's Mamba2)."""

    def __init__(self, d_model, d_state=128, d_conv=4, conv_init=None, expand=2, headdim=64, ngroups=1,
                 A_init_range=(1, 16), D_has_hdim=False, rmsnorm=True, norm_before_gate=False,
                 dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4, dt_limit=(0.0, float("inf")),
                 bias=False, conv_bias=True, chunk_size=256):
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        if self.d_inner % headdim:
            raise ValueError(f"d_model*expand = {self.d_inner} must be divisible by headdim = {headdim}")
        self.headdim, self.nheads = headdim, self.d_inner // headdim
        if self.nheads % ngroups:
            raise ValueError(f"nheads = {self.nheads} must be divisible by ngroups = {ngroups}")
        self.ngroups, self.D_has_hdim, self.rmsnorm = ngroups, D_has_hdim, rmsnorm
        self.norm_before_gate, self.dt_limit, self.chunk_size = norm_before_gate, tuple(dt_limit), chunk_size

        # in_proj output order: [z, x, B, C, dt]
        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.nheads, bias=bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim,
                                padding=d_conv - 1, bias=conv_bias)
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)

        # dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]
        dt = torch.exp(torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = torch.clamp(dt, min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        assert A_init_range[0] > 0 and A_init_range[1] >= A_init_range[0]
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(*A_init_range)))
        self.D = nn.Parameter(torch.ones(self.d_inner if D_has_hdim else self.nheads))
        for param in (self.dt_bias, self.A_log, self.D):
            param._no_weight_decay = True  # as mamba_ssm: no weight decay on the SSM's own parameters
        if rmsnorm:
            self.norm = RMSNormGated(self.d_inner, eps=1e-5, norm_before_gate=norm_before_gate,
                                     group_size=self.d_inner // ngroups)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def forward(self, u):
        return self.mix(u, scan=mamba_chunk_scan_combined, gated_norm=rmsnorm_fn)

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        """Zero states for step(), as mamba_ssm's: conv_state (B, conv_dim, d_conv), the last d_conv inputs of the
        conv (a transposed view, laid out in memory as mamba_ssm's), and ssm_state (B, h, p, n).
        Their size does not depend on max_seqlen (kept for the calling convention)."""
        device = self.out_proj.weight.device
        conv_state = torch.zeros(batch_size, self.d_conv, self.conv_dim, device=device,
                                 dtype=dtype or self.conv1d.weight.dtype).transpose(1, 2)
        ssm_state = torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device,
                                dtype=dtype or self.in_proj.weight.dtype)
        return conv_state, ssm_state

    def step(self, hidden_states, conv_state, ssm_state):
        """The recurrent form: one token in, one out, with mamba_ssm's Mamba2.step convention. The states (from
        allocate_inference_cache) are updated in place and returned; stepping through a sequence gives forward()'s
        outputs one at a time, in memory constant in the length. dt_limit and D_has_hdim act as in forward
        (mamba_ssm 2.3's step ignores the first and rejects the second)."""
        # hidden_states : (b, 1, d_model)  conv_state : (b, conv_dim, d_conv)  ssm_state : (b, h, p, n)
        z, xBC, dt = self.in_proj_parts(hidden_states[:, 0])
        # the causal conv at the newest position: slide the window of the last d_conv inputs, apply the kernel
        conv_state.copy_(torch.cat([conv_state[..., 1:], xBC[..., None]], dim=-1))
        xBC = F.silu(F.conv1d(conv_state.to(xBC.dtype), self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim))
        x, B, C = torch.split(xBC[..., 0], [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state],
                              dim=-1)
        x = rearrange(x, "b (h p) -> b h p", p=self.headdim).float()
        r = self.nheads // self.ngroups  # the heads of a group share B and C
        B, C = (repeat(t.float(), "b (g n) -> b (g r) n", g=self.ngroups, r=r) for t in (B, C))
        dt = discretize_dt(dt, self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit)  # (b, h)
        # h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,  y_t = h_t C_t + D x_t  (in fp32, as the scan)
        decay = torch.exp(dt * -torch.exp(self.A_log.float()))[..., None, None]  # (b, h, 1, 1)
        ssm_state.copy_(decay * ssm_state + torch.einsum("bh,bhp,bhn->bhpn", dt, x, B))
        y = torch.einsum("bhpn,bhn->bhp", ssm_state.float(), C)
        y = y + x * (rearrange(self.D, "(h p) -> h p", p=self.headdim) if self.D_has_hdim else self.D[:, None])
        y = rearrange(y, "b h p -> b (h p)").to(hidden_states.dtype)
        y = self.norm(y, z) if self.rmsnorm else y * F.silu(z)
        return self.out_proj(y)[:, None], conv_state, ssm_state

    def in_proj_parts(self, u):
        """in_proj(u) as its parts z, xBC, dt, each computed by its own rows of the weight: each comes out contiguous
        (the conv reads xBC without a copy), and the backward pass adds their gradients into u's instead of first
        concatenating them (a pass over the whole projection)."""
        sizes = [self.d_inner, self.conv_dim, self.nheads]
        biases = [None] * 3 if self.in_proj.bias is None else self.in_proj.bias.split(sizes)
        return [F.linear(u, w, b) for w, b in zip(self.in_proj.weight.split(sizes), biases)]

    def ssd_matrix(self, u, *, matrix=ssd_matrix):
        """This layer's SSD matrix M (b, h, l, l) on input u (see the function ssd_matrix; non_causal_ssd_matrix for
        non_causal_scan): x, dt, B and C come from u as in mix(), and the scan's output is
        y[:, i, h] = sum_j M[:, h, i, j] x[:, j, h] + D x[:, i, h]."""
        # u : (b, l, d_model)
        _, xBC, dt = self.in_proj_parts(u)
        xBC = causal_conv1d_silu(xBC, self.conv1d.weight, self.conv1d.bias)
        _, B, C = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        B, C = (rearrange(t, "b l (g n) -> b l g n", g=self.ngroups) for t in (B, C))
        return matrix(dt, -torch.exp(self.A_log.float()), B, C, dt_bias=self.dt_bias, dt_softplus=True,
                      dt_limit=self.dt_limit)

    def mix(self, u, *, scan, gated_norm):
        """The Mamba-2 forward with the SSD `scan` and `gated_norm` functions given (portable or official)."""
        # u : (b, l, d_model)
        z, xBC, dt = self.in_proj_parts(u)
        xBC = causal_conv1d_silu(xBC, self.conv1d.weight, self.conv1d.bias)
        x, B, C = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        y = scan(
            rearrange(x, "b l (h p) -> b l h p", p=self.headdim),
            dt,
            -torch.exp(self.A_log.float()),
            rearrange(B, "b l (g n) -> b l g n", g=self.ngroups),
            rearrange(C, "b l (g n) -> b l g n", g=self.ngroups),
            self.chunk_size,
            D=rearrange(self.D, "(h p) -> h p", p=self.headdim) if self.D_has_hdim else self.D,
            z=None if self.rmsnorm else rearrange(z, "b l (h p) -> b l h p", p=self.headdim),
            dt_bias=self.dt_bias,
            dt_softplus=True,
            dt_limit=self.dt_limit,
        )
        y = rearrange(y, "b l h p -> b l (h p)")
        if self.rmsnorm:
            y = gated_norm(y, self.norm.weight, None, z=z, eps=self.norm.eps, group_size=self.norm.group_size,
                           norm_before_gate=self.norm_before_gate)
        return self.out_proj(y)
