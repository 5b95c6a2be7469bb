"""Product quantization (faiss ``ProductQuantizer``) after the Hadamard rotation.

Encode: rotate (``e8vllm.hadamard.rotation(D, seed)``), divide by a per-vector fp16 scale
``s = RMS(y)`` (coordinates ~N(0, 1)), split into M = D / d_sub sub-vectors and store for each
the ``nbits``-bit index of its nearest k-means centroid. Decode: centroids * s, rotate back.
Bits per value: ``nbits / d_sub + 16 / D``. Configurations (``nbits / d_sub = b``, nbits <= 12
so that training stays within seconds on 2 cores; 16-bit codebooks would need 65536 centroids):

=========  =====  =====  ==============================================  =====
name       d_sub  nbits  codebook                                        bits
=========  =====  =====  ==============================================  =====
pq-2bit      4      8    256 centroids in R^4                            2 + 16/D
pq-3bit      4     12    4096 centroids in R^4                           3 + 16/D
pq-4bit      2      8    256 centroids in R^2                            4 + 16/D
pq-4bit-raw  2      8    same, no rotation, one codebook per sub-vector  4 + 16/D
=========  =====  =====  ==============================================  =====

Codebooks: after the rotation the M sub-vectors are (near) exchangeable, so the rotated codecs
train ONE codebook shared by all sub-vectors (faiss ``Train_shared``: M times cheaper, and M
times more training points per centroid). ``shared=False`` trains one per sub-vector (per-
subspace statistics, e.g. outlier channels of real KV data; for pq-3bit at D=128 that is 32
k-means runs of 4096 centroids: minutes). ``pq-4bit-raw`` (no rotation) defaults to per-sub-
vector codebooks, since the channels then have different distributions.

``needs_training``: ``fit(x_train)`` runs faiss k-means (``niter`` iterations, seed ``seed``,
at most ``max_points_per_centroid * ksub`` sampled training points per codebook) on vectors held
apart from the test data; ``encode``/``decode`` before ``fit`` raise ValueError.
Code layout: the faiss code bytes (``ceil(M*nbits/8)``) then the fp16 scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


def _faiss():  # imported on first use: decoding E8 caches (GPU workers) must not need faiss
    import faiss

    return faiss

from . import register
from .base import Codec, DecodeCost, check_codes, check_head_dim, check_vectors, fp16_bytes
from .uniform import cached_rotation, fp16_round, read_fp16, safe_div

__all__ = ["PQ", "CONFIGS"]

#: bits per value -> (d_sub, nbits)
CONFIGS: dict[int, tuple[int, int]] = {2: (4, 8), 3: (4, 12), 4: (2, 8)}


@dataclass(frozen=True)
class PQ(Codec):
    """Product quantizer. x: float [N, D] -> uint8 [N, M*nbits/8 + 2] -> float32 [N, D]."""

    head_dim: int
    bits: int = 4
    rotate: bool = True
    shared: bool | None = None  # None: shared codebook iff rotate
    seed: int = 0
    niter: int = 25
    max_points_per_centroid: int = 256
    _state: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    family = "pq"
    needs_training = True

    def __post_init__(self) -> None:
        check_head_dim(self.head_dim)
        if self.bits not in CONFIGS:
            raise ValueError(f"bits must be one of {sorted(CONFIGS)}, got {self.bits!r}")
        if self.rotate:
            cached_rotation(self.head_dim, self.seed)

    # ---- structure ------------------------------------------------------------------
    @property
    def d_sub(self) -> int:
        return CONFIGS[self.bits][0]

    @property
    def nbits(self) -> int:
        return CONFIGS[self.bits][1]

    @property
    def m(self) -> int:
        """Number of sub-vectors M = D / d_sub."""
        return self.head_dim // self.d_sub

    @property
    def is_shared(self) -> bool:
        return self.rotate if self.shared is None else bool(self.shared)

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"pq-{self.bits}bit" + ("" if self.rotate else "-raw")

    @property
    def codec_id(self) -> int:  # type: ignore[override]
        return 600 + self.bits + (0 if self.rotate else 10)

    @property
    def code_bytes(self) -> int:
        return (self.m * self.nbits + 7) // 8 + 2

    @property
    def decode_cost(self) -> DecodeCost:
        ksub = 1 << self.nbits
        tables = 1 if self.is_shared else self.m
        return DecodeCost(2.0 + 2.0 / self.d_sub, tables * ksub * self.d_sub * 4,
                          f"per {self.d_sub} values: unpack a {self.nbits}-bit index, read a float32 centroid; "
                          "multiply by the fp16 scale; the rotation is applied once to q / the output")

    @property
    def fitted(self) -> bool:
        return "pq" in self._state

    @property
    def centroids(self) -> torch.Tensor:
        """float32 [M, 2^nbits, d_sub] (identical rows when shared)."""
        pq = self._pq()
        c = _faiss().vector_to_array(pq.centroids).reshape(self.m, pq.ksub, self.d_sub)
        return torch.from_numpy(c.copy())

    # ---- training -------------------------------------------------------------------
    def _normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 [N, D] -> (rotated, RMS-normalized [N, D], fp16-exact scale [N])."""
        y = cached_rotation(self.head_dim, self.seed).forward(x) if self.rotate else x
        s = fp16_round(y.square().mean(dim=1).sqrt())
        return safe_div(y, s), s

    def fit(self, x: torch.Tensor) -> "PQ":
        """Train the codebooks on x: float [N, D] (held-out vectors). Deterministic given seed."""
        u, _ = self._normalize(check_vectors(x, self.head_dim))
        ksub = 1 << self.nbits
        n_points = u.shape[0] * (self.m if self.is_shared else 1)
        if n_points < ksub:
            raise ValueError(f"{self.name}: need at least {ksub} training sub-vectors, got {n_points} "
                             f"({u.shape[0]} vectors)")
        pq = _faiss().ProductQuantizer(self.head_dim, self.m, self.nbits)
        if self.is_shared:
            pq.train_type = _faiss().ProductQuantizer.Train_shared
        pq.cp.seed = int(self.seed) + 1234
        pq.cp.niter = int(self.niter)
        pq.cp.max_points_per_centroid = int(self.max_points_per_centroid)
        pq.verbose = False
        pq.train(np.ascontiguousarray(u.numpy(), dtype=np.float32))
        self._state["pq"] = pq
        return self

    def _pq(self) -> faiss.ProductQuantizer:
        if not self.fitted:
            raise ValueError(f"{self.name} needs training: call fit() first")
        return self._state["pq"]

    # ---- the maps -------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [N, D] -> uint8 [N, code_bytes]."""
        pq = self._pq()
        y = check_vectors(x, self.head_dim)
        if y.shape[0] == 0:
            return torch.empty((0, self.code_bytes), dtype=torch.uint8)
        u, s = self._normalize(y)
        codes = pq.compute_codes(np.ascontiguousarray(u.numpy(), dtype=np.float32))
        return torch.cat([torch.from_numpy(codes), fp16_bytes(s)], dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: uint8 [N, code_bytes] -> float32 [N, D]."""
        pq = self._pq()
        codes = check_codes(codes, self.code_bytes)
        if codes.shape[0] == 0:
            return torch.empty((0, self.head_dim), dtype=torch.float32)
        nb = self.code_bytes - 2
        u = torch.from_numpy(pq.decode(np.ascontiguousarray(codes[:, :nb].numpy())))
        y = u * read_fp16(codes[:, nb:], "scale")[:, None]
        return cached_rotation(self.head_dim, self.seed).inverse(y) if self.rotate else y


def _factory(bits: int, rotate: bool):
    def make(head_dim: int, **kw) -> PQ:
        return PQ(head_dim=head_dim, bits=bits, rotate=rotate, **kw)
    return make


for _b, (_ds, _nb) in CONFIGS.items():
    register(f"pq-{_b}bit", 600 + _b, _factory(_b, True), family="pq", nominal_bits=float(_b),
             summary=f"faiss PQ after Hadamard rotation + fp16 RMS scale: {_nb}-bit codes per {_ds} values, shared codebook")
register("pq-4bit-raw", 614, _factory(4, False), family="pq", nominal_bits=4.0,
         summary="faiss PQ without rotation, fp16 RMS scale: 8-bit codes per 2 values, one codebook per sub-vector")
del _b, _ds, _nb
