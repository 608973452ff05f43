"""visualize.py -- pictures of what OTSeg does: predictions, and each prompt's map (paper Fig. 1 and 5).

For every class, OTSeg compares each pixel with N prompt embeddings. Before optimal transport, the N
cosine maps S^i of a class look alike (every prompt matches the whole object a little); Multi-Prompts
Sinkhorn (sinkhorn.py) splits each pixel's mass over the prompts, and the maps M N T^i * S^i show which
part of the object each prompt took (paper Sec. 4.2, Fig. 5). `prompt_score_maps` computes both from
the same steps as OTSeg.forward; `prompt_grid` lays them out side by side.

    python evaluate.py --checkpoint ckpt.pt --data-root DATA --visualize vis/    # validation images
    python evaluate.py --checkpoint ckpt.pt --image cat.jpg --classes "cat,grass,sky"

Notation: B batch, K classes, N prompts, M pixels (h*w tokens), C channels.
"""
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision import tv_tensors

import data
import evaluate
from model import OTSeg
from sinkhorn import mps


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
    predict = evaluate.make_predictor(model, class_names, seen)
    written = []
    for index in range(min(count, len(dataset))):
        sample = dataset[index]
        image, label = sample["image"].to(device), sample["label"]
        probs = evaluate.slide_inference(predict, image, window["crop"], window["stride"])["OTSeg+"]
        pred = F.interpolate(probs[None], size=label.shape, mode="bilinear", align_corners=False)[0].argmax(0)
        picture = denormalize(image).resize(label.shape[::-1], Image.BILINEAR)
        present = sorted((set(label.unique().tolist()) | set(pred.unique().tolist())) - {data.IGNORE_INDEX})
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
    predict = evaluate.make_predictor(model, class_names, seen=None)
    probs = evaluate.slide_inference(predict, image.as_subclass(torch.Tensor).to(device), window["crop"], window["stride"])
    probs = F.interpolate(probs["OTSeg+"][None], size=pixels.shape[1:], mode="bilinear", align_corners=False)
    pred = probs[0].argmax(0)  # (H0, W0)
    overlay = Image.blend(picture, colourize(pred), 0.5)
    present = sorted(pred.unique().tolist())
    with_legend(overlay, class_names, present).save(out_path)
    return out_path
