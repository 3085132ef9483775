"""Tile cache: build, resume, shard + merge, search (exact, near, approximate), bad input."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess

import cv2
import numpy as np
import pytest
import rasterio
from affine import Affine
from pyproj import Transformer
from rasterio.warp import Resampling, calculate_default_transform, reproject

from mean_nav.cli import main
from mean_nav.deploy.embedder import Embedder, Preprocessing
from mean_nav.errors import MeanNavError
from mean_nav.geo.cache import TileCache, build_cache, exact_topk, merge_caches
from mean_nav.geo.tiles import read_window

UTM32N = "EPSG:32632"
MAP_ORIGIN = (500000.0, 5200320.0)  # top-left of the synthetic map, metres


class ColourGradientEmbedder(Embedder):
    """Deterministic numpy descriptor: colour histograms + gradient-orientation histogram."""

    name = "numpy-test"

    def __init__(self, model_hash="colour-gradient-v1", img_size=16, fail_after_batches=None):
        self.dim = 64
        self.model_hash = model_hash
        self.preprocessing = Preprocessing(img_size=img_size)
        self.fail_after_batches = fail_after_batches
        self.batches = 0
        self.images = 0

    def _embed_batch(self, batch):
        self.batches += 1
        if self.fail_after_batches is not None and self.batches > self.fail_after_batches:
            raise RuntimeError("simulated crash during the build")
        self.images += len(batch)
        out = []
        for im in batch:
            hist = [np.histogram(im[..., c], bins=16, range=(0, 256))[0] for c in range(3)]
            grey = im.astype(np.float32).mean(axis=2)
            gx, gy = np.gradient(grey)
            ang = np.arctan2(gy, gx)
            grad = np.histogram(ang, bins=16, range=(-np.pi, np.pi), weights=np.hypot(gx, gy))[0]
            out.append(np.concatenate(hist + [grad / (grad.sum() + 1e-6) * im.shape[0] * im.shape[1]]))
        return np.asarray(out, np.float32)


def synthetic_map(h=320, w=320, seed=0):
    """Aerial-like texture: smooth colour regions + fine detail, never pure black."""
    rng = np.random.default_rng(seed)
    coarse = cv2.resize(rng.uniform(20, 235, (h // 16, w // 16, 3)).astype(np.float32), (w, h),
                        interpolation=cv2.INTER_CUBIC)
    fine = rng.normal(0, 18, (h, w, 3)).astype(np.float32)
    return np.clip(coarse + fine, 1, 255).astype(np.uint8)


def write_geotiff(path, rgb, crs=UTM32N, transform=None, with_crs=True):
    h, w, _ = rgb.shape
    transform = transform or Affine(1, 0, MAP_ORIGIN[0], 0, -1, MAP_ORIGIN[1])
    kw = dict(crs=crs, transform=transform) if with_crs else {}
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=3, dtype="uint8", **kw) as dst:
        dst.write(rgb.transpose(2, 0, 1))
    return path


BUILD = dict(gsd_m=2.0, tile_size_m=32.0, stride_m=16.0, crs=UTM32N, batch_size=16, progress=False)


@pytest.fixture(scope="module")
def map_path(tmp_path_factory):
    return write_geotiff(tmp_path_factory.mktemp("maps") / "map.tif", synthetic_map())


@pytest.fixture(scope="module")
def built(tmp_path_factory, map_path):
    out = tmp_path_factory.mktemp("cache") / "c"
    build_cache([map_path], out, ColourGradientEmbedder(), block_px=48, **BUILD)
    return out


@pytest.fixture(scope="module")
def cache(built):
    return TileCache.load(built)


def test_build_writes_memory_mapped_float16_embeddings_geometry_and_meta(cache, built):
    meta = json.loads((built / "meta.json").read_text())
    assert meta["format_version"] == 1 and meta["model_hash"] == "colour-gradient-v1" and meta["dim"] == 64
    assert meta["grid"]["gsd_m"] == 2.0 and meta["grid"]["tile_size_m"] == 32.0 and meta["grid"]["stride_m"] == 16.0
    assert meta["grid"]["crs"] == UTM32N and meta["model"]["preprocessing"]["img_size"] == 16
    assert set(meta["files"]) >= {"embeddings.npy", "tiles.npy"} and len(meta["maps"]) > 1
    assert not (built / "work").exists()
    assert isinstance(cache.embeddings, np.memmap) and cache.embeddings.dtype == np.float16
    # 320 m map, 32 m tiles every 16 m: 21 x 21 tiles touch it; the outer ring is exactly
    # half on the map (kept at min_valid_fraction 0.5), the 4 corners a quarter (skipped)
    assert len(cache) == 21 * 21 - 4
    assert np.isclose(cache.tiles["valid_fraction"].min(), 0.5)
    norms = np.linalg.norm(np.asarray(cache.embeddings, np.float32), axis=1)
    assert np.allclose(norms, 1.0, atol=2e-3)
    to_wgs = Transformer.from_crs(UTM32N, "EPSG:4326", always_xy=True)
    lon, lat = to_wgs.transform(cache.x, cache.y)
    assert np.allclose(lon, cache.lon, atol=1e-9) and np.allclose(lat, cache.lat, atol=1e-9)
    # centres on the stride lattice, inside the map
    assert np.allclose((cache.x - MAP_ORIGIN[0]) % 16.0, 0.0) and cache.x.min() == MAP_ORIGIN[0]
    fp = cache.tiles["footprint_lonlat"][0]
    fx, fy = Transformer.from_crs("EPSG:4326", UTM32N, always_xy=True).transform(fp[:, 0], fp[:, 1])
    assert np.allclose(fx - cache.x[0], [-16, 16, 16, -16], atol=1e-6)
    assert np.allclose(fy - cache.y[0], [16, 16, -16, -16], atol=1e-6)


def test_tile_image_is_the_image_that_was_embedded(cache):
    emb = ColourGradientEmbedder()
    for t in [0, 100, len(cache) - 1]:
        image = cache.tile_image(t)
        assert image.shape == (16, 16, 3) and image.dtype == np.uint8
        again = emb.embed([image])[0]
        assert np.allclose(again, np.asarray(cache.embeddings[t], np.float32), atol=2e-3)


def tile_near(cache, east_m, south_m):
    """The tile whose centre is nearest a point east_m, south_m from the map's top-left corner."""
    return int(np.argmin(np.hypot(cache.x - (MAP_ORIGIN[0] + east_m), cache.y - (MAP_ORIGIN[1] - south_m))))


def test_tile_image_shows_the_map_at_the_tile_footprint(cache, map_path):
    t = tile_near(cache, 100, 200)
    with rasterio.open(map_path) as src:
        full = src.read().transpose(1, 2, 0).astype(np.float32)
    col = int(round(cache.x[t] - 16 - MAP_ORIGIN[0]))
    row = int(round(MAP_ORIGIN[1] - (cache.y[t] + 16)))
    expect = cv2.resize(full[row:row + 32, col:col + 32], (16, 16), interpolation=cv2.INTER_AREA)
    diff = np.abs(cache.tile_image(t).astype(np.float32) - expect).mean()
    assert diff < 10  # bilinear vs area resampling of noisy texture; a one-pixel shift gives > 15
    shifted = cv2.resize(full[row + 2:row + 34, col:col + 32], (16, 16), interpolation=cv2.INTER_AREA)
    assert np.abs(cache.tile_image(t).astype(np.float32) - shifted).mean() > diff + 3


@pytest.mark.parametrize("use_faiss", [False, True])
def test_exact_search_equals_brute_force(cache, use_faiss):
    rng = np.random.default_rng(0)
    all_emb = np.asarray(cache.embeddings, np.float64)
    queries = all_emb[rng.choice(len(cache), 5)] + rng.normal(0, 0.05, (5, 64))
    scores, ids = exact_topk(cache.embeddings, queries.astype(np.float32), 10, use_faiss=use_faiss, chunk=50)
    for q, s, i in zip(queries, scores, ids):
        brute = all_emb @ q
        expect = np.argsort(-brute, kind="stable")[:10]
        assert np.array_equal(np.sort(i), np.sort(expect))
        assert np.allclose(s, brute[i], atol=1e-4) and np.all(np.diff(s) <= 1e-7)


def test_search_returns_the_tile_itself_first_with_its_geometry(cache):
    hits = cache.search(np.asarray(cache.embeddings[123], np.float32), k=5)
    assert len(hits) == 5 and hits[0].tile_id == 123 and hits[0].score == pytest.approx(1.0, abs=2e-3)
    h = hits[0]
    assert (h.x, h.y, h.lat, h.lon) == (cache.x[123], cache.y[123], cache.lat[123], cache.lon[123])
    assert hits[0].score >= hits[1].score >= hits[4].score


def test_search_near_returns_the_best_tiles_within_the_radius_only(cache):
    q = np.asarray(cache.embeddings[200], np.float32) + np.float32(0.02)
    q /= np.linalg.norm(q)
    lat, lon = cache.lat[50], cache.lon[50]
    hits = cache.search_near(q, lat, lon, radius_m=60.0, k=7)
    d = np.hypot(cache.x - cache.x[50], cache.y - cache.y[50])
    inside = np.nonzero(d <= 60.0)[0]
    brute = np.asarray(cache.embeddings, np.float32)[inside] @ q
    expect = inside[np.argsort(-brute)[:7]]
    assert [h.tile_id for h in hits] == list(expect)
    assert cache.search_near(q, lat, lon, radius_m=0.5, k=3)[0].tile_id == 50
    assert cache.search_near(q, lat + 1.0, lon, radius_m=2000.0, k=3) == []


def test_approximate_index_recall_against_exact_and_reload(built, tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(built, folder)
    c = TileCache.load(folder)
    q0 = np.asarray(c.embeddings[10], np.float32)
    assert [h.tile_id for h in c.search_approx(q0, 5)] == [h.tile_id for h in c.search(q0, 5)]  # no index yet
    entry = c.build_approx_index(factory="IVF8,Flat", nprobe=3, rerank=30, progress=False)
    assert entry["factory"] == "IVF8,Flat"
    c = TileCache.load(folder, verify=True)  # meta.json rewritten with the index checksum
    assert c.meta["approx_index"]["file"] == "approx.faiss" and "approx.faiss" in c.meta["files"]
    rng = np.random.default_rng(2)
    emb = np.asarray(c.embeddings, np.float32)
    recalls = []
    for t in rng.choice(len(c), 40, replace=False):
        q = emb[t] + rng.normal(0, 0.02, 64).astype(np.float32)
        exact = {h.tile_id for h in c.search(q, 10)}
        approx = c.search_approx(q, 10)
        recalls.append(len(exact & {h.tile_id for h in approx}) / 10)
        assert all(a.score >= b.score for a, b in zip(approx, approx[1:]))
    assert np.mean(recalls) >= 0.9


def test_region_image_is_centred_on_the_point_and_spans_map_parts(cache, map_path):
    t = tile_near(cache, 150, 170)
    x, y = cache.x[t] + 3.0, cache.y[t] - 5.0
    crop = cache.region(x, y, 100.0)
    assert crop.image.shape == (50, 50, 3) and crop.valid.all()
    cx, cy = crop.transform @ (25.0, 25.0)  # centre of the 50 px crop
    assert abs(cx - x) <= 1.0 and abs(cy - y) <= 1.0
    col0 = round(crop.transform.c / 2.0)
    row0 = round(-crop.transform.f / 2.0)
    direct, valid = read_window([map_path], cache.grid, col0, row0, 50, 50)
    assert valid.all() and np.abs(direct.astype(int) - crop.image).max() <= 1
    image, valid = cache.region_image(MAP_ORIGIN[0], MAP_ORIGIN[1], 40.0)  # map corner: 3/4 empty
    assert 0.2 < valid.mean() < 0.3 and (image[~valid] == 0).all()


def test_tile_pixel_and_metric_coordinates_round_trip(cache):
    t = 42
    x, y = cache.tile_pixel_to_xy(t, 7.5, 7.5)  # centre of a 16 px tile
    assert (x, y) == pytest.approx((cache.x[t], cache.y[t]), abs=1e-9)
    x, y = cache.tile_pixel_to_xy(t, 0.0, 0.0)  # top-left pixel centre: 1 m in from the corner
    assert (x, y) == pytest.approx((cache.x[t] - 15.0, cache.y[t] + 15.0), abs=1e-9)
    assert cache.xy_to_tile_pixel(t, x, y) == pytest.approx((0.0, 0.0), abs=1e-9)
    assert cache.tile_at(cache.x[t] + 3, cache.y[t] - 2) == t


def test_interrupted_build_resumes_and_equals_an_uninterrupted_build(map_path, built, tmp_path):
    out = tmp_path / "c"
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_cache([map_path], out, ColourGradientEmbedder(fail_after_batches=6), block_px=48, **BUILD)
    assert not (out / "meta.json").exists()
    with pytest.raises(MeanNavError, match="did not finish.*resume"):
        TileCache.load(out)
    done_blocks = len(list((out / "work").glob("block-*.npz")))
    assert done_blocks > 0
    resumed = ColourGradientEmbedder()
    build_cache([map_path], out, resumed, block_px=48, **BUILD)
    full = TileCache.load(built)
    c = TileCache.load(out)
    assert 0 < resumed.images < len(full)  # finished blocks were not embedded again
    assert np.array_equal(np.asarray(c.embeddings), np.asarray(full.embeddings))
    assert np.array_equal(np.asarray(c.tiles), np.asarray(full.tiles))
    assert_same_map_features(c, full)


def test_resume_with_different_settings_is_refused(map_path, tmp_path):
    out = tmp_path / "c"
    with pytest.raises(RuntimeError):
        build_cache([map_path], out, ColourGradientEmbedder(fail_after_batches=1), block_px=48, **BUILD)
    with pytest.raises(MeanNavError, match="different settings"):
        build_cache([map_path], out, ColourGradientEmbedder(), block_px=48, **{**BUILD, "stride_m": 32.0})


def test_shards_merge_into_the_same_cache_as_one_build(map_path, built, tmp_path):
    shards = []
    for i in range(3):
        shards.append(build_cache([map_path], tmp_path / f"s{i}", ColourGradientEmbedder(), block_px=48,
                                  shard=(i, 3), **BUILD))
    sizes = [len(TileCache.load(s)) for s in shards]
    assert all(n > 0 for n in sizes)
    merged = TileCache.load(merge_caches(shards, tmp_path / "merged", progress=False))
    full = TileCache.load(built)
    assert len(merged) == sum(sizes) == len(full)
    order_m = np.lexsort((merged.tiles["i"], merged.tiles["j"]))
    order_f = np.lexsort((full.tiles["i"], full.tiles["j"]))
    assert np.array_equal(np.asarray(merged.embeddings)[order_m], np.asarray(full.embeddings)[order_f])
    assert np.array_equal(merged.x[order_m], full.x[order_f])
    t = int(order_m[57])
    assert np.array_equal(merged.tile_image(t), full.tile_image(int(order_f[57])))
    assert_same_map_features(merged, full)


def stored_keypoints(cache, detector="sift"):
    """Every stored keypoint as (global col, global row, descriptor...), sorted: layout-independent."""
    from mean_nav.geo.map_features import read_store

    entry = cache.meta["map_features"][detector]
    store = read_store(cache.folder, entry)
    cell = entry["settings"]["cell_px"]
    origin = np.repeat(np.stack([store.cells["ci"], store.cells["cj"]], 1) * cell, store.cells["count"], axis=0)
    order = np.repeat(store.cells["start"], store.cells["count"]) + np.concatenate(
        [np.arange(n) for n in store.cells["count"]])
    rows = np.concatenate([np.asarray(store.points)[order] + origin, np.asarray(store.descriptors)[order]], axis=1)
    return rows[np.lexsort(rows.T[::-1])]


def assert_same_map_features(a, b):
    assert a.meta["map_features"]["sift"]["settings"] == b.meta["map_features"]["sift"]["settings"]
    ka, kb = stored_keypoints(a), stored_keypoints(b)
    assert len(ka) > 100
    np.testing.assert_array_equal(ka, kb)


def test_merge_refuses_caches_of_another_model(built, map_path, tmp_path):
    other = build_cache([map_path], tmp_path / "o", ColourGradientEmbedder(model_hash="other"), **BUILD)
    with pytest.raises(MeanNavError, match="model_hash"):
        merge_caches([built, other], tmp_path / "m", progress=False)


def test_overlapping_maps_in_different_crs_merge_like_one_map(tmp_path):
    rgb = synthetic_map(seed=5)
    whole = write_geotiff(tmp_path / "whole.tif", rgb)
    left = write_geotiff(tmp_path / "left.tif", rgb[:, :200])
    # right half (with 80 m overlap) delivered in World Mercator, as some providers do
    right_utm = write_geotiff(tmp_path / "right_utm.tif", rgb[:, 120:],
                              transform=Affine(1, 0, MAP_ORIGIN[0] + 120, 0, -1, MAP_ORIGIN[1]))
    with rasterio.open(right_utm) as src:
        tr, w, h = calculate_default_transform(src.crs, "EPSG:3395", src.width, src.height, *src.bounds)
        data = np.zeros((3, h, w), np.uint8)
        reproject(src.read(), data, src_transform=src.transform, src_crs=src.crs, dst_transform=tr,
                  dst_crs="EPSG:3395", resampling=Resampling.bilinear)
    right = write_geotiff(tmp_path / "right_3395.tif", data.transpose(1, 2, 0), crs="EPSG:3395", transform=tr)
    a = TileCache.load(build_cache([whole], tmp_path / "a", ColourGradientEmbedder(), **BUILD))
    b = TileCache.load(build_cache([left, right], tmp_path / "b", ColourGradientEmbedder(), **BUILD))
    assert len(a) == len(b) and np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    cos = np.sum(np.asarray(a.embeddings, np.float32) * np.asarray(b.embeddings, np.float32), axis=1)
    assert np.median(cos) > 0.99 and cos.min() > 0.9


# ---------------------------------------------------------------------------- bad input

def test_map_without_crs_is_refused_with_the_file_name(tmp_path):
    path = write_geotiff(tmp_path / "nocrs.tif", synthetic_map(64, 64), with_crs=False)
    with pytest.raises(MeanNavError, match="nocrs.tif.*(CRS|georeference)"):
        build_cache([path], tmp_path / "c", ColourGradientEmbedder(), **BUILD)
    assert not (tmp_path / "c" / "meta.json").exists()


def test_tampered_embeddings_fail_the_checksum(built, tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(built, folder)
    with open(folder / "embeddings.npy", "r+b") as f:
        f.seek(-7, 2)
        byte = f.read(1)
        f.seek(-7, 2)
        f.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(MeanNavError, match="embeddings.npy: checksum"):
        TileCache.load(folder)
    TileCache.load(folder, verify=False)  # sizes still agree: only the checksum catches it


def test_truncated_cache_is_refused(built, tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(built, folder)
    with open(folder / "tiles.npy", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(MeanNavError, match="tiles.npy.*truncated"):
        TileCache.load(folder, verify=False)


def test_cache_of_another_model_is_refused(built):
    with pytest.raises(MeanNavError, match="built with model colour-gradient-v1.*other-model"):
        TileCache.load(built, expect_model_hash="other-model")
    c = TileCache.load(built, verify=False)
    with pytest.raises(MeanNavError, match="rebuild the cache with this model"):
        c.check_model(ColourGradientEmbedder(model_hash="other-model"))
    with pytest.raises(MeanNavError, match="preprocessing"):
        c.check_model(ColourGradientEmbedder(img_size=24))
    c.check_model(ColourGradientEmbedder())  # the model it was built with is accepted


def test_query_with_wrong_dimension_is_refused(cache):
    with pytest.raises(MeanNavError, match="64-d"):
        cache.search(np.zeros(768, np.float32))
    with pytest.raises(MeanNavError, match="query"):
        cache.search_near(np.zeros(32, np.float32), cache.lat[0], cache.lon[0], 100.0)


def test_folder_without_meta_and_existing_cache_output_are_refused(built, map_path, tmp_path):
    with pytest.raises(MeanNavError, match="not a tile cache"):
        TileCache.load(tmp_path)
    with pytest.raises(MeanNavError, match="already holds a complete cache"):
        build_cache([map_path], built, ColourGradientEmbedder(), **BUILD)


# ---------------------------------------------------------------------------- CLI with a real ONNX model

def tiny_onnx_model(path, img_size=16, dim=24):
    """A real ONNX deploy graph (pooling + projection) carrying mean-nav's metadata."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from mean_nav.deploy.deploy_info import DeployInfo

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(3 * 16, dim)).astype(np.float32), "proj")
    nodes = [
        helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[img_size // 4] * 2,
                         strides=[img_size // 4] * 2),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "proj"], ["descriptor"]),
    ]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                            ["N", 3, img_size, img_size])],
                              [helper.make_tensor_value_info("descriptor", TensorProto.FLOAT, ["N", dim])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    info = DeployInfo("tiny-onnx-v1", "tiny", dim, Preprocessing(img_size=img_size))
    for k, v in info.to_metadata().items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return path


def mean_nav(*args):
    """Run the `mean-nav` CLI in this process (faster than a subprocess); stdout, stderr, exit code."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_cli_builds_with_onnxruntime_shards_merges_and_searches(map_path, tmp_path):
    model = tiny_onnx_model(tmp_path / "tiny.onnx")
    common = ["--model", model, "--gsd", 2, "--tile-size", 32, "--stride", 16, "--crs", UTM32N, "--no-progress"]
    for i in range(2):
        r = mean_nav("cache", "build", map_path, "--out", tmp_path / f"s{i}", "--shard", f"{i}/2", *common)
        assert r.returncode == 0, r.stderr
    r = mean_nav("cache", "merge", tmp_path / "s0", tmp_path / "s1", "--out", tmp_path / "c", "--no-progress")
    assert r.returncode == 0, r.stderr
    r = mean_nav("cache", "info", tmp_path / "c")
    assert r.returncode == 0 and "tiny-onnx-v1" in r.stdout and "437" in r.stdout and "EPSG:32632" in r.stdout
    r = mean_nav("cache", "search", tmp_path / "c", "--tile-id", 100, "-k", 3, "--json")
    hits = json.loads(r.stdout)
    assert r.returncode == 0 and hits[0]["tile_id"] == 100 and len(hits) == 3
    r = mean_nav("cache", "index", tmp_path / "c", "--factory", "IVF4,Flat", "--nprobe", 4, "--no-progress")
    assert r.returncode == 0 and "IVF4,Flat" in r.stdout, r.stderr
    r = mean_nav("cache", "search", tmp_path / "c", "--tile-id", 100, "--approx", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["tile_id"] == 100
    r = mean_nav("cache", "index", tmp_path / "c", "--factory", "NotAnIndex", "--no-progress")
    assert r.returncode == 1 and "factory" in r.stderr
    c = TileCache.load(tmp_path / "c")
    cv2.imwrite(str(tmp_path / "q.png"), cv2.cvtColor(c.tile_image(100), cv2.COLOR_RGB2BGR))
    r = mean_nav("cache", "search", tmp_path / "c", "--image", tmp_path / "q.png", "--model", model,
                 "--near", f"{c.lat[100]},{c.lon[100]}", "--radius", 100, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["tile_id"] == 100


def test_cli_reports_bad_input_as_one_line(tmp_path, built):
    r = mean_nav("cache", "info", tmp_path / "missing")
    assert r.returncode == 1 and "missing: tile cache folder not found" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = mean_nav("cache", "search", built, "--tile-id", 10**6)
    assert r.returncode == 1 and "--tile-id" in r.stderr


def test_cache_benchmark_runs_and_reports_consistent_numbers(tmp_path):
    out = tmp_path / "bench.json"
    r = mean_nav("bench", "cache", "--tiles", 2500, "--dim", 32, "--folder", tmp_path / "gen", "--queries", 20,
                 "--exact-queries", 2, "--nprobe", 4, 50, "--rerank", 50, "--factory", "IVF50,Flat",
                 "--plot", tmp_path / "bench.png", "--json", out)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["tiles"] == 2500 and res["exact_top1_is_query_tile"] >= 0.9
    # 2 km radius on a 100 m lattice: about pi * 20^2 tiles (fewer near the 5 km area's edge)
    assert 600 < res["near"]["tiles_in_radius_median"] <= 1257
    assert res["approx"][-1]["recall_at_10"] >= res["approx"][0]["recall_at_10"]
    assert res["approx"][-1]["recall_at_10"] == 1.0  # nprobe 50 of 50 lists: exhaustive
    assert res["bytes_per_tile"]["disk_embeddings"] == 64.0
    assert (tmp_path / "bench.png").stat().st_size > 10_000


def test_a_shard_over_nodata_is_an_empty_cache_that_merges_as_nothing(tmp_path):
    rgb = synthetic_map(seed=7)
    rgb[:180] = 0  # northern part black: shard 0 of 2 (northern tile rows) has no ground
    path = write_geotiff(tmp_path / "m.tif", rgb)
    s0 = TileCache.load(build_cache([path], tmp_path / "s0", ColourGradientEmbedder(), shard=(0, 2), **BUILD))
    s1 = TileCache.load(build_cache([path], tmp_path / "s1", ColourGradientEmbedder(), shard=(1, 2), **BUILD))
    assert len(s0) == 0 and len(s1) > 0
    assert s0.search(np.ones(64, np.float32) / 8.0) == [] and "tiles          0" in s0.describe()
    merged = TileCache.load(merge_caches([s0.folder, s1.folder], tmp_path / "m", progress=False))
    assert len(merged) == len(s1) and np.array_equal(np.asarray(merged.embeddings), np.asarray(s1.embeddings))
    with pytest.raises(MeanNavError, match="no tile has at least the minimum valid fraction"):
        black = write_geotiff(tmp_path / "black.tif", np.zeros((64, 64, 3), np.uint8))
        build_cache([black], tmp_path / "b", ColourGradientEmbedder(), **BUILD)
