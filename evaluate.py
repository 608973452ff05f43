"""evaluate.py -- score an OTSeg checkpoint the way the paper does, and use it on any image.

The protocol (paper Sec. 5.1, and the authors' MMSegmentation release: docs/release.md):
- test-time resize of the short side (512; Context 520), single scale, no flip;
- sliding windows of the training crop (512 stride 426; Context 480 stride 80), per-window
  probabilities P averaged where windows overlap, resized bilinearly to the original image, argmax;
- OTSeg scores the decoder alone, P = sigmoid(D) (lambda = 1); OTSeg+ the ensemble
  P = sigmoid(0.5 D + 0.5 S) (Eq. 17). Both come out of the same forward pass;
- inductive checkpoints: 0.1 is subtracted from the seen classes' probabilities (calibration, the
  release's `decode_seg.py`);
- one confusion matrix over the whole validation set (pixels labelled 255 excluded: that is the
  background of VOC and Context), per-class IoU, mIoU(S) and mIoU(U) (nan-mean over the seen and
  unseen classes), hIoU = 2 S U / (S + U), pixel accuracy (MMSegmentation 0.24's
  `mmseg/core/evaluation/metrics.py`).

Cross-dataset (paper Table 2): `--dataset ade --checkpoint coco.pt` scores the COCO model on ADE20K
with ADE20K's class names for the text (the release used the source's: a bug) and reports mIoU over
all target classes. The target's test resize and normalisation, the source model's window: as the
release's configs under `configs/cross_dataset/` ran it, including their two departures (COCO to VOC
slides with stride 380; ADE20K is normalised with CLIP's mean and std). `--window-stride` and
`--normalization source` give the other choice.

Everything needed is in the checkpoint (weights of the prompts and head, CLIP description,
templates, dataset, setting, window); nothing is imported from train.py. Pictures are drawn by
visualize.py; the checkpoint format and the release's converter are in checkpoint.py.

    python evaluate.py --checkpoint runs/voc-inductive/ckpt.pt --data-root data/VOCdevkit/..
    torchrun --nproc_per_node 4 evaluate.py --checkpoint runs/voc-inductive/ckpt.pt --data-root ..
    python evaluate.py --checkpoint runs/coco-inductive/ckpt.pt --dataset ade --data-root data/ade
    python evaluate.py --checkpoint otseg_voc_release.pth --source voc --setting inductive --data-root ..
    python evaluate.py --checkpoint otseg_voc_release.pth --source voc --setting inductive --convert voc.pt
    python evaluate.py --checkpoint ckpt.pt --image cat.jpg --classes "cat,grass,sky"
    python evaluate.py --checkpoint ckpt.pt --data-root .. --visualize vis/

Notation: B batch, K classes, N prompts, M pixels (h*w tokens), C channels.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import tv_tensors

import checkpoint
import clip
import data
import visualize
from common import (atomic_save, autocast, close_distributed, ignore_stop_signals, print0, setup_distributed,
                    stop_workers)
from model import OTSeg


# ----------------------------------------------------------------------------------------------
# Metrics: one confusion matrix over the whole set, then IoU per class (MMSegmentation's mIoU)
# ----------------------------------------------------------------------------------------------

def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """pred, label (...) -> int64 (K, K), rows the true class, columns the prediction.

    Pixels whose label is not a class (255: background of VOC/Context, padding) are left out: they
    are counted in a spare bin K*K that is dropped. A scatter_add_ into K*K + 1 bins of a known size
    needs no host synchronisation, where `label[keep]` (its size is data) and `bincount` (it reads
    the largest value) would each wait for the GPU, on every image.
    """
    label, pred = label.reshape(-1).long(), pred.reshape(-1).long()  # long: 255 * K overflows uint8
    is_class = (label >= 0) & (label < num_classes)
    index = torch.where(is_class, label * num_classes + pred, num_classes ** 2)  # (M,)
    counts = torch.zeros(num_classes ** 2 + 1, dtype=torch.long, device=label.device)
    counts.scatter_add_(0, index, torch.ones_like(index))
    return counts[:-1].view(num_classes, num_classes)


def segmentation_metrics(conf: torch.Tensor, seen: torch.Tensor) -> dict:
    """Confusion matrix (K, K) -> per-class IoU, mIoU(S), mIoU(U), hIoU, mIoU, pixel accuracy (in %).

    IoU is NaN for a class with no pixel in the labels nor in the predictions (MMSegmentation), and
    the means skip NaNs. With no unseen class (cross-dataset), mIoU(U) and hIoU are NaN and the
    headline is mIoU. Fully supervised models are still scored over the zero-shot split. seen: bool (K,)
    (data.seen_mask).
    """
    conf = conf.double().cpu()
    intersection = conf.diag()
    union = conf.sum(0) + conf.sum(1) - intersection
    iou = intersection / union  # 0/0 -> NaN
    seen = seen.cpu()
    miou_s = float(iou[seen].nanmean()) * 100
    miou_u = float(iou[~seen].nanmean()) * 100 if not seen.all() else float("nan")
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


# ----------------------------------------------------------------------------------------------
# Evaluation over a dataset, sharded over processes with no image counted twice
# ----------------------------------------------------------------------------------------------

def first_item(batch: list):
    """collate_fn for batch size 1 of images of different sizes."""
    return batch[0]


@torch.no_grad()
def evaluate(model: nn.Module, dataset, class_names: list[str], seen: torch.Tensor,
             calibrate: bool, window: dict, device: torch.device, amp: bool = False,
             workers: int = 2, window_batch: int = 8, limit: int | None = None,
             progress: bool = True) -> dict:
    """Confusion matrices of OTSeg and OTSeg+ over `dataset`, summed over processes, and metrics.

    seen: bool (K,) (data.seen_mask); with `calibrate` the seen classes' probabilities are lowered by
    0.1. Process r scores images r, r + P, r + 2P, ...: every image exactly once (DistributedSampler
    would pad the last round with repeats, counting some images twice).
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    num_classes = len(class_names)
    predict = make_predictor(model, class_names, seen.to(device) if calibrate else None, amp)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=1, sampler=range(rank, count, world), num_workers=workers,
        collate_fn=first_item, pin_memory=device.type == "cuda",  # pinned: the copies below overlap
        generator=torch.Generator(),  # own generator: training RNG untouched
        worker_init_fn=ignore_stop_signals)  # a stop signal is for this process to obey (common.py)
    conf = {name: torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
            for name in ("OTSeg", "OTSeg+")}
    was_training = model.training
    model.eval()
    start = time.time()
    batches = iter(loader)
    try:
        for i, sample in enumerate(batches):
            image = sample["image"].to(device, non_blocking=True)  # (3, h, w) resized and normalised
            label = sample["label"].to(device, non_blocking=True)  # (H0, W0) at the original size
            probs = slide_inference(predict, image, window["crop"], window["stride"], window_batch)
            for name, p in probs.items():  # (K, h, w) -> (K, H0, W0) -> (H0, W0)
                p = F.interpolate(p[None], size=label.shape[-2:], mode="bilinear", align_corners=False)
                conf[name] += confusion_matrix(p[0].argmax(0), label, num_classes)
            if progress and rank == 0 and (i + 1) % 50 == 0:
                print0(f"  evaluated {(i + 1) * world}/{count} images, {time.time() - start:.0f} s")
    finally:  # however the loop ends: no worker left running, the model in the mode it came in
        stop_workers(batches)
        model.train(was_training)
    results = {}
    for name, matrix in conf.items():
        if dist.is_initialized():
            dist.all_reduce(matrix)  # integer counts: exactly the one-process matrix
        results[name] = dict(segmentation_metrics(matrix, seen), confusion=matrix.cpu().tolist())
    return results


def format_results(results: dict, class_names: list[str], seen: torch.Tensor) -> str:
    """The per-class IoU table and the summary lines, as printed."""
    lines = [f"{'class':24s} {'split':6s} " + " ".join(f"{name:>8s}" for name in results)]
    for k, name in enumerate(class_names):
        split = "seen" if seen[k] else "unseen"
        lines.append(f"{name[:24]:24s} {split:6s} "
                     + " ".join(f"{r['iou'][k]:8.2f}" for r in results.values()))
    lines.append("")
    for key, title in (("miou_unseen", "mIoU(U)"), ("miou_seen", "mIoU(S)"), ("hiou", "hIoU"),
                       ("miou", "mIoU"), ("pixel_accuracy", "pixel acc.")):
        lines.append(f"{title:31s} " + " ".join(f"{r[key]:8.2f}" for r in results.values()))
    return "\n".join(lines)


def without_nan(x):
    """NaN (the IoU of a class absent from labels and predictions) -> None, so the JSON is standard."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: without_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [without_nan(v) for v in x]
    return x


# ----------------------------------------------------------------------------------------------
# Cross-dataset: the settings the release's Table 2 runs used
# ----------------------------------------------------------------------------------------------

# The release scores each (source, target) pair of paper Table 2 with its own config under
# configs/cross_dataset/, whose test_cfg sets the window (crop, stride) below, at full size. Each config
# takes the target's dataset config whole: images are resized and normalised as the target's (ADE20K's
# `_base_/datasets/ade.py` normalises with CLIP's mean and std, as data.py's 'ade' preset). The windows
# are the source model's, except COCO to VOC: stride 380 where COCO's own runs slide by 426.
RELEASE_CROSS_DATASET = {
    ("coco", "voc"): dict(config="coco-to-voc.py", window=(512, 380)),
    ("coco", "context"): dict(config="coco-to-context.py", window=(512, 426)),
    ("coco", "ade"): dict(config="coco-to-ade.py", window=(512, 426)),
    ("context", "voc"): dict(config="context-to-voc.py", window=(480, 80)),
    ("context", "coco"): dict(config="context-to-coco.py", window=(480, 80)),
}


def evaluation_window(ckpt: dict, target: str, stride: int | None = None) -> tuple[dict, str]:
    """The sliding window for scoring dataset `target` with a checkpoint, and where it comes from.

    The checkpoint's own window (its training crop), the release's for its cross-dataset runs (scaled
    like the rest of a small run's sizes), or `stride` when given.
    """
    crop, steps = tuple(ckpt["window"]["crop"]), tuple(ckpt["window"]["stride"])
    origin = "the checkpoint's"
    release = RELEASE_CROSS_DATASET.get((ckpt["dataset"], target))
    if release is not None:
        release_crop, release_stride = release["window"]
        steps = (max(1, round(release_stride * crop[0] / release_crop)),) * 2
        origin = f"as the release's configs/cross_dataset/{release['config']}"
    if stride is not None:
        steps, origin = (stride, stride), "--window-stride"
    return dict(crop=crop, stride=steps), origin


# ----------------------------------------------------------------------------------------------
# Using the model: any image with any class names (visualize.py draws and writes the pictures)
# ----------------------------------------------------------------------------------------------

def predict_labels(predict, image: torch.Tensor, window: dict, size: tuple[int, int]) -> torch.Tensor:
    """image (3, h, w) resized and normalised -> (H0, W0) OTSeg+ class indices at the original size."""
    probs = slide_inference(predict, image, window["crop"], window["stride"])["OTSeg+"]  # (K, h, w)
    probs = F.interpolate(probs[None], size=size, mode="bilinear", align_corners=False)  # (1, K, H0, W0)
    return probs[0].argmax(0)


@torch.no_grad()
def segment_image(model: OTSeg, image: torch.Tensor, class_names: list[str], preset: dict, window: dict,
                  device: torch.device) -> torch.Tensor:
    """uint8 (3, H0, W0) -> (H0, W0) indices into class_names: OTSeg+, no calibration (no class is
    'seen' among names the user chose), resized and normalised as the preset's test images."""
    blank = tv_tensors.Mask(torch.zeros(image.shape[1:], dtype=torch.uint8))  # the transforms take a label
    normalised, _ = data.test_transform(preset)(tv_tensors.Image(image), blank)
    predict = make_predictor(model, class_names, seen=None)
    return predict_labels(predict, normalised.as_subclass(torch.Tensor).to(device), window, image.shape[1:]).cpu()


# ----------------------------------------------------------------------------------------------
# The program: user errors are one line `error: ...` and happen before anything is written
# ----------------------------------------------------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, as every other error of this program."""

    def error(self, message: str):
        sys.exit(f"error: {message} (see --help)")


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Evaluate OTSeg (see the module docstring for commands)")
    parser.add_argument("--checkpoint", help="a checkpoint of train.py, or the release's .pth (see --source)")
    parser.add_argument("--dataset", default=None, choices=sorted(data.DATASETS),
                        help="dataset to score (default: the checkpoint's); another one = cross-dataset")
    parser.add_argument("--data-root", default=None, help="the dataset's root (needed to score or visualise)")
    parser.add_argument("--clip-weights", default=None,
                        help="CLIP weights (default: those the checkpoint was trained with)")
    parser.add_argument("--source", default=None, choices=sorted(data.DATASETS),
                        help="release checkpoints only: the dataset it was trained on (default: --dataset)")
    parser.add_argument("--setting", default=None, choices=data.SETTINGS,
                        help="release checkpoints only: its training setting (decides the calibration)")
    parser.add_argument("--convert", metavar="OUT", help="write the (release) checkpoint in this project's format")
    parser.add_argument("--crop-size", type=int, default=None,
                        help="override the preset's sizes (default: as the checkpoint's training run)")
    parser.add_argument("--window-stride", type=int, default=None,
                        help="sliding-window stride (default: the checkpoint's, or the release's for its "
                             "cross-dataset runs: 380 from COCO to VOC)")
    parser.add_argument("--normalization", default="target", choices=["target", "source"],
                        help="cross-dataset: normalise with the target dataset's mean and std (the release; "
                             "CLIP's for ADE20K) or with those the model was trained with")
    parser.add_argument("--output-json", default=None, help="default: CHECKPOINT_DIR/eval_DATASET.json")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (Sinkhorn stays fp32)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--window-batch", type=int, default=8, help="sliding windows per forward pass")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N images")
    parser.add_argument("--visualize", metavar="DIR", help="write predictions and per-prompt score maps")
    parser.add_argument("--num-visualize", type=int, default=8)
    parser.add_argument("--image", help="segment this image with --classes")
    parser.add_argument("--classes", help='comma-separated class names for --image, e.g. "cat,grass,sky"')
    parser.add_argument("--output", default=None, help="--image's result (default: IMAGE_otseg.png)")
    return parser


def parse_classes(text: str) -> list[str]:
    """--classes "cat, grass,sky" -> ['cat', 'grass', 'sky'], or exit if none is left or one repeats."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        sys.exit('error: --classes holds no class name: give them separated by commas, e.g. --classes "cat,grass,sky"')
    lower = [name.lower() for name in names]  # CLIP's tokenizer lower-cases: "Cat" and "cat" are one text
    repeated = sorted({name for name, low in zip(names, lower) if lower.count(low) > 1})
    if repeated:
        sys.exit(f"error: --classes names {', '.join(repeated)} more than once: give each class once")
    return names


def check_output_path(path: str, flag: str) -> None:
    """Exit before any work if `path` cannot be written: its folder must exist, its name be no folder."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        sys.exit(f"error: {flag} {path}: the folder {folder} does not exist; create it or give another path")
    if os.path.isdir(path):
        sys.exit(f"error: {flag} {path} is a folder; give a file name")


def check_arguments(args) -> tuple[torch.Tensor | None, list[str] | None]:
    """The checks that need no model: -> (the --image as uint8 (3, H, W), the --classes), or exit."""
    if args.checkpoint is None:
        sys.exit("error: --checkpoint is needed")
    if not (args.image or args.data_root or args.convert):
        sys.exit("error: nothing to do: give --data-root to score a dataset, --image and --classes to "
                 "segment a picture, or --convert OUT")
    if args.visualize and not args.data_root:
        sys.exit("error: --visualize draws validation images: give --data-root too")
    if args.visualize and os.path.exists(args.visualize) and not os.path.isdir(args.visualize):
        sys.exit(f"error: --visualize {args.visualize} is a file; give a folder for the pictures")
    for flag, value, least in (("--window-stride", args.window_stride, 1), ("--workers", args.workers, 0),
                               ("--window-batch", args.window_batch, 1), ("--crop-size", args.crop_size, 1)):
        if value is not None and value < least:
            sys.exit(f"error: {flag} must be at least {least}, not {value}")
    if (args.image is None) != (args.classes is None):  # --classes "" reaches parse_classes' own message
        sys.exit('error: --image and --classes go together, e.g. --image cat.jpg --classes "cat,grass,sky"')
    for flag, path in (("--output-json", args.output_json), ("--convert", args.convert)):
        if path:
            check_output_path(path, flag)
    image = names = None
    if args.image:
        names = parse_classes(args.classes)
        if args.output:
            check_output_path(args.output, "--output")
            if os.path.splitext(args.output)[1].lower() not in Image.registered_extensions():
                sys.exit(f"error: --output {args.output}: unknown picture format; end the name with .png or .jpg")
        if not os.path.isfile(args.image):
            sys.exit(f"error: --image {args.image}: no such file")
        try:
            image = data.read_image(args.image)
        except data.DatasetError as error:
            sys.exit(f"error: --image {args.image} is not a picture PIL can read ({error.__cause__}); "
                     f"give a JPEG or PNG file")
    return image, names


def load_checkpoint(args, device: torch.device) -> dict:
    """The checkpoint of --checkpoint in this project's format (a release checkpoint is converted)."""
    ckpt = checkpoint.read_checkpoint(args.checkpoint)
    if checkpoint.is_release_checkpoint(ckpt):
        source = args.source or args.dataset
        if source is None or args.setting is None:
            sys.exit("error: a release (MMSegmentation) checkpoint needs --source (the dataset it was trained "
                     "on) and --setting (inductive, transductive or fully)")
        return checkpoint.convert_release_checkpoint(ckpt, source, args.setting,
                                                     args.clip_weights or clip.DEFAULT_WEIGHTS, device)
    if ckpt.get("format") != checkpoint.FORMAT:
        sys.exit(f"error: {args.checkpoint} is neither a checkpoint of this project ({checkpoint.FORMAT}) nor "
                 f"a released OTSeg checkpoint: give one written by train.py or the release")
    for flag, value, saved in (("--source", args.source, ckpt["dataset"]),
                               ("--setting", args.setting, ckpt["setting"])):
        if value is not None and value != saved:
            sys.exit(f"error: {flag} {value}: {args.checkpoint} was trained with {flag} {saved} (the flag is for "
                     f"release checkpoints; to score another dataset, use --dataset)")
    return ckpt


def main(args) -> None:
    rank, _, device = setup_distributed(args.device)
    try:
        run(args, rank, device)
    except checkpoint.CheckpointError as error:  # a checkpoint or weights file that does not fit: one line
        sys.exit(f"error: {error}")
    close_distributed()


def run(args, rank: int, device: torch.device) -> None:
    """Everything evaluate.py does, in the order of its options; rank 0 writes the files."""
    image, names = check_arguments(args)
    ckpt = load_checkpoint(args, device)
    crop = ckpt["window"]["crop"][0]
    if args.window_stride is not None and args.window_stride > crop:
        sys.exit(f"error: --window-stride {args.window_stride} exceeds the window ({crop} pixels, the checkpoint's "
                 f"training crop): pixels between windows would get no prediction")
    if args.convert:
        if rank == 0:
            checkpoint.save(ckpt, args.convert)
        print0(f"wrote {args.convert}")
    crop_size = args.crop_size or (ckpt.get("args") or {}).get("crop_size")  # a small run's sizes
    try:  # the sizes and normalisation the model was trained with
        source = data.get_preset(ckpt["dataset"], crop_size)
    except ValueError as error:  # a preset file (a dataset of one's own) that has gone
        sys.exit(f"error: {args.checkpoint} was trained on --dataset {ckpt['dataset']}: {error}")
    scoring = plan_scoring(args, ckpt, source, crop_size) if args.data_root else None  # before CLIP's weights load
    if not (args.image or scoring):
        return
    model = checkpoint.build_model_from_checkpoint(ckpt, args.clip_weights, device)
    described = f"checkpoint {args.checkpoint} ({ckpt['dataset']} {ckpt['setting']}, step {ckpt.get('step')})"

    if args.image:
        window, origin = evaluation_window(ckpt, ckpt["dataset"], args.window_stride)
        print0(f"{described}: segmenting {args.image} into {len(names)} classes ({', '.join(names)}) with OTSeg+, "
               f"no calibration, resized and normalised as {ckpt['dataset']}, window {window['crop']} stride "
               f"{window['stride']} ({origin})")
        if rank == 0:
            pred = segment_image(model, image, names, source, window, device)
            out = args.output or os.path.splitext(args.image)[0] + "_otseg.png"
            picture = visualize.overlay(visualize.to_picture(image), pred, names)
            print0(f"wrote {visualize.save_picture(picture, out)}")
    if scoring:
        print0(f"{described}: {scoring['description']}")
        score_dataset(args, ckpt, model, scoring, rank, device)


def plan_scoring(args, ckpt: dict, source: dict, crop_size: int | None) -> dict:
    """What scoring --data-root means for this checkpoint: dataset, names, window, calibration, report."""
    name = args.dataset or ckpt["dataset"]
    cross = name != ckpt["dataset"]
    target = data.get_preset(name, crop_size)
    if args.normalization == "source":
        target.update(mean=source["mean"], std=source["std"])
    try:
        dataset = data.SegmentationDataset(target, args.data_root, "val", "fully",
                                           transform=data.test_transform(target))
    except data.DatasetError as error:
        sys.exit(f"error: --data-root: {error}")
    window, origin = evaluation_window(ckpt, name, args.window_stride)
    seen = data.seen_mask(len(target["classes"]), [] if cross else target["unseen"])
    calibrate = ckpt["setting"] == "inductive" and not cross  # as decode_seg.py; across datasets nothing is seen
    normalised_as = name if args.normalization == "target" else f"{ckpt['dataset']} (--normalization source)"
    description = (f"scoring {name}{' (cross-dataset)' if cross else ''} with {len(target['classes'])} classes, "
                   f"window {window['crop']} stride {window['stride']} ({origin}), normalised as {normalised_as}, "
                   f"calibration {'on' if calibrate else 'off'}")
    out = args.output_json or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                           f"eval_{data.preset_stem(name)}.json")
    return dict(name=name, cross=cross, target=target, dataset=dataset, window=window, origin=origin,
                classes=list(target["classes"]),  # the target's names (the release's bug: the source's)
                seen=seen, calibrate=calibrate, description=description, out=out)


def score_dataset(args, ckpt: dict, model: OTSeg, plan: dict, rank: int, device: torch.device) -> None:
    """Score the planned validation set (pictures first with --visualize) and write the JSON report."""
    class_names, seen, window = plan["classes"], plan["seen"], plan["window"]
    try:
        if args.visualize and rank == 0:
            predict = make_predictor(model, class_names, seen.to(device) if plan["calibrate"] else None)
            paths = visualize.write_pictures(model, plan["dataset"], class_names,
                                             lambda image, size: predict_labels(predict, image, window, size),
                                             window["crop"], args.visualize, args.num_visualize, device)
            print0(f"wrote {len(paths)} pictures to {args.visualize}")
        results = evaluate(model, plan["dataset"], class_names, seen, plan["calibrate"], window, device, args.amp,
                           args.workers, args.window_batch, args.limit)
    except data.DatasetError as error:  # from a DataLoader worker, the message ends with the original one
        sys.exit("error: " + str(error).strip().splitlines()[-1].split("DatasetError: ", 1)[-1])
    print0(format_results(results, class_names, seen))
    if rank == 0:
        target = plan["target"]
        report = dict(checkpoint=args.checkpoint, source=ckpt["dataset"], dataset=plan["name"],
                      cross_dataset=plan["cross"], setting=ckpt["setting"], calibration=plan["calibrate"],
                      classes=class_names, unseen=(~seen).nonzero().flatten().tolist(), window=window,
                      window_from=plan["origin"],
                      normalization=dict(mean=list(target["mean"]), std=list(target["std"])), results=results)
        with atomic_save(plan["out"]) as tmp, open(tmp, "w") as f:
            json.dump(without_nan(report), f, indent=1)
        print0(f"wrote {plan['out']}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
