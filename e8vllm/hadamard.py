r"""Randomized (block) Hadamard rotation of head vectors.

The rotation
------------
For a head dimension D, let b be the largest power of two dividing D (the *block*)
and m = D / b the number of blocks. With H_b the Sylvester Hadamard matrix
(H_1 = [1], H_2k = [[H_k, H_k], [H_k, -H_k]], so entries are ±1 and
H_b H_b^T = b I) and s in {±1}^D a vector of random signs,

    R = blockdiag(H_b/√b, ..., H_b/√b) · diag(s)          (D × D, m blocks)

R is orthonormal (R R^T = I): each block H_b/√b is orthonormal and diag(s) is a
signed permutation. So rotating keys and queries alike leaves every attention score
unchanged (⟨Rq, Rk⟩ = ⟨q, k⟩), and values can be rotated back exactly (x = R^T y).

Why it helps quantization
-------------------------
KV vectors have a few "outlier" channels with much larger magnitude than the rest.
After the rotation, every output coordinate of a block is y_i = (1/√b) Σ_j ±s_j x_j,
a sum of b terms with random signs: by a central-limit argument the coordinates are
close to i.i.d. Gaussian with variance ||x_block||²/b, whatever the input's shape.
An outlier's energy is spread evenly over its b-coordinate block (each coordinate
gets exactly 1/b of it), so the max/RMS ratio drops and a lattice quantizer scaled
to the vector's norm wastes far fewer levels on rare extremes.

Non-power-of-two sizes
----------------------
Hadamard matrices of Sylvester type exist only for powers of two, so D = 80, 96, 112
use m blocks of b = 16, 32, 16 (5, 3, 7 blocks). Energy is mixed inside each block
only (an outlier is spread over its own block, not all of D). Every D that is a
multiple of 8 (the E8 group size) is supported, so b >= 8; other sizes raise
ValueError.

Fast path
---------
``forward``/``inverse`` use an in-PyTorch fast Walsh-Hadamard transform (log2 b
butterfly stages, each one reshape + add/sub), costing O(D log b) per vector instead
of the O(D²) of a matmul; ``matrix()`` builds R from ``scipy.linalg.hadamard`` and is
the reference the tests compare against. Inputs of any float dtype are accepted and
the result is float32. Works on CPU and CUDA (the sign vector is cached per device).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

__all__ = ["SUPPORTED_HEAD_DIMS", "HadamardRotation", "rotation", "block_size", "fwht"]

#: Head dimensions the project targets (all are multiples of 8 and work).
SUPPORTED_HEAD_DIMS: tuple[int, ...] = (64, 80, 96, 112, 128, 256)


def block_size(head_dim: int) -> int:
    """Largest power of two dividing ``head_dim`` (e.g. 80 -> 16, 96 -> 32, 128 -> 128).

    Raises:
        ValueError: if ``head_dim`` is not a positive int that is a multiple of 8.
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, (int, np.integer)):
        raise ValueError(f"head_dim must be an int, got {type(head_dim).__name__}")
    head_dim = int(head_dim)
    if head_dim <= 0 or head_dim % 8 != 0:
        raise ValueError(f"head_dim must be a positive multiple of 8, got {head_dim}")
    return head_dim & -head_dim


def fwht(x: Tensor, block: int) -> Tensor:
    """Unnormalized fast Walsh-Hadamard transform of each ``block``-sized chunk.

    Computes ``x_chunk @ H_b`` (H_b Sylvester-ordered, symmetric) for every consecutive
    chunk of ``block`` entries of the last dimension.

    Args:
        x: (..., D) float tensor, D a multiple of ``block``.
        block: power of two.
    Returns:
        (..., D) tensor, same dtype.
    """
    d = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < block:
        # (..., D) -> (..., D/(2h), 2, h): pairs (a, b) at distance h inside groups of 2h.
        y = x.reshape(*lead, d // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, d)
        h *= 2
    return x


@dataclass(frozen=True)
class HadamardRotation:
    """R = blockdiag(H_b/√b, ...) · diag(s) for one head dimension and seed.

    Attributes:
        head_dim: D, a positive multiple of 8.
        seed: seed of ``torch.Generator`` drawing the signs s in {±1}^D.
    """

    head_dim: int
    seed: int = 0
    _signs_by_device: dict[str, Tensor] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        block_size(self.head_dim)  # validates head_dim
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"seed must be an int, got {type(self.seed).__name__}")

    # ---- structure --------------------------------------------------------------
    @property
    def block(self) -> int:
        """b, the largest power of two dividing head_dim (the Hadamard block size)."""
        return block_size(self.head_dim)

    @property
    def num_blocks(self) -> int:
        """m = head_dim / block."""
        return self.head_dim // self.block

    def signs(self, device: torch.device | str = "cpu") -> Tensor:
        """The sign vector s, shape [D], float32 entries ±1, on ``device`` (cached)."""
        key = str(torch.device(device))
        s = self._signs_by_device.get(key)
        if s is None:
            cpu = self._signs_by_device.get("cpu")
            if cpu is None:
                gen = torch.Generator().manual_seed(int(self.seed))
                bits = torch.randint(0, 2, (self.head_dim,), generator=gen, device="cpu")
                cpu = bits.to(torch.float32) * 2.0 - 1.0
                self._signs_by_device["cpu"] = cpu
            s = cpu.to(device)
            self._signs_by_device[key] = s
        return s

    # ---- maps -------------------------------------------------------------------
    def _check(self, x: Tensor, name: str) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if x.ndim == 0 or x.shape[-1] != self.head_dim:
            raise ValueError(
                f"{name} must have shape (..., {self.head_dim}), got {tuple(x.shape)}"
            )
        return x.to(torch.float32)

    def forward(self, x: Tensor) -> Tensor:
        """Rotate: y = x @ R^T = blockwise H_b (s ⊙ x) / √b.

        Args:
            x: (..., D) floating-point tensor.
        Returns:
            (..., D) float32 tensor on x's device.
        """
        x = self._check(x, "x")
        b = self.block
        return fwht(x * self.signs(x.device), b) * (1.0 / b**0.5)

    def inverse(self, y: Tensor) -> Tensor:
        """Rotate back: x = y @ R = s ⊙ (blockwise H_b y) / √b.

        Args:
            y: (..., D) floating-point tensor.
        Returns:
            (..., D) float32 tensor on y's device.
        """
        y = self._check(y, "y")
        b = self.block
        return fwht(y, b) * (self.signs(y.device) * (1.0 / b**0.5))

    __call__ = forward

    def matrix(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The reference matrix R, shape [D, D], on CPU, built with scipy.linalg.hadamard."""
        b = self.block
        hb = torch.from_numpy(scipy.linalg.hadamard(b).astype(np.float64)) / np.sqrt(b)
        blocks = torch.block_diag(*([hb] * self.num_blocks))  # [D, D]
        r = blocks * self.signs("cpu").to(torch.float64)[None, :]  # columns scaled by s
        return r.to(dtype)


@functools.lru_cache(maxsize=None)
def rotation(head_dim: int, seed: int = 0) -> HadamardRotation:
    """The (cached, shared) HadamardRotation for ``head_dim`` and ``seed``."""
    return HadamardRotation(head_dim, seed)
