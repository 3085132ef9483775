"""Retrieval metrics by the University-1652 formulas (numpy only, no torch).

For each query the gallery is ranked by descending dot product of L2-normalised
descriptors. Gallery items labelled -1 are junk and removed from the ranking. Under the
"family" convention (Sample4Geo, CAMP, MEAN) gallery items whose label no query has are
junk too; the "original" convention ranks them as distractors.

  CMC   for a query whose first good item sits at 0-based rank r: cmc[r:] = 1
  R@K   mean over queries of cmc[K-1]
  R@1%  mean cmc[round(0.01 * gallery size)]: the reference code's index (one past
        the top 1 %), with gallery size = all gallery images given
  AP    with n good items at ranks r_1 < ... < r_n:
        sum_i (1/n) * (P_old + P_i) / 2, P_i = i / (r_i + 1),
        P_old = (i - 1) / r_i if r_i > 0 else 1
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

CONVENTIONS = ("family", "original")


def average_precision(good_ranks: np.ndarray) -> float:
    """AP of one query from the sorted 0-based ranks of its good items (junk removed)."""
    n = len(good_ranks)
    if n == 0:
        return 0.0
    ap = 0.0
    for i, r in enumerate(np.sort(good_ranks), start=1):
        precision = i / (r + 1)
        precision_old = (i - 1) / r if r > 0 else 1.0
        ap += (precision_old + precision) / 2 / n
    return float(ap)


def retrieval_metrics(query_feats: np.ndarray, query_labels: Sequence[int],
                      gallery_feats: np.ndarray, gallery_labels: Sequence[int],
                      ks: Sequence[int] = (1, 5, 10), convention: str = "family",
                      chunk: int = 1024) -> dict[str, float]:
    """R@K, R@1% and mAP (percent) of queries against a gallery.

    Queries without any good gallery item are skipped (they have no defined rank), as
    in the reference code; `queries` in the result counts those that were scored.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"gallery convention must be one of {CONVENTIONS}, got {convention!r}")
    q = np.asarray(query_feats, np.float32)
    g = np.asarray(gallery_feats, np.float32)
    ql = np.asarray(query_labels, np.int64)
    gl = np.asarray(gallery_labels, np.int64)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"descriptor shapes do not match: query {q.shape}, gallery {g.shape}")
    if len(ql) != len(q) or len(gl) != len(g):
        raise ValueError("one label per descriptor is needed")
    junk = gl == -1
    if convention == "family":
        junk |= ~np.isin(gl, ql)
    one_percent_index = int(round(0.01 * len(g)))
    max_k = max(max(ks), one_percent_index + 1)
    cmc = np.zeros(max(max_k, 1), np.float64)
    ap_sum, scored = 0.0, 0
    for start in range(0, len(q), chunk):
        scores = q[start:start + chunk] @ g.T
        for row, label in zip(scores, ql[start:start + chunk]):
            order = np.argsort(-row, kind="stable")
            order = order[~junk[order]]
            good = np.flatnonzero(gl[order] == label)
            if len(good) == 0:
                continue
            scored += 1
            first = good[0]
            if first < len(cmc):
                cmc[first:] += 1
            ap_sum += average_precision(good)
    if scored == 0:
        raise ValueError("no query has a matching gallery item; check the labels")
    cmc /= scored
    out = {f"R@{k}": 100.0 * float(cmc[min(k, len(cmc)) - 1]) for k in ks}
    out["R@1%"] = 100.0 * float(cmc[min(one_percent_index, len(cmc) - 1)])
    out["AP"] = 100.0 * ap_sum / scored
    out["queries"] = scored
    out["gallery"] = int(len(g))
    return out
