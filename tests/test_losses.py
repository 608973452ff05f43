"""Tests of losses.py against torchvision's focal loss and hand computations on tiny tensors."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from conftest import assert_close
from losses import count_masks, dice_loss, focal_loss, one_hot_targets, otseg_loss, sigmoid_focal_loss


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_sigmoid_focal_matches_torchvision():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5) * 3
    targets = (torch.rand(2, 3, 4, 5) > 0.5).float()
    expected = torchvision.ops.sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2, reduction="none")
    assert_close(sigmoid_focal_loss(logits, targets), expected, atol=1e-6, rtol=1e-5)
    assert_close(sigmoid_focal_loss(logits, targets.bool()), expected, atol=1e-6, rtol=1e-5,
                 what="bool targets are accepted")


def test_focal_loss_reduction_matches_torchvision():
    torch.manual_seed(1)
    B, K, H, W = 2, 4, 3, 5
    logits = torch.randn(B, K, H, W)
    labels = torch.randint(0, K, (B, H, W))
    labels[0, 0] = 255
    targets = torch.zeros(B, K, H, W)
    for b in range(B):  # one-hot by hand; 255 pixels stay all-zero
        for i in range(H):
            for j in range(W):
                if labels[b, i, j] != 255:
                    targets[b, labels[b, i, j], i, j] = 1
    per_element = torchvision.ops.sigmoid_focal_loss(logits, targets, reduction="none")
    expected = per_element.mean(dim=(2, 3)).sum() / 3.0  # mean over pixels, sum over B*K maps, / num_masks
    assert_close(focal_loss(logits, labels, num_masks=3.0), expected, atol=1e-6, rtol=1e-5)


def test_ignored_pixels_are_negatives_for_every_class():
    # One image, K=2, two pixels, both labelled 255: each element is a negative, FL = 0.75 p^2 (-log(1-p)).
    logits = torch.tensor([[[[0.5, -1.0]], [[2.0, 0.0]]]])  # (1, 2, 1, 2)
    labels = torch.full((1, 1, 2), 255)
    def fl_negative(x):
        p = sigmoid(x)
        return 0.75 * p ** 2 * -math.log(1 - p)
    expected = (fl_negative(0.5) + fl_negative(-1.0)) / 2 + (fl_negative(2.0) + fl_negative(0.0)) / 2
    assert_close(focal_loss(logits, labels, num_masks=1.0), expected, atol=1e-6, rtol=1e-5)
    assert not one_hot_targets(labels, 2).any()
    # No class is present: no dice term, no mask counted; the normaliser is clamped to 1.
    assert count_masks(labels, 2).item() == 0
    assert_close(dice_loss(logits, labels, num_masks=count_masks(labels, 2)), 0.0, atol=1e-6, rtol=1e-5)
    assert_close(focal_loss(logits, labels, num_masks=0.0), expected, atol=1e-6, rtol=1e-5)


def test_dice_only_over_present_classes_by_hand():
    # One image, K=3, three pixels labelled [0, 255, 0]: only class 0 is present.
    logits = torch.tensor([[[[1.0, -2.0, 0.5]], [[3.0, 3.0, 3.0]], [[0.0, 1.0, -1.0]]]])  # (1, 3, 1, 3)
    labels = torch.tensor([[[0, 255, 0]]])
    p = [sigmoid(1.0), sigmoid(-2.0), sigmoid(0.5)]
    y = [1, 0, 1]
    expected = 1 - (2 * (p[0] + p[2]) + 1) / (sum(p) + sum(y) + 1)
    assert_close(dice_loss(logits, labels, num_masks=1.0), expected, atol=1e-6, rtol=1e-5)
    assert_close(dice_loss(logits, labels, num_masks=2.0), expected / 2, atol=1e-6, rtol=1e-5)


def test_count_masks():
    labels = torch.tensor([[[0, 0], [255, 1]],  # image 0: classes 0, 1
                           [[2, 2], [255, 255]],  # image 1: class 2
                           [[255, 255], [255, 255]]])  # image 2: nothing
    assert count_masks(labels, 3).item() == 3
    assert count_masks(labels, 3).dtype == torch.float32


def reference_terms(logits, labels, num_masks):
    """Focal by torchvision and dice from its definition, on one-hot targets made by F.one_hot
    (255 -> an extra class that is then dropped): (focal, dice), each / num_masks."""
    K = logits.shape[1]
    targets = F.one_hot(labels.where(labels != 255, K), K + 1)[..., :K].permute(0, 3, 1, 2).float()  # (B, K, H, W)
    focal = torchvision.ops.sigmoid_focal_loss(logits, targets, reduction="none").mean(dim=(2, 3)).sum()
    p = logits.sigmoid()
    dice = 1 - (2 * (p * targets).sum(dim=(2, 3)) + 1) / (p.sum(dim=(2, 3)) + targets.sum(dim=(2, 3)) + 1)  # (B, K)
    present = targets.amax(dim=(2, 3)) > 0
    return focal / num_masks, dice[present].sum() / num_masks


def test_otseg_loss_weights_and_gradients():
    torch.manual_seed(2)
    B, K, H, W = 2, 3, 4, 4
    labels = torch.randint(0, K, (B, H, W))
    labels[1, :, :2] = 255
    labels[0][labels[0] == 2] = 1  # class 2 absent from image 0: no dice term for that pair
    decoder = torch.randn(B, K, H, W, requires_grad=True)
    score = torch.randn(B, K, H, W, requires_grad=True)
    num_masks = count_masks(labels, K)
    losses = otseg_loss(dict(decoder=decoder, score=score), labels, num_masks)
    expected = {}
    for name, logits in (("decoder", decoder), ("score", score)):
        expected[f"{name}_focal"], expected[f"{name}_dice"] = reference_terms(logits, labels, num_masks.item())
    expected["total"] = 100 * (expected["decoder_focal"] + expected["score_focal"]) \
        + expected["decoder_dice"] + expected["score_dice"]  # paper Eq. 18 with the release's weights 100, 1
    assert set(losses) == set(expected)
    for name in expected:
        assert_close(losses[name].detach(), expected[name].detach(), atol=1e-6, rtol=1e-5)
    losses["total"].backward()
    assert decoder.grad.abs().sum() > 0 and score.grad.abs().sum() > 0


def test_perfect_prediction_has_near_zero_loss():
    labels = torch.tensor([[[0, 1], [1, 255]]])
    logits = torch.where(one_hot_targets(labels, 2), 20.0, -20.0)
    losses = otseg_loss(dict(decoder=logits, score=logits), labels, count_masks(labels, 2))
    # dice keeps its +1 smoothing: 1 - (2*|y| + 1)/(2*|y| + 1) = 0 up to sigmoid(20) != 1
    assert losses["total"].item() == pytest.approx(0.0, abs=1e-6)


def test_micro_batch_sums_divided_once_equal_the_whole_batch():
    """train.py's way (losses.py's docstring): otseg_loss with num_masks = 1 on each micro-batch, summed,
    then divided once by the global pair count, is the whole batch's loss with num_masks = that count
    (it holds because every term is a sum over maps, never a mean over the batch)."""
    torch.manual_seed(3)
    B, K, H, W = 4, 3, 4, 5
    labels = torch.randint(0, K, (B, H, W))
    labels[2] = 255  # an image with no pair at all
    outputs = dict(decoder=torch.randn(B, K, H, W), score=torch.randn(B, K, H, W))
    count = count_masks(labels, K)
    whole = otseg_loss(outputs, labels, count)["total"]
    micro = sum(otseg_loss({k: v[i:i + 2] for k, v in outputs.items()}, labels[i:i + 2], 1.0)["total"]
                for i in (0, 2))
    assert count.item() > 2
    assert_close(micro / count, whole, rtol=1e-6, what="micro-batch sums / global count vs the whole batch")
