"""evaluate.py -- score an OTSeg checkpoint the way the paper does, and use it on any image.

The protocol (paper Sec. 5.1, reference FACTS sections 6-7, the authors' MMSegmentation release):
- test-time resize of the short side (512; Context 520), single scale, no flip;
- sliding windows of the training crop (512 stride 426; Context 480 stride 80), per-window
  probabilities P averaged where windows overlap, resized bilinearly to the original image, argmax;
- OTSeg scores the decoder alone, P = sigmoid(D) (lambda = 1); OTSeg+ the ensemble
  P = sigmoid(0.5 D + 0.5 S) (Eq. 17). Both come out of the same forward pass;
- inductive checkpoints: 0.1 is subtracted from the seen classes' probabilities (calibration);
- one confusion matrix over the whole validation set (pixels labelled 255 excluded: that is the
  background of VOC and Context), per-class IoU, mIoU(S) and mIoU(U) (nan-mean over the seen and
  unseen classes), hIoU = 2 S U / (S + U), pixel accuracy.

Cross-dataset (paper Table 2): `--dataset ade --checkpoint coco.pt` scores the COCO model on ADE20K
with ADE20K's class names for the text (the release used the source's: a bug) and reports mIoU over
all target classes. Windows are the source model's (its training crop), the resize the target's.

Everything needed is in the checkpoint (weights of the prompts and head, CLIP description,
templates, dataset, setting, window); nothing is imported from train.py.

    python evaluate.py --checkpoint runs/voc-inductive/ckpt.pt --data-root data/VOCdevkit/..
    torchrun --nproc_per_node 4 evaluate.py --checkpoint runs/voc-inductive/ckpt.pt --data-root ..
    python evaluate.py --checkpoint runs/coco-inductive/ckpt.pt --dataset ade --data-root data/ade
    python evaluate.py --checkpoint otseg_voc_release.pth --dataset voc --setting inductive ...
    python evaluate.py --checkpoint ckpt.pt --image cat.jpg --classes "cat,grass,sky"
    python evaluate.py --checkpoint ckpt.pt --efficiency
    python evaluate.py --checkpoint ckpt.pt --data-root .. --visualize vis/

Notation: B batch, K classes, N prompts, M pixels (h*w tokens), C channels.
"""
import argparse
import hashlib
import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torchvision import tv_tensors

import clip
import data
from model import OTSeg, trainable_parameters
from sinkhorn import mps

FORMAT = "otseg-reference/1"  # written into every checkpoint of this project
IGNORE_INDEX = 255


def print0(*args, **kwargs):
    """print on the first process only."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def setup_distributed(device_name: str | None) -> tuple[int, int, torch.device]:
    """-> (rank, world size, device) from torchrun's environment variables; NCCL on CUDA, gloo on CPU.

    Plain `python evaluate.py` (or train.py) is rank 0 of 1 with no process group.
    """
    if device_name is None:
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 1, torch.device(device_name)
    local_rank = int(os.environ["LOCAL_RANK"])
    if device_name.startswith("cuda"):
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


# ----------------------------------------------------------------------------------------------
# Metrics: one confusion matrix over the whole set, then IoU per class (MMSegmentation's mIoU)
# ----------------------------------------------------------------------------------------------

def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """pred, label (...) -> int64 (K, K), rows the true class, columns the prediction.

    Pixels whose label is not a class (255: background of VOC/Context, padding) are left out.
    """
    keep = label < num_classes
    index = label[keep] * num_classes + pred[keep]
    return torch.bincount(index, minlength=num_classes ** 2).view(num_classes, num_classes)


def segmentation_metrics(conf: torch.Tensor, unseen: list[int]) -> dict:
    """Confusion matrix (K, K) -> per-class IoU, mIoU(S), mIoU(U), hIoU, mIoU, pixel accuracy (in %).

    IoU is NaN for a class with no pixel in the labels nor in the predictions (MMSegmentation), and
    the means skip NaNs. With no unseen class (cross-dataset), mIoU(U) and hIoU are NaN and the
    headline is mIoU. Fully supervised models are still scored over the zero-shot split.
    """
    conf = conf.double().cpu()
    intersection = conf.diag()
    union = conf.sum(0) + conf.sum(1) - intersection
    iou = intersection / union  # 0/0 -> NaN
    is_unseen = torch.zeros(len(iou), dtype=torch.bool)
    is_unseen[list(unseen)] = True
    miou_s = float(iou[~is_unseen].nanmean()) * 100
    miou_u = float(iou[is_unseen].nanmean()) * 100 if unseen else float("nan")
    return dict(
        iou=[float(x) * 100 for x in iou],
        miou=float(iou.nanmean()) * 100,
        miou_seen=miou_s,
        miou_unseen=miou_u,
        hiou=harmonic_iou(miou_s, miou_u),
        pixel_accuracy=float(intersection.sum() / conf.sum().clamp(min=1)) * 100,
    )


def harmonic_iou(seen: float, unseen: float) -> float:
    """hIoU = 2 S U / (S + U), the paper's primary metric (NaN when either side is missing)."""
    if seen + unseen == 0:
        return 0.0
    return 2 * seen * unseen / (seen + unseen)  # NaN in, NaN out


# ----------------------------------------------------------------------------------------------
# Sliding-window inference (MMSegmentation's `slide` mode)
# ----------------------------------------------------------------------------------------------

def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """First pixel of each window along one axis: every `stride`, the last one flush with the end."""
    count = max(size - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, size) - crop, 0) for i in range(count)]


@torch.no_grad()
def slide_inference(predict, image: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int],
                    window_batch: int = 8) -> dict[str, torch.Tensor]:
    """image (3, H, W) -> {name: (K, H, W)} probabilities averaged over the windows covering a pixel.

    `predict(windows (b, 3, crop_h, crop_w))` returns {name: probabilities (b, K, crop_h, crop_w)}.
    An image smaller than the crop is padded with 0 (the mean colour after normalisation, as the
    training crops are padded) and the padding cut off again; the release instead decodes the small
    window unpadded, which the short-side resize makes rare (aspect ratios above 4).
    """
    (crop_h, crop_w), (stride_h, stride_w) = crop, stride
    _, height, width = image.shape
    image = F.pad(image, (0, max(crop_w - width, 0), 0, max(crop_h - height, 0)))
    _, padded_h, padded_w = image.shape
    boxes = [(y, x) for y in window_starts(padded_h, crop_h, stride_h)
             for x in window_starts(padded_w, crop_w, stride_w)]
    sums: dict[str, torch.Tensor] = {}
    count = image.new_zeros(1, padded_h, padded_w)
    for first in range(0, len(boxes), window_batch):
        chunk = boxes[first:first + window_batch]
        windows = torch.stack([image[:, y:y + crop_h, x:x + crop_w] for y, x in chunk])  # (b, 3, h, w)
        for name, probs in predict(windows).items():  # (b, K, crop_h, crop_w)
            total = sums.setdefault(name, probs.new_zeros(probs.shape[1], padded_h, padded_w))
            for (y, x), p in zip(chunk, probs):
                total[:, y:y + crop_h, x:x + crop_w] += p
        for y, x in chunk:
            count[:, y:y + crop_h, x:x + crop_w] += 1
    return {name: (total / count)[:, :height, :width] for name, total in sums.items()}


def make_predictor(model: nn.Module, class_names: list[str], seen: torch.Tensor | None,
                   amp: bool = False):
    """The two scorings of one forward pass: OTSeg (decoder only) and OTSeg+ (ensemble, Eq. 17).

    seen: bool (K,) of the classes to calibrate (inductive checkpoints), or None.
    """
    def predict(windows: torch.Tensor) -> dict[str, torch.Tensor]:
        with autocast(windows.device, amp):
            out = model(windows, class_names)
        decoder, score = out["decoder"].float(), out["score"].float()  # (b, K, h, w) logits
        return {"OTSeg": OTSeg.ensemble(decoder, score, lam=1.0, seen=seen),
                "OTSeg+": OTSeg.ensemble(decoder, score, lam=0.5, seen=seen)}
    return predict


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when asked; Sinkhorn runs in fp32 inside it (sinkhorn.py)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# ----------------------------------------------------------------------------------------------
# Evaluation over a dataset, sharded over processes with no image counted twice
# ----------------------------------------------------------------------------------------------

def first_item(batch: list):
    """collate_fn for batch size 1 of images of different sizes."""
    return batch[0]


@torch.no_grad()
def evaluate(model: nn.Module, dataset, class_names: list[str], unseen: list[int],
             calibrate: bool, window: dict, device: torch.device, amp: bool = False,
             workers: int = 2, window_batch: int = 8, limit: int | None = None,
             progress: bool = True) -> dict:
    """Confusion matrices of OTSeg and OTSeg+ over `dataset`, summed over processes, and metrics.

    Process r scores images r, r + P, r + 2P, ...: every image exactly once (DistributedSampler
    would pad the last round with repeats, counting some images twice).
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    num_classes = len(class_names)
    seen = None
    if calibrate:
        seen = torch.ones(num_classes, dtype=torch.bool, device=device)
        seen[list(unseen)] = False
    predict = make_predictor(model, class_names, seen, amp)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=1, sampler=range(rank, count, world), num_workers=workers,
        collate_fn=first_item, generator=torch.Generator())  # own generator: training RNG untouched
    conf = {name: torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
            for name in ("OTSeg", "OTSeg+")}
    was_training = model.training
    model.eval()
    start = time.time()
    for i, sample in enumerate(loader):
        image = sample["image"].to(device, non_blocking=True)  # (3, h, w) resized and normalised
        label = sample["label"].to(device, non_blocking=True)  # (H0, W0) at the original size
        probs = slide_inference(predict, image, window["crop"], window["stride"], window_batch)
        for name, p in probs.items():  # (K, h, w) -> (K, H0, W0) -> (H0, W0)
            p = F.interpolate(p[None], size=label.shape[-2:], mode="bilinear", align_corners=False)
            conf[name] += confusion_matrix(p[0].argmax(0), label, num_classes)
        if progress and rank == 0 and (i + 1) % 50 == 0:
            print0(f"  evaluated {(i + 1) * world}/{count} images, {time.time() - start:.0f} s")
    model.train(was_training)
    results = {}
    for name, matrix in conf.items():
        if dist.is_initialized():
            dist.all_reduce(matrix)  # integer counts: exactly the one-process matrix
        results[name] = dict(segmentation_metrics(matrix, unseen), confusion=matrix.cpu().tolist())
    return results


def format_results(results: dict, class_names: list[str], unseen: list[int]) -> str:
    """The per-class IoU table and the summary lines, as printed."""
    lines = [f"{'class':24s} {'split':6s} " + " ".join(f"{name:>8s}" for name in results)]
    for k, name in enumerate(class_names):
        split = "unseen" if k in unseen else "seen"
        lines.append(f"{name[:24]:24s} {split:6s} "
                     + " ".join(f"{r['iou'][k]:8.2f}" for r in results.values()))
    lines.append("")
    for key, title in (("miou_unseen", "mIoU(U)"), ("miou_seen", "mIoU(S)"), ("hiou", "hIoU"),
                       ("miou", "mIoU"), ("pixel_accuracy", "pixel acc.")):
        lines.append(f"{title:31s} " + " ".join(f"{r[key]:8.2f}" for r in results.values()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Checkpoints: what they hold, how the model is rebuilt from one, and checks with clear errors
# ----------------------------------------------------------------------------------------------

# A small CLIP with random weights (fixed seed) for tests and for trying the code without downloads.
RANDOM_TINY = dict(embed_dim=64, image_resolution=64, vision_layers=2, vision_width=64, vision_patch_size=16,
                   context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                   transformer_layers=2)


def build_clip(weights: str, prompt_tokens: int, image_size: int, device: torch.device) -> clip.CLIP:
    """OpenAI's CLIP from `weights` (or 'random-tiny') with deep VPT, positions resized to the crop."""
    if weights == "random-tiny":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same random CLIP in every run, so its checkpoints evaluate
            state_dict = clip.CLIP(**RANDOM_TINY).state_dict()
        return clip.build_model(state_dict, prompt_tokens, image_size).to(device)
    try:
        return clip.load(weights, prompt_tokens=prompt_tokens, image_size=image_size, device=device)
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")


def describe_clip(clip_model: clip.CLIP, weights: str) -> dict:
    """Sizes of the CLIP, its prompt tokens and a fingerprint of its frozen weights."""
    state_dict = clip_model.state_dict()
    conv = state_dict["visual.conv1.weight"].float().cpu().contiguous()
    return dict(clip.architecture(state_dict), prompt_tokens=clip_model.visual.prompt_tokens,
                weights=weights, fingerprint=hashlib.sha256(conv.numpy().tobytes()).hexdigest()[:16])


def check_same_clip(saved: dict, built: dict, what: str, strict: bool = False) -> None:
    """Exit with one clear message if `what` was trained on another CLIP or number of prompt tokens.

    Other frozen weights of the same sizes are a warning, or with `strict` (resuming) an error.
    """
    keys = [k for k in saved if k not in ("image_resolution", "weights", "fingerprint")]
    wrong = [f"{k} {saved[k]} (this CLIP: {built.get(k)})" for k in keys if saved[k] != built.get(k)]
    if wrong:
        sys.exit(f"error: {what} was trained with another CLIP: " + ", ".join(wrong)
                 + f". It was trained with --clip-weights {saved['weights']}.")
    if saved["fingerprint"] != built["fingerprint"]:
        message = (f"{what} was trained with CLIP weights {saved['weights']}, whose frozen weights differ "
                   f"from those of {built['weights']}")
        if strict:
            sys.exit(f"error: {message}")
        print0(f"warning: {message}: its numbers will not be reproduced")


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights OTSeg trains (VPT prompts and head), on the CPU: all a checkpoint needs."""
    return {name: p.detach().cpu().clone() for name, p in trainable_parameters(model)}


def load_trainable(model: nn.Module, state_dict: dict, what: str) -> None:
    """Load the trained weights, exiting with the list of differences if they do not fit."""
    params = dict(trainable_parameters(model))
    missing = sorted(set(params) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(params))
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(params[k].shape)}"
             for k in set(params) & set(state_dict) if state_dict[k].shape != params[k].shape]
    if missing or unexpected or wrong:
        sys.exit(f"error: the weights in {what} do not fit this model: missing {missing[:5]}, "
                 f"unexpected {unexpected[:5]}, other shapes {wrong[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state_dict[name])


def atomic_save(obj: dict, path: str) -> None:
    """torch.save to a temporary file and rename it: a crash never leaves half a checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str) -> dict:
    """A checkpoint of this project, or the release's MMSegmentation file (converted by the caller)."""
    if not os.path.isfile(path):
        sys.exit(f"error: no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch file, or a pickle holding more than tensors and containers
        sys.exit(f"error: cannot read {path} as a checkpoint: {error}")


def dataset_preset(dataset: str, crop_size: int | None = None) -> dict:
    """data.py's preset of `dataset`, with crop, rescale, test resize and windows scaled to `crop_size`.

    The override is for small runs (tests, CPU trials): every size of the preset shrinks together.
    """
    preset = data.get_preset(dataset)
    if crop_size is not None:
        scale = crop_size / preset["crop_size"]
        preset.update(
            crop_size=crop_size, window_crop=crop_size,
            window_stride=max(1, round(preset["window_stride"] * scale)),
            train_scale=tuple(round(s * scale) for s in preset["train_scale"]),
            test_short_side=round(preset["test_short_side"] * scale),
            test_max_long_side=(None if preset["test_max_long_side"] is None
                                else round(preset["test_max_long_side"] * scale)))
    return preset


def window_of(preset: dict) -> dict:
    """The sliding window of a preset: dict(crop=(h, w), stride=(h, w))."""
    return dict(crop=(preset["window_crop"],) * 2, stride=(preset["window_stride"],) * 2)


def build_model_from_checkpoint(ckpt: dict, clip_weights: str | None, device: torch.device,
                                matching: str | None = None) -> OTSeg:
    """Rebuild the CLIP the checkpoint describes, check it, and load the trained weights."""
    saved = ckpt["clip"]
    weights = clip_weights or saved["weights"]
    clip_model = build_clip(weights, saved["prompt_tokens"], ckpt["crop_size"], device)
    check_same_clip(saved, describe_clip(clip_model, weights), "the checkpoint")
    model = OTSeg(clip_model, ckpt["templates"], matching=matching or ckpt["matching"]).to(device)
    load_trainable(model, ckpt["model"], "the checkpoint")
    return model.eval()


# ----------------------------------------------------------------------------------------------
# The authors' released checkpoints (MMSegmentation 0.24 state dicts) -> this project's names
# ----------------------------------------------------------------------------------------------

# Key names read from the release's model code (github.com/cubeyoung/OTSeg): VPTCLIPVisionTransformer
# in models/backbone/img_encoder.py ('backbone.*'), ATMSingleHeadSeg, TPN_DecoderLayer (a subclass of
# nn.TransformerDecoderLayer) and AttentionOT in models/decode_heads/decode_seg.py ('decode_head.*').
# The release's decoder is 'decoder_1' (one stage) and its relationship descriptor 'q_proj'.
RELEASE_KEYS = [  # (release key, this project's key), as regular expressions
    (r"backbone\.(prompt_embeddings|deep_prompt_embeddings)", r"clip.visual.\1"),
    (r"backbone\.(prompt_proj|prompt_norm)\.(weight|bias)", r"clip.visual.\1.\2"),
    (r"decode_head\.q_proj\.(weight|bias)", r"relationship_descriptor.\1"),
    (r"decode_head\.decoder_1\.layers\.(\d+)\.multihead_attn\.q\.(weight|bias)", r"decoder.layers.\1.cross_attn.q_proj.\2"),
    (r"decode_head\.decoder_1\.layers\.(\d+)\.multihead_attn\.k\.(weight|bias)", r"decoder.layers.\1.cross_attn.k_proj.\2"),
    (r"decode_head\.decoder_1\.layers\.(\d+)\.multihead_attn\.v\.(weight|bias)", r"decoder.layers.\1.cross_attn.v_proj.\2"),
    (r"decode_head\.decoder_1\.layers\.(\d+)\.multihead_attn\.proj\.(weight|bias)", r"decoder.layers.\1.cross_attn.out_proj.\2"),
    (r"decode_head\.decoder_1\.layers\.(\d+)\.(linear1|linear2|norm2|norm3)\.(weight|bias)", r"decoder.layers.\1.\2.\3"),
]
# Built by the release and never used by its forward pass (FACTS 3): the self-attention and its norm,
# and everything of the last layer but its query and key projections (mapped above, then not found).
RELEASE_UNUSED = r"decode_head\.decoder_1\.layers\.\d+\.(self_attn\..*|norm1\.(weight|bias))"


def is_release_checkpoint(ckpt: dict) -> bool:
    return "state_dict" in ckpt and any(k.startswith("decode_head.") for k in ckpt["state_dict"])


def convert_release_state_dict(state_dict: dict, trainable: dict[str, torch.Tensor]) -> dict:
    """The release's state dict -> this project's trainable weights (names and shapes of `trainable`).

    Frozen CLIP weights ('backbone.*' but the prompts, 'text_encoder.*') are dropped: they are
    OpenAI's, rebuilt from --clip-weights (the caller compares the patch embedding). Unused weights of
    the release's decoder are dropped. Anything else left over, or missing, is an error.
    """
    converted, unknown = {}, []
    for key, value in state_dict.items():
        if key.startswith("text_encoder.") or re.fullmatch(RELEASE_UNUSED, key):
            continue
        for pattern, target in RELEASE_KEYS:
            if re.fullmatch(pattern, key):
                name = re.sub(pattern, target, key)
                if name in trainable:
                    converted[name] = value.float()
                elif not name.startswith("decoder.layers."):
                    unknown.append(key)
                break
        else:
            if not key.startswith("backbone."):
                unknown.append(key)
    missing = sorted(set(trainable) - set(converted))
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(trainable[k].shape)}" for k, v in converted.items()
             if v.shape != trainable[k].shape]
    if unknown or missing or wrong:
        sys.exit(f"error: not an OTSeg release checkpoint of this CLIP: unknown keys {unknown[:5]}, "
                 f"missing {missing[:5]}, other shapes {wrong[:5]}")
    return converted


def convert_release_checkpoint(ckpt: dict, source: str, setting: str, clip_weights: str,
                               device: torch.device) -> dict:
    """A checkpoint of this project's format from the release's file (trained on `source`)."""
    state_dict = ckpt["state_dict"]
    if "backbone.prompt_embeddings" not in state_dict:
        sys.exit("error: the release checkpoint has no visual prompts (backbone.prompt_embeddings)")
    prompt_tokens = state_dict["backbone.prompt_embeddings"].shape[1]
    preset = data.get_preset(source)
    clip_model = build_clip(clip_weights, prompt_tokens, preset["crop_size"], device)
    description = describe_clip(clip_model, clip_weights)
    if "backbone.conv1.weight" in state_dict:  # the release saves the frozen weights too: compare
        conv = state_dict["backbone.conv1.weight"].float().contiguous()
        description["fingerprint"] = hashlib.sha256(conv.numpy().tobytes()).hexdigest()[:16]
    model = OTSeg(clip_model, preset["templates"])
    trainable = dict(trainable_parameters(model))
    converted = convert_release_state_dict(state_dict, trainable)
    return dict(format=FORMAT, model=converted, clip=description, templates=list(preset["templates"]),
                matching="sinkhorn", dataset=source, setting=setting, classes=list(preset["classes"]),
                unseen=list(preset["unseen"]), crop_size=preset["crop_size"],
                window={k: list(v) for k, v in window_of(preset).items()},
                step=ckpt.get("meta", {}).get("iter"), args=None, schedule=None)


# ----------------------------------------------------------------------------------------------
# Efficiency (paper Table 3): parameters, compute per image, images per second
# ----------------------------------------------------------------------------------------------

def paper_macs(model: OTSeg, images: torch.Tensor, class_names: list[str]) -> int:
    """Multiply-accumulates of nn.Linear and nn.Conv2d modules, CLIP's attention blocks left out.

    The convention of the MMCV counter behind the paper's "GFLOPs" (FACTS 10): attention products,
    the attention projections of CLIP, norms, Sinkhorn and matrix products outside modules uncounted.
    """
    total = [0]
    skip = {id(m) for block in model.modules() if isinstance(block, (clip.Attention, nn.MultiheadAttention))
            for m in block.modules()}

    def linear(module, inputs, output):
        total[0] += inputs[0].numel() // module.in_features * module.in_features * module.out_features

    def conv(module, inputs, output):
        kernel = math.prod(module.kernel_size) * module.in_channels // module.groups
        total[0] += output.numel() * kernel

    handles = [m.register_forward_hook(linear if isinstance(m, nn.Linear) else conv)
               for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in skip]
    with torch.no_grad():
        model(images, class_names)
    for handle in handles:
        handle.remove()
    return total[0]


def full_flops(model: OTSeg, images: torch.Tensor, class_names: list[str]) -> int:
    """FLOPs of every matrix product, convolution and attention (2 per multiply-accumulate)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images, class_names)
    return counter.get_total_flops()


def images_per_second(model: OTSeg, images: torch.Tensor, class_names: list[str], iters: int, amp: bool) -> float:
    with torch.no_grad(), autocast(images.device, amp):
        model(images, class_names)  # warm-up (text embeddings, kernels)
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.time()
        for _ in range(iters):
            model(images, class_names)
        if images.device.type == "cuda":
            torch.cuda.synchronize()
    return iters * images.shape[0] / (time.time() - start)


def release_overheads(model: OTSeg, num_queries: int, num_pixels: int) -> tuple[int, int]:
    """(parameters, MACs) the release adds to ours by building and running weights it never uses
    (FACTS 3): every decoder layer's self-attention and norm1 (built, never called), and the last
    layer's value and output projections, norms and FFN (built and run, their output unused)."""
    d = model.relationship_descriptor.out_features
    ffn = model.decoder.layers[0].linear1.out_features
    parameters = (len(model.decoder.layers) * (4 * d * d + 4 * d + 2 * d)
                  + 2 * (d * d + d) + 4 * d + (d * ffn + ffn) + (ffn * d + d))
    macs = num_pixels * d * d + num_queries * d * d + 2 * num_queries * d * ffn
    return parameters, macs


def efficiency_table(model: OTSeg, class_names: list[str], crop: int, device: torch.device,
                     iters: int, amp: bool) -> str:
    """Table 3's columns for MPSA and for the softmax matching, on one crop-sized image."""
    images = torch.randn(1, 3, crop, crop, device=device)
    model.text_embeddings(class_names)  # cached before counting: the text tower runs once per class list
    softmax = OTSeg(model.clip, model.templates, matching="softmax").to(device).eval()
    load_trainable(softmax, trainable_state_dict(model), "the MPSA model")  # same parameters
    softmax.text_embeddings(class_names)
    patch = model.clip.visual.conv1.kernel_size[0]
    extra_params, extra_macs = release_overheads(model, len(class_names) * len(model.templates),
                                                 (crop // patch) ** 2)
    rows = [f"{'':24s} {'learnable (M)':>13s} {'as release (M)':>14s} {'GMACs':>6s} {'as release':>10s} "
            f"{'GFLOPs full':>11s} {'images/s':>8s}"]
    for name, m in (("OTSeg+ (MPSA)", model.eval()), ("softmax cross-attention", softmax)):
        learnable = sum(p.numel() for _, p in trainable_parameters(m))
        macs = paper_macs(m, images, class_names)
        rows.append(f"{name:24s} {learnable / 1e6:13.2f} {(learnable + extra_params) / 1e6:14.2f} "
                    f"{macs / 1e9:6.1f} {(macs + extra_macs) / 1e9:10.1f} "
                    f"{full_flops(m, images, class_names) / 1e9:11.1f} "
                    f"{images_per_second(m, images, class_names, iters, amp):8.2f}")
    rows.append(f"({len(class_names)} classes x {len(model.templates)} prompts, one {crop}x{crop} image on "
                f"{device}. GMACs: nn.Linear and conv modules, CLIP's attention not counted, the convention "
                "of the paper's 'GFLOPs'; 'as release' adds the weights it builds and runs without using "
                "them. Paper Table 3, RTX 3090: OTSeg+ 13.8M, 61.9 GFLOPs, 22.5 FPS)")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------
# Pictures: predictions, per-prompt score maps (paper Fig. 1 and 5), any image with any names
# ----------------------------------------------------------------------------------------------

def colourize(label: torch.Tensor) -> Image.Image:
    """(H, W) class indices (255 = ignored, black) -> RGB image with VOC's colour map, shifted by 1."""
    palette = np.array(data.color_palette(), dtype=np.uint8).reshape(256, 3)
    colours = np.concatenate([palette[1:], np.zeros((1, 3), np.uint8)])  # class k -> colour k + 1
    return Image.fromarray(colours[label.cpu().numpy().astype(np.uint8)])


def heatmap(values: torch.Tensor) -> Image.Image:
    """(h, w) -> RGB, min-max normalised, dark blue -> green -> yellow."""
    anchors = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)
    x = values.float().cpu().numpy()
    x = (x - x.min()) / max(x.max() - x.min(), 1e-12) * (len(anchors) - 1)
    low = np.floor(x).astype(int).clip(0, len(anchors) - 2)
    frac = (x - low)[..., None]
    return Image.fromarray((anchors[low] * (1 - frac) + anchors[low + 1] * frac).astype(np.uint8))


def denormalize(image: torch.Tensor) -> Image.Image:
    """(3, H, W) normalised with ImageNet statistics -> RGB image."""
    mean = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    x = (image.float().cpu() * std + mean).clamp(0, 255).byte()
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def with_legend(picture: Image.Image, class_names: list[str], classes: list[int]) -> Image.Image:
    """The picture with a legend of the given classes' colours on its right."""
    font = ImageFont.load_default()
    row = 16
    width = 30 + max(ImageDraw.Draw(picture).textlength(class_names[k], font=font) for k in classes)
    canvas = Image.new("RGB", (picture.width + int(width) + 10, max(picture.height, row * len(classes) + 10)), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    swatches = colourize(torch.tensor(classes)[None])
    for i, k in enumerate(classes):
        x, y = picture.width + 8, 5 + i * row
        draw.rectangle([x, y, x + 14, y + 12], fill=swatches.getpixel((i, 0)), outline="black")
        draw.text((x + 20, y), class_names[k], fill="black", font=font)
    return canvas


@torch.no_grad()
def prompt_score_maps(model: OTSeg, images: torch.Tensor, class_names: list[str]):
    """Per-prompt maps of the score path: cosine similarities S^i without MPS and M N T S^i with it.

    images (B, 3, H, W) -> two (B, K, N, h, w) tensors, from the same steps as OTSeg.forward.
    """
    pixels, queries, (h, w) = model.encode(images, class_names)  # (B, M, C), (B, K, N, C)
    sim = model.prompt_similarities(pixels, queries)  # (B, K, M, N)
    N = sim.shape[-1]
    _, plan = mps(sim, eps=model.eps, n_iters=model.n_iters, tol=model.tol, return_plan=True)
    refined = h * w * N * plan * sim  # (B, K, M, N): each prompt's share of the MPS score
    grid = lambda x: x.permute(0, 1, 3, 2).unflatten(-1, (h, w))  # (B, K, M, N) -> (B, K, N, h, w)
    return grid(sim), grid(refined)


def visualize(model: OTSeg, dataset, class_names: list[str], unseen: list[int], calibrate: bool,
              window: dict, out_dir: str, count: int, device: torch.device) -> list[str]:
    """For `count` images: image | ground truth | OTSeg+ prediction, and the per-prompt score maps of
    the image's largest class in its first window, without MPS (left column) and with MPS (right)."""
    os.makedirs(out_dir, exist_ok=True)
    seen = None
    if calibrate:
        seen = torch.ones(len(class_names), dtype=torch.bool, device=device)
        seen[list(unseen)] = False
    predict = make_predictor(model, class_names, seen)
    written = []
    for index in range(min(count, len(dataset))):
        sample = dataset[index]
        image, label = sample["image"].to(device), sample["label"]
        probs = slide_inference(predict, image, window["crop"], window["stride"])["OTSeg+"]
        pred = F.interpolate(probs[None], size=label.shape, mode="bilinear", align_corners=False)[0].argmax(0)
        picture = denormalize(image).resize(label.shape[::-1], Image.BILINEAR)
        present = sorted((set(label.unique().tolist()) | set(pred.unique().tolist())) - {IGNORE_INDEX})
        panels = [picture, colourize(label), colourize(pred)]
        strip = Image.new("RGB", (sum(p.width for p in panels) + 10 * len(panels), picture.height), "white")
        for i, p in enumerate(panels):
            strip.paste(p, (i * (p.width + 10), 0))
        path = os.path.join(out_dir, f"{sample['name']}_prediction.png")
        with_legend(strip, class_names, present).save(path)
        written.append(path)

        counts = torch.bincount(label[label < len(class_names)].flatten(), minlength=len(class_names))
        k = int(counts.argmax())
        crop = window["crop"]
        windows = F.pad(image, (0, max(crop[1] - image.shape[2], 0), 0, max(crop[0] - image.shape[1], 0)))
        plain, refined = prompt_score_maps(model, windows[None, :, :crop[0], :crop[1]], class_names)
        path = os.path.join(out_dir, f"{sample['name']}_prompts_{class_names[k].replace(' ', '_')}.png")
        prompt_grid(plain[0, k], refined[0, k], model.templates, class_names[k]).save(path)
        written.append(path)
    return written


def prompt_grid(plain: torch.Tensor, refined: torch.Tensor, templates: list[str], name: str) -> Image.Image:
    """(N, h, w) maps of one class: a row per prompt, cosine S^i on the left, after MPS on the right."""
    font = ImageFont.load_default()
    tile, label_width, top = 96, 180, 18
    grid = Image.new("RGB", (label_width + 2 * (tile + 6), top + len(templates) * (tile + 4)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((label_width, 2), "cosine S^i", fill="black", font=font)
    draw.text((label_width + tile + 6, 2), "with MPS", fill="black", font=font)
    for n, template in enumerate(templates):
        y = top + n * (tile + 4)
        draw.text((2, y + tile // 2 - 6), template.format(name)[:30], fill="black", font=font)
        for column, maps in enumerate((plain, refined)):
            grid.paste(heatmap(maps[n]).resize((tile, tile), Image.NEAREST), (label_width + column * (tile + 6), y))
    return grid


@torch.no_grad()
def segment_image(model: OTSeg, path: str, class_names: list[str], preset: dict, window: dict,
                  device: torch.device, out_path: str) -> str:
    """Segment any image with any class names (OTSeg+, no calibration) and save it with a legend."""
    try:
        picture = Image.open(path).convert("RGB")
    except OSError as error:
        sys.exit(f"error: cannot read image {path}: {error}")
    pixels = torch.from_numpy(np.array(picture)).permute(2, 0, 1)  # (3, H0, W0) uint8
    blank = tv_tensors.Mask(torch.zeros(pixels.shape[1:], dtype=torch.uint8))
    image, _ = data.test_transform(preset)(tv_tensors.Image(pixels), blank)
    predict = make_predictor(model, class_names, seen=None)
    probs = slide_inference(predict, image.as_subclass(torch.Tensor).to(device), window["crop"], window["stride"])
    probs = F.interpolate(probs["OTSeg+"][None], size=pixels.shape[1:], mode="bilinear", align_corners=False)
    pred = probs[0].argmax(0)  # (H0, W0)
    overlay = Image.blend(picture, colourize(pred), 0.5)
    present = sorted(pred.unique().tolist())
    with_legend(overlay, class_names, present).save(out_path)
    return out_path


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def without_nan(x):
    """NaN (the IoU of a class absent from labels and predictions) -> None, so the JSON is standard."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: without_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [without_nan(v) for v in x]
    return x


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluate OTSeg (see the module docstring for commands)")
    parser.add_argument("--checkpoint", help="a checkpoint of train.py, or the release's .pth (see --source)")
    parser.add_argument("--dataset", default=None, choices=sorted(data.DATASETS),
                        help="dataset to score (default: the checkpoint's); another one = cross-dataset")
    parser.add_argument("--data-root", default=None, help="the dataset's root (needed to score or visualise)")
    parser.add_argument("--clip-weights", default=None,
                        help="CLIP weights (default: those the checkpoint was trained with)")
    parser.add_argument("--source", default=None, choices=sorted(data.DATASETS),
                        help="release checkpoints only: the dataset it was trained on (default: --dataset)")
    parser.add_argument("--setting", default=None, choices=["inductive", "transductive", "fully"],
                        help="release checkpoints only: its training setting (decides the calibration)")
    parser.add_argument("--convert", metavar="OUT", help="write the (release) checkpoint in this project's format")
    parser.add_argument("--crop-size", type=int, default=None,
                        help="override the preset's sizes (default: as the checkpoint's training run)")
    parser.add_argument("--output-json", default=None, help="default: CHECKPOINT_DIR/eval_DATASET.json")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (Sinkhorn stays fp32)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--window-batch", type=int, default=8, help="sliding windows per forward pass")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N images")
    parser.add_argument("--efficiency", action="store_true", help="paper Table 3: parameters, compute, speed")
    parser.add_argument("--efficiency-iters", type=int, default=10)
    parser.add_argument("--prompt-tokens", type=int, default=10, help="--efficiency without a checkpoint")
    parser.add_argument("--visualize", metavar="DIR", help="write predictions and per-prompt score maps")
    parser.add_argument("--num-visualize", type=int, default=8)
    parser.add_argument("--image", help="segment this image with --classes")
    parser.add_argument("--classes", help='comma-separated class names for --image, e.g. "cat,grass,sky"')
    parser.add_argument("--output", default=None, help="--image's result (default: IMAGE_otseg.png)")
    return parser


def main(args) -> None:
    rank, world_size, device = setup_distributed(args.device)
    run(args, rank, device)
    if world_size > 1:
        dist.destroy_process_group()


def run(args, rank: int, device: torch.device) -> None:
    """Everything evaluate.py does, in the order of its options."""
    if args.checkpoint is None:
        if not args.efficiency:
            sys.exit("error: --checkpoint is needed (only --efficiency runs without one)")
        preset = dataset_preset(args.dataset or "voc", args.crop_size)
        weights = args.clip_weights or clip.DEFAULT_WEIGHTS
        clip_model = build_clip(weights, args.prompt_tokens, preset["crop_size"], device)
        model = OTSeg(clip_model, preset["templates"]).to(device).eval()
        print0(efficiency_table(model, list(preset["classes"]), preset["crop_size"], device,
                                args.efficiency_iters, args.amp))
        return

    ckpt = read_checkpoint(args.checkpoint)
    if is_release_checkpoint(ckpt):
        source = args.source or args.dataset
        if source is None or args.setting is None:
            sys.exit("error: a release (MMSegmentation) checkpoint needs --source (the dataset it was trained "
                     "on) and --setting (inductive, transductive or fully)")
        ckpt = convert_release_checkpoint(ckpt, source, args.setting, args.clip_weights or clip.DEFAULT_WEIGHTS,
                                          device)
    elif ckpt.get("format") != FORMAT:
        sys.exit(f"error: {args.checkpoint} is neither a checkpoint of this project nor the release's")
    if args.convert:
        if rank == 0:
            atomic_save(ckpt, args.convert)
        print0(f"wrote {args.convert}")
        if not (args.efficiency or args.image or args.data_root):
            return
    model = build_model_from_checkpoint(ckpt, args.clip_weights, device)

    dataset_name = args.dataset or ckpt["dataset"]
    cross = dataset_name != ckpt["dataset"]
    crop_size = args.crop_size or (ckpt.get("args") or {}).get("crop_size")  # a small run's sizes
    target = dataset_preset(dataset_name, crop_size)
    window = {k: tuple(v) for k, v in ckpt["window"].items()}  # the source model's (the release does so)
    class_names = list(target["classes"])  # the target's names (the release's cross-dataset bug used the source's)
    unseen = [] if cross else list(target["unseen"])
    calibrate = ckpt["setting"] == "inductive" and not cross  # FACTS 6; nothing is "seen" across datasets
    print0(f"checkpoint {args.checkpoint}: {ckpt['dataset']} {ckpt['setting']}, step {ckpt.get('step')}; "
           f"scoring {dataset_name}{' (cross-dataset)' if cross else ''} with {len(class_names)} classes, "
           f"window {window['crop']} stride {window['stride']}, calibration {'on' if calibrate else 'off'}")

    if args.efficiency:
        print0(efficiency_table(model, class_names, ckpt["crop_size"], device, args.efficiency_iters, args.amp))
    if args.image:
        if not args.classes:
            sys.exit("error: --image needs --classes, e.g. --classes \"cat,grass,sky\"")
        names = [c.strip() for c in args.classes.split(",") if c.strip()]
        out = args.output or os.path.splitext(args.image)[0] + "_otseg.png"
        if rank == 0:
            print0(f"wrote {segment_image(model, args.image, names, target, window, device, out)}")
    if args.data_root is None:
        if not (args.efficiency or args.image):
            sys.exit("error: --data-root is needed to score a dataset")
        return
    try:
        dataset = data.SegmentationDataset(target, args.data_root, "val", "fully",
                                           transform=data.test_transform(target))
    except data.DatasetError as error:
        sys.exit(f"error: {error}")
    if args.visualize and rank == 0:
        paths = visualize(model, dataset, class_names, unseen, calibrate, window, args.visualize,
                          args.num_visualize, device)
        print0(f"wrote {len(paths)} pictures to {args.visualize}")
    results = evaluate(model, dataset, class_names, unseen, calibrate, window, device, args.amp,
                       args.workers, args.window_batch, args.limit)
    print0(format_results(results, class_names, unseen))
    if rank == 0:
        out = args.output_json or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                               f"eval_{dataset_name}.json")
        report = dict(checkpoint=args.checkpoint, source=ckpt["dataset"], dataset=dataset_name,
                      cross_dataset=cross, setting=ckpt["setting"], calibration=calibrate,
                      classes=class_names, unseen=unseen, window=window, results=results)
        tmp = f"{out}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(without_nan(report), f, indent=1)
        os.replace(tmp, out)
        print0(f"wrote {out}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
