"""Metric definitions pinned on hand-made label images with hand-computed values.

Each case's expected numbers are worked out in the comments from the definitions in the issue
(AJI: Kumar 2017; AJI+: one-to-one; PQ at IoU > 0.5; VOC AP50; 12 px at 0.25 um/px).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from usnet_wsi import metrics as M
from usnet_wsi.errors import DataError


def relabel(labels: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    out = np.zeros(labels.shape, np.uint32)
    for old, new in mapping.items():
        out[labels == old] = new
    return out


# --------------------------------------------------------------------------- hand-made cases

def case_one_pred_two_gt():
    """GT: two 2x4 blocks side by side; one 2x8 prediction covers both."""
    gt = np.zeros((4, 10), np.uint32)
    gt[0:2, 0:4] = 1
    gt[0:2, 4:8] = 2
    pred = np.zeros_like(gt)
    pred[0:2, 0:8] = 1
    return pred, gt


def case_touching():
    """Two touching 4x5 GT nuclei; the prediction moves their border one column right."""
    gt = np.zeros((4, 10), np.uint32)
    gt[:, 0:5] = 1
    gt[:, 5:10] = 2
    pred = np.zeros_like(gt)
    pred[:, 0:6] = 1       # 24 px: I(G1)=20 -> IoU 20/24; I(G2)=4 -> IoU 4/40
    pred[:, 6:10] = 2      # 16 px: I(G2)=16 -> IoU 16/20
    return pred, gt


def case_unmatched():
    """40x40: G1 half-overlapped by P1; G2 overlaps nothing; P2 overlaps nothing (far away)."""
    gt = np.zeros((40, 40), np.uint32)
    gt[0:2, 0:2] = 1          # area 4
    gt[30:32, 30:33] = 2      # area 6
    pred = np.zeros_like(gt)
    pred[1:3, 0:2] = 1        # area 4, I(G1) = 2, U = 6
    pred[0, 30:33] = 2        # area 3
    return pred, gt


def test_one_prediction_covering_two_gt():
    pred, gt = case_one_pred_two_gt()
    r = M.evaluate_pair(pred, gt, {1: 0.9})
    # AJI: G1 and G2 both take P1 (IoU 8/16 each): (8 + 8) / (16 + 16)
    assert r["aji"] == pytest.approx(16 / 32)
    # AJI+: P1 pairs with one GT only (I 8, U 16); the other GT adds its 8 px to the union
    assert r["aji_plus"] == pytest.approx(8 / 24)
    # PQ: IoU is exactly 0.5, not > 0.5: TP 0, FP 1, FN 2
    assert (r["pq"], r["dq"], r["sq"]) == (0.0, 0.0, 0.0)
    assert r["dice"] == 1.0 and r["pixel_accuracy"] == 1.0
    # centroids (0.5, 1.5), (0.5, 5.5) vs (0.5, 3.5): one pair only -> TP 1, FN 1
    assert r["det_f1"] == pytest.approx(2 / 3)
    # VOC: P1's best GT (tie -> G1) has IoU 0.5 >= 0.5 -> TP; recall 1/2 at precision 1
    assert r["ap50"] == pytest.approx(0.5)


def test_touching_nuclei():
    pred, gt = case_touching()
    r = M.evaluate_pair(pred, gt, {1: 0.9, 2: 0.8})
    assert r["aji"] == pytest.approx((20 + 16) / (24 + 20))
    assert r["aji_plus"] == pytest.approx((20 + 16) / (24 + 20))
    sq = (20 / 24 + 16 / 20) / 2
    assert r["dq"] == 1.0
    assert r["sq"] == pytest.approx(sq)
    assert r["pq"] == pytest.approx(sq)
    assert r["det_f1"] == 1.0 and r["ap50"] == 1.0
    assert r["counts"]["pq_tp"] == 2 and r["counts"]["n_gt"] == 2


def test_gt_without_overlap_and_untaken_prediction():
    pred, gt = case_unmatched()
    r = M.evaluate_pair(pred, gt, {1: 0.9, 2: 0.8})
    # C = 2; U = 6 (G1 u P1) + 6 (G2, no overlap) + 3 (P2, never taken)
    assert r["aji"] == pytest.approx(2 / 15)
    assert r["aji_plus"] == pytest.approx(2 / 15)
    assert (r["pq"], r["dq"], r["sq"]) == (0.0, 0.0, 0.0)     # IoU 1/3: TP 0, FP 2, FN 2
    assert r["dice"] == pytest.approx(2 * 2 / (10 + 7))
    assert r["pixel_accuracy"] == pytest.approx((1600 - (10 + 7 - 4)) / 1600)
    # P1-G1 centroids 1 px apart; P2 and G2 are ~30 px from anything: TP 1, FP 1, FN 1
    assert r["det_f1"] == pytest.approx(0.5)
    assert r["ap50"] == 0.0


def test_aji_takes_highest_iou_not_largest_intersection():
    gt = np.zeros((3, 12), np.uint32)
    gt[0, 0:10] = 1                      # area 10
    pred = np.zeros_like(gt)
    pred[0, 0:6] = 1
    pred[1, 0:10] = 1                    # area 16: I 6, U 20, IoU 0.3
    pred[0, 6:10] = 2                    # area 4:  I 4, U 10, IoU 0.4
    # G1 takes P2 (I 4, U 10); P1 is never taken and adds 16
    assert M.aji(pred, gt) == pytest.approx(4 / 26)
    assert M.aji_plus(pred, gt) == pytest.approx(4 / 26)


def test_aji_plus_maximises_summed_iou():
    gt = np.zeros((2, 12), np.uint32)
    gt[0, 0:4] = 1            # G1: 4 px
    gt[0, 4:12] = 2           # G2: 8 px
    pred = np.zeros_like(gt)
    pred[0, 2:10] = 1         # P1: I(G1)=2 (IoU 0.2), I(G2)=6 (IoU 0.6)
    pred[0, 0:2] = 2          # P2: I(G1)=2 (IoU 0.5)
    # one-to-one optimum: P2-G1 (I 2, U 4) + P1-G2 (I 6, U 10); nothing left unpaired
    assert M.aji_plus(pred, gt) == pytest.approx((2 + 6) / (4 + 10))
    # AJI: G1 -> P2 (0.5 > 0.2), G2 -> P1: the same pairs here
    assert M.aji(pred, gt) == pytest.approx((2 + 6) / (4 + 10))


@pytest.mark.parametrize("case", [case_one_pred_two_gt, case_touching, case_unmatched])
def test_non_contiguous_ids_give_the_same_values(case):
    pred, gt = case()
    base = M.evaluate_pair(pred, gt)
    gt2 = relabel(gt, {1: 65000, 2: 7})
    pred2 = relabel(pred, {1: 2**31 + 5, 2: 3})
    other = M.evaluate_pair(pred2, gt2)
    for key in M.METRIC_KEYS:
        assert other[key] == pytest.approx(base[key]), key


def test_uint16_and_int64_inputs_accepted():
    pred, gt = case_touching()
    r = M.evaluate_pair(pred.astype(np.int64), gt.astype(np.uint16))
    assert r["aji"] == pytest.approx(36 / 44)


def test_empty_gt():
    gt = np.zeros((10, 10), np.uint32)
    pred = np.zeros_like(gt)
    pred[0:2, 0:2] = 4
    pred[5, 5:8] = 9
    r = M.evaluate_pair(pred, gt)
    assert r["aji"] == 0.0 and r["aji_plus"] == 0.0            # 0 / (4 + 3)
    assert (r["pq"], r["dq"], r["sq"]) == (0.0, 0.0, 0.0)      # TP 0, FP 2, FN 0
    assert r["dice"] == 0.0 and r["det_f1"] == 0.0
    assert r["ap50"] is None                                   # recall undefined without GT
    assert r["pixel_accuracy"] == pytest.approx(93 / 100)
    assert any("no GT nuclei" in n for n in r["notes"])


def test_empty_prediction():
    gt = np.zeros((10, 10), np.uint32)
    gt[0:2, 0:2] = 1
    gt[5:7, 5:8] = 3
    r = M.evaluate_pair(np.zeros_like(gt), gt)
    assert r["aji"] == 0.0 and r["aji_plus"] == 0.0            # 0 / (4 + 6)
    assert (r["pq"], r["dq"], r["sq"]) == (0.0, 0.0, 0.0)
    assert r["dice"] == 0.0 and r["det_f1"] == 0.0 and r["ap50"] == 0.0
    assert r["pixel_accuracy"] == pytest.approx(90 / 100)


def test_both_empty_is_undefined_except_pixel_accuracy():
    empty = np.zeros((5, 5), np.uint32)
    r = M.evaluate_pair(empty, empty)
    for key in ("aji", "aji_plus", "pq", "dq", "sq", "dice", "det_f1", "ap50"):
        assert r[key] is None, key
    assert r["pixel_accuracy"] == 1.0


def test_perfect_prediction_scores_one():
    _, gt = case_touching()
    r = M.evaluate_pair(relabel(gt, {1: 10, 2: 20}), gt)
    for key in M.METRIC_KEYS:
        assert r[key] == 1.0, key


def test_an_instance_in_two_pieces_is_one_nucleus():
    gt = np.zeros((4, 10), np.uint32)
    gt[0, 0:2] = 1
    gt[0, 8:10] = 1
    pred = np.zeros_like(gt)
    pred[0, 0:2] = 5
    assert M.aji(pred, gt) == pytest.approx(2 / 4)


# --------------------------------------------------------------------------- detection F1

def dots(width: int, centres_col: list[int], row: int = 5) -> np.ndarray:
    """3x3 squares centred at (row, col), ids 1..n."""
    lab = np.zeros((11, width), np.uint32)
    for i, c in enumerate(centres_col, start=1):
        lab[row - 1: row + 2, c - 1: c + 2] = i
    return lab


def test_detection_pairs_are_one_to_one_and_maximal():
    # distances: p1-g1 5, p1-g2 11, p2-g1 9, p2-g2 25 (> 12). Greedy nearest-first would take
    # p1-g1 and leave p2 unmatched; the Hungarian pairing finds p1-g2 and p2-g1.
    gt = dots(50, [20, 36])
    pred = dots(50, [25, 11])
    assert M.detection_f1(pred, gt, mpp=0.25) == 1.0


def test_detection_radius_is_inclusive_and_scales_with_mpp():
    gt = dots(40, [5])
    assert M.detection_f1(dots(40, [17]), gt, mpp=0.25) == 1.0     # 12 px: on the radius
    assert M.detection_f1(dots(40, [18]), gt, mpp=0.25) == 0.0     # 13 px
    assert M.detection_f1(dots(40, [11]), gt, mpp=0.5) == 1.0      # 6 px = 3 um at 0.5 um/px
    assert M.detection_f1(dots(40, [12]), gt, mpp=0.5) == 0.0
    assert M.detection_radius_px(0.2527) == pytest.approx(3.0 / 0.2527)


def test_detection_identical_centroids_match():
    gt = dots(20, [5, 12])
    assert M.detection_f1(relabel(gt, {1: 2, 2: 1}), gt) == 1.0


# --------------------------------------------------------------------------- AP50

def three_detections():
    """GT G1, G2; A matches G1, B is a false positive, C matches G2."""
    gt = np.zeros((4, 20), np.uint32)
    gt[0:2, 0:2] = 1
    gt[0:2, 10:12] = 2
    pred = np.zeros_like(gt)
    pred[0:2, 0:2] = 1      # A
    pred[3, 5:7] = 2        # B
    pred[0:2, 10:12] = 3    # C
    return pred, gt


def test_ap50_voc_all_point_interpolation():
    pred, gt = three_detections()
    # ranks A (TP), B (FP), C (TP): (R, P) = (.5, 1), (.5, .5), (1, 2/3)
    # interpolated: P(R<=.5) = 1, P(.5<R<=1) = 2/3 -> AP = .5 * 1 + .5 * 2/3
    assert M.ap50(pred, gt, {1: 0.9, 2: 0.8, 3: 0.7}) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # B ranked first: (0, 0), (.5, .5), (1, 2/3) -> AP = .5 * 2/3 + .5 * 2/3
    assert M.ap50(pred, gt, {1: 0.5, 2: 0.9, 3: 0.4}) == pytest.approx(2 / 3)


def test_ap50_without_scores_is_precision_times_recall_and_noted():
    pred, gt = three_detections()
    r = M.evaluate_pair(pred, gt, None)
    assert r["ap50"] == pytest.approx(1.0 * (2 / 3))    # R = 1, P = 2/3 at the single threshold
    assert any("no detection scores" in n for n in r["notes"])


def test_ap50_iou_exactly_half_counts_but_pq_does_not():
    gt = np.zeros((2, 8), np.uint32)
    gt[0:2, 0:4] = 1                       # 8 px
    pred = np.zeros_like(gt)
    pred[0:2, 0:2] = 1                     # left half: IoU 4/8 = 0.5
    pred[0:2, 2:4] = 2                     # right half: IoU 0.5, but G1 is taken -> FP
    r = M.evaluate_pair(pred, gt, {1: 0.9, 2: 0.6})
    assert r["ap50"] == 1.0                # (R, P) = (1, 1), (1, .5)
    assert r["pq"] == 0.0 and r["counts"]["pq_fp"] == 2


def test_missing_score_is_an_error():
    pred, gt = three_detections()
    with pytest.raises(DataError, match="no score"):
        M.evaluate_pair(pred, gt, {1: 0.9})


def test_voc_ap_ties_form_one_threshold():
    scores = np.array([0.5, 0.5])
    assert M.voc_average_precision(scores, np.array([True, False]), 1) == 0.5
    assert M.voc_average_precision(scores, np.array([False, True]), 1) == 0.5


# --------------------------------------------------------------------------- pooled vs mean

def test_dataset_mean_and_pooled():
    p1, g1 = case_touching()
    p2, g2 = case_unmatched()
    counts = {"a": M.image_counts(p1, g1, {1: 0.9, 2: 0.8}),
              "b": M.image_counts(p2, g2, {1: 0.95, 2: 0.5})}
    out = M.summarise_dataset(counts)
    assert out["n_images"] == 2 and set(out["per_image"]) == {"a", "b"}
    assert out["aji"] == pytest.approx((36 / 44 + 2 / 15) / 2)
    assert out["pooled"]["aji"] == pytest.approx((36 + 2) / (44 + 15))
    sq = (20 / 24 + 16 / 20) / 2                  # TP 2, FP 2, FN 2 summed
    assert out["pooled"]["dq"] == pytest.approx(2 / (2 + 1 + 1))
    assert out["pooled"]["sq"] == pytest.approx(sq)
    assert out["pooled"]["pq"] == pytest.approx(0.5 * sq)
    # all 4 detections ranked together, 4 GT: .95 FP, .9 TP, .8 TP, .5 FP -> AP = .5 * 2/3
    assert out["pooled"]["ap50"] == pytest.approx(1 / 3)
    assert out["pooled"]["det_f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert out["pixel_accuracy"] == pytest.approx((1.0 + (1600 - 13) / 1600) / 2)


def test_mean_skips_undefined_images():
    p1, g1 = case_touching()
    empty = np.zeros((3, 3), np.uint32)
    out = M.summarise_dataset({"a": M.image_counts(p1, g1), "e": M.image_counts(empty, empty)})
    assert out["aji"] == pytest.approx(36 / 44)
    assert out["per_image"]["e"]["aji"] is None


# --------------------------------------------------------------------------- bad input

def test_shape_mismatch_is_a_data_error():
    with pytest.raises(DataError, match="shape"):
        M.evaluate_pair(np.zeros((4, 4), np.uint32), np.zeros((4, 5), np.uint32))


@pytest.mark.parametrize("bad", [np.zeros((4, 4), float), np.zeros((4, 4, 3), np.uint8),
                                 -np.ones((4, 4), np.int32)])
def test_non_instance_maps_are_data_errors(bad):
    with pytest.raises(DataError):
        M.evaluate_pair(bad, np.zeros((4, 4), np.uint32))


# --------------------------------------------------------------------------- against brute force

def brute_force(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Dense, per-pair reference (every pair by full-image masks) of AJI, AJI+ and PQ."""
    g_ids = [i for i in np.unique(gt) if i]
    p_ids = [j for j in np.unique(pred) if j]
    inter = np.array([[np.sum((gt == i) & (pred == j)) for j in p_ids] for i in g_ids]).reshape(len(g_ids), len(p_ids))
    union = np.array([[np.sum((gt == i) | (pred == j)) for j in p_ids] for i in g_ids]).reshape(len(g_ids), len(p_ids))
    iou = inter / np.maximum(union, 1)
    g_area = np.array([np.sum(gt == i) for i in g_ids])
    p_area = np.array([np.sum(pred == j) for j in p_ids])
    c = u = 0
    taken = set()
    for a in range(len(g_ids)):
        if len(p_ids) and iou[a].max() > 0:
            b = int(np.argmax(iou[a]))
            c, u = c + inter[a, b], u + union[a, b]
            taken.add(b)
        else:
            u += g_area[a]
    u += sum(p_area[b] for b in range(len(p_ids)) if b not in taken)
    rows, cols = linear_sum_assignment(-iou) if iou.size else (np.zeros(0, int), np.zeros(0, int))
    keep = iou[rows, cols] > 0
    rows, cols = rows[keep], cols[keep]
    c2 = inter[rows, cols].sum()
    u2 = union[rows, cols].sum() + np.delete(g_area, rows).sum() + np.delete(p_area, cols).sum()
    tp = int((iou > 0.5).sum())
    return {"aji": c / u if u else None, "aji_plus": c2 / u2 if u2 else None,
            "tp": tp, "iou_sum": iou[iou > 0.5].sum()}


def random_labels(draw, shape=(16, 16)) -> np.ndarray:
    lab = np.zeros(shape, np.uint32)
    for _ in range(draw(st.integers(0, 6))):
        r, c = draw(st.integers(0, shape[0] - 1)), draw(st.integers(0, shape[1] - 1))
        h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        lab[r: r + h, c: c + w] = draw(st.sampled_from([1, 2, 3, 5, 8, 13, 300, 70000]))
    return lab


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_matches_brute_force_reference(data):
    pred = random_labels(data.draw)
    gt = random_labels(data.draw)
    ref = brute_force(pred, gt)
    c = M.image_counts(pred, gt)
    m = M.metrics_from_counts(c)
    for key in ("aji", "aji_plus"):
        if ref[key] is None:
            assert m[key] is None
        else:
            assert m[key] == pytest.approx(ref[key]), key
    assert c.pq_tp == ref["tp"] and c.pq_iou_sum == pytest.approx(ref["iou_sum"])
