import math

import numpy as np
import pytest
import torch

from mlcl.evaluate import confusion_matrix, iou_from_confusion, sliding_window_logits


def test_confusion_matrix_by_hand():
    gt = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 2]])
    cm = confusion_matrix(pred, gt, num_classes=3)
    expected = torch.tensor([[1, 1, 0],   # gt 0: one right, one predicted as 1
                             [0, 2, 0],   # gt 1: both right
                             [1, 0, 0]])  # gt 2: predicted 0; the 255 pixel is ignored
    assert torch.equal(cm, expected)
    miou, iou = iou_from_confusion(cm)
    # class 0: TP 1, FP 1 (gt2->0), FN 1 (0->1) = 1/3; class 1: 2/(2+1) ; class 2: 0/1
    assert iou == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert miou == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)


def test_absent_class_is_left_out_of_the_mean():
    cm = torch.tensor([[4, 0, 0], [0, 2, 0], [0, 0, 0]])
    miou, iou = iou_from_confusion(cm)
    assert math.isnan(iou[2]) and miou == pytest.approx(1.0)


def test_confusion_matrix_random_against_loop():
    rng = np.random.default_rng(0)
    k = 5
    gt = rng.integers(0, k, size=(2, 7, 9))
    gt[0, 0, :4] = 255
    pred = rng.integers(0, k, size=(2, 7, 9))
    slow = np.zeros((k, k), dtype=np.int64)
    for g, p in zip(gt.ravel(), pred.ravel()):
        if g != 255:
            slow[g, p] += 1
    fast = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt), k)
    assert np.array_equal(fast.numpy(), slow)


def test_sliding_window_covers_every_pixel_and_any_class_count():
    calls = []

    def model(x):  # a "model" whose scores are the mean colour, for any class count
        calls.append(tuple(x.shape[-2:]))
        return x.mean(1, keepdim=True).expand(-1, 11, -1, -1) * torch.arange(11.).view(1, -1, 1, 1)

    x = torch.rand(1, 3, 20, 45)
    probs = sliding_window_logits(model, x, num_classes=11, window=16, stride=10)
    assert probs.shape == (1, 11, 20, 45)
    assert torch.allclose(probs.sum(1), torch.ones(1, 20, 45), atol=1e-5)
    assert set(calls) == {(16, 16)}
    small = sliding_window_logits(model, torch.rand(1, 3, 8, 8), 11, window=16, stride=10)
    assert small.shape == (1, 11, 8, 8)
