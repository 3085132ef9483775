"""Map features stored in the cache: the same keypoints the in-flight fallback makes, served per
region without map pixels, covered by the checksums, refused when made with other settings."""
import logging

import numpy as np
import pytest

from mean_nav.errors import MeanNavError
from mean_nav.geo.cache import TileCache, build_cache
from mean_nav.geo.map_features import InFlightMapFeatures, StoredMapFeatures, map_feature_source, store_settings
from mean_nav.nav.refine import RefineConfig
from test_cache import BUILD, MAP_ORIGIN, ColourGradientEmbedder, synthetic_map, write_geotiff

# 1 m/px map at the cache GSD, tiles of 64 px every 32 px: regions of 128 px, cells of 32 px
GRID = dict(BUILD, gsd_m=1.0, tile_size_m=64.0, stride_m=32.0)


def at(cache, col, row):
    """Global pixel of map pixel (col, row) (the synthetic map's top-left is MAP_ORIGIN)."""
    c, r = cache.grid.xy_to_pixel(*MAP_ORIGIN)
    return int(round(float(c) + 0.5)) + col, int(round(float(r) + 0.5)) + row


@pytest.fixture(scope="module")
def map_with_hole(tmp_path_factory):
    rgb = synthetic_map(320, 320, seed=4)
    rgb[200:, 200:] = 0        # a nodata corner (black counts as nodata)
    return write_geotiff(tmp_path_factory.mktemp("maps") / "hole.tif", rgb)


@pytest.fixture(scope="module")
def stored(tmp_path_factory, map_with_hole):
    return TileCache.load(build_cache([map_with_hole], tmp_path_factory.mktemp("c") / "c",
                                      ColourGradientEmbedder(), block_px=160, **GRID))


def test_stored_region_features_are_the_keypoints_the_in_flight_fallback_makes(stored):
    refine = RefineConfig()
    source = map_feature_source(stored, refine)
    assert isinstance(source, StoredMapFeatures)
    in_flight = InFlightMapFeatures(stored.mosaic, refine, store_settings(refine, stored.grid))
    for c0, r0 in [(40, 30), (150, 120), (0, 0)]:
        a, on_a = source.region(*at(stored, c0, r0), 128, 128)
        b, on_b = in_flight.region(*at(stored, c0, r0), 128, 128)
        assert len(a) > 20
        order_a, order_b = np.lexsort(a.points.T), np.lexsort(b.points.T)
        np.testing.assert_allclose(a.points[order_a], b.points[order_b], atol=1e-4)
        np.testing.assert_array_equal(a.descriptors[order_a], b.descriptors[order_b])
        assert a.descriptors.dtype == np.float32          # what the SIFT matcher expects
        assert np.array_equal(on_a.bits, on_b.bits)


def test_a_region_holds_about_max_features_all_inside_it_and_none_on_nodata(stored):
    source = map_feature_source(stored, RefineConfig())
    feats, _ = source.region(*at(stored, 20, 20), 128, 128)
    assert len(feats) > 20
    assert (feats.points >= -0.5).all() and (feats.points < 127.5).all()
    hole, on_map = source.region(*at(stored, 200, 200), 120, 120)   # entirely over the nodata corner
    assert len(hole) == 0
    assert on_map.fraction_on_map(np.array([[10.0, 10.0], [100.0, 60.0]])) == 0.0


def test_fraction_on_map_measures_the_footprint_over_a_nodata_hole(stored):
    source = map_feature_source(stored, RefineConfig())
    _, on_map = source.region(*at(stored, 136, 136), 128, 128)    # the hole starts at (200, 200): region px 64
    grid = np.stack(np.meshgrid(np.arange(0, 128, 4.0), np.arange(0, 128, 4.0)), -1).reshape(-1, 2)
    expected = 1.0 - 0.5 * 0.5
    assert on_map.fraction_on_map(grid) == pytest.approx(expected, abs=0.05)


def test_a_cache_without_map_features_computes_them_in_flight_with_one_notice(tmp_path, map_with_hole, caplog):
    bare = TileCache.load(build_cache([map_with_hole], tmp_path / "bare", ColourGradientEmbedder(), features=[],
                                      **GRID))
    assert bare.meta["map_features"] == {}
    assert not (tmp_path / "bare" / "features").exists()
    with caplog.at_level(logging.WARNING):
        source = map_feature_source(bare, RefineConfig())
    assert isinstance(source, InFlightMapFeatures)
    notices = [r for r in caplog.records if "in flight" in r.getMessage()]
    assert len(notices) == 1 and "--features sift" in notices[0].getMessage()
    feats, _ = source.region(*at(bare, 40, 30), 128, 128)
    assert len(feats) > 20


def test_map_features_made_with_other_settings_are_refused(stored):
    with pytest.raises(MeanNavError, match="other settings.*max_features_per_region"):
        map_feature_source(stored, RefineConfig(max_features=500))
    with pytest.raises(MeanNavError, match="equalize"):
        map_feature_source(stored, RefineConfig(equalize=False))
    # another detector the cache does not store is computed in flight, not refused
    assert isinstance(map_feature_source(stored, RefineConfig(detector="orb")), InFlightMapFeatures)


def test_stored_features_are_in_the_checksummed_manifest(stored, tmp_path):
    import shutil

    entry = stored.meta["map_features"]["sift"]
    names = [n for n in stored.meta["files"] if n.startswith(entry["dir"] + "/")]
    assert sorted(n.rsplit("/", 1)[1] for n in names) == ["cells.npy", "descriptors.npy", "points.npy", "scores.npy"]
    assert entry["num_keypoints"] > 0
    copy = tmp_path / "copy"
    shutil.copytree(stored.folder, copy)
    desc = copy / entry["dir"] / "descriptors.npy"
    data = bytearray(desc.read_bytes())
    data[-1] ^= 0xFF
    desc.write_bytes(bytes(data))
    with pytest.raises(MeanNavError, match="descriptors.npy: checksum"):
        TileCache.load(copy)


def test_orb_features_are_stored_beside_sift_with_their_binary_descriptors(tmp_path, map_with_hole):
    both = TileCache.load(build_cache([map_with_hole], tmp_path / "both", ColourGradientEmbedder(),
                                      features=[RefineConfig(), RefineConfig(detector="orb")], **GRID))
    assert set(both.meta["map_features"]) == {"sift", "orb"}
    orb = map_feature_source(both, RefineConfig(detector="orb"))
    feats, _ = orb.region(*at(both, 40, 30), 128, 128)
    assert isinstance(orb, StoredMapFeatures) and len(feats) > 20
    assert feats.descriptors.dtype == np.uint8 and feats.descriptors.shape[1] == 32
