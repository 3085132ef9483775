"""Images shared by the export and quantization tests: real orthophoto tiles when
../shared/data is present, procedural aerial-like images otherwise."""
from pathlib import Path

from mean_nav.deploy.images import load_images

MAP = Path(__file__).resolve().parents[2] / "shared" / "data" / "orthophotos" / "test_tiled.tif"


def sample_images(n: int, size: int):
    if MAP.is_file():
        return load_images(MAP, n, size)
    print(f"shared data absent ({MAP}); using procedural images")
    return load_images(None, n, size)
