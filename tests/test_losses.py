"""MEAN losses against values computed independently with numpy from the definitions."""
import math

import numpy as np
import pytest
import torch

from mean_nav.config import from_dict
from mean_nav.errors import MeanNavError
from mean_nav.model.losses import LossConfig, MEANLoss, cda_loss, heads_cross_entropy, symmetric_infonce

torch.set_num_threads(2)


def np_ce(logits: np.ndarray, target: np.ndarray, eps: float = 0.0) -> float:
    """Cross-entropy with label smoothing: (1-eps) * NLL(target) + eps * mean_j NLL(j)."""
    shifted = logits - logits.max(1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    nll = -logp[np.arange(len(target)), target]
    uniform = -logp.mean(1)
    return float(((1 - eps) * nll + eps * uniform).mean())


def np_infonce(a: np.ndarray, b: np.ndarray, scale: float, eps: float) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    logits = scale * a @ b.T
    t = np.arange(len(a))
    return 0.5 * (np_ce(logits, t, eps) + np_ce(logits.T, t, eps))


SAT = np.array([[1.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
DRONE = np.array([[1.0, 0.5, 1.0], [0.5, 1.0, -0.5]])


def test_symmetric_infonce_with_two_hand_made_pairs():
    # by hand: sat rows normalise to (.707,0,.707), (0,1,0); drone to (.667,.333,.667), (.408,.816,-.408)
    scale = 1 / 0.07
    got = symmetric_infonce(torch.tensor(SAT), torch.tensor(DRONE),
                            torch.tensor(math.log(scale), dtype=torch.float64), 0.1)
    assert got.item() == pytest.approx(np_infonce(SAT, DRONE, scale, 0.1), rel=1e-9)
    # at this scale pair 0 is clearly matched: cos(s0,d0) = 0.943 vs cos(s0,d1) = 0
    cos = np.array([[0.9428, 0.0], [0.3333, 0.8165]])
    assert np.allclose((SAT / np.linalg.norm(SAT, axis=1, keepdims=True))
                       @ (DRONE / np.linalg.norm(DRONE, axis=1, keepdims=True)).T, cos, atol=1e-4)


def test_infonce_without_smoothing_equals_log_softmax_by_hand_for_orthogonal_pairs():
    # identical orthonormal pairs, scale 1: each row's logits are [1, 0] -> CE = log(1 + e^-1)
    eye = torch.eye(2, dtype=torch.float64)
    got = symmetric_infonce(eye, eye, torch.tensor(0.0, dtype=torch.float64), label_smoothing=0.0)
    assert got.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-12)
    # with smoothing 0.1 over 2 classes: 0.95 * log(1+e^-1) + 0.05 * (1 + log(1+e^-1))
    got = symmetric_infonce(eye, eye, torch.tensor(0.0, dtype=torch.float64), label_smoothing=0.1)
    assert got.item() == pytest.approx(math.log(1 + math.exp(-1)) + 0.05, rel=1e-12)


def test_heads_cross_entropy_averages_over_heads():
    rng = np.random.default_rng(0)
    logits = [rng.normal(size=(3, 4)) for _ in range(3)]
    labels = np.array([0, 3, 1])
    got = heads_cross_entropy([torch.tensor(l) for l in logits], torch.tensor(labels))
    assert got.item() == pytest.approx(np.mean([np_ce(l, labels) for l in logits]), rel=1e-9)


def test_cda_reference_mode_doubles_the_cosine_term_and_true_mode_uses_mse():
    sat = np.array([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]])      # [B=2, 2, 2]
    drone = np.array([[[1.0, 0.0], [0.0, -1.0]], [[2.0, 2.0], [2.0, 2.0]]])
    # by hand: pair 0 flattened (1,0,0,1)·(1,0,0,-1) = 0 -> cos 0; pair 1 parallel -> cos 1
    cos_term = 1 - (0 + 1) / 2
    total, c, d = cda_loss(torch.tensor(sat), torch.tensor(drone), "reference", beta=1.0)
    assert c.item() == pytest.approx(cos_term) and total.item() == pytest.approx(2 * cos_term)
    # true MSE of L2-normalised rows: pair 0 differs by (0,0,0,2/sqrt2) -> sum sq 2; pair 1 by 0
    mse = (2.0 + 0.0) / 8
    total, c, d = cda_loss(torch.tensor(sat), torch.tensor(drone), "true", beta=0.5)
    assert d.item() == pytest.approx(mse)
    assert total.item() == pytest.approx(cos_term + 0.5 * mse)


def outputs(rng, b=3, classes=4, dim=5, positions=6, offset=0.0):
    return {
        "gap": torch.tensor(rng.normal(size=(b, dim)) + offset, requires_grad=True),
        "logits": [torch.tensor(rng.normal(size=(b, classes)), requires_grad=True) for _ in range(3)],
        "pfeat_align": torch.tensor(rng.normal(size=(b, 2, positions)), requires_grad=True),
    }


def test_total_loss_is_the_weighted_sum_of_the_parts_computed_by_hand():
    rng = np.random.default_rng(1)
    sat, drone = outputs(rng), outputs(rng)
    labels = np.array([2, 0, 3])
    loss = MEANLoss(LossConfig()).double()
    total, parts = loss(sat, drone, torch.tensor(labels))

    np_sat = {k: (v.detach().numpy() if torch.is_tensor(v) else [t.detach().numpy() for t in v])
              for k, v in sat.items()}
    np_drone = {k: (v.detach().numpy() if torch.is_tensor(v) else [t.detach().numpy() for t in v])
                for k, v in drone.items()}
    infonce = np_infonce(np_sat["gap"], np_drone["gap"], 1 / 0.07, 0.1)
    ce = (np.mean([np_ce(l, labels) for l in np_sat["logits"]])
          + np.mean([np_ce(l, labels) for l in np_drone["logits"]]))
    a, b = np_sat["pfeat_align"].reshape(3, -1), np_drone["pfeat_align"].reshape(3, -1)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    cda = 2 * (1 - cos.mean())
    expected = 1.0 * infonce + 0.1 * ce + 1.3 * cda
    # rel 1e-7: the logit scale parameter is float32 (ln(1/0.07) rounded)
    assert total.item() == pytest.approx(expected, rel=1e-7)
    assert parts["infonce"] == pytest.approx(infonce) and parts["ce"] == pytest.approx(ce)
    assert parts["cda"] == pytest.approx(cda) and parts["logit_scale"] == pytest.approx(1 / 0.07)
    total.backward()
    assert loss.logit_scale.grad is not None and loss.logit_scale.grad.abs() > 0
    assert sat["pfeat_align"].grad.abs().sum() > 0


def test_camp_same_view_adds_weighted_drone_drone_and_sat_sat_terms():
    rng = np.random.default_rng(2)
    sat, drone, sat2, drone2 = outputs(rng), outputs(rng), outputs(rng), outputs(rng)
    labels = torch.tensor([0, 1, 2])
    cfg = LossConfig(camp_same_view=True, w_ce=0.0, w_cda=0.0)
    loss = MEANLoss(cfg).double()
    with torch.no_grad():
        loss.camp_log_w.fill_(math.log(2.0))
    total, parts = loss(sat, drone, labels, out_drone2=drone2, out_sat2=sat2)
    g = lambda o: o["gap"].detach().numpy()
    expected = (np_infonce(g(sat), g(drone), 1 / 0.07, 0.1)
                + 2.0 * np_infonce(g(drone), g(drone2), 1 / 0.07, 0.1)
                + 0.5 * np_infonce(g(sat), g(sat2), 1 / 0.07, 0.1))
    assert total.item() == pytest.approx(expected, rel=1e-7)
    assert parts["camp_w"] == pytest.approx(2.0)
    total.backward()
    assert loss.camp_log_w.grad.abs() > 0
    with pytest.raises(MeanNavError, match="camp_same_view"):
        loss(sat, drone, labels)


def test_loss_config_from_yaml_mapping_rejects_unknown_cda_mode():
    cfg = from_dict(LossConfig, {"w_cda": 0.75, "cda_mse": "true"})
    assert cfg.w_cda == 0.75 and MEANLoss(cfg).cfg.cda_mse == "true"
    with pytest.raises(MeanNavError, match="cda_mse"):
        from_dict(LossConfig, {"cda_mse": "paper"})
