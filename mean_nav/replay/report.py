"""Scoring and plots of a replay: summary JSON numbers and PNG figures.

Everything here works from the estimates CSV columns, so a report can be rebuilt from a
finished (or interrupted) replay without running the localizer again.

Definitions (the summary's `definitions` field repeats them):
  error         horizontal distance between the estimate and the GNSS truth (WGS84 geodesic)
  fix rate      fixes / frames whose nadir is over the map (all frames when the map is unknown)
  false fix     a fix whose error exceeds 3 x its reported sigma_h_m (68 % radius)
  outside map   a frame whose true nadir is not over valid map pixels
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
from pyproj import Geod

from ..nav.estimate import FixQuality

GEOD = Geod(ellps="WGS84")
FALSE_FIX_SIGMAS = 3.0

DEFINITIONS = {
    "error_m": "geodesic distance between estimate and GNSS truth, metres",
    "fix_rate": "fixes / frames whose true nadir is over the map (all frames if no map is known)",
    "false_fix_rate": f"fixes with error > {FALSE_FIX_SIGMAS:g} x reported sigma_h_m (68 % radius) / fixes",
    "time_to_first_fix_s": "first fix time - first frame time",
    "latency_s": "wall-clock processing time per frame on this machine (not deterministic)",
    "fixes_outside_map": "fixes while the true nadir is outside the map",
    "coverage_68": "fraction of scored fix errors inside the reported sigma_h_m (68 % radius); 0.68 is honest",
    "truth_frames": "frames with a GNSS truth position to score against",
}


def horizontal_error_m(lat, lon, truth_lat, truth_lon) -> np.ndarray:
    """Geodesic distance in metres; nan where either position is unknown."""
    lat, lon, tlat, tlon = (np.asarray(a, float) for a in (lat, lon, truth_lat, truth_lon))
    ok = np.isfinite(lat) & np.isfinite(lon) & np.isfinite(tlat) & np.isfinite(tlon)
    out = np.full(lat.shape, np.nan)
    if ok.any():
        _, _, dist = GEOD.inv(lon[ok], lat[ok], tlon[ok], tlat[ok])
        out[ok] = dist
    return out


def read_estimates_csv(path: str | Path) -> dict[str, np.ndarray]:
    """Columns of an estimates CSV as arrays (numbers as float, `reason` as str)."""
    with Path(path).open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    cols = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        try:
            cols[key] = np.array([float(v) if v != "" else math.nan for v in values])
        except ValueError:
            cols[key] = np.array(values, dtype=object)
    return cols


def _pct(x: np.ndarray, q: float) -> float | None:
    return float(np.percentile(x, q)) if x.size else None


def summarize(cols: dict[str, np.ndarray]) -> dict:
    """Summary numbers of a replay from its estimate columns."""
    if not cols:
        return {"frames": 0}
    n = len(cols["time_s"])
    fix = cols["fix"] == int(FixQuality.FIX)
    err = cols["error_m"]
    sigma = cols["sigma_h_m"]
    in_map = cols["in_map"]
    map_known = np.isfinite(in_map).any()
    over_map = (in_map == 1) if map_known else np.ones(n, bool)
    processed = cols["processed"] == 1 if "processed" in cols else np.ones(n, bool)
    scored = fix & np.isfinite(err)
    fix_err = err[scored]
    false_fix = scored & (err > FALSE_FIX_SIGMAS * sigma)
    first_fix = np.flatnonzero(fix)
    latency = cols["latency_s"][processed & np.isfinite(cols["latency_s"])]
    fixes_in_map = int((fix & over_map).sum())
    frames_in_map = int((over_map & processed).sum())
    summary = {
        "frames": int(n),
        "frames_processed": int(processed.sum()),
        "frames_over_map": frames_in_map if map_known else None,
        "fixes": int(fix.sum()),
        "fix_rate": fixes_in_map / frames_in_map if frames_in_map else None,
        "fix_rate_all_frames": float(fix.sum() / processed.sum()) if processed.any() else None,
        "coasting": int((cols["fix"] == int(FixQuality.COASTING)).sum()),
        "error_m": {
            "median": _pct(fix_err, 50), "p95": _pct(fix_err, 95),
            "max": float(fix_err.max()) if fix_err.size else None,
            "mean": float(fix_err.mean()) if fix_err.size else None,
            "scored_fixes": int(scored.sum()),
        },
        "sigma_h_m_median": _pct(sigma[fix & np.isfinite(sigma)], 50),
        "coverage_68": float(np.mean(fix_err <= sigma[scored])) if scored.any() else None,
        "truth_frames": int((np.isfinite(cols["truth_lat"]) & np.isfinite(cols["truth_lon"])).sum()),
        "false_fixes": int(false_fix.sum()),
        "false_fix_rate": float(false_fix.sum() / scored.sum()) if scored.any() else None,
        "time_to_first_fix_s": float(cols["time_s"][first_fix[0]] - cols["time_s"][0]) if first_fix.size else None,
        "latency_s": {"median": _pct(latency, 50), "p95": _pct(latency, 95),
                      "max": float(latency.max()) if latency.size else None},
        "frames_per_s": float(1.0 / latency.mean()) if latency.size and latency.mean() > 0 else None,
        "fixes_outside_map": int((fix & (in_map == 0)).sum()) if map_known else None,
        "frames_outside_map": int((in_map == 0).sum()) if map_known else None,
        "definitions": DEFINITIONS,
    }
    return summary


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def _savefig(fig, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def _error_scale_m(errors: np.ndarray) -> float:
    """Top of the colour scale: the 95th percentile of the fix errors, rounded up to a
    readable step, so the colours spread over the errors that occur (a few large ones are
    drawn in the top colour and said to be clipped)."""
    finite = errors[np.isfinite(errors)]
    if not finite.size:
        return 1.0
    p95 = float(np.percentile(finite, 95))
    for step in (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0):
        if p95 <= 10 * step:
            return max(step, math.ceil(p95 / step) * step)
    return math.ceil(p95 / 100.0) * 100.0


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) index ranges where mask is True."""
    edges = np.diff(np.r_[0, mask.astype(np.int8), 0])
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def _legend_outside(ax, ncol: int = 3, below: float = 0.14) -> None:
    """Legend under the axis labels (`below`: axes fractions), never over the data."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -below), ncol=ncol, fontsize=8,
                  frameon=False)


def plot_track(cols: dict[str, np.ndarray], path: Path, raster=None) -> None:
    """Truth track over the map, fixes coloured by error (scale fitted to the errors), false
    fixes and no-fix stretches marked; the view stays on the map when the flight leaves it far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from ..geo.crs import from_lonlat

    fig, ax = plt.subplots(figsize=(8, 8.6))
    fix = cols["fix"] == int(FixQuality.FIX)
    coast = cols["fix"] == int(FixQuality.COASTING)
    if raster is not None:
        crs = raster.crs
        left, bottom, right, top = raster.bounds
        ax.imshow(raster.image, extent=(left, right, bottom, top), origin="upper", alpha=0.85)
    else:
        from ..geo.crs import utm_crs_for

        ok = np.isfinite(cols["truth_lon"])
        lon0 = float(np.nanmedian(cols["truth_lon"][ok] if ok.any() else cols["lon"]))
        lat0 = float(np.nanmedian(cols["truth_lat"][ok] if ok.any() else cols["lat"]))
        crs = utm_crs_for(lon0, lat0)
    tx, ty = (np.asarray(v, float) for v in from_lonlat(crs, cols["truth_lon"], cols["truth_lat"]))
    ex, ey = (np.asarray(v, float) for v in from_lonlat(crs, cols["lon"], cols["lat"]))
    has_truth = bool(np.isfinite(tx).any())
    if has_truth:
        ax.plot(tx, ty, "-", color="white", lw=3, alpha=0.8)
        ax.plot(tx, ty, "-", color="black", lw=1.2, label="GNSS truth")
    no_fix = ~fix if has_truth else np.zeros_like(fix)   # drawn along the truth, when there is one
    for k, (i0, i1) in enumerate(_runs(no_fix)):
        seg = slice(max(i0 - 1, 0), min(i1 + 1, len(tx)))   # join the neighbouring fixes
        ax.plot(tx[seg], ty[seg], "-", color="tab:orange", lw=2.5, alpha=0.9,
                label="no fix sent" if k == 0 else None, zorder=2)
    if coast.any():
        ax.plot(ex[coast], ey[coast], ".", color="0.45", ms=3, label="coasting (not sent)")
    scored = fix & np.isfinite(cols["error_m"])
    if (fix & ~scored).any():   # no truth for these: drawn, in one colour, as not scored
        ax.plot(ex[fix & ~scored], ey[fix & ~scored], ".", color="tab:blue", ms=6, zorder=3,
                label="fix (no GNSS truth: error unknown)")
    if scored.any():
        err = cols["error_m"][scored]
        vmax = _error_scale_m(err)
        sc = ax.scatter(ex[scored], ey[scored], c=np.clip(err, 0, vmax), cmap="viridis", s=16, vmin=0, vmax=vmax,
                        label="fix (colour: error)", zorder=3, edgecolors="none")
        clipped = int(np.sum(err > vmax))
        note = f"; {clipped} above, drawn in the top colour" if clipped else ""
        fig.colorbar(sc, ax=ax, shrink=0.7, extend="max" if clipped else "neither",
                     label=f"fix error, m (0 to {vmax:g} = 95th percentile{note})")
        false_fix = fix & (cols["error_m"] > FALSE_FIX_SIGMAS * cols["sigma_h_m"])
        if false_fix.any():
            ax.plot(ex[false_fix], ey[false_fix], "x", color="red", ms=9, mew=2,
                    label=f"false fix: error > {FALSE_FIX_SIGMAS:g} sigma ({int(false_fix.sum())})", zorder=4)
    ax.set_aspect("equal")
    if raster is not None:
        _keep_map_in_view(ax, raster.bounds, tx, ty, ex[fix], ey[fix])
    ax.set_xlabel(f"easting, m ({crs.to_string()})")
    ax.set_ylabel("northing, m")
    ax.ticklabel_format(useOffset=False, style="plain")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))  # 7-digit eastings overlap otherwise
    ax.tick_params(axis="x", labelrotation=20)
    _legend_outside(ax, below=0.2)   # under the rotated easting labels
    ax.set_title("replay track" if has_truth else "replay track (no GNSS truth in the flight: errors not scored)",
                 fontsize=12 if has_truth else 10)
    _savefig(fig, path)
    plt.close(fig)


def _keep_map_in_view(ax, bounds, *xy_pairs, max_outside: float = 0.5) -> None:
    """Show the whole track unless it reaches further than max_outside map sizes beyond the
    map: then show the map plus that margin, and say how far the track went beyond the view."""
    left, bottom, right, top = bounds
    xs = np.concatenate([np.asarray(v, float) for v in xy_pairs[0::2]])
    ys = np.concatenate([np.asarray(v, float) for v in xy_pairs[1::2]])
    xs, ys = xs[np.isfinite(xs)], ys[np.isfinite(ys)]
    if not xs.size:
        return
    mx, my = (right - left) * max_outside, (top - bottom) * max_outside
    view = (max(min(xs.min(), left), left - mx), max(min(ys.min(), bottom), bottom - my),
            min(max(xs.max(), right), right + mx), min(max(ys.max(), top), top + my))
    pad_x, pad_y = 0.03 * (view[2] - view[0]), 0.03 * (view[3] - view[1])
    view = (view[0] - pad_x, view[1] - pad_y, view[2] + pad_x, view[3] + pad_y)
    ax.set_xlim(view[0], view[2])
    ax.set_ylim(view[1], view[3])
    # against the padded view: a track just past the margin is still drawn, not clipped
    beyond = max(view[0] - xs.min(), xs.max() - view[2], view[1] - ys.min(), ys.max() - view[3], 0.0)
    if beyond > 0:
        ax.text(0.01, 0.01, f"view clipped: the track goes up to {beyond:.0f} m beyond it",
                transform=ax.transAxes, fontsize=8, va="bottom", ha="left",
                bbox=dict(facecolor="white", alpha=0.85, edgecolor="0.5"))


def plot_error(cols: dict[str, np.ndarray], path: Path) -> None:
    """Fix error and reported sigma over time: false fixes, no-fix stretches and frames
    outside the map marked; values above the (stated) axis limit drawn on the top edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = cols["time_s"] - cols["time_s"][0]
    fix = cols["fix"] == int(FixQuality.FIX)
    err = cols["error_m"]
    fig, ax = plt.subplots(figsize=(10, 5))
    outside = cols["in_map"] == 0
    if outside.any():
        ax.fill_between(t, 0, 1, where=outside, transform=ax.get_xaxis_transform(),
                        color="orange", alpha=0.25, step="mid", label="nadir outside map")
    no_fix = ~fix & ~outside
    if no_fix.any():
        known = np.isfinite(cols["in_map"]).any()
        ax.fill_between(t, 0, 1, where=no_fix, transform=ax.get_xaxis_transform(), color="0.5", alpha=0.18,
                        step="mid", label="no fix sent (over the map)" if known else "no fix sent")
    sigma = np.where(np.isfinite(cols["sigma_h_m"]) & (cols["fix"] > 0), cols["sigma_h_m"], np.nan)
    ax.plot(t, sigma, "-", color="tab:blue", lw=1, label="reported sigma_h (68 %)")
    ax.plot(t, FALSE_FIX_SIGMAS * sigma, ":", color="tab:blue", lw=1,
            label=f"{FALSE_FIX_SIGMAS:g} sigma (false-fix line)")
    scored = fix & np.isfinite(err)
    if scored.any():
        ax.plot(t[scored], err[scored], ".", color="tab:green", ms=4, label="fix error")
    coast = cols["fix"] == int(FixQuality.COASTING)
    if coast.any():
        ax.plot(t[coast], err[coast], ".", color="0.45", ms=3, label="coasting error (not sent)")
    false_fix = fix & (err > FALSE_FIX_SIGMAS * cols["sigma_h_m"])
    if false_fix.any():
        ax.plot(t[false_fix], err[false_fix], "x", color="red", ms=8, mew=2,
                label=f"false fix ({int(false_fix.sum())})", zorder=4)
    # the axis covers the fix errors (and a sigma band over them), not a diverging coast
    fix_err = err[fix & np.isfinite(err)]
    top = max(5.0, 1.5 * float(np.percentile(fix_err, 99))) if fix_err.size else 20.0
    top = max(top, 1.2 * float(np.nanpercentile(FALSE_FIX_SIGMAS * sigma[fix], 50))) if fix.any() else top
    top = float(min(top, 200.0))
    ax.set_ylim(0, top)
    shown = [(err, cols["fix"] > 0, "tab:green"), (sigma, np.isfinite(sigma), "tab:blue")]
    clipped_notes = []
    for values, where, colour in shown:
        over = where & (values > top)
        if over.any():
            ax.plot(t[over], np.full(int(over.sum()), top), "^", color=colour, ms=5, clip_on=False, zorder=5)
            clipped_notes.append(f"{'error' if values is err else 'sigma'} up to {np.nanmax(values[over]):.0f} m")
    title = "horizontal error and reported accuracy"
    if fix.any() and not scored.any():
        title += "\nno GNSS truth in the flight: fix errors unknown, only the reported accuracy is drawn"
    if clipped_notes:
        title += (f"\naxis clipped at {top:.3g} m: triangles on the top edge are above it ("
                  + ", ".join(clipped_notes) + ")")
    ax.set_xlabel("time since first frame, s")
    ax.set_ylabel("metres")
    ax.grid(alpha=0.3)
    _legend_outside(ax, ncol=4)
    ax.set_title(title, fontsize=10)
    _savefig(fig, path)
    plt.close(fig)


def write_report(estimates_csv: Path, out_dir: Path, raster=None, extra: dict | None = None) -> dict:
    """summary.json, track.png and error.png from an estimates CSV; returns the summary."""
    cols = read_estimates_csv(estimates_csv)
    summary = summarize(cols)
    if extra:
        summary.update(extra)
    write_json(out_dir / "summary.json", summary)
    if cols:
        plot_track(cols, out_dir / "track.png", raster)
        plot_error(cols, out_dir / "error.png")
    return summary
