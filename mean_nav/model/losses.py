"""MEAN's training objective: L = w_infonce * InfoNCE + w_ce * CE + w_cda * CDA.

- InfoNCE (PEE/global): symmetric contrastive loss on the L2-normalised `gap` of B
  matching (satellite, drone) pairs: logits = exp(s) * f_sat @ f_drone.T; the mean of
  CE(logits, arange(B)) and CE(logits.T, arange(B)) with label smoothing; `s` is
  learnable, initialised to ln(1/0.07).
- CE: plain cross-entropy of each DEC head's logits against the location label,
  averaged over the three heads, summed over the two views.
- CDA (CEA): on `pfeat_align` flattened per sample, (1 - mean_b cos(sat_b, drone_b))
  + beta * D. `cda_mse: reference` (default) reproduces the reference code, where D is
  numerically the cosine term again (so CDA = (1 + beta)(1 - mean cos));
  `cda_mse: true` makes D the paper's mean squared error between the L2-normalised
  flattened features (F.mse_loss, averaged over batch and elements).
- Optional (CAMP same-view negatives, `camp_same_view: true`): the InfoNCE term becomes
  InfoNCE(D,S) + w * InfoNCE(D,D') + (1/w) * InfoNCE(S,S') with w = exp(log_w) learnable
  (init w = 1), given a second augmented view of each drone and satellite image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MeanNavError


@dataclass
class LossConfig:
    """Loss weights and options. Defaults: University-1652 (SUES-200 uses w_cda 0.75)."""

    w_infonce: float = 1.0
    w_ce: float = 0.1
    w_cda: float = 1.3
    # "reference": D term equals the cosine term (reference code); "true": MSE of L2-normalised features
    cda_mse: Literal["reference", "true"] = "reference"
    cda_beta: float = 1.0
    label_smoothing: float = 0.1
    logit_scale_init: float = math.log(1 / 0.07)
    camp_same_view: bool = False


def symmetric_infonce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor,
                      label_smoothing: float = 0.1) -> torch.Tensor:
    """Symmetric InfoNCE between row-aligned batches `a`, `b` ([B,D]; L2-normalised here).
    Row i of `a` matches row i of `b`; every other row in the batch is a negative."""
    a = F.normalize(a, dim=-1)
    b = F.normalize(b, dim=-1)
    logits = logit_scale.exp() * a @ b.t()
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target, label_smoothing=label_smoothing)
                  + F.cross_entropy(logits.t(), target, label_smoothing=label_smoothing))


def heads_cross_entropy(logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Mean over the heads of plain cross-entropy against the location labels."""
    return torch.stack([F.cross_entropy(lg, labels) for lg in logits]).mean()


def cda_loss(sat: torch.Tensor, drone: torch.Tensor, mode: str = "reference", beta: float = 1.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Consistency (CDA) loss on aligned part features [B, ...]; returns (total, cos_term, d_term)."""
    sat_flat = sat.flatten(1)
    drone_flat = drone.flatten(1)
    cos_term = 1.0 - F.cosine_similarity(sat_flat, drone_flat, dim=1).mean()
    if mode == "reference":
        d_term = cos_term
    elif mode == "true":
        d_term = F.mse_loss(F.normalize(sat_flat, dim=1), F.normalize(drone_flat, dim=1))
    else:
        raise MeanNavError(f"loss.cda_mse: {mode!r} is not one of 'reference', 'true'")
    return cos_term + beta * d_term, cos_term, d_term


class MEANLoss(nn.Module):
    """The weighted MEAN objective; holds the learnable logit scale (and CAMP's log w),
    so put its parameters in the optimizer too."""

    def __init__(self, cfg: LossConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or LossConfig()
        if cfg.cda_mse not in ("reference", "true"):
            raise MeanNavError(f"loss.cda_mse: {cfg.cda_mse!r} is not one of 'reference', 'true'")
        if not 0.0 <= cfg.label_smoothing < 1.0:
            raise MeanNavError(f"loss.label_smoothing: must be in [0, 1), got {cfg.label_smoothing}")
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        # CAMP: one learnable log w gives weights w and 1/w (their product stays 1)
        self.camp_log_w = nn.Parameter(torch.zeros(())) if cfg.camp_same_view else None

    def forward(self, out_sat: dict, out_drone: dict, labels: torch.Tensor,
                out_drone2: dict | None = None, out_sat2: dict | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        """`out_*` are MEAN.forward outputs for row-aligned satellite/drone batches of the
        same locations (`labels` [B]). Returns (total loss, parts for logging)."""
        cfg = self.cfg
        infonce = symmetric_infonce(out_drone["gap"], out_sat["gap"], self.logit_scale, cfg.label_smoothing)
        parts: dict[str, float] = {}
        if cfg.camp_same_view:
            if out_drone2 is None or out_sat2 is None:
                raise MeanNavError("loss.camp_same_view: needs a second view of each drone and satellite image "
                                   "(out_drone2, out_sat2); enable two views in the data config or turn it off")
            w = self.camp_log_w.exp()
            drone_drone = symmetric_infonce(out_drone["gap"], out_drone2["gap"], self.logit_scale,
                                            cfg.label_smoothing)
            sat_sat = symmetric_infonce(out_sat["gap"], out_sat2["gap"], self.logit_scale, cfg.label_smoothing)
            parts.update(infonce_cross=infonce.item(), infonce_dd=drone_drone.item(),
                         infonce_ss=sat_sat.item(), camp_w=w.item())
            infonce = infonce + w * drone_drone + sat_sat / w
        ce = heads_cross_entropy(out_sat["logits"], labels) + heads_cross_entropy(out_drone["logits"], labels)
        cda, cos_term, d_term = cda_loss(out_sat["pfeat_align"], out_drone["pfeat_align"], cfg.cda_mse,
                                         cfg.cda_beta)
        total = cfg.w_infonce * infonce + cfg.w_ce * ce + cfg.w_cda * cda
        parts.update(loss=total.item(), infonce=infonce.item(), ce=ce.item(), cda=cda.item(),
                     cda_cos=cos_term.item(), cda_d=d_term.item(), logit_scale=self.logit_scale.exp().item())
        return total, parts
