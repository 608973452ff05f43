"""losses.py -- OTSeg's training losses: sigmoid focal + dice on both outputs (paper Sec. 4.3, Eq. 18).

    L_seg = 100 * L_focal + 1 * L_dice,        L_total = L_seg(decoder D) + L_seg(score map S)

The paper names the losses; the numbers come from the conventions of the authors' release
(ZegCLIP's: the release's `models/losses/criterion.py` and its configs, e.g.
`configs/voc12/vpt_seg_zero_vit-b_512x512_20k_12_10.py`), which this file follows:
- targets are one-hot over the K output channels; a pixel labelled 255 gets an all-zero target, so it
  is a negative for every class (background, padding and, when inductive, unseen pixels alike);
- focal (alpha 0.25, gamma 2) over all K channels and all pixels: mean over pixels, summed over the
  B*K maps, divided by num_masks;
- dice only over the (image, class) pairs present in the label map, summed, divided by num_masks.

The normaliser num_masks is the number of (image, present class) pairs in the *global* batch. In the
release (its `models/losses/criterion.py`, DETR's convention) each of the P processes all-reduces its
count, divides it by P, clamps it to at least 1 and divides its own losses by that; DDP then averages
the gradients over the P processes. A step's gradient is therefore

    grad(sum over the global batch of the weighted focal and dice terms) / max(global count, P).

`train.py` (`train_step`) computes exactly this, for any number of micro-batches: it calls
`otseg_loss` with num_masks = 1.0 (plain sums), sums the gradients over its micro-batches and,
all-reduced, over the processes, together with the counts (`count_masks`), and divides them once by
max(global count, P); the losses it logs are divided the same way. With one process and one batch
that is `otseg_loss(outputs, labels, count_masks(labels, K).clamp(min=1))`.

Notation: B batch, K classes, H x W pixels of the label map. Run `python losses.py` for a demo.
"""
import torch
import torch.nn.functional as F

IGNORE_INDEX = 255  # label value that is a negative for every class (the release's `criterion.py`)


# ----------------------------------------------------------------------------------------------
# Helpers: one-hot targets with the 255 convention
# ----------------------------------------------------------------------------------------------

def one_hot_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """labels (B, H, W) in {0..K-1, 255} -> bool (B, K, H, W); a 255 pixel is False in every channel.

    Kept boolean (1 byte per element): losses convert to float only where they need it.
    """
    classes = torch.arange(num_classes, device=labels.device)
    return labels[:, None] == classes[None, :, None, None]  # (B, K, H, W)


def present_classes(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """bool (B, K): which classes occur in each label map (255 and other values >= K are ignored)."""
    flat = labels.flatten(1).clamp(min=0, max=num_classes)  # (B, H*W); ignored pixels -> column K
    hit = torch.zeros(labels.shape[0], num_classes + 1, dtype=torch.bool, device=labels.device)
    hit.scatter_(1, flat, True)  # (B, K+1)
    return hit[:, :num_classes]  # (B, K)


def count_masks(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Number of (image, present class) pairs in this process's batch, as a float tensor.

    Across processes and micro-batches the count is summed; the module docstring says how it divides.
    """
    return present_classes(labels, num_classes).sum().float()


# ----------------------------------------------------------------------------------------------
# The two losses
# ----------------------------------------------------------------------------------------------

def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Elementwise sigmoid focal loss (Lin et al. 2017), torchvision's formula; same shape as logits.

    FL = alpha_t * (1 - p_t)^gamma * BCE(logits, targets), p_t = p if target else 1 - p.
    """
    targets = targets.to(logits.dtype)
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * (1 - p_t) ** gamma * ce


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, num_masks: float | torch.Tensor,
               alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """logits (B, K, H, W), labels (B, H, W) -> scalar: mean over pixels, sum over maps, / num_masks."""
    logits = logits.float()  # the release trains in fp32; keep the loss there under autocast too
    targets = one_hot_targets(labels, logits.shape[1])  # (B, K, H, W) bool
    loss = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma)  # (B, K, H, W)
    return loss.mean(dim=(2, 3)).sum() / _clamp_masks(num_masks)


def dice_loss(logits: torch.Tensor, labels: torch.Tensor,
              num_masks: float | torch.Tensor) -> torch.Tensor:
    """Dice loss over the (image, present class) pairs only, summed, / num_masks.

    Per pair: 1 - (2 * sum(p * y) + 1) / (sum(p) + sum(y) + 1), p = sigmoid(logits), sums over pixels.
    """
    logits = logits.float()
    num_classes = logits.shape[1]
    p = torch.sigmoid(logits)  # (B, K, H, W)
    targets = one_hot_targets(labels, num_classes)  # (B, K, H, W) bool
    overlap = (p * targets).sum(dim=(2, 3))  # (B, K)
    area_p = p.sum(dim=(2, 3))  # (B, K)
    area_y = targets.sum(dim=(2, 3)).float()  # (B, K)
    loss = 1 - (2 * overlap + 1) / (area_p + area_y + 1)  # (B, K)
    present = area_y > 0  # (B, K): the release builds targets only for the classes in the image
    return (loss * present).sum() / _clamp_masks(num_masks)  # a product, not loss[present]: no host sync


def _clamp_masks(num_masks: float | torch.Tensor) -> float | torch.Tensor:
    """At least 1, as in the release (an image of only 255 pixels must not divide by zero)."""
    if isinstance(num_masks, torch.Tensor):
        return num_masks.clamp(min=1)
    return max(float(num_masks), 1.0)


# ----------------------------------------------------------------------------------------------
# OTSeg's total loss (Eq. 18): the same focal + dice on the decoder output and on the score map
# ----------------------------------------------------------------------------------------------

def otseg_loss(outputs: dict[str, torch.Tensor], labels: torch.Tensor,
               num_masks: float | torch.Tensor, focal_weight: float = 100.0,
               dice_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """outputs: dict(decoder=(B, K, H, W), score=(B, K, H, W)) logits at label resolution.

    Returns the unweighted terms 'decoder_focal', 'decoder_dice', 'score_focal', 'score_dice' and
    'total' = sum over both outputs of focal_weight * focal + dice_weight * dice (the release's
    configs: mask_weight 100, dice_weight 1).
    """
    losses = {}
    total = 0.0
    for name in ("decoder", "score"):
        focal = focal_loss(outputs[name], labels, num_masks)
        dice = dice_loss(outputs[name], labels, num_masks)
        losses[f"{name}_focal"] = focal
        losses[f"{name}_dice"] = dice
        total = total + focal_weight * focal + dice_weight * dice
    losses["total"] = total
    return losses


if __name__ == "__main__":
    torch.manual_seed(0)
    B, K, H, W = 2, 3, 4, 5
    labels = torch.randint(0, K, (B, H, W))
    labels[0, :2] = IGNORE_INDEX  # a band of ignored pixels: negatives for every class
    labels[1][labels[1] == 2] = 1  # class 2 absent from image 1: no dice term for that pair
    print("labels:\n", labels)
    num_masks = count_masks(labels, K).clamp(min=1)
    print("present (image, class) pairs:\n", present_classes(labels, K), "-> num_masks", num_masks)
    perfect = torch.where(one_hot_targets(labels, K), 10.0, -10.0)
    random = torch.randn(B, K, H, W)
    for name, logits in (("perfect logits", perfect), ("random logits", random)):
        losses = otseg_loss(dict(decoder=logits, score=logits), labels, num_masks)
        print(f"{name:15s}", {k: round(float(v), 4) for k, v in losses.items()})
