"""Random projections P from a d-dimensional subspace into a network's D parameters.

Intrinsic-dimension training (Li et al. 2018) sets theta = theta0 + P theta_d and trains only
theta_d. Every projection here is an `nn.Module` mapping theta_d of shape (d,) to a vector of
shape (D,). All random state lives in registered buffers, drawn from a local
`torch.Generator().manual_seed(seed)` on the CPU, so it moves with `.to()`, is saved in the
state_dict and is identical on every DDP rank built with the same seed. All projections are
linear with columns of about unit norm, so a step in theta_d moves theta by about as much.

- `DenseProjection`: N(0, 1) entries, each column normalised to unit length; 4*d*D bytes.
- `SparseProjection`: very sparse random projection (Li, Hastie, Church 2006), density
  1/sqrt(D_layer) per layer block, nonzeros scaled per block so every entry has variance 1/D
  as in dense (a bias block gets no larger share of a column than its size).
- `FastfoodProjection`: one global transform H G Pi H B over all D coordinates (Le, Sarlos,
  Smola 2013); O(D) memory, O(D log D) time, with a hand-written backward.

`build_projection(name, d, D, seed, layer_sizes)` picks one from `PROJECTIONS`.
"""
from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

# Torch warns once per process that CSR support is beta; mv with CSR is all this module uses.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


class _Projection(nn.Module):
    """Common interface: forward(theta_d) -> (D,), sizes `d`, `D`, and `memory_bytes()`."""

    def __init__(self, d: int, D: int):
        super().__init__()
        if d < 1 or D < 1:
            raise ValueError(f"projection sizes must be positive, got d={d}, D={D}")
        self.d, self.D = d, D

    def memory_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"d={self.d}, D={self.D}"


# ---------------------------------------------------------------------------------------------
# Dense


class DenseProjection(_Projection):
    """P with N(0, 1) entries, each of the d columns normalised to unit length over all D rows."""

    def __init__(self, d: int, D: int, seed: int):
        super().__init__(d, D)
        generator = torch.Generator().manual_seed(seed)
        matrix = torch.randn(D, d, generator=generator)
        self.register_buffer("matrix", matrix / matrix.norm(dim=0, keepdim=True))

    def forward(self, theta_d: torch.Tensor) -> torch.Tensor:
        return torch.mv(self.matrix.to(theta_d.dtype), theta_d)


# ---------------------------------------------------------------------------------------------
# Sparse


def _bernoulli_positions(n: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """Sorted indices of the successes among n Bernoulli(p) trials, in O(n p) time and memory.

    Gaps between successes are geometric, so they are drawn directly instead of n coin flips
    (d * D trials would be 150 M at d=750, D=199,210).
    """
    if p >= 1.0:
        return torch.arange(n)
    chunks, start = [], 0
    while start < n:
        expected = (n - start) * p
        count = int(expected + 6 * math.sqrt(expected) + 16)
        uniform = 1.0 - torch.rand(count, generator=generator, dtype=torch.float64)  # in (0, 1]
        gaps = torch.floor(torch.log(uniform) / math.log1p(-p)).long() + 1
        positions = start - 1 + torch.cumsum(gaps, 0)
        chunks.append(positions[positions < n])
        start = int(positions[-1]) + 1
    return torch.cat(chunks)


class _CsrMatvec(torch.autograd.Function):
    """y = P x with P given as CSR parts; backward uses the stored CSR parts of P^T."""

    @staticmethod
    def forward(ctx, x, crow, col, values, crow_t, col_t, values_t):
        ctx.save_for_backward(crow_t, col_t, values_t)
        ctx.shape = (crow.numel() - 1, x.numel())
        matrix = torch.sparse_csr_tensor(crow, col, values.to(x.dtype), ctx.shape, check_invariants=False)
        return torch.mv(matrix, x)

    @staticmethod
    def backward(ctx, grad):
        crow_t, col_t, values_t = ctx.saved_tensors
        matrix_t = torch.sparse_csr_tensor(crow_t, col_t, values_t.to(grad.dtype), ctx.shape[::-1],
                                           check_invariants=False)
        return (torch.mv(matrix_t, grad.contiguous()),) + (None,) * 6


class SparseProjection(_Projection):
    """Very sparse random projection: in the rows of each layer block of size D_l, each entry is
    nonzero with probability 1/sqrt(D_l), +-D_l^(1/4) / sqrt(D) with equal odds (Li et al.'s
    sqrt(s) x +-1 with s = sqrt(D_l), over sqrt(D)): variance 1/D in every block, as in dense. So a
    column's expected squared norm is 1, and its part in a block is D_l / D of that. (One scale for
    all blocks would give a block a share of sqrt(D_l) / sum_l sqrt(D_l): in FC 784-200-200-10, 94x
    its size's share for the 10 output biases, 21x for a 200-entry bias, 0.75x for the 784 x 200
    weights.)

    `layer_sizes` partitions D into blocks (default: one block). A column left without any
    nonzero (likely only for tiny D) gets a +-1 at a random row, so every coordinate of theta_d
    reaches theta. P and P^T are both stored in CSR form (buffers `crow`, `col`, `values` and
    the same with `_t`): sparse matrix-vector products both ways, no scatter in backward.
    """

    def __init__(self, d: int, D: int, seed: int, layer_sizes: list[int] | tuple[int, ...] | None = None):
        super().__init__(d, D)
        layer_sizes = [D] if layer_sizes is None else [int(n) for n in layer_sizes]
        if sum(layer_sizes) != D or min(layer_sizes) < 1:
            raise ValueError(f"layer_sizes must be positive and sum to D={D}, got sum {sum(layer_sizes)}")
        generator = torch.Generator().manual_seed(seed)
        rows, cols, scales, offset = [], [], [], 0
        for size in layer_sizes:
            flat = _bernoulli_positions(size * d, 1.0 / math.sqrt(size), generator)  # row-major in the block
            rows.append(offset + flat // d)
            cols.append(flat % d)
            scales.append(torch.full((flat.numel(),), size ** 0.25 / math.sqrt(D)))
            offset += size
        rows, cols, scales = torch.cat(rows), torch.cat(cols), torch.cat(scales)
        empty = torch.ones(d, dtype=torch.bool)
        empty[cols] = False
        if empty.any():
            missing = empty.nonzero().flatten()
            rows = torch.cat([rows, torch.randint(D, (missing.numel(),), generator=generator)])
            cols = torch.cat([cols, missing])
            scales = torch.cat([scales, torch.ones(missing.numel())])
        signs = torch.randint(2, (rows.numel(),), generator=generator) * 2 - 1
        coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), signs * scales, (D, d),
                                      dtype=torch.float32, check_invariants=True).coalesce()
        # int32 indices: half the memory traffic of int64 (MKL's sparse kernels use int32 too).
        for suffix, matrix in (("", coo), ("_t", coo.t().coalesce())):
            csr = matrix.to_sparse_csr()
            self.register_buffer("crow" + suffix, csr.crow_indices().int())
            self.register_buffer("col" + suffix, csr.col_indices().int())
            self.register_buffer("values" + suffix, csr.values())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The number of nonzeros depends on the seed: take the saved buffers' sizes, so a
        # checkpoint loads into a projection built with any seed.
        for name, buffer in self._buffers.items():
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != buffer.shape:
                self._buffers[name] = buffer.new_empty(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def to_dense(self) -> torch.Tensor:
        """The (D, d) matrix, for tests and inspection."""
        return torch.sparse_csr_tensor(self.crow, self.col, self.values, (self.D, self.d),
                                       check_invariants=False).to_dense()

    def forward(self, theta_d: torch.Tensor) -> torch.Tensor:
        return _CsrMatvec.apply(theta_d, self.crow, self.col, self.values,
                                self.crow_t, self.col_t, self.values_t)


# ---------------------------------------------------------------------------------------------
# Fast Walsh-Hadamard transform and Fastfood

FWHT_MAX_FACTOR_LOG2 = 4  # factors of at most 16: among the fastest on the 2-core CPU (see fwht)


@functools.lru_cache(maxsize=None)
def _hadamard(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Unnormalised Sylvester Hadamard matrix H_n, H[i, j] = (-1)^popcount(i & j)."""
    index = torch.arange(n, device=device)
    parity = torch.zeros(n, n, dtype=torch.long, device=device)
    bits = index[:, None] & index[None, :]
    while bits.any():
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).to(dtype)


def _factor_sizes(n: int, max_factor_log2: int) -> list[int]:
    """Split n = 2^k into as few power-of-2 factors of at most 2^max_factor_log2 as possible, as
    equal as possible (equal factors keep the matrix products balanced)."""
    k = n.bit_length() - 1
    if n != 1 << k:
        raise ValueError(f"fwht needs a power-of-2 length, got {n}")
    count = -(-k // max_factor_log2)
    return [1 << (k // count + (i < k % count)) for i in range(count)]


def fwht(x: torch.Tensor, max_factor_log2: int = FWHT_MAX_FACTOR_LOG2) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform H_n x over the last dimension (n a power of 2).

    Sylvester's H_n is the Kronecker product of smaller Hadamard matrices, one per group of
    index bits, so the transform is a product with a small Hadamard matrix along each digit of
    the index written in mixed radix. Each step multiplies the least significant digit and
    moves it to the front (one GEMM with a transposed operand, no copies); after all factors
    the digits are back in order. Fewer, bigger factors mean fewer passes over memory but more
    FLOPs (2 n * sum of factor sizes). On 2 CPU cores, 2^18 floats took about 0.8 ms with
    factors of at most 8, 16 or 32, 1.1 ms with 64x64 and 5 ms with a radix-2 loop.
    """
    shape, n = x.shape, x.shape[-1]
    batch = x.numel() // n
    x = x.reshape(batch, n)
    for size in reversed(_factor_sizes(n, max_factor_log2)):
        hadamard = _hadamard(size, x.dtype, x.device)
        if batch == 1:  # plain GEMM: faster than the batched product on CPU
            x = torch.mm(hadamard, x.view(-1, size).t())
        else:
            x = torch.matmul(hadamard, x.view(batch, -1, size).transpose(1, 2))
    return x.reshape(shape)


def _padded_size(d: int) -> int:
    """m = 2^ceil(log2 d): the length theta_d is padded to before the first Hadamard transform."""
    return 1 << (d - 1).bit_length()


class _FastfoodMap(torch.autograd.Function):
    """theta = scale * (H G Pi H B pad(theta_d))[:D] and its adjoint, without autograd graphs.

    theta_d fills only the first m = 2^ceil(log2 d) of the L entries, and H_L = H_{L/m} (x) H_m,
    so H_L of it is H_m of theta_d tiled L/m times: Pi of the tiling is a gather with perm % m.
    The adjoint u -> B H Pi^T G H u needs only the first d outputs of the second H, i.e. H_m
    of Pi^T G H u folded (summed) modulo m: a scatter-add with the same perm % m
    (scatter_add_ ran 2x faster than index_add_ here).
    """

    @staticmethod
    def forward(ctx, theta_d, B, perm_mod, G, scale, D):
        m = _padded_size(theta_d.numel())
        small = theta_d.new_zeros(m)
        small[: theta_d.numel()] = theta_d * B * scale
        v = fwht(small).index_select(0, perm_mod).mul_(G)
        ctx.save_for_backward(B, perm_mod, G, scale)
        return fwht(v)[:D]

    @staticmethod
    def backward(ctx, grad):
        B, perm_mod, G, scale = ctx.saved_tensors
        d, L = B.numel(), G.numel()
        u = fwht(F.pad(grad, (0, L - grad.numel()))).mul_(G)
        folded = grad.new_zeros(_padded_size(d)).scatter_add_(0, perm_mod, u)
        return (fwht(folded)[:d] * B * scale,) + (None,) * 5


class FastfoodProjection(_Projection):
    """theta = scale * (H G Pi H B pad_L(theta_d))[:D], one transform over all D coordinates.

    L = 2^ceil(log2 max(D, d)) >= d, so every coordinate of theta_d enters the transform (no
    per-tensor blocks that drop coordinates). Buffers: `B` (+-1, length d: the diagonal entries
    that meet theta_d; the rest multiply padding), `perm` (Pi v = v[perm], length L), `G`
    (N(0, 1), length L), `scale`. Each row of H G Pi H B has squared norm L * sum(G^2), so the D
    kept rows have mean squared column norm D * sum(G^2) over all L columns: scale =
    1 / sqrt(D * sum(G^2)) makes columns about unit norm.
    """

    def __init__(self, d: int, D: int, seed: int):
        super().__init__(d, D)
        L = 1 << (max(D, d) - 1).bit_length()
        generator = torch.Generator().manual_seed(seed)
        B = torch.randint(2, (d,), generator=generator).float() * 2 - 1
        perm = torch.randperm(L, generator=generator)
        G = torch.randn(L, generator=generator)
        self.L = L
        self.register_buffer("B", B)
        self.register_buffer("perm", perm)
        self.register_buffer("G", G)
        self.register_buffer("scale", 1.0 / torch.sqrt(D * G.pow(2).sum()))
        # Derived from perm (not saved): the gather/scatter index of _FastfoodMap.
        self.register_buffer("perm_mod", perm % _padded_size(d), persistent=False)
        self.register_load_state_dict_post_hook(FastfoodProjection._refresh_perm_mod)

    @staticmethod
    def _refresh_perm_mod(module: "FastfoodProjection", incompatible_keys) -> None:
        module.perm_mod = module.perm % _padded_size(module.d)

    def forward(self, theta_d: torch.Tensor) -> torch.Tensor:
        dtype = theta_d.dtype
        return _FastfoodMap.apply(theta_d, self.B.to(dtype), self.perm_mod, self.G.to(dtype),
                                  self.scale.to(dtype), self.D)


# ---------------------------------------------------------------------------------------------

PROJECTIONS = {"dense": DenseProjection, "sparse": SparseProjection, "fastfood": FastfoodProjection}


def build_projection(name: str, d: int, D: int, seed: int,
                     layer_sizes: list[int] | tuple[int, ...] | None = None) -> nn.Module:
    """The projection `name` from d to D dimensions. `layer_sizes` (a partition of D, e.g. the
    network's tensor sizes) sets the sparse projection's per-block density; dense and Fastfood
    treat D as one block and do not use it."""
    if name not in PROJECTIONS:
        raise ValueError(f"unknown projection {name!r}; choose from {', '.join(PROJECTIONS)}")
    if name == "sparse":
        return SparseProjection(d, D, seed, layer_sizes)
    return PROJECTIONS[name](d, D, seed)
