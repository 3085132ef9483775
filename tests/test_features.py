"""The local-features interface: every extractor gives the same Features, every matcher Matches."""
import numpy as np
import pytest

from mean_nav.errors import MeanNavError
from mean_nav.nav.features import Features, make_extractor, make_matcher
from mean_nav.nav.features.mutual_nn import MutualNNMatcher
from mean_nav.nav.features.ratio_test import RatioTestMatcher
from mean_nav.nav.refine import RefineConfig


def textured(seed=0, size=200):
    rng = np.random.default_rng(seed)
    import cv2

    noise = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    return cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)


@pytest.mark.parametrize("detector,dim,dtype", [("sift", 128, np.float32), ("orb", 32, np.uint8)])
def test_every_extractor_returns_points_descriptors_scores_and_size(detector, dim, dtype):
    extractor = make_extractor(RefineConfig(detector=detector, max_features=300))
    image = textured()
    feats = extractor.extract(image)
    assert 20 <= len(feats) <= 300
    assert feats.points.dtype == np.float32 and feats.points.shape == (len(feats), 2)
    assert feats.descriptors.shape == (len(feats), dim) and feats.descriptors.dtype == dtype
    assert feats.scores.shape == (len(feats),)
    assert feats.image_size == (200, 200)
    assert (feats.points >= 0).all() and (feats.points < 200).all()
    # grey input gives the same keypoints as RGB
    import cv2

    grey = extractor.extract(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))
    np.testing.assert_allclose(grey.points, feats.points)


@pytest.mark.parametrize("detector", ["sift", "orb"])
def test_no_features_outside_the_valid_mask(detector):
    extractor = make_extractor(RefineConfig(detector=detector))
    valid = np.zeros((200, 200), bool)
    valid[:, 100:] = True
    feats = extractor.extract(textured(), valid)
    assert len(feats) > 0
    assert feats.points[:, 0].min() > 100


def test_settings_name_what_changes_the_features_but_not_the_budget():
    a = make_extractor(RefineConfig(max_features=100)).settings()
    b = make_extractor(RefineConfig(max_features=900)).settings()
    c = make_extractor(RefineConfig(equalize=False)).settings()
    assert a == b and a != c and a["detector"] == "sift"


def _descriptors(n=50, dim=16, seed=1):
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def test_mutual_nn_recovers_a_permutation_and_drops_one_sided_pairs():
    d = _descriptors()
    perm = np.random.default_rng(2).permutation(len(d))
    query = Features(np.zeros((len(d), 2), np.float32), d)
    ref = Features(np.zeros((len(d), 2), np.float32), d[perm] + 0.01)
    m = MutualNNMatcher().match(query, ref)
    assert len(m) == len(d)
    np.testing.assert_array_equal(perm[m.ref_idx], m.query_idx)
    # two queries share one nearest reference: only the closer one survives
    q2 = Features(np.zeros((2, 2), np.float32), np.stack([d[0], d[0] + 0.05]))
    r2 = Features(np.zeros((2, 2), np.float32), np.stack([d[0] + 0.01, d[1] + 5.0]))
    m2 = MutualNNMatcher().match(q2, r2)
    assert list(zip(m2.query_idx, m2.ref_idx)) == [(0, 0)]


def test_ratio_test_rejects_a_query_with_two_equally_close_references():
    d = _descriptors(10)
    query = Features(np.zeros((2, 2), np.float32), d[:2] + 0.1)
    # reference: d0 twice (ambiguous), d1 once (distinct)
    ref = Features(np.zeros((3, 2), np.float32), np.stack([d[0], d[0] + 1e-3, d[1]]))
    m = RatioTestMatcher("l2", 0.8).match(query, ref)
    assert list(m.query_idx) == [1] and list(m.ref_idx) == [2]
    assert 0.0 < m.confidence[0] <= 1.0


def test_factories_refuse_unknown_names_naming_the_field():
    with pytest.raises(MeanNavError, match="refine.detector"):
        make_extractor(RefineConfig(detector="surf"))
    with pytest.raises(MeanNavError, match="refine.matcher"):
        make_matcher(RefineConfig(matcher="superglue"), make_extractor(RefineConfig()))


def test_orb_defaults_to_hamming_ratio_matching():
    cfg = RefineConfig(detector="orb")
    matcher = make_matcher(cfg, make_extractor(cfg))
    assert matcher.name == "ratio"
    feats = make_extractor(cfg).extract(textured())
    m = matcher.match(feats, feats)
    assert len(m) > 0.9 * len(feats)   # every keypoint matches itself
    np.testing.assert_array_equal(m.query_idx, m.ref_idx)
