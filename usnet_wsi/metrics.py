"""Nuclei instance-segmentation metrics, computed exactly as defined (pure numpy/scipy).

Inputs are instance label images of one shape: 0 is background, every other value is one
nucleus; ids need not be contiguous. A sparse contingency table (one entry per overlapping
(GT, prediction) pair) is built once per image, so ~2000 nuclei on 1000x1000 px take well
under a second.

Per image, the variants are (see `DEFINITIONS`):

- AJI (Kumar et al., IEEE TMI 2017): every GT nucleus takes the prediction of highest IoU
  (ties: the lowest prediction id; a prediction may be taken by several GT nuclei);
  AJI = sum of intersections / (sum of unions + area of predictions never taken). A GT nucleus
  that overlaps no prediction adds its own area to the union and takes nothing.
- AJI+ (Graham et al., HoVer-Net 2019): the same, with a one-to-one pairing that maximises the
  summed IoU (Hungarian); only pairs with IoU > 0 count as paired.
- PQ (Kirillov et al. 2019): a pair is a true positive when IoU > 0.5 (unique by construction);
  DQ = TP / (TP + FP/2 + FN/2), SQ = mean IoU of the TPs (0 when TP = 0), PQ = DQ x SQ.
- Dice: binary foreground Dice 2|P & G| / (|P| + |G|).
- Detection F1: instance centroids paired one-to-one within 12 px at 0.25 um/px (radius
  3 um / mpp px, distance <= radius), maximum number of pairs, then least total distance
  (Hungarian); F1 = 2TP / (2TP + FP + FN).
- AP50: PASCAL VOC (2010+) all-point interpolated average precision at mask IoU >= 0.5.
  Predictions in descending score order each take the GT of highest IoU; a TP if that IoU >= 0.5
  and the GT is not yet taken, else a FP. Predictions with equal scores form one threshold
  (order independent). Without scores every prediction scores 1.0 (then AP50 = P x R).
- Pixel accuracy: fraction of pixels whose foreground/background class agrees (the US-Net
  paper's segmentation metric).

A value that is undefined (e.g. no GT and no prediction) is None. Several images are summarised
two ways: `mean` (mean over images of the per-image values, undefined ones skipped) and `pooled`
(from counts summed over images: AJI = all intersections / all unions, PQ/DQ/SQ and detection F1
from summed TP/FP/FN and IoU, Dice and pixel accuracy from summed pixels, AP50 from all
predictions of all images ranked together, as in VOC).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Iterable, Mapping

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from usnet_wsi.errors import DataError

METRIC_KEYS = ("aji", "aji_plus", "pq", "dq", "sq", "dice", "det_f1", "ap50", "pixel_accuracy")

DETECTION_RADIUS_PX_AT_025 = 12.0  # px at 0.25 um/px, i.e. 3 um

DEFINITIONS = {
    "aji": "Kumar 2017: each GT takes its highest-IoU prediction (many-to-one); sum I / (sum U + "
           "area of untaken predictions); GT without overlap adds its area to U",
    "aji_plus": "Graham 2019 (HoVer-Net): as AJI with a one-to-one pairing maximising summed IoU",
    "pq": "Kirillov 2019: DQ x SQ, TP = pair with IoU > 0.5",
    "dq": "TP / (TP + FP/2 + FN/2) at IoU > 0.5",
    "sq": "mean IoU of the TP pairs (0 when there is none)",
    "dice": "binary foreground Dice 2|P&G| / (|P|+|G|)",
    "det_f1": "centroids paired one-to-one (Hungarian) within 12 px at 0.25 um/px (3 um), "
              "F1 = 2TP / (2TP+FP+FN)",
    "ap50": "PASCAL VOC all-point interpolated AP at mask IoU >= 0.5, ranked by detection score",
    "pixel_accuracy": "fraction of pixels with the right foreground/background class",
}


@dataclass(frozen=True)
class Overlap:
    """Sparse contingency table between a prediction and a GT label image.

    Instances are indexed 0..n-1 in ascending id order; `*_ids` give the original ids.
    `pair_*` list every (GT, prediction) pair that shares at least one pixel.
    """

    gt_ids: np.ndarray
    pred_ids: np.ndarray
    gt_area: np.ndarray
    pred_area: np.ndarray
    gt_centroid_rc: np.ndarray   # (n_gt, 2) float (row, col), pixel centres
    pred_centroid_rc: np.ndarray
    pair_gt: np.ndarray          # (K,) index into gt arrays
    pair_pred: np.ndarray        # (K,) index into pred arrays
    pair_inter: np.ndarray       # (K,) shared pixels
    pixels: int
    fg_both: int                 # pixels that are foreground in both images

    @property
    def pair_union(self) -> np.ndarray:
        return self.gt_area[self.pair_gt] + self.pred_area[self.pair_pred] - self.pair_inter

    @property
    def pair_iou(self) -> np.ndarray:
        return self.pair_inter / self.pair_union


@dataclass
class ImageCounts:
    """Sufficient statistics of one image (or, summed, of a dataset) for every metric."""

    n_gt: int = 0
    n_pred: int = 0
    pixels: int = 0
    fg_gt: int = 0
    fg_pred: int = 0
    fg_both: int = 0
    aji_inter: int = 0
    aji_union: int = 0
    aji_plus_inter: int = 0
    aji_plus_union: int = 0
    pq_tp: int = 0
    pq_fp: int = 0
    pq_fn: int = 0
    pq_iou_sum: float = 0.0
    det_tp: int = 0
    det_fp: int = 0
    det_fn: int = 0
    ap_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ap_is_tp: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    scored: bool = True

    def scalars(self) -> dict[str, int | float]:
        """The counts as plain JSON-ready numbers (the AP arrays left out)."""
        out = asdict(self)
        for key in ("ap_scores", "ap_is_tp", "scored"):
            out.pop(key)
        return {k: (float(v) if isinstance(v, float) else int(v)) for k, v in out.items()}


# ----------------------------------------------------------------------------- contingency table

def _check_labels(pred_labels: np.ndarray, gt_labels: np.ndarray) -> None:
    for name, arr in (("prediction", pred_labels), ("ground truth", gt_labels)):
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"{name} is not an instance label image (shape {arr.shape}, {arr.dtype})",
                            "give a 2-D integer image: 0 = background, one id per nucleus")
        if arr.size and arr.min() < 0:
            raise DataError(f"{name} label image has negative ids", "use ids >= 0; 0 is background")
    if pred_labels.shape != gt_labels.shape:
        raise DataError(f"prediction shape {pred_labels.shape} != ground truth shape {gt_labels.shape}",
                        "evaluate images of the same size (or give --region X,Y,W,H)")


def _index(flat: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """ids (ascending, no 0), per-pixel index (-1 background), areas, centroids (row, col)."""
    fg = np.flatnonzero(flat)
    ids, inv, area = np.unique(flat[fg], return_inverse=True, return_counts=True)
    index = np.full(flat.shape, -1, np.int64)
    index[fg] = inv
    centroid = np.zeros((ids.size, 2))
    if ids.size:
        centroid[:, 0] = np.bincount(inv, weights=fg // width, minlength=ids.size) / area
        centroid[:, 1] = np.bincount(inv, weights=fg % width, minlength=ids.size) / area
    return ids, index, area.astype(np.int64), centroid


def overlap_table(pred_labels: np.ndarray, gt_labels: np.ndarray) -> Overlap:
    """Build the sparse (GT, prediction) contingency table of two label images of one shape."""
    _check_labels(pred_labels, gt_labels)
    width = gt_labels.shape[1]
    gt_ids, g_idx, gt_area, gt_c = _index(np.ascontiguousarray(gt_labels).ravel(), width)
    pred_ids, p_idx, pred_area, pred_c = _index(np.ascontiguousarray(pred_labels).ravel(), width)
    both = (g_idx >= 0) & (p_idx >= 0)
    n_pred = max(pred_ids.size, 1)
    pairs, inter = np.unique(g_idx[both] * n_pred + p_idx[both], return_counts=True)
    return Overlap(gt_ids, pred_ids, gt_area, pred_area, gt_c, pred_c,
                   pair_gt=pairs // n_pred, pair_pred=pairs % n_pred,
                   pair_inter=inter.astype(np.int64), pixels=int(gt_labels.size),
                   fg_both=int(both.sum()))


# ----------------------------------------------------------------------------- matching

def _match(rows: np.ndarray, cols: np.ndarray, cost: np.ndarray, fill: float) -> np.ndarray:
    """Optimal one-to-one assignment restricted to the given edges; returns chosen edge indices.

    Solved per connected component of the (rows, cols) edge graph, which is exact because an
    assignment never links two components. Non-edges cost `fill`; assigned non-edges are dropped.
    """
    if rows.size == 0:
        return np.zeros(0, np.int64)
    r_ids, r = np.unique(rows, return_inverse=True)
    c_ids, c = np.unique(cols, return_inverse=True)
    n_r = r_ids.size
    graph = coo_matrix((np.ones(rows.size), (r, c + n_r)), shape=(n_r + c_ids.size,) * 2)
    _, comp = connected_components(graph, directed=False)
    edge_comp = comp[r]
    order = np.argsort(edge_comp, kind="stable")
    bounds = np.flatnonzero(np.diff(edge_comp[order])) + 1
    chosen = []
    for group in np.split(order, bounds):
        if group.size == 1:
            chosen.append(group)
            continue
        chosen.append(_match_component(r[group], c[group], cost[group], fill, group))
    return np.concatenate(chosen)


def _match_component(r: np.ndarray, c: np.ndarray, cost: np.ndarray, fill: float,
                     edge_index: np.ndarray) -> np.ndarray:
    ur, lr = np.unique(r, return_inverse=True)
    uc, lc = np.unique(c, return_inverse=True)
    dense = np.full((ur.size, uc.size), fill, float)
    edge_at = np.full((ur.size, uc.size), -1, np.int64)
    dense[lr, lc] = cost
    edge_at[lr, lc] = edge_index
    ri, ci = linear_sum_assignment(dense)
    picked = edge_at[ri, ci]
    return picked[picked >= 0]


# ----------------------------------------------------------------------------- per-metric counts

def _first_per_group(order: np.ndarray, group: np.ndarray) -> np.ndarray:
    """The first entry of `order` (sorted by `group` first) for each distinct group value."""
    if order.size == 0:
        return order
    g = group[order]
    return order[np.r_[True, g[1:] != g[:-1]]]


def _paired_totals(ov: Overlap, picked: np.ndarray) -> tuple[int, int]:
    """Intersections and unions of the picked pairs; GT and predictions left out of every
    picked pair add their whole area to the union."""
    inter = int(ov.pair_inter[picked].sum())
    union = int(ov.pair_union[picked].sum())
    gt_free = np.ones(ov.gt_ids.size, bool)
    gt_free[ov.pair_gt[picked]] = False
    pred_free = np.ones(ov.pred_ids.size, bool)
    pred_free[ov.pair_pred[picked]] = False
    return inter, union + int(ov.gt_area[gt_free].sum() + ov.pred_area[pred_free].sum())


def _aji_counts(ov: Overlap) -> tuple[int, int]:
    """(sum of intersections, sum of unions) of Kumar's AJI (many-to-one)."""
    # per GT: highest IoU, ties -> lowest prediction index
    best = _first_per_group(np.lexsort((ov.pair_pred, -ov.pair_iou, ov.pair_gt)), ov.pair_gt)
    return _paired_totals(ov, best)


def _aji_plus_counts(ov: Overlap) -> tuple[int, int]:
    """(sum of intersections, sum of unions) of AJI+ (one-to-one, max summed IoU)."""
    return _paired_totals(ov, _match(ov.pair_gt, ov.pair_pred, -ov.pair_iou, fill=0.0))


def _pq_counts(ov: Overlap) -> tuple[int, int, int, float]:
    """(TP, FP, FN, summed IoU of TPs) at IoU > 0.5 (such pairs are unique, no matching needed)."""
    iou = ov.pair_iou
    tp_mask = iou > 0.5
    tp = int(tp_mask.sum())
    return tp, int(ov.pred_ids.size - tp), int(ov.gt_ids.size - tp), float(iou[tp_mask].sum())


def detection_radius_px(mpp: float) -> float:
    """Detection F1 pairing radius in pixels: 12 px at 0.25 um/px (3 um), scaled by mpp."""
    if not mpp > 0:
        raise DataError(f"mpp {mpp!r} must be > 0", "give the image resolution in um/px, e.g. 0.25")
    return DETECTION_RADIUS_PX_AT_025 * 0.25 / mpp


def _detection_counts(ov: Overlap, mpp: float) -> tuple[int, int, int]:
    """(TP, FP, FN) of centroid matching within the radius (max pairs, then least distance)."""
    radius = detection_radius_px(mpp)
    n_gt, n_pred = ov.gt_ids.size, ov.pred_ids.size
    if n_gt == 0 or n_pred == 0:
        return 0, n_pred, n_gt
    near = cKDTree(ov.pred_centroid_rc).query_ball_point(ov.gt_centroid_rc, r=radius)
    rows = np.repeat(np.arange(n_gt), [len(n) for n in near])
    cols = np.fromiter((j for n in near for j in n), np.int64, count=rows.size)
    dist = np.hypot(*(ov.gt_centroid_rc[rows] - ov.pred_centroid_rc[cols]).T)
    keep = dist <= radius
    rows, cols, dist = rows[keep], cols[keep], dist[keep]
    fill = radius * (min(n_gt, n_pred) + 1) + 1.0   # any extra pair beats any distance saving
    tp = int(_match(rows, cols, dist, fill).size)
    return tp, n_pred - tp, n_gt - tp


def _score_array(ov: Overlap, pred_scores: Mapping[int, float] | None) -> np.ndarray:
    if pred_scores is None:
        return np.ones(ov.pred_ids.size)
    missing = [int(i) for i in ov.pred_ids if int(i) not in pred_scores]
    if missing:
        raise DataError(f"{len(missing)} predicted nuclei have no score (ids {missing[:5]}...)",
                        "give a score for every prediction id, or no scores at all")
    return np.array([float(pred_scores[int(i)]) for i in ov.pred_ids], float)


def _voc_matches(ov: Overlap, scores: np.ndarray) -> np.ndarray:
    """VOC greedy matching: bool TP flag per prediction (in prediction index order)."""
    iou = ov.pair_iou
    # per prediction: highest IoU, ties -> lowest GT index
    best = _first_per_group(np.lexsort((ov.pair_gt, -iou, ov.pair_pred)), ov.pair_pred)
    best_gt = np.full(ov.pred_ids.size, -1, np.int64)
    best_iou = np.zeros(ov.pred_ids.size)
    best_gt[ov.pair_pred[best]] = ov.pair_gt[best]
    best_iou[ov.pair_pred[best]] = iou[best]
    is_tp = np.zeros(ov.pred_ids.size, bool)
    taken = np.zeros(ov.gt_ids.size, bool)
    for j in np.lexsort((np.arange(scores.size), -scores)):   # by score, then prediction id
        g = best_gt[j]
        if best_iou[j] >= 0.5 and not taken[g]:
            taken[g] = is_tp[j] = True
    return is_tp


def voc_average_precision(scores: np.ndarray, is_tp: np.ndarray, n_gt: int) -> float | None:
    """VOC all-point interpolated AP from ranked detections; equal scores form one threshold.

    None when there is no GT object (recall undefined); 0.0 when there are GT but no detections.
    """
    if n_gt == 0:
        return None
    if scores.size == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    s, tp = scores[order], is_tp[order].astype(float)
    ctp, cfp = np.cumsum(tp), np.cumsum(1.0 - tp)
    last = np.r_[s[1:] != s[:-1], True]
    rec = np.r_[0.0, ctp[last] / n_gt, 1.0]
    prec = np.r_[0.0, ctp[last] / (ctp[last] + cfp[last]), 0.0]
    prec = np.maximum.accumulate(prec[::-1])[::-1]
    step = np.flatnonzero(rec[1:] != rec[:-1])
    return float(np.sum((rec[step + 1] - rec[step]) * prec[step + 1]))


# ----------------------------------------------------------------------------- counts -> metrics

def image_counts(pred_labels: np.ndarray, gt_labels: np.ndarray,
                 pred_scores: Mapping[int, float] | None = None, mpp: float = 0.25) -> ImageCounts:
    """All sufficient statistics of one image pair (see the module docstring for definitions)."""
    ov = overlap_table(pred_labels, gt_labels)
    scores = _score_array(ov, pred_scores)
    c = ImageCounts(n_gt=int(ov.gt_ids.size), n_pred=int(ov.pred_ids.size), pixels=ov.pixels,
                    fg_gt=int(ov.gt_area.sum()), fg_pred=int(ov.pred_area.sum()),
                    fg_both=ov.fg_both, scored=pred_scores is not None)
    c.aji_inter, c.aji_union = _aji_counts(ov)
    c.aji_plus_inter, c.aji_plus_union = _aji_plus_counts(ov)
    c.pq_tp, c.pq_fp, c.pq_fn, c.pq_iou_sum = _pq_counts(ov)
    c.det_tp, c.det_fp, c.det_fn = _detection_counts(ov, mpp)
    c.ap_scores, c.ap_is_tp = scores, _voc_matches(ov, scores)
    return c


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def metrics_from_counts(c: ImageCounts) -> dict[str, float | None]:
    """The nine metrics (None where undefined) from counts of one image or of a pooled dataset."""
    pq_den = c.pq_tp + 0.5 * c.pq_fp + 0.5 * c.pq_fn
    dq = _ratio(c.pq_tp, pq_den)
    sq = (c.pq_iou_sum / c.pq_tp if c.pq_tp else 0.0) if pq_den else None
    wrong = c.fg_gt + c.fg_pred - 2 * c.fg_both
    return {
        "aji": _ratio(c.aji_inter, c.aji_union),
        "aji_plus": _ratio(c.aji_plus_inter, c.aji_plus_union),
        "pq": dq * sq if dq is not None else None,
        "dq": dq,
        "sq": sq,
        "dice": _ratio(2 * c.fg_both, c.fg_gt + c.fg_pred),
        "det_f1": _ratio(2 * c.det_tp, 2 * c.det_tp + c.det_fp + c.det_fn),
        "ap50": voc_average_precision(c.ap_scores, c.ap_is_tp, c.n_gt),
        "pixel_accuracy": _ratio(c.pixels - wrong, c.pixels),
    }


def counts_notes(c: ImageCounts) -> list[str]:
    """Plain-language notes about undefined values or defaults behind these counts."""
    notes = []
    if not c.scored:
        notes.append("ap50: no detection scores were given; every prediction scored 1.0, "
                     "so AP50 equals precision x recall at IoU >= 0.5")
    if c.n_gt == 0 and c.n_pred == 0:
        notes.append("no GT and no predicted nuclei: instance metrics are undefined (null)")
    elif c.n_gt == 0:
        notes.append("no GT nuclei: AP50 is undefined (null); every prediction is a false positive")
    return notes


def evaluate_pair(pred_labels: np.ndarray, gt_labels: np.ndarray,
                  pred_scores: Mapping[int, float] | None = None, mpp: float = 0.25) -> dict:
    """Evaluate one image: the nine metric keys, plus `counts` and `notes`.

    pred_scores maps prediction id -> detection score (used by AP50 only); None means 1.0 for all.
    mpp (um/px) scales the detection-F1 radius (12 px at 0.25 um/px).
    """
    c = image_counts(pred_labels, gt_labels, pred_scores, mpp)
    return {**metrics_from_counts(c), "counts": c.scalars(), "notes": counts_notes(c)}


def pool_counts(counts: Iterable[ImageCounts]) -> ImageCounts:
    """Sum the counts of several images (AP detections are concatenated and ranked together)."""
    items = list(counts)
    total = ImageCounts()
    for f in fields(ImageCounts):
        if f.name in ("ap_scores", "ap_is_tp", "scored"):
            continue
        setattr(total, f.name, sum(getattr(c, f.name) for c in items))
    if items:
        total.ap_scores = np.concatenate([c.ap_scores for c in items])
        total.ap_is_tp = np.concatenate([c.ap_is_tp for c in items])
        total.scored = all(c.scored for c in items)
    return total


def _mean_metrics(per_image: list[dict]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in METRIC_KEYS:
        values = [m[key] for m in per_image if m[key] is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def summarise_dataset(named_counts: Mapping[str, ImageCounts]) -> dict:
    """Several images: per-image mean of each metric at top level, plus `pooled` and `per_image`.

    The mean skips images where a metric is undefined; `pooled` computes each metric once from
    counts summed over all images (see the module docstring).
    """
    per_image = {name: {**metrics_from_counts(c), "counts": c.scalars(), "notes": counts_notes(c)}
                 for name, c in named_counts.items()}
    pooled_counts = pool_counts(named_counts.values())
    pooled = {**metrics_from_counts(pooled_counts), "counts": pooled_counts.scalars()}
    notes = counts_notes(pooled_counts)
    return {**_mean_metrics(list(per_image.values())), "n_images": len(per_image),
            "pooled": pooled, "per_image": per_image, "notes": notes}


# ----------------------------------------------------------------------------- one function per metric

def aji(pred_labels: np.ndarray, gt_labels: np.ndarray) -> float | None:
    """Aggregated Jaccard Index (Kumar et al. 2017); None when both images are empty."""
    return _ratio(*_aji_counts(overlap_table(pred_labels, gt_labels)))


def aji_plus(pred_labels: np.ndarray, gt_labels: np.ndarray) -> float | None:
    """AJI+ (one-to-one pairing maximising summed IoU); None when both images are empty."""
    return _ratio(*_aji_plus_counts(overlap_table(pred_labels, gt_labels)))


def panoptic_quality(pred_labels: np.ndarray, gt_labels: np.ndarray) -> dict[str, float | None]:
    """{'pq', 'dq', 'sq'} at IoU > 0.5; all None when both images are empty."""
    m = metrics_from_counts(image_counts(pred_labels, gt_labels))
    return {k: m[k] for k in ("pq", "dq", "sq")}


def dice(pred_labels: np.ndarray, gt_labels: np.ndarray) -> float | None:
    """Binary foreground Dice; None when neither image has foreground."""
    _check_labels(pred_labels, gt_labels)
    p, g = pred_labels > 0, gt_labels > 0
    return _ratio(2 * int((p & g).sum()), int(p.sum() + g.sum()))


def detection_f1(pred_labels: np.ndarray, gt_labels: np.ndarray, mpp: float = 0.25) -> float | None:
    """Centroid detection F1 (one-to-one within 12 px at 0.25 um/px); None when both are empty."""
    tp, fp, fn = _detection_counts(overlap_table(pred_labels, gt_labels), mpp)
    return _ratio(2 * tp, 2 * tp + fp + fn)


def ap50(pred_labels: np.ndarray, gt_labels: np.ndarray,
         pred_scores: Mapping[int, float] | None = None) -> float | None:
    """VOC all-point interpolated AP at mask IoU >= 0.5; None without GT nuclei."""
    ov = overlap_table(pred_labels, gt_labels)
    scores = _score_array(ov, pred_scores)
    return voc_average_precision(scores, _voc_matches(ov, scores), int(ov.gt_ids.size))


def pixel_accuracy(pred_labels: np.ndarray, gt_labels: np.ndarray) -> float | None:
    """Fraction of pixels whose foreground/background class agrees; None for an empty image."""
    _check_labels(pred_labels, gt_labels)
    return _ratio(int(((pred_labels > 0) == (gt_labels > 0)).sum()), gt_labels.size)
