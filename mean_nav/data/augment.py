"""Training augmentations and photometric degradations, numpy + OpenCV only (no torch).

Pair augmentation follows the MEAN recipe (spec/mean-model.md): a joint horizontal
flip, then per view JPEG re-compression, colour jitter with per-view strengths, blur or
sharpen, grid or coarse dropout, and a random 90-degree rotation of the satellite view.

`degrade_photometric` is the reusable "a real camera saw this" function: illumination,
colour cast, blur, sensor noise and compression. The synthetic pair source and the
flight simulator both call it, so they share one model of the domain gap.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np


@dataclass
class JitterConfig:
    """Colour jitter strengths (torchvision-style ranges: factor in [1-s, 1+s], hue +-s turns)."""

    brightness: float = 0.15
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.3


@dataclass
class AugmentConfig:
    """Probabilities and strengths of the pair augmentation (defaults: the MEAN recipe)."""

    hflip_p: float = 0.5
    jpeg_p: float = 0.5
    jpeg_quality: tuple[int, int] = (90, 100)
    jitter_p: float = 0.5
    satellite_jitter: JitterConfig = field(default_factory=JitterConfig)
    drone_jitter: JitterConfig = field(default_factory=lambda: JitterConfig(contrast=0.7))
    blur_sharpen_p: float = 0.3
    dropout_p: float = 0.3
    satellite_rot90: bool = True


# --- single operations ------------------------------------------------------------------

def jpeg_recompress(img: np.ndarray, quality: int) -> np.ndarray:
    """Encode and decode as JPEG at `quality` (RGB in, RGB out)."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # cannot happen for uint8 RGB; keep the image rather than fail a batch
        return img
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _grey(x: np.ndarray) -> np.ndarray:
    return x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114


def color_jitter(img: np.ndarray, rng: np.random.Generator, jitter: JitterConfig) -> np.ndarray:
    """Random brightness, contrast, saturation and hue, applied in a random order."""
    x = img.astype(np.float32)
    ops = rng.permutation(4)
    for op in ops:
        if op == 0 and jitter.brightness > 0:
            x = x * rng.uniform(1 - jitter.brightness, 1 + jitter.brightness)
        elif op == 1 and jitter.contrast > 0:
            factor = rng.uniform(max(0.0, 1 - jitter.contrast), 1 + jitter.contrast)
            mean = _grey(x).mean()
            x = (x - mean) * factor + mean
        elif op == 2 and jitter.saturation > 0:
            factor = rng.uniform(max(0.0, 1 - jitter.saturation), 1 + jitter.saturation)
            g = _grey(x)[..., None]
            x = (x - g) * factor + g
        elif op == 3 and jitter.hue > 0:
            shift = rng.uniform(-jitter.hue, jitter.hue)  # fraction of a full turn
            hsv = cv2.cvtColor(np.clip(x, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV)
            # OpenCV's 8-bit hue runs 0..179 for a full turn
            hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + int(round(shift * 180))) % 180).astype(np.uint8)
            x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(np.float32)
    return np.clip(x, 0, 255).astype(np.uint8)


def blur_or_sharpen(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Either an anisotropic Gaussian blur at a random angle or an unsharp-mask sharpen."""
    if rng.random() < 0.5:
        sx, sy = rng.uniform(0.2, 1.5, size=2)
        angle = rng.uniform(0, 180)
        return gaussian_blur_anisotropic(img, sx, sy, angle)
    amount = rng.uniform(0.2, 0.8)
    soft = cv2.GaussianBlur(img, (0, 0), 1.0)
    return cv2.addWeighted(img, 1 + amount, soft, -amount, 0)


def gaussian_blur_anisotropic(img: np.ndarray, sigma_x: float, sigma_y: float, angle_deg: float) -> np.ndarray:
    radius = int(np.ceil(3 * max(sigma_x, sigma_y)))
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1].astype(np.float32)
    a = np.radians(angle_deg)
    u = xx * np.cos(a) + yy * np.sin(a)
    v = -xx * np.sin(a) + yy * np.cos(a)
    kernel = np.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    kernel /= kernel.sum()
    return cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT)


def grid_dropout(img: np.ndarray, rng: np.random.Generator, ratio: float = 0.4) -> np.ndarray:
    """Black out a regular grid of squares covering about `ratio` of each grid cell's side."""
    h, w = img.shape[:2]
    unit = int(rng.integers(max(2, min(h, w) // 10), max(3, min(h, w) // 3) + 1))
    hole = max(1, int(unit * ratio))
    ox, oy = rng.integers(0, unit, size=2)
    out = img.copy()
    for y in range(int(oy) - unit, h, unit):
        for x in range(int(ox) - unit, w, unit):
            out[max(0, y):max(0, y + hole), max(0, x):max(0, x + hole)] = 0
    return out


def coarse_dropout(img: np.ndarray, rng: np.random.Generator, holes: tuple[int, int] = (10, 25),
                   size_fraction: tuple[float, float] = (0.1, 0.2)) -> np.ndarray:
    """Black out 10-25 rectangles of 10-20 % of the image side each."""
    h, w = img.shape[:2]
    out = img.copy()
    for _ in range(int(rng.integers(holes[0], holes[1] + 1))):
        hh = max(1, int(h * rng.uniform(*size_fraction)))
        ww = max(1, int(w * rng.uniform(*size_fraction)))
        y = int(rng.integers(0, h - hh + 1))
        x = int(rng.integers(0, w - ww + 1))
        out[y:y + hh, x:x + ww] = 0
    return out


def augment_view(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig, jitter: JitterConfig) -> np.ndarray:
    """The per-view part of the recipe (everything except the joint flip and rotation)."""
    if rng.random() < cfg.jpeg_p:
        img = jpeg_recompress(img, int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1)))
    if rng.random() < cfg.jitter_p:
        img = color_jitter(img, rng, jitter)
    if rng.random() < cfg.blur_sharpen_p:
        img = blur_or_sharpen(img, rng)
    if rng.random() < cfg.dropout_p:
        img = grid_dropout(img, rng) if rng.random() < 0.5 else coarse_dropout(img, rng)
    return img


def augment_pair(satellite: np.ndarray, drone: np.ndarray, rng: np.random.Generator,
                 cfg: AugmentConfig) -> tuple[np.ndarray, np.ndarray]:
    """Augment one (satellite, drone) pair of RGB uint8 images as the MEAN recipe does."""
    if rng.random() < cfg.hflip_p:
        # flip both so the pair still shows the same ground
        satellite, drone = satellite[:, ::-1], drone[:, ::-1]
    satellite = augment_view(np.ascontiguousarray(satellite), rng, cfg, cfg.satellite_jitter)
    drone = augment_view(np.ascontiguousarray(drone), rng, cfg, cfg.drone_jitter)
    if cfg.satellite_rot90:
        satellite = np.ascontiguousarray(np.rot90(satellite, int(rng.integers(0, 4))))
    return satellite, drone


# --- camera domain gap ------------------------------------------------------------------

def degrade_photometric(img: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Make a clean map rendering look like a real camera frame of the same ground.

    `strength` in [0, 1] scales every effect; 0 returns the image unchanged. Effects:
    exposure and gamma (time of day), a smooth illumination gradient (clouds, vignetting),
    a colour cast (white balance), blur (focus, motion), sensor noise and JPEG.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if strength == 0.0:
        return img
    s = float(strength)
    h, w = img.shape[:2]
    x = img.astype(np.float32) / 255.0
    # exposure and gamma
    x = x * rng.uniform(1 - 0.35 * s, 1 + 0.25 * s)
    x = np.clip(x, 0, 1) ** rng.uniform(1 - 0.3 * s, 1 + 0.3 * s)
    # smooth illumination field: a low-resolution random field upsampled (cloud shadows)
    coarse = rng.uniform(-1, 1, size=(3, 3)).astype(np.float32)
    field_ = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    x = x * (1 + 0.25 * s * field_)[..., None]
    # white balance / colour cast
    x = x * (1 + rng.uniform(-0.12, 0.12, size=3).astype(np.float32) * s)
    # desaturate or saturate a little
    g = _grey(x)[..., None]
    x = g + (x - g) * rng.uniform(1 - 0.3 * s, 1 + 0.2 * s)
    x = np.clip(x * 255.0, 0, 255)
    # blur: defocus or motion
    if rng.random() < 0.7 * s:
        if rng.random() < 0.5:
            x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.3, 0.3 + 1.2 * s))
        else:
            length = int(round(rng.uniform(1, 1 + 6 * s)))
            if length >= 2:
                kernel = np.zeros((length, length), np.float32)
                kernel[length // 2, :] = 1.0 / length
                rot = cv2.getRotationMatrix2D(((length - 1) / 2, (length - 1) / 2), rng.uniform(0, 180), 1.0)
                kernel = cv2.warpAffine(kernel, rot, (length, length))
                kernel /= max(kernel.sum(), 1e-6)
                x = cv2.filter2D(x, -1, kernel, borderType=cv2.BORDER_REFLECT)
    # sensor noise: shot-like (signal dependent) plus read noise
    sigma = rng.uniform(0.5, 0.5 + 6.0 * s)
    noise = rng.standard_normal(x.shape).astype(np.float32) * sigma * np.sqrt(np.maximum(x, 1.0) / 128.0)
    x = np.clip(x + noise, 0, 255).astype(np.uint8)
    if rng.random() < 0.8 * s:
        x = jpeg_recompress(x, int(rng.integers(int(95 - 35 * s), 96)))
    return x


def add_occlusions(img: np.ndarray, rng: np.random.Generator, strength: float = 1.0,
                   max_count: int = 3) -> np.ndarray:
    """Paint a few blobs of uniform-ish colour (vehicles, birds, lens dirt, cloud wisps)."""
    if strength <= 0:
        return img
    h, w = img.shape[:2]
    out = img.copy()
    for _ in range(int(rng.integers(0, max_count + 1))):
        if rng.random() > strength:
            continue
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(2, max(3, w // 8))), int(rng.integers(2, max(3, h // 8))))
        colour = rng.integers(0, 256, size=3) if rng.random() < 0.5 else np.full(3, rng.integers(180, 256))
        cv2.ellipse(out, centre, axes, float(rng.uniform(0, 180)), 0, 360,
                    tuple(int(c) for c in colour), -1, lineType=cv2.LINE_AA)
    return out
