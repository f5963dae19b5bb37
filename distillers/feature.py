"""Feature- and relation-based terms (SPEC sec. 2): the ``beta * L_feat`` of ``NAME`` (with CE alone),
``kd+NAME`` and ``pesf+NAME``.

Each term reads the models' feature dicts: ``pooled`` (penultimate feature ``[N, D]``), ``stages`` (stem
and stage outputs; RepDistiller's ``is_feat`` list without its pooled entry) and ``preact_stages``.
Formulas and default weights follow Tian et al. (2020, RepDistiller, ``distiller_zoo/``, ``crd/`` and
``scripts/run_cifar_distill.sh``); SPEC sec. 2 fixes pkt, rkd and crd. Where student and teacher have a
different number of stages, stage lists are paired from the first stage and the longer one is truncated
(RepDistiller's ``zip``). Projection heads live inside the term, so they train with the student at its lr.
Every loss runs without host synchronisation, so that the whole training step can be a CUDA graph.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from models.cifar import ResNet, WideResNet
from .base import CRD_NEGATIVES, DistillConfig
from .logit import FeatureTerm

Feats = dict


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def dry_features(model: nn.Module, size: int = 32) -> Feats:
    """The model's feature dict on a tiny input (eval mode), leaving every module's mode as it was."""
    modes = {m: m.training for m in model.modules()}
    param = next(model.parameters())
    model.eval()
    try:
        _, feats = model(torch.zeros(2, 3, size, size, device=param.device, dtype=param.dtype), features=True)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return feats


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64, for the tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@contextmanager
def _no_autocast(x: torch.Tensor) -> Iterator[None]:
    # Gram matrices, exponentials at temperature 0.07 and weights up to 30000 lose too much in bf16.
    with torch.autocast(x.device.type, enabled=False):
        yield


def _match_spatial(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two feature maps to the other's spatial size."""
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif t_h > s_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    return f_s, f_t


def _spatial_map(f: torch.Tensor, p: int = 2) -> torch.Tensor:
    """``normalize(mean_c f^p)``: the attention map of AT and the factor of FT, one row per sample."""
    return F.normalize(f.pow(p).mean(1).flatten(1))


def conv_regressor(s_shape: torch.Size, t_shape: torch.Size, relu: bool = True) -> nn.Sequential:
    """FitNet's regressor (RepDistiller ``ConvReg``): conv to the teacher's channels and size, BN, ReLU."""
    _, s_c, s_h, s_w = s_shape
    _, t_c, t_h, t_w = t_shape
    if s_h == 2 * t_h:
        conv = nn.Conv2d(s_c, t_c, 3, stride=2, padding=1)
    elif 2 * s_h == t_h:
        conv = nn.ConvTranspose2d(s_c, t_c, 4, stride=2, padding=1)
    elif s_h >= t_h:
        conv = nn.Conv2d(s_c, t_c, (1 + s_h - t_h, 1 + s_w - t_w))
    else:
        raise ValueError(f"no regressor from a {s_h}x{s_w} student map to a {t_h}x{t_w} teacher map")
    return nn.Sequential(conv, nn.BatchNorm2d(t_c), *([nn.ReLU()] if relu else []))


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks (rank order), identical on every rank; ``t`` itself when not distributed."""
    if not _is_distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class _Term(FeatureTerm):
    """A feature term built from the two networks: ``from_models(student, teacher, cfg, num_train)``."""

    @classmethod
    def from_models(cls, student: nn.Module, teacher: nn.Module, cfg: DistillConfig, num_train: int) -> "_Term":
        return cls()


# ----------------------------------------------------------------------------------------------
# Losses as functions of tensors (also what the tests check against independent formulas)
# ----------------------------------------------------------------------------------------------
def hint_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(_fp32(f_s), _fp32(f_t))


def attention_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    f_s, f_t = _match_spatial(_fp32(f_s), _fp32(f_t))
    return (_spatial_map(f_s) - _spatial_map(f_t)).pow(2).mean()


def similarity_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    n = f_s.shape[0]
    g_s = F.normalize(_fp32(f_s).flatten(1) @ _fp32(f_s).flatten(1).T)
    g_t = F.normalize(_fp32(f_t).flatten(1) @ _fp32(f_t).flatten(1).T)
    return (g_t - g_s).pow(2).sum() / (n * n)


def correlation_loss(e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
    delta = (_fp32(e_s) - _fp32(e_t)).abs()
    return (delta[:-1] * delta[1:]).sum(1).mean()


def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    def conditional(f: torch.Tensor) -> torch.Tensor:
        f = _fp32(f).flatten(1)
        f = f / (f.norm(dim=1, keepdim=True) + eps)
        sim = (f @ f.T + 1) / 2
        return sim / sim.sum(1, keepdim=True)

    p_s, p_t = conditional(f_s), conditional(f_t)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def _pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.T).clamp_min(eps).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def _normalised_distances(e: torch.Tensor) -> torch.Tensor:
    d = _pairwise_distances(e)
    n = len(e)
    # Mean over the off-diagonal pairs; the diagonal is exactly zero (no boolean indexing: no host sync).
    return d / (d.sum() / (n * (n - 1)))


def _angles(e: torch.Tensor) -> torch.Tensor:
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


def rkd_loss(f_s: torch.Tensor, f_t: torch.Tensor, w_dist: float = 25.0, w_angle: float = 50.0) -> torch.Tensor:
    s, t = _fp32(f_s).flatten(1), _fp32(f_t).flatten(1)
    with torch.no_grad():
        t_dist, t_angle = _normalised_distances(t), _angles(t)
    return (w_dist * F.smooth_l1_loss(_normalised_distances(s), t_dist)
            + w_angle * F.smooth_l1_loss(_angles(s), t_angle))


def factor_loss(factor_s: torch.Tensor, factor_t: torch.Tensor) -> torch.Tensor:
    f_s, f_t = _match_spatial(_fp32(factor_s), _fp32(factor_t))
    return (_spatial_map(f_s) - _spatial_map(f_t)).abs().mean()


def vid_nll(pred_mean: torch.Tensor, target: torch.Tensor, log_scale: torch.Tensor,
            eps: float = 1e-5) -> torch.Tensor:
    var = (F.softplus(_fp32(log_scale)) + eps).view(1, -1, 1, 1)
    return (0.5 * ((_fp32(pred_mean) - _fp32(target)).pow(2) / var + var.log())).mean()


def ab_loss(g_s: list[torch.Tensor], g_t: list[torch.Tensor], margin: float = 1.0) -> torch.Tensor:
    n, total = len(g_s), 0.0
    for i, (s, t) in enumerate(zip(g_s, g_t)):
        s, t = _fp32(s), _fp32(t)
        wrong_off = (s > -margin) & (t <= 0)
        wrong_on = (s <= margin) & (t > 0)
        per = ((s + margin).pow(2) * wrong_off + (s - margin).pow(2) * wrong_on).sum()
        total = total + 2.0 ** (i - n + 1) * per
    # RepDistiller's scaling: per sample, and x 3/1000.
    return total / g_s[0].shape[0] * 3 / 1000


def fsp_matrices(g: list[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for bottom, top in zip(g[:-1], g[1:]):
        bottom, top = _match_spatial(_fp32(bottom), _fp32(top))
        out.append(torch.einsum("nihw,njhw->nij", bottom, top) / (bottom.shape[2] * bottom.shape[3]))
    return out


def fsp_loss(g_s: list[torch.Tensor], g_t: list[torch.Tensor]) -> torch.Tensor:
    return sum((s - t).pow(2).mean() for s, t in zip(fsp_matrices(g_s), fsp_matrices(g_t)))


def nce_loss(scores: torch.Tensor, num_data: int, eps: float = 1e-7) -> torch.Tensor:
    """CRD's NCE loss (Tian et al. eq. 18) on ``[B, 1 + K]`` normalised scores, column 0 the positive."""
    m = scores.shape[1] - 1
    noise = m / num_data
    log_pos = torch.log(scores[:, 0] / (scores[:, 0] + noise + eps))
    log_neg = torch.log(noise / (scores[:, 1:] + noise + eps))
    return -(log_pos.sum() + log_neg.sum()) / scores.shape[0]


# ----------------------------------------------------------------------------------------------
# Terms without an initialisation stage
# ----------------------------------------------------------------------------------------------
class PKT(_Term):
    """PKT (Passalis & Tefas, ECCV 2018): ``mean_ij q_ij log(q_ij / p_ij)`` with ``p``, ``q`` the
    row-normalised cosine kernels ``(1 + cos(f_i, f_j)) / 2`` of student and teacher pooled features."""

    default_weight = 30000.0

    def forward(self, s_feats, t_feats, y, index):
        with _no_autocast(s_feats["pooled"]):
            return pkt_loss(s_feats["pooled"], t_feats["pooled"])


class RKD(_Term):
    """RKD (Park et al., CVPR 2019): ``25 * huber(psi_D(s), psi_D(t)) + 50 * huber(psi_A(s), psi_A(t))``,
    pairwise distances normalised by their mean and triplet angles of the pooled features."""

    default_weight = 1.0

    def __init__(self, w_dist: float = 25.0, w_angle: float = 50.0) -> None:
        super().__init__()
        self.w_dist, self.w_angle = w_dist, w_angle

    def forward(self, s_feats, t_feats, y, index):
        with _no_autocast(s_feats["pooled"]):
            return rkd_loss(s_feats["pooled"], t_feats["pooled"], self.w_dist, self.w_angle)


class Attention(_Term):
    """AT (Zagoruyko & Komodakis, ICLR 2017): ``sum_l mean (a_s - a_t)^2`` over stages 1.., with
    ``a = normalize(mean_c f^2)`` the spatial attention map."""

    default_weight = 1000.0

    def forward(self, s_feats, t_feats, y, index):
        return sum(attention_loss(s, t) for s, t in zip(s_feats["stages"][1:], t_feats["stages"][1:]))


class Similarity(_Term):
    """SP (Tung & Mori, ICCV 2019): ``||G_t - G_s||_F^2 / N^2`` with ``G = row_normalize(F F^T)`` the
    batch similarity of the last stage's output."""

    default_weight = 3000.0

    def forward(self, s_feats, t_feats, y, index):
        with _no_autocast(s_feats["pooled"]):
            return similarity_loss(s_feats["stages"][-1], t_feats["stages"][-1])


class Embed(nn.Module):
    """A linear projection of the pooled feature, optionally L2-normalised (RepDistiller ``Embed`` /
    ``LinearEmbed``)."""

    def __init__(self, dim_in: int, dim_out: int = 128, normalize: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x.flatten(1))
        return F.normalize(x, dim=1) if self.normalize else x


class Correlation(_Term):
    """CC (Peng et al., ICCV 2019), RepDistiller's form: ``mean_i sum_d |e_s - e_t|_i |e_s - e_t|_(i+1)``
    on 128-d linear embeddings (trained) of the pooled features of consecutive samples."""

    default_weight = 0.02

    def __init__(self, s_dim: int, t_dim: int, dim: int = 128) -> None:
        super().__init__()
        self.embed_s, self.embed_t = Embed(s_dim, dim, normalize=False), Embed(t_dim, dim, normalize=False)

    @classmethod
    def from_models(cls, student, teacher, cfg, num_train):
        return cls(student.feature_dim, teacher.feature_dim)

    def forward(self, s_feats, t_feats, y, index):
        with _no_autocast(s_feats["pooled"]):
            return correlation_loss(self.embed_s(_fp32(s_feats["pooled"])), self.embed_t(_fp32(t_feats["pooled"])))


class VIDHead(nn.Module):
    """Gaussian ``q(t | s)`` of VID: mean by three 1x1 convolutions, per-channel variance ``softplus(b)``."""

    def __init__(self, s_channels: int, t_channels: int, init_var: float = 5.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.regressor = nn.Sequential(nn.Conv2d(s_channels, t_channels, 1, bias=False), nn.ReLU(),
                                       nn.Conv2d(t_channels, t_channels, 1, bias=False), nn.ReLU(),
                                       nn.Conv2d(t_channels, t_channels, 1, bias=False))
        # softplus(log_scale) + eps = init_var at the start
        self.log_scale = nn.Parameter(torch.full((t_channels,), math.log(math.expm1(init_var - eps))))
        self.eps = eps

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        f_s, f_t = _match_spatial(f_s, f_t)
        return vid_nll(self.regressor(f_s), f_t, self.log_scale, self.eps)


class VID(_Term):
    """VID (Ahn et al., CVPR 2019): ``sum_l mean 0.5 ((mu_l(s) - t)^2 / sigma_l^2 + log sigma_l^2)``, the
    negative log-likelihood of each teacher stage under a Gaussian predicted from the student's stage."""

    default_weight = 1.0

    def __init__(self, s_channels: list[int], t_channels: list[int]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(VIDHead(s, t) for s, t in zip(s_channels, t_channels))

    @classmethod
    def from_models(cls, student, teacher, cfg, num_train):
        s, t = dry_features(student), dry_features(teacher)
        return cls([f.shape[1] for f in s["stages"][1:]], [f.shape[1] for f in t["stages"][1:]])

    def forward(self, s_feats, t_feats, y, index):
        return sum(h(s, t) for h, s, t in zip(self.heads, s_feats["stages"][1:], t_feats["stages"][1:]))


class CRD(_Term):
    """CRD (Tian et al., ICLR 2020): NCE (eq. 18) with ``h(v, m) = exp(v.m / T) / Z`` between each
    network's 128-d normalised embedding and the other network's memory bank, both directions.

    The bank holds one momentum-averaged embedding per training image (``num_train`` rows, buffers, so
    they are checkpointed). K negatives per anchor are drawn on the device, uniformly among the images of
    the other classes (``other_class``, RepDistiller's default ``mode="exact"``; needs the training labels,
    ``bind_train_labels``) or among all other images (``uniform``). The draw is made for the whole global
    batch from the global RNG (seeded alike on every rank, restored on resume) and each rank takes its
    slice, so the negatives do not depend on the number of processes. Under DDP the indices and
    embeddings of all ranks update the bank, which stays identical everywhere.
    """

    default_weight = 0.8

    def __init__(self, s_dim: int, t_dim: int, num_train: int, dim: int = 128, k: int = 16384,
                 temperature: float = 0.07, momentum: float = 0.5, negatives: str = "other_class") -> None:
        super().__init__()
        if num_train < 2:
            raise ValueError(f"CRD needs the size of the training set (num_train >= 2), got {num_train}")
        if negatives not in CRD_NEGATIVES:
            raise ValueError(f"crd_negatives must be one of {', '.join(CRD_NEGATIVES)}, got {negatives!r}")
        self.embed_s, self.embed_t = Embed(s_dim, dim), Embed(t_dim, dim)
        self.k, self.temperature, self.momentum, self.negatives = k, temperature, momentum, negatives
        bound = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("memory_s", torch.rand(num_train, dim) * 2 * bound - bound)
        self.register_buffer("memory_t", torch.rand(num_train, dim) * 2 * bound - bound)
        # Normalising constants Z of the two directions, estimated on the first batch (< 0: not yet).
        self.register_buffer("z", torch.full((2,), -1.0))
        # Bank rows sorted by class, and where each class's block starts in that order and how long it is.
        # Derived from the data set, so not checkpointed (old checkpoints load unchanged).
        for name in ("rows_by_class", "class_start", "class_size"):
            self.register_buffer(name, None, persistent=False)

    @classmethod
    def from_models(cls, student, teacher, cfg, num_train):
        return cls(student.feature_dim, teacher.feature_dim, num_train, negatives=cfg.crd_negatives)

    def bind_train_labels(self, labels: torch.Tensor) -> None:
        labels = labels.flatten().long().to(self.memory_s.device)
        if len(labels) != len(self.memory_s):
            raise ValueError(f"CRD got {len(labels)} training labels for a bank of {len(self.memory_s)} images")
        size = torch.bincount(labels)
        if int(size.max()) == len(labels):
            raise ValueError("CRD's other_class negatives need at least two classes in the training set")
        self.rows_by_class = torch.argsort(labels, stable=True)
        self.class_start, self.class_size = torch.cumsum(size, 0) - size, size

    def sample_indices(self, index: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """``[B, 1 + K]``: the anchor's own row, then K draws, uniform among the rows outside the anchor's
        block: its class (``other_class``, in class-sorted order) or the anchor alone (``uniform``)."""
        if self.negatives == "uniform":
            order, start, size = None, index, torch.ones_like(index)
        elif self.rows_by_class is None:
            raise RuntimeError("CRD's other_class negatives need the training labels (build_distiller(..., "
                               "train_labels=...)); or set crd_negatives=uniform")
        else:
            order, start, size = self.rows_by_class, self.class_start[y], self.class_size[y]
        rank, world = (dist.get_rank(), dist.get_world_size()) if _is_distributed() else (0, 1)
        b = len(index)
        # 62-bit draws reduced modulo the span: the bias, span / 2^62, is negligible for any data set.
        draws = torch.randint(0, 2 ** 62, (world * b, self.k), device=index.device)[rank * b:(rank + 1) * b]
        pos = draws % (len(self.memory_s) - size)[:, None]
        pos = pos + size[:, None] * (pos >= start[:, None])
        return torch.cat([index[:, None], pos if order is None else order[pos]], 1)

    def forward(self, s_feats, t_feats, y, index):
        with _no_autocast(s_feats["pooled"]):
            v_s, v_t = self.embed_s(_fp32(s_feats["pooled"])), self.embed_t(_fp32(t_feats["pooled"]))
            idx = self.sample_indices(index, y)
            # Student anchors score against the teacher bank and vice versa (RepDistiller's out_v1, out_v2).
            out_s = torch.exp(torch.bmm(self.memory_t[idx].to(v_s.dtype), v_s[:, :, None])[..., 0] / self.temperature)
            out_t = torch.exp(torch.bmm(self.memory_s[idx].to(v_t.dtype), v_t[:, :, None])[..., 0] / self.temperature)
            z = self._normalisers(out_s.detach(), out_t.detach())
            loss = nce_loss(out_s / z[0], len(self.memory_s)) + nce_loss(out_t / z[1], len(self.memory_s))
            self.update_memory(index, v_s.detach(), v_t.detach())
        return loss

    def _normalisers(self, out_s: torch.Tensor, out_t: torch.Tensor) -> torch.Tensor:
        estimate = torch.stack([out_s.mean(), out_t.mean()]).to(self.z.dtype) * len(self.memory_s)
        if _is_distributed():   # one Z for all ranks, so the ranks optimise the same objective
            dist.all_reduce(estimate)
            estimate /= dist.get_world_size()
        z = torch.where(self.z > 0, self.z, estimate)
        self.z.copy_(z)
        return z

    @torch.no_grad()
    def update_memory(self, index: torch.Tensor, v_s: torch.Tensor, v_t: torch.Tensor) -> None:
        """``m_i <- normalize(momentum * m_i + (1 - momentum) * v_i)`` for every index of the global batch."""
        index, v_s, v_t = _all_gather(index), _all_gather(v_s), _all_gather(v_t)
        for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
            mixed = memory[index] * self.momentum + v.to(memory.dtype) * (1 - self.momentum)
            memory.index_copy_(0, index, F.normalize(mixed, dim=1))


# ----------------------------------------------------------------------------------------------
# Terms with an initialisation stage (FitNet's hint stage, AB, FT's paraphraser, FSP)
# ----------------------------------------------------------------------------------------------
@dataclass
class InitStage:
    """What a method trains before the main run: ``modules`` on ``loss(s_feats or None, t_feats)``."""

    modules: list[nn.Module]
    loss: Callable[[Feats | None, Feats], torch.Tensor]
    uses_student: bool = True
    lr: float | None = None         # None: the student's lr


class StagedTerm(_Term):
    """A term with an initialisation stage of ``default_init_epochs`` epochs (RepDistiller ``--init_epochs``)."""

    default_init_epochs = 30

    def init_stage(self, student: nn.Module) -> InitStage:
        raise NotImplementedError


class FitNet(StagedTerm):
    """FitNet (Romero et al., ICLR 2015): ``mean (r(s_2) - t_2)^2``, a trained convolutional regressor
    ``r`` from the student's stage-2 output (RepDistiller's hint layer 2) to the teacher's.

    As in RepDistiller the hint trains jointly with KD (no stage by default); ``init_epochs > 0`` adds
    Romero's stage 1, which trains the student and the regressor on the hint loss alone.
    """

    default_weight = 100.0
    default_init_epochs = 0
    hint_layer = 2

    def __init__(self, s_shape: torch.Size, t_shape: torch.Size) -> None:
        super().__init__()
        self.regressor = conv_regressor(s_shape, t_shape)

    @classmethod
    def from_models(cls, student, teacher, cfg, num_train):
        s, t = dry_features(student), dry_features(teacher)
        return cls(s["stages"][cls.hint_layer].shape, t["stages"][cls.hint_layer].shape)

    def forward(self, s_feats, t_feats, y, index):
        return hint_loss(self.regressor(s_feats["stages"][self.hint_layer]), t_feats["stages"][self.hint_layer])

    def init_stage(self, student):
        return InitStage([student, self.regressor], lambda s, t: self(s, t, None, None))


class ActivationBoundaries(StagedTerm):
    """AB (Heo et al., AAAI 2019): in the initialisation stage, ``sum_l 2^(l-L+1) sum [(c(s)+1)^2 1(c(s) > -1,
    t <= 0) + (c(s)-1)^2 1(c(s) <= 1, t > 0)] * 3 / (1000 N)`` on pre-activation stages 1.., ``c`` a
    connector (conv + BN, discarded afterwards). As in RepDistiller the main stage adds nothing.
    """

    default_weight = 1.0
    main_stage = False

    def __init__(self, s_shapes: list[torch.Size], t_shapes: list[torch.Size]) -> None:
        super().__init__()
        self.s_shapes, self.t_shapes = s_shapes, t_shapes

    @classmethod
    def from_models(cls, student, teacher, cfg, num_train):
        s, t = dry_features(student), dry_features(teacher)
        pairs = list(zip(s["preact_stages"][1:], t["preact_stages"][1:]))
        return cls([a.shape for a, _ in pairs], [b.shape for _, b in pairs])

    def init_stage(self, student):
        # The connector only serves the stage; a fresh one (not part of the term's state) keeps the main
        # run free of parameters that would never get a gradient.
        device = next(student.parameters()).device
        connector = nn.ModuleList(nn.Identity() if s[1:3] == t[1:3] else conv_regressor(s, t, relu=False)
                                  for s, t in zip(self.s_shapes, self.t_shapes)).to(device)

        def loss(s_feats, t_feats):
            g_s = [c(f) for c, f in zip(connector, s_feats["preact_stages"][1:])]
            return ab_loss(g_s, t_feats["preact_stages"][1:len(g_s) + 1])

        return InitStage([student, connector], loss)


class Paraphraser(nn.Module):
    """FT's teacher-side autoencoder (no BN): three 3x3 convolutions down to ``k * C`` channels and back."""

    def __init__(self, channels: int, k: float = 0.5) -> None:
        super().__init__()
        mid = int(channels * k)
        act = lambda: nn.LeakyReLU(0.1)   # noqa: E731
        self.encoder = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), act(),
                                     nn.Conv2d(channels, mid, 3, padding=1), act(),
                                     nn.Conv2d(mid, mid, 3, padding=1), act())
        self.decoder = nn.Sequential(nn.ConvTranspose2d(mid, mid, 3, padding=1), act(),
                                     nn.ConvTranspose2d(mid, channels, 3, padding=1), act(),
                                     nn.ConvTranspose2d(channels, channels, 3, padding=1), act())


def translator(s_channels: int, t_channels: int, k: float = 0.5) -> nn.Sequential:
    """FT's student-side encoder to the paraphraser's factor space (with BN, as in RepDistiller)."""
    mid = int(t_channels * k)
    layers: list[nn.Module] = []
    for cin, cout in ((s_channels, s_channels), (s_channels, mid), (mid, mid)):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class FactorTransfer(StagedTerm):
    """FT (Kim et al., NeurIPS 2018): ``mean |phi(T(s)) - phi(P(t))|``, ``phi(f) = normalize(mean_c f^2)``,
    on the last stage; the paraphraser ``P`` is first trained to reconstruct the teacher's last stage
    (MSE, initialisation stage) and then frozen; the translator ``T`` trains with the student.
    """

    default_weight = 200.0

    def __init__(self, s_channels: int, t_channels: int, init_lr: float | None = None) -> None:
        super().__init__()
        self.translator = translator(s_channels, t_channels)
        self.paraphraser = Paraphraser(t_channels).requires_grad_(False)
        self.init_lr = init_lr

    @classmethod
    def from_models(cls, student, teacher, cfg, num_train):
        s, t = dry_features(student), dry_features(teacher)
        # RepDistiller trains the paraphraser at lr 0.01 when the student is a ResNet or WRN.
        init_lr = 0.01 if isinstance(student, (ResNet, WideResNet)) else None
        return cls(s["stages"][-1].shape[1], t["stages"][-1].shape[1], init_lr)

    def forward(self, s_feats, t_feats, y, index):
        with torch.no_grad():
            factor_t = self.paraphraser.encoder(t_feats["stages"][-1])
        return factor_loss(self.translator(s_feats["stages"][-1]), factor_t)

    def init_stage(self, student):
        def loss(s_feats, t_feats):
            f_t = t_feats["stages"][-1]
            return F.mse_loss(_fp32(self.paraphraser.decoder(self.paraphraser.encoder(f_t))), _fp32(f_t))

        return InitStage([self.paraphraser], loss, uses_student=False, lr=self.init_lr)


class FSP(StagedTerm):
    """FSP (Yim et al., CVPR 2017): in the initialisation stage, ``sum_l mean (G_l(s) - G_l(t))^2`` with
    ``G_l = F_l^T F_(l+1) / (h w)`` the flow matrix of consecutive stage outputs (stem included). As in
    RepDistiller the main stage adds nothing. Needs equal channel counts stage by stage.
    """

    default_weight = 50.0
    main_stage = False

    @classmethod
    def from_models(cls, student, teacher, cfg, num_train):
        s_c = [f.shape[1] for f in dry_features(student)["stages"]]
        t_c = [f.shape[1] for f in dry_features(teacher)["stages"]]
        if any(a != b for a, b in zip(s_c, t_c)):
            raise ValueError(f"FSP needs equal channels stage by stage; student {s_c}, teacher {t_c}")
        return cls()

    def init_stage(self, student):
        return InitStage([student], lambda s, t: fsp_loss(s["stages"], t["stages"]))


FACTORIES: dict[str, Callable[..., FeatureTerm]] = {
    "pkt": PKT.from_models, "rkd": RKD.from_models, "crd": CRD.from_models, "fitnet": FitNet.from_models,
    "at": Attention.from_models, "sp": Similarity.from_models, "cc": Correlation.from_models,
    "vid": VID.from_models, "ab": ActivationBoundaries.from_models, "ft": FactorTransfer.from_models,
    "fsp": FSP.from_models,
}
# Terms whose loss draws random numbers in every step (CRD's negatives).
RANDOM_STEP_TERMS = frozenset({"crd"})


# ----------------------------------------------------------------------------------------------
# The initialisation stage, run once before the main training (skipped on resume)
# ----------------------------------------------------------------------------------------------
def init_epochs_of(term: FeatureTerm | None, configured: int | None) -> int:
    """Epochs of ``term``'s initialisation stage: ``configured`` or the method's default; 0 without a stage."""
    if not isinstance(term, StagedTerm):
        return 0
    return term.default_init_epochs if configured is None else configured


@contextmanager
def _trainable(params: list[nn.Parameter]) -> Iterator[None]:
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)


def _average_gradients(params: list[nn.Parameter]) -> None:
    # The stage runs before DDP wraps anything: average by hand so every rank takes the same step.
    if _is_distributed():
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()


def run_init_stage(distiller: nn.Module, batches,
                   make_optimizer: Callable[[list[nn.Parameter], float], torch.optim.Optimizer],
                   amp_dtype: torch.dtype | None = None, log: Callable[[str], None] = print) -> int:
    """Train the feature term's initialisation modules for ``distiller.cfg.init_epochs`` epochs (None:
    the method's default) at constant lr (RepDistiller ``helper/pretrain.py``); teacher frozen.

    ``make_optimizer(params, lr)`` is the script's optimiser (SGD for the CNNs, AdamW for BERT).
    ``batches.epoch(e)`` yields ``(x, y, index)``. Returns the number of epochs run (0: no stage).
    """
    term = getattr(distiller, "feature_term", None)
    epochs = init_epochs_of(term, distiller.cfg.init_epochs)
    if epochs <= 0:
        return 0
    stage = term.init_stage(distiller.student)
    params = list({id(p): p for m in stage.modules for p in m.parameters()}.values())
    if _is_distributed():   # the stage's fresh modules start from rank 0's draw on every rank
        for p in params:
            dist.broadcast(p.data, 0)
    lr = distiller.cfg.lr if stage.lr is None else stage.lr
    optimizer = make_optimizer(params, lr)
    device = batches.device
    distiller.train()
    for m in stage.modules:
        m.train()
    with _trainable(params):
        for epoch in range(epochs):
            total, steps = torch.zeros((), device=device), 0
            for x, _, _ in batches.epoch(epoch):
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    with torch.no_grad():
                        t_feats = distiller.teacher(x, features=True)[1]
                    s_feats = distiller.student(x, features=True)[1] if stage.uses_student else None
                    loss = stage.loss(s_feats, t_feats)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                _average_gradients(params)
                optimizer.step()
                total += loss.detach()
                steps += 1
            mean = float(total) / max(steps, 1)
            log(f"init stage ({type(term).__name__}) epoch {epoch + 1}/{epochs}: loss {mean:.4f}")
            if not math.isfinite(mean):   # as in the main stage: stop rather than train on NaN for more epochs
                raise FloatingPointError(f"non-finite loss in the {type(term).__name__} initialisation stage, "
                                         f"epoch {epoch + 1}/{epochs}; no checkpoint was written (lower the stage's "
                                         f"lr or use a trained teacher)")
    return epochs
