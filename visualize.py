"""visualize.py -- pictures of what OTSeg does: predictions, and each prompt's map (paper Fig. 1 and 5).

For every class, OTSeg compares each pixel with N prompt embeddings. Before optimal transport, the N
cosine maps S^i of a class look alike (every prompt matches the whole object a little); Multi-Prompts
Sinkhorn (sinkhorn.py) splits each pixel's mass over the prompts, and the maps M N T^i * S^i show which
part of the object each prompt took (paper Sec. 4.2, Fig. 5). `prompt_score_maps` computes both from
the same steps as OTSeg.forward; `prompt_grid` lays them out side by side.

This file only draws (and writes the pictures): predictions come from evaluate.py, which calls it for

    python evaluate.py --checkpoint ckpt.pt --data-root DATA --visualize vis/    # validation images
    python evaluate.py --checkpoint ckpt.pt --image cat.jpg --classes "cat,grass,sky"

Class k is drawn in colour k + 1 of PASCAL VOC's colour map (colour 0 is VOC's black background);
ignored pixels (label 255) are black.

Notation: B batch, K classes, N prompts, M pixels (h*w tokens), C channels.
"""
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import data
from common import atomic_save
from model import OTSeg
from sinkhorn import mps

MIN_HEIGHT = 256  # pictures of small images are enlarged to at least this height, so that they can be read
LEGEND_ROW = 16   # height of a legend row: the default bitmap font's 11-pixel text and a 12-pixel swatch


def color_palette() -> list[int]:
    """VOC's colour map, the palette of its SegmentationClass PNGs (256 RGB triples, flattened; index 255 is
    the boundary colour (224, 224, 192)). Pictures of labels use it, and tools/datasets.py
    writes VOC's PNGs with it."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):               # spread the bits of the index over the three channels
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


def colourize(label: torch.Tensor) -> Image.Image:
    """(H, W) class indices (255 = ignored, black) -> RGB image with VOC's colour map, shifted by 1."""
    palette = np.array(color_palette(), dtype=np.uint8).reshape(256, 3)
    colours = np.concatenate([palette[1:], np.zeros((1, 3), np.uint8)])  # class k -> colour k + 1
    return Image.fromarray(colours[label.cpu().numpy().astype(np.uint8)])


def heatmap(values: torch.Tensor) -> Image.Image:
    """(h, w) -> RGB, min-max normalised, dark blue -> green -> yellow (matplotlib's viridis anchors)."""
    anchors = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)
    x = values.float().cpu().numpy()
    x = (x - x.min()) / max(x.max() - x.min(), 1e-12) * (len(anchors) - 1)  # a constant map is all dark
    low = np.floor(x).astype(int).clip(0, len(anchors) - 2)
    frac = (x - low)[..., None]
    return Image.fromarray((anchors[low] * (1 - frac) + anchors[low + 1] * frac).astype(np.uint8))


def denormalize(image: torch.Tensor, mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD) -> Image.Image:
    """(3, H, W) normalised with `mean` and `std` (on 0-255 values) -> RGB image, each value at its nearest level."""
    mean = torch.tensor(mean).view(3, 1, 1)
    std = torch.tensor(std).view(3, 1, 1)
    x = (image.float().cpu() * std + mean).round().clamp(0, 255).byte()
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def to_picture(image: torch.Tensor) -> Image.Image:
    """uint8 (3, H, W) -> RGB image."""
    return Image.fromarray(image.permute(1, 2, 0).cpu().numpy())


def enlarged(picture: Image.Image, min_height: int = MIN_HEIGHT) -> Image.Image:
    """The picture scaled up by a whole factor (nearest: every pixel stays a clean block) to min_height."""
    factor = max(1, math.ceil(min_height / picture.height))
    return picture.resize((picture.width * factor, picture.height * factor), Image.NEAREST)


def with_legend(picture: Image.Image, class_names: list[str], classes: list[int]) -> Image.Image:
    """The picture with a legend of the given classes' colours on its right."""
    font = ImageFont.load_default()
    width = 30 + max((ImageDraw.Draw(picture).textlength(class_names[k], font=font) for k in classes), default=0)
    height = max(picture.height, LEGEND_ROW * len(classes) + 10)
    canvas = Image.new("RGB", (picture.width + int(width) + 10, height), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    swatches = colourize(torch.tensor(classes, dtype=torch.long)[None])
    for i, k in enumerate(classes):
        x, y = picture.width + 8, 5 + i * LEGEND_ROW
        draw.rectangle([x, y, x + 14, y + 12], fill=swatches.getpixel((i, 0)), outline="black")
        draw.text((x + 20, y), class_names[k], fill="black", font=font)
    return canvas


def overlay(picture: Image.Image, pred: torch.Tensor, class_names: list[str]) -> Image.Image:
    """A photo half-covered by its prediction (H, W), enlarged to a readable size, with a legend."""
    mixed = enlarged(Image.blend(picture, colourize(pred), 0.5))
    return with_legend(mixed, class_names, sorted(pred.unique().tolist()))


def prediction_strip(picture: Image.Image, label: torch.Tensor, pred: torch.Tensor,
                     class_names: list[str]) -> Image.Image:
    """image | ground truth | prediction, 10 pixels apart, with a legend of every class shown."""
    panels = [enlarged(p) for p in (picture, colourize(label), colourize(pred))]
    strip = Image.new("RGB", (sum(p.width for p in panels) + 10 * len(panels), panels[0].height), "white")
    for i, p in enumerate(panels):
        strip.paste(p, (i * (p.width + 10), 0))
    present = sorted((set(label.unique().tolist()) | set(pred.unique().tolist())) - {data.IGNORE_INDEX})
    return with_legend(strip, class_names, present)


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


def prompt_grid(plain: torch.Tensor, refined: torch.Tensor, templates: list[str], name: str) -> Image.Image:
    """(N, h, w) maps of one class: a row per prompt, cosine S^i on the left, after MPS on the right."""
    font = ImageFont.load_default()
    tile, label_width, top = 96, 180, 18  # 96-pixel tiles; room for a 30-character prompt; the titles
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



# ----------------------------------------------------------------------------------------------
# Writing the pictures of evaluate.py --visualize and --image
# ----------------------------------------------------------------------------------------------

def save_picture(picture, path: str) -> str:
    """Write a PIL picture atomically: a failure never leaves half a picture."""
    with atomic_save(path) as tmp:
        picture.save(tmp)
    return path


@torch.no_grad()
def write_pictures(model: OTSeg, dataset, class_names: list[str], predict_labels, crop: tuple[int, int],
                   out_dir: str, count: int, device: torch.device) -> list[str]:
    """For `count` validation images: image | ground truth | OTSeg+ prediction (`_prediction.png`), and
    the per-prompt score maps of the image's largest class in its first window of size `crop`
    (`_prompts_CLASS.png`). predict_labels(image (3, h, w), (H0, W0)) -> (H0, W0) class indices
    (evaluate.py's sliding window)."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for index in range(min(count, len(dataset))):
        sample = dataset[index]
        image, label = sample["image"].to(device), sample["label"]  # (3, h, w) normalised, (H0, W0)
        pred = predict_labels(image, label.shape).cpu()
        raw, _ = dataset.load(index)  # the image as read, uint8 (3, H0, W0)
        strip = prediction_strip(to_picture(raw), label, pred, class_names)
        written.append(save_picture(strip, os.path.join(out_dir, f"{sample['name']}_prediction.png")))

        k = int(torch.bincount(label[label < len(class_names)].flatten(), minlength=len(class_names)).argmax())
        (crop_h, crop_w), (_, height, width) = crop, image.shape
        first = F.pad(image, (0, max(crop_w - width, 0), 0, max(crop_h - height, 0)))[:, :crop_h, :crop_w]
        plain, refined = prompt_score_maps(model, first[None], class_names)  # (1, K, N, h, w) each
        grid = prompt_grid(plain[0, k], refined[0, k], model.templates, class_names[k])
        name = f"{sample['name']}_prompts_{class_names[k].replace(' ', '_')}.png"
        written.append(save_picture(grid, os.path.join(out_dir, name)))
    return written
