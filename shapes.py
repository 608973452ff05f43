"""shapes.py -- the shapes world: zero-shot segmentation end to end on a laptop CPU, in minutes.

Zero-shot segmentation works only if the encoders already know the unseen classes: OTSeg trains on masks
of the seen classes and recognises the unseen ones because CLIP's pretraining tied their names to their
looks. This chapter builds a small world where that can happen on a CPU, with this project's own code:

 1. The world. 64x64 scenes of 1-3 flat objects (six shapes) on a cloudy grey background, with pixel
    labels and a caption naming each object ("a photo of a striped and dotted dark red star and a plain
    light blue circle."). The classes are the objects' colours: five hues, each light or dark (K = 10).
    Unseen: light yellow, dark blue and dark purple. OTSeg never sees a mask of them; it sees their words
    only in other combinations ("dark yellow", "light blue", "light purple", "dark red"). Colours,
    because a tiny CLIP learns them in CPU minutes (shapes would take hours). Names made of shared words,
    because they give the text embeddings a structure OTSeg's head can carry over: that head (a linear
    map of the text embeddings, initialised at random and trained on the seen classes) acts at random on
    the directions the seen classes do not span, and with a handful of classes a new word lives mostly
    there (measured: with single-word colours, or with whole hues held out, the unseen classes were often
    confused with each other). The hues are 60 degrees apart, so the training pipeline's hue jitter
    (+-36 degrees) rarely turns one into another. Every object is made of two halves, cut by a random
    line through its centre, each plain, striped or dotted: something inside one class that the prompts
    can tell apart (item 3).
 2. A tiny CLIP (clip.py's TINY with a ViT of 4 layers on 8-pixel patches; C = 64) pretrained
    contrastively on fresh captioned scenes of every colour, unseen ones included: the analogue of CLIP
    having seen every concept. Captions saying the same count as positives of each other; every scene
    comes twice in a batch with other patterns, or contrastive learning stops at the colours. Three
    terms: CLIP's on the CLS embedding; the mean dense token against the caption; and FILIP's late
    interaction, where each phrase of the caption ('a striped dark red shape.') must match some dense
    token on its own, since OTSeg reads the dense tokens. `python shapes.py pretrain` remakes
    assets/shapes_clip.pt (command and seed stored inside).
 3. The demo, `python shapes.py`: writes the world in the simplest layout data.py reads
    (images/{train,val}/*.jpg, annotations/{train,val}/*.png, and its preset PRESET as shapes.json), runs
    `train.py --dataset WORLD/shapes.json` on the seen classes' masks (inductive) and `evaluate.py` on all classes,
    for OTSeg and OTSeg+ and for an honesty check: the same OTSeg on a randomly initialised tiny CLIP,
    which has never seen a light yellow thing. `--compare` adds the softmax matching (paper Table 5(b)).
    Then what the prompts do: the N = 3 templates name one pattern each ("a striped {} shape.", "a dotted
    {} shape.", "a plain {} shape."). On fresh scenes, whose pattern at every pixel is known, it measures
    how alike a class's per-prompt maps are before transport (the cosines S^i) and after MPS
    (M N T^i S^i), and whether the part of a pixel's score each prompt takes follows the pattern drawn
    there; and it draws paper Fig. 5's analogue on unseen objects. It prints the tables and where the
    pictures are.

The checkpoint keeps only the rows of the 49,408-row token table that the world's words use (no other row
ever received a gradient): 1.4 MB instead of 14. `clip_state_dict` rebuilds a plain CLIP state dict from
it (the other rows zero), which clip.build_model and clip.load read.

Notation: B batch, K classes, N prompts, M pixels (h*w tokens), C channels.
Run: `python shapes.py` (the demo, a few minutes on 2 cores), `python shapes.py --compare` (with the softmax
baseline), `python shapes.py pretrain --steps 600` (about 7 minutes on one core), `python shapes.py world
--root DIR` (only the world).
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import evaluate
import visualize
from checkpoint import build_model_from_checkpoint, read_checkpoint as read_otseg_checkpoint
from common import atomic_save
from clip import CLIP, TINY, architecture, tokenize
from data import IMAGENET_MEAN, IMAGENET_STD, SegmentationDataset, seen_mask, test_transform
from losses import IGNORE_INDEX

# ----------------------------------------------------------------------------------------------
# 1. The world
# ----------------------------------------------------------------------------------------------

IMAGE_SIZE = 64  # every scene is 64 x 64

# The world as a dataset preset of data.py (the keys and their meaning: data.DATASETS), in the simplest
# layout: folders, no split files. write_world puts it beside the scenes as PRESET_FILE, the file that
# `train.py --dataset` is given (a checkpoint keeps its path, where evaluate.py reads it again).
PRESET = dict(
    name='shapes world',
    classes=['light red', 'dark red', 'light yellow', 'dark yellow', 'light green', 'dark green',
             'light blue', 'dark blue', 'light purple', 'dark purple'],  # the objects' colours (K = 10)
    unseen=[2, 7, 9],  # light yellow, dark blue, dark purple: no masks of them in training
    templates=['a striped {} shape.', 'a dotted {} shape.', 'a plain {} shape.'],  # N = 3: one per pattern
    splits={'train': [dict(images='images/train', labels='annotations/train')],
            'val': [dict(images='images/val', labels='annotations/val')]},
    reduce_zero_label=True,  # PNG 0 = background -> 255, 1..10 -> 0..9
    crop_size=IMAGE_SIZE, train_scale=(IMAGE_SIZE, IMAGE_SIZE),  # the whole scene, rescaled by 0.5..2
    cat_max_ratio=1.0,  # no class limit: many scenes hold one object
    test_short_side=IMAGE_SIZE, window_crop=IMAGE_SIZE, window_stride=IMAGE_SIZE,  # one window per scene
    help='write it with `python shapes.py world --root DIR` (or run the demo: `python shapes.py`)',
)
PRESET_FILE = 'shapes.json'
CLASSES = PRESET['classes']
UNSEEN = PRESET['unseen']
SEEN = seen_mask(len(CLASSES), UNSEEN)  # bool (K,): how the rest of the code asks which classes are seen
TEMPLATES = PRESET['templates']
HUES = {'red': (220, 35, 35), 'yellow': (230, 220, 40), 'green': (40, 190, 50), 'blue': (45, 65, 225),
        'purple': (190, 50, 210)}  # RGB; hues 0, 60, 120, 240 and 300 degrees
SHADES = ['light', 'dark']
COLOURS = {  # RGB of each class: light = 45% of the hue mixed with white, dark = half its intensity
    f'{shade} {hue}': tuple(round(0.45 * v + 0.55 * 255) if shade == 'light' else round(0.5 * v) for v in rgb)
    for hue, rgb in HUES.items() for shade in SHADES}
SHAPES = ['circle', 'square', 'triangle', 'diamond', 'hexagon', 'star']
PATTERNS = ['plain', 'striped', 'dotted']

def shape_mask(shape: str, centre: tuple[float, float], radius: float, angle: float, size: int) -> np.ndarray:
    """(size, size) bool: the filled polygon (no anti-aliasing, so every pixel is either in or out)."""
    corners, radii = {'circle': (48, [1.0]), 'square': (4, [1.0]), 'triangle': (3, [1.15]),
                      'diamond': (4, [1.15, 0.7]), 'hexagon': (6, [1.0]), 'star': (10, [1.2, 0.55])}[shape]
    t = angle + 2 * math.pi * np.arange(corners) / corners
    r = radius * np.resize(radii, corners)
    points = list(zip(centre[0] + r * np.cos(t), centre[1] + r * np.sin(t)))
    canvas = Image.new('L', (size, size), 0)
    ImageDraw.Draw(canvas).polygon(points, fill=1)
    return np.array(canvas, dtype=bool)


def pattern_mask(pattern: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) bool: where the object shows its colour; elsewhere a darker shade of it."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    if pattern == 'plain':
        return np.ones((size, size), dtype=bool)
    if pattern == 'striped':  # period 4-6 px, any direction
        angle, period = rng.uniform(0, math.pi), rng.uniform(4, 6)
        return ((x * math.cos(angle) + y * math.sin(angle)) / period + rng.uniform()) % 1 < 0.5
    period = rng.uniform(5, 7)  # dotted: dark dots on a lattice
    dx, dy = (x + rng.uniform(0, period)) % period - period / 2, (y + rng.uniform(0, period)) % period - period / 2
    return dx * dx + dy * dy > (0.3 * period) ** 2


def render_scene(rng: np.random.Generator, size: int = IMAGE_SIZE, max_objects: int = 3,
                 radius: tuple[float, float] = (9.0, 16.0), pattern_rng: np.random.Generator | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """One image of the world.

    Every object is made of two halves, cut by a random line through its centre, each with its own
    pattern (the same one or not), drawn from `pattern_rng` (default: rng): the same rng state with
    another pattern_rng gives the same scene with other patterns.

    Returns image uint8 (size, size, 3), label uint8 (size, size) with 0 = background and k + 1 = class k
    (the VOC convention, reduce_zero_label), parts uint8 (size, size) with 0 = background and p + 1 =
    PATTERNS[p] drawn there, and the objects drawn: dicts with colour, shape and patterns (the two
    halves'). Objects never overlap, so every object drawn is visible and named in the caption.
    """
    pattern_rng = rng if pattern_rng is None else pattern_rng
    # background: smooth grey-brown clouds (low-frequency noise, little saturation)
    clouds = rng.uniform(60, 150, (4, 4, 1)) + rng.uniform(-15, 15, (4, 4, 3))
    clouds = Image.fromarray(np.clip(clouds, 0, 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    image = np.asarray(clouds, dtype=np.float32)
    label = np.zeros((size, size), dtype=np.uint8)
    parts = np.zeros((size, size), dtype=np.uint8)
    taken = np.zeros((size, size), dtype=bool)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    objects = []
    for _ in range(rng.integers(1, max_objects + 1)):
        for _attempt in range(20):  # rejection sampling of a free spot
            r = rng.uniform(*radius)
            centre = tuple(rng.uniform(r, size - r, 2))
            mask = shape_mask(shape := SHAPES[rng.integers(len(SHAPES))], centre, r, rng.uniform(0, 2 * math.pi), size)
            if mask.sum() >= 30 and not (mask & taken).any():
                break
        else:
            continue
        k = int(rng.integers(len(CLASSES)))
        patterns = [int(p) for p in pattern_rng.integers(len(PATTERNS), size=2)]
        cut = pattern_rng.uniform(0, 2 * math.pi)
        second = (x - centre[0]) * math.cos(cut) + (y - centre[1]) * math.sin(cut) > 0  # one side of the cut
        colour = np.array(COLOURS[CLASSES[k]], dtype=np.float32) * rng.uniform(0.85, 1.05)
        shade = colour * 0.55
        for half, p in zip((~second, second), patterns):
            fill = np.where(pattern_mask(PATTERNS[p], size, pattern_rng)[..., None], colour, shade)
            image = np.where((mask & half)[..., None], fill, image)
            parts[mask & half] = p + 1
        label[mask] = k + 1
        taken |= mask
        objects.append(dict(colour=CLASSES[k], shape=shape, patterns=tuple(PATTERNS[p] for p in patterns)))
    image = image + rng.normal(0, 6, image.shape)  # sensor noise
    return np.clip(image, 0, 255).round().astype(np.uint8), label, parts, objects


def caption(objects: list[dict], rng: np.random.Generator) -> str:
    """A sentence naming every object's colour and patterns, and sometimes its shape."""
    phrases = []
    for obj in objects:
        patterns = sorted(set(obj['patterns']), key=lambda _: rng.random())  # one word, or two in random order
        noun = obj['shape'] if rng.random() < 0.5 else ['shape', 'object', 'thing'][rng.integers(3)]
        phrases.append('a ' + ' and '.join(patterns) + f" {obj['colour']} {noun}")
    order = rng.permutation(len(phrases))
    phrases = [phrases[i] for i in order]
    body = phrases[0] if len(phrases) == 1 else ', '.join(phrases[:-1]) + ' and ' + phrases[-1]
    return ['a photo of ', 'a picture of ', 'an image of ', ''][rng.integers(4)] + body + '.'


def prompt_patterns(templates: list[str]) -> list[int]:
    """Index in PATTERNS of the pattern each template names."""
    return [next(p for p, pattern in enumerate(PATTERNS) if pattern in t.split()) for t in templates]


def world_words() -> list[str]:
    """Every word a caption or template can hold: the token rows the checkpoint keeps."""
    words = SHADES + list(HUES) + SHAPES + PATTERNS + ['shape', 'object', 'thing', 'a', 'an', 'photo', 'picture',
                                                       'image', 'of', 'and', ',', '.']
    return words + [t.format(name) for t in TEMPLATES for name in CLASSES]


def write_world(root: str, num_train: int = 2000, num_val: int = 300, seed: int = 0) -> str:
    """Write the world under root: images/{train,val}/NAME.jpg, annotations/{train,val}/NAME.png
    (0 = background, k + 1 = class k), captions/{train,val}.txt ("NAME<tab>caption" lines) and the
    preset, PRESET_FILE."""
    for split, count, split_seed in [('train', num_train, seed), ('val', num_val, seed + 1)]:
        rng = np.random.default_rng([split_seed, 20240924])  # disjoint from the pretraining streams
        for folder in ('images', 'annotations'):
            os.makedirs(os.path.join(root, folder, split), exist_ok=True)
        lines = []
        for i in range(count):
            image, label, _, objects = render_scene(rng)
            name = f'{split}_{i:05d}'
            # full-resolution colour (no 4:2:0 subsampling): in this world the colour is the class
            Image.fromarray(image).save(os.path.join(root, 'images', split, name + '.jpg'), quality=95,
                                        subsampling=0)
            Image.fromarray(label).save(os.path.join(root, 'annotations', split, name + '.png'))
            lines.append(f'{name}\t{caption(objects, rng)}')
        with atomic_save(os.path.join(root, 'captions', f'{split}.txt')) as tmp, open(tmp, 'w') as f:
            f.write('\n'.join(lines) + '\n')
    with atomic_save(os.path.join(root, PRESET_FILE)) as tmp, open(tmp, 'w') as f:
        json.dump(PRESET, f, indent=1)
    return root


# ----------------------------------------------------------------------------------------------
# 2. The tiny CLIP and its contrastive pretraining
# ----------------------------------------------------------------------------------------------

# clip.py's TINY with a deeper image tower on finer patches (8 x 8 patches of 8 pixels: M = 64 tokens)
TINY_CLIP = dict(TINY, image_resolution=IMAGE_SIZE, vision_layers=4, vision_patch_size=8)
# data.py's normalisation (IMAGENET_MEAN, IMAGENET_STD), so that the pretrained towers see what OTSeg sees


def encode_captions(model: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP's encode_text on the first L positions only, L = the longest caption: the text tower is causal,
    so what follows the end-of-text token never reaches it (same result, 77 / L times cheaper). (n, C)."""
    eot = tokens.argmax(dim=-1)  # (n,) the end-of-text token has the largest id
    L = int(eot.max()) + 1
    x = model.token_embedding(tokens[:, :L]) + model.positional_embedding[:L]  # (n, L, W)
    x = model.ln_final(model.transformer(x))  # (n, L, W)
    return x[torch.arange(x.shape[0]), eot] @ model.text_projection  # (n, C)


def scene_batch(rng: np.random.Generator, n: int, twins: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
    """n fresh scenes: normalised images (n, 3, H, W), labels and parts (n, H, W) (render_scene's), captions
    and what each caption says, as (n, K, P) bool: [i, k, p] = scene i shows colour k with pattern p.
    twins: n / 2 scenes, each drawn twice with other patterns (same objects, colours and places): pairs
    that only the patterns tell apart, without which contrastive learning stops at the colours."""
    images, labels, parts, captions = [], [], [], []
    shown = torch.zeros(n, len(CLASSES), len(PATTERNS), dtype=torch.bool)
    layouts = [int(s) for s in rng.integers(2 ** 32, size=n // 2) for _ in range(2)] if twins else [None] * n
    for i, layout in enumerate(layouts):
        scene_rng = rng if layout is None else np.random.default_rng(layout)
        image, label, part, objects = render_scene(scene_rng, pattern_rng=None if layout is None else rng)
        images.append(image)
        labels.append(label)
        parts.append(part)
        captions.append(caption(objects, rng))
        for obj in objects:
            for pattern in obj['patterns']:
                shown[i, CLASSES.index(obj['colour']), PATTERNS.index(pattern)] = True
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    images = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() - mean) / std
    return images, torch.from_numpy(np.stack(labels)), torch.from_numpy(np.stack(parts)), captions, shown


def phrases() -> list[str]:
    """The K * P phrases a caption is made of, one per (colour, pattern), colour-major: 'a striped light red
    shape.' (the demo's templates are these phrases)."""
    return [f'a {pattern} {colour} shape.' for colour in CLASSES for pattern in PATTERNS]


def multi_positive_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE on (B images, B captions) logits, where every caption saying the same as
    another is a positive too (soft targets spread evenly over them): two images of a striped red circle
    must not be pushed apart. positives (B, B), symmetric."""
    targets = positives / positives.sum(dim=1, keepdim=True)  # symmetric, so the same for both directions
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))


def pretraining_loss(model: CLIP, images: torch.Tensor, tokens: torch.Tensor,
                     shown: torch.Tensor) -> torch.Tensor:
    """Three contrastive terms over the batch (captions saying the same count as positives):
    CLIP's, on the CLS embedding; the mean dense token against the caption (OTSeg reads the dense tokens);
    and phrase grounding, FILIP's late interaction: each phrase of caption j finds its best dense token in
    image i, and the mean of those similarities scores the pair (i, j). The last term asks some patch of
    the image to match each phrase on its own, so that dense tokens say what is drawn *there*.
    images (B, 3, H, W), tokens (B, L), shown (B, K, P) as scene_batch returns it."""
    global_embedding, dense = model.encode_dense(images)  # (B, C), (B, C, h, w)
    text = F.normalize(encode_captions(model, tokens), dim=-1)  # (B, C)
    phrase_text = F.normalize(encode_captions(model, tokenize(phrases())), dim=-1)  # (K * P, C)
    scale = model.logit_scale.exp().clamp(max=100)  # OpenAI's clamp
    said = shown.flatten(1).float()  # (B, K * P)
    positives = (said[:, None] == said[None]).all(dim=-1).float()  # (B, B)
    patches = F.normalize(dense.flatten(2), dim=1)  # (B, C, M): unit dense tokens
    pooled = F.normalize(patches.mean(dim=2), dim=-1)  # (B, C)
    best = torch.einsum('bcm,pc->bpm', patches, phrase_text).amax(dim=-1)  # (B, K * P): best patch per phrase
    grounding = best @ (said / said.sum(dim=1, keepdim=True)).t()  # (B, B): mean over caption j's phrases
    return (multi_positive_loss(scale * F.normalize(global_embedding, dim=-1) @ text.t(), positives)
            + multi_positive_loss(scale * pooled @ text.t(), positives)
            + multi_positive_loss(scale * grounding, positives))


def patch_majority(labels: torch.Tensor, patch: int, purity: float = 0.7) -> torch.Tensor:
    """(B, H, W) labels -> (B, M) class of each patch (k + 1 as in the labels), 0 where the patch is
    background or mixed (its most frequent label covers less than `purity`)."""
    B, H, W = labels.shape
    cells = labels.view(B, H // patch, patch, W // patch, patch)  # (B, h, patch, w, patch)
    cells = cells.permute(0, 1, 3, 2, 4).reshape(B, -1, patch * patch)  # (B, M, patch * patch)
    majority = torch.mode(cells, dim=-1).values  # (B, M)
    share = (cells == majority[..., None]).float().mean(dim=-1)  # (B, M)
    return torch.where(share >= purity, majority, torch.zeros_like(majority))


@torch.no_grad()
def zero_shot_quality(model: CLIP, images: torch.Tensor, labels: torch.Tensor, parts: torch.Tensor) -> dict[str, float]:
    """What pretraining alone gives, no segmentation training:
    image: for each image, the share of its n colours among the n classes closest to its CLS embedding;
    patch: accuracy of the class closest to each dense token (MaskCLIP-style), over patches inside objects;
    pattern: accuracy of the template closest to each dense token among those of the patch's true class,
    over patches of one pattern (does a dense token know which prompt names it?).
    Chance: about 1/K, 1/K and 1/N. `model` as pretrained: built with double_cls_embedding=False, so
    encode_dense's CLS is encode_image's."""
    model.eval()
    texts = [t.format(name) for name in CLASSES for t in TEMPLATES]
    prompts = F.normalize(encode_captions(model, tokenize(texts)), dim=-1).view(len(CLASSES), len(TEMPLATES), -1)
    text = F.normalize(prompts.mean(dim=1), dim=-1)  # (K, N, C) -> (K, C)
    global_embedding, dense = model.encode_dense(images)  # (B, C), (B, C, h, w)
    image_scores = F.normalize(global_embedding, dim=-1) @ text.t()  # (B, K)
    hits = []
    for scores, label in zip(image_scores, labels):
        present = set(label.unique().tolist()) - {0}
        top = scores.topk(len(present)).indices + 1
        hits.append(sum(int(k) in present for k in top) / len(present))
    patch = model.visual.conv1.kernel_size[0]
    classes, patterns = patch_majority(labels, patch), patch_majority(parts, patch)  # (B, M) each
    tokens = F.normalize(dense.flatten(2).transpose(1, 2), dim=-1)  # (B, C, M) -> (B, M, C)
    predicted = (tokens @ text.t()).argmax(dim=-1) + 1  # (B, M)
    inside = classes > 0
    pure = inside & (patterns > 0)
    own = prompts[classes[pure].long() - 1]  # (P, N, C): the templates of each pure patch's true class
    named = torch.einsum('pc,pnc->pn', tokens[pure], own).argmax(dim=-1)  # (P,)
    template_pattern = torch.tensor(prompt_patterns(TEMPLATES))  # (N,) the pattern each template names
    return dict(image=float(np.mean(hits)), patch=float((predicted[inside] == classes[inside]).float().mean()),
                pattern=float((template_pattern[named] + 1 == patterns[pure].long()).float().mean()))


def quality_set(count: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed held-out scenes zero_shot_quality is measured on."""
    images, labels, parts, _, _ = scene_batch(np.random.default_rng([7, 20240924]), count)
    return images, labels, parts


def pretrain(steps: int = 600, batch_size: int = 128, lr: float = 1e-3, warmup: int = 100, seed: int = 0,
             config: dict = TINY_CLIP, log_every: int = 100, log=print) -> tuple[CLIP, list[dict]]:
    """Contrastive pretraining of a tiny CLIP on fresh scenes (never the same image twice).
    AdamW (weight decay 0.1 on matrices), linear warmup then cosine decay. Returns the model and the log."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 1])
    # double_cls_embedding=False: encode_dense's CLS output is then exactly encode_image's (no prompts here)
    model = CLIP(**config, double_cls_embedding=False)
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    others = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([dict(params=matrices, weight_decay=0.1), dict(params=others, weight_decay=0.0)],
                                  lr=lr, betas=(0.9, 0.98), eps=1e-6)
    quality = quality_set()
    history = [dict(step=0, **zero_shot_quality(model, *quality))]
    log(f"step 0: zero-shot image {history[-1]['image']:.3f}, patch {history[-1]['patch']:.3f} "
        f"(chance {1 / len(CLASSES):.2f}), pattern {history[-1]['pattern']:.3f} (chance {1 / len(TEMPLATES):.2f})")
    start = time.time()
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group['lr'] = lr * min(1.0, step / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        images, _, _, captions, shown = scene_batch(rng, batch_size, twins=True)
        model.train()
        loss = pretraining_loss(model, images, tokenize(captions), shown)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % log_every == 0 or step == steps:
            history.append(dict(step=step, loss=loss.item(), minutes=(time.time() - start) / 60,
                                **zero_shot_quality(model, *quality)))
            h = history[-1]
            log(f"step {step}: loss {h['loss']:.3f}, zero-shot image {h['image']:.3f}, patch {h['patch']:.3f}, "
                f"pattern {h['pattern']:.3f}, {h['minutes']:.1f} min")
    return model.eval(), history


# ----------------------------------------------------------------------------------------------
# 3. The checkpoint: CLIP's weights minus the unused token rows
# ----------------------------------------------------------------------------------------------

CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets', 'shapes_clip.pt')


def world_token_ids() -> torch.Tensor:
    """Ids of every token the world's captions and templates can produce (start and end of text included)."""
    return torch.unique(tokenize(world_words()))[1:]  # [1:]: drop the padding 0 (a '!' that never occurs)


def save_checkpoint(model: CLIP, path: str, **meta) -> None:
    """Write the weights with the token table cut to the world's rows (about 1.5 MB instead of 14 MB), plus
    `meta` (command, seed, steps, quality, ...). Written atomically."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    table = state.pop('token_embedding.weight')  # (vocab, W)
    ids = world_token_ids()
    checkpoint = dict(state_dict=state, token_ids=ids, token_rows=table[ids].clone(), vocab_size=table.shape[0],
                      **meta)
    with atomic_save(path) as tmp:
        torch.save(checkpoint, tmp)


def read_checkpoint(path: str = CHECKPOINT) -> dict:
    return torch.load(path, map_location='cpu', weights_only=True)


def clip_state_dict(path: str = CHECKPOINT) -> dict[str, torch.Tensor]:
    """A plain CLIP state dict (what clip.build_model and clip.load read): the token table rebuilt with the
    stored rows and zeros elsewhere (those tokens never occur in the world)."""
    checkpoint = read_checkpoint(path)
    rows = checkpoint['token_rows']  # (n, W)
    table = rows.new_zeros(checkpoint['vocab_size'], rows.shape[1])  # (vocab, W)
    table[checkpoint['token_ids']] = rows
    return {**checkpoint['state_dict'], 'token_embedding.weight': table}


# ----------------------------------------------------------------------------------------------
# 4. The demo: train.py and evaluate.py run exactly as a user runs them
# ----------------------------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))

# OTSeg's schedule in the demo, passed to train.py as overrides of its preset (the paper's 20k steps at
# lr 2e-4 with 1,500 warm-up steps would take hours on a CPU): a few hundred steps at a higher rate.
DEMO_SCHEDULE = dict(iters=600, batch_size=16, lr=3e-3, warmup_iters=30, prompt_tokens=4)

RUNS = [  # (run name, which tiny CLIP, matching): what the demo trains; the Sinkhorn runs first
    ('pretrained-sinkhorn', 'pretrained', 'sinkhorn'),
    ('random-sinkhorn', 'random', 'sinkhorn'),  # the honesty check: the same OTSeg on a CLIP that knows nothing
]
COMPARE_RUNS = [('pretrained-softmax', 'pretrained', 'softmax')]  # --compare: the Table 5(b) baseline


def write_clip_weights(out_dir: str, checkpoint: str, seed: int) -> dict[str, str]:
    """The two tiny CLIPs as plain state-dict files for `train.py --clip-weights`: the pretrained one and
    the same architecture with random weights (OpenAI's initialisation, seeded)."""
    pretrained = clip_state_dict(checkpoint)
    torch.manual_seed(seed)
    random_init = CLIP(**architecture(pretrained)).state_dict()
    paths = {}
    for name, state_dict in (('pretrained', pretrained), ('random', random_init)):
        paths[name] = os.path.join(out_dir, f'clip_{name}.pt')
        with atomic_save(paths[name]) as tmp:
            torch.save(state_dict, tmp)
    return paths


def progress_lines(path: str, offset: int, title: str) -> int:
    """Print the records train.py appended to its log.jsonl since `offset`, one short line each; returns
    the new offset. Only whole lines are read: a record being written is left for the next call."""
    if not os.path.isfile(path):
        return offset
    with open(path, 'rb') as f:  # bytes: offsets are exact
        f.seek(offset)
        text = f.read()
    complete = text[:text.rfind(b'\n') + 1]
    for line in complete.decode().splitlines():
        record = json.loads(line)
        if 'loss' in record:
            print(f"  {title}: step {record['step']}, loss {record['loss']:.3f}, "
                  f"about {record['eta_s']:.0f} s to go", flush=True)
    return offset + len(complete)


def run_commands(commands: list[tuple[str, list[str], str, str | None]], jobs: int) -> None:
    """Run (title, argv, log file, progress file) commands, `jobs` at a time (one thread each when several
    run at once), printing the progress records as they come and each one's time; exit with the end of
    its log if one fails."""
    env = dict(os.environ, OMP_NUM_THREADS='1') if jobs > 1 else None
    pending, running = list(commands), []
    while pending or running:
        while pending and len(running) < jobs:
            title, argv, log_path, progress = pending.pop(0)
            log = open(log_path, 'w')
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=HERE, env=env)
            running.append(dict(title=title, process=process, log=log, log_path=log_path, progress=progress,
                                offset=0, start=time.time()))
        time.sleep(0.2)
        for job in running:
            if job['progress']:
                job['offset'] = progress_lines(job['progress'], job['offset'], job['title'])
        for job in [job for job in running if job['process'].poll() is not None]:
            running.remove(job)
            job['log'].close()
            if job['process'].returncode != 0:
                with open(job['log_path']) as f:
                    sys.exit(f"error: {job['title']} failed (exit code {job['process'].returncode}); the end of "
                             f"{job['log_path']}:\n" + ''.join(f.readlines()[-15:]))
            print(f"  {job['title']}: done in {time.time() - job['start']:.0f} s", flush=True)


def results_table(results: dict[str, dict], seed: int) -> str:
    """The demo's table from evaluate.py's JSON reports, one row per (run, inference)."""
    rows = [('pretrained-sinkhorn', 'OTSeg', 'pretrained', 'Sinkhorn (MPSA)', 'OTSeg: decoder'),
            ('pretrained-sinkhorn', 'OTSeg+', 'pretrained', 'Sinkhorn (MPSA)', 'OTSeg+: decoder + score map'),
            ('pretrained-softmax', 'OTSeg', 'pretrained', 'softmax', 'decoder'),
            ('pretrained-softmax', 'OTSeg+', 'pretrained', 'softmax', 'decoder + score map'),
            ('random-sinkhorn', 'OTSeg', 'random init', 'Sinkhorn (MPSA)', 'OTSeg: decoder'),
            ('random-sinkhorn', 'OTSeg+', 'random init', 'Sinkhorn (MPSA)', 'OTSeg+: decoder + score map')]
    unseen = ', '.join(name for name, seen in zip(CLASSES, SEEN.tolist()) if not seen)
    lines = [f"Shapes world, inductive, seed {seed}: trained on the masks of {int(SEEN.sum())} seen "
             f"classes, scored on all {len(CLASSES)}", f"(unseen: {unseen}). IoU in %.", "",
             f"{'tiny CLIP':12s} {'matching':16s} {'prediction':28s} {'mIoU(S)':>8s} {'mIoU(U)':>8s} {'hIoU':>8s}"]
    for run, key, clip_name, matching, inference in rows:
        if run in results:
            r = results[run][key]  # evaluate.py writes NaN (a class never labelled nor predicted) as null
            values = [math.nan if r[k] is None else r[k] for k in ('miou_seen', 'miou_unseen', 'hiou')]
            lines.append(f"{clip_name:12s} {matching:16s} {inference:28s} " + " ".join(f"{v:8.1f}" for v in values))
    return '\n'.join(lines)


BACKGROUND = (40, 40, 40)  # how the pictures paint background pixels (not a class: ignored, as VOC's)
PATTERN_COLOURS = {'plain': (230, 230, 230), 'striped': (240, 150, 40), 'dotted': (60, 200, 230)}  # "its patterns"


def paint(label: np.ndarray) -> np.ndarray:
    """(H, W) labels over all classes (255 = background) -> (H, W, 3) RGB in each class's own colour."""
    palette = np.array([COLOURS[c] for c in CLASSES] + [BACKGROUND] * (256 - len(CLASSES)), dtype=np.uint8)
    return palette[label]


@torch.no_grad()
def overview_picture(path: str, root: str, checkpoints: dict[str, str], count: int = 8, scale: int = 3) -> str:
    """One PNG of the first `count` validation scenes holding an unseen colour: the scene, the truth and
    each model's prediction, painted in the classes' own colours; predictions are shown on the object
    pixels only (the pixels that are scored) and background is grey."""
    dataset = SegmentationDataset(PRESET, root, 'val', 'fully', transform=test_transform(PRESET))
    unseen = (~SEEN).nonzero().flatten()
    chosen = [i for i in range(len(dataset)) if torch.isin(dataset[i]['label'], unseen).any()][:count]
    samples = [dataset[i] for i in chosen]
    images = torch.stack([s['image'] for s in samples])  # (B, 3, H, W): one window is the whole scene
    labels = torch.stack([s['label'] for s in samples])  # (B, H, W), 255 = background
    columns = [('scene', [np.asarray(visualize.denormalize(image)) for image in images]),
               ('truth', [paint(label.numpy()) for label in labels])]
    for title, (checkpoint, inference) in checkpoints.items():
        model = build_model_from_checkpoint(read_otseg_checkpoint(checkpoint), None, torch.device('cpu'))
        probabilities = evaluate.make_predictor(model, CLASSES, SEEN)(images)[inference]  # (B, K, H, W)
        predicted = torch.where(labels == IGNORE_INDEX, IGNORE_INDEX, probabilities.argmax(dim=1))  # (B, H, W)
        columns.append((title, [paint(p.numpy()) for p in predicted]))
    size, header = IMAGE_SIZE * scale, 28
    canvas = Image.new('RGB', (len(columns) * (size + 6), header + len(samples) * (size + 6)), 'white')
    draw = ImageDraw.Draw(canvas)
    for c, (title, tiles) in enumerate(columns):
        for line, text in enumerate(title.split('\n')):
            draw.text((c * (size + 6) + 2, 2 + 12 * line), text, fill='black')
        for r, tile in enumerate(tiles):
            tile = Image.fromarray(tile).resize((size, size), Image.NEAREST)
            canvas.paste(tile, (c * (size + 6), header + r * (size + 6)))
    return visualize.save_picture(canvas, path)


# What the prompts do. Each template names a pattern ("a striped {} shape.") and every object is made of
# two halves, often of two patterns, so the world knows which prompt ought to win at each pixel. A class's
# per-prompt maps before transport (the cosines S^i) and after MPS (M N T^i S^i, paper Fig. 5) are compared
# on fresh scenes, whose pattern at every pixel is known.

def specialisation_scenes(seed: int, count: int = 200) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh scenes for the prompt measurements: normalised images (B, 3, H, W), labels and parts (B, H, W)."""
    images, labels, parts, _, _ = scene_batch(np.random.default_rng([seed, 2, 20240924]), count)
    return images, labels, parts


def prompt_specialisation(maps: torch.Tensor, labels: torch.Tensor, parts: torch.Tensor,
                          templates: list[str]) -> dict[str, float]:
    """How differently a class's N per-prompt maps look, and whether each pixel goes to the prompt naming
    the pattern drawn there. maps (B, K, N, h, w): one kind of per-prompt map (the cosines S^i, or
    M N T^i S^i after MPS); labels, parts (B, H, W) as render_scene returns them.

    correlation: Pearson correlation of two prompts' maps over the M pixels, averaged over the prompt pairs
        and the (scene, class present) pairs: 1 = the same picture up to scale and offset.
    share: over the patches of one class and one pattern, the part of the patch's score (the sum of its N
        map values, negative ones counted as 0) taken by the prompt naming the pattern drawn there;
        1/N = an even split, 1 = that prompt alone.
    top: how often that prompt has the largest value (chance 1/N).
    """
    B, K, N, h, w = maps.shape
    values = maps.flatten(3)  # (B, K, N, h, w) -> (B, K, N, M)
    classes = patch_majority(labels, labels.shape[-1] // w).long()  # (B, M): k + 1, 0 = background or mixed
    patterns = patch_majority(parts, parts.shape[-1] // w).long()  # (B, M): p + 1, 0 = background or mixed
    pairs = ~torch.eye(N, dtype=torch.bool)
    correlations = [torch.corrcoef(values[b, k - 1])[pairs].mean()  # (N, M) -> (N, N) -> mean off the diagonal
                    for b in range(B) for k in classes[b].unique().tolist() if k > 0]
    prompt_of = torch.full((len(PATTERNS),), -1)  # pattern -> the prompt naming it (-1: none)
    prompt_of[prompt_patterns(templates)] = torch.arange(N)
    b, m = ((classes > 0) & (patterns > 0)).nonzero(as_tuple=True)  # (P,) each: the patches of one pattern
    named = prompt_of[patterns[b, m] - 1]  # (P,)
    keep = named >= 0
    b, m, named = b[keep], m[keep], named[keep]
    patch = values[b, classes[b, m] - 1, :, m].clamp(min=0)  # (P, N)
    total = patch.sum(dim=-1)  # (P,)
    share = patch[torch.arange(len(named)), named][total > 0] / total[total > 0]
    return dict(correlation=float(torch.stack(correlations).mean()), share=float(share.mean()),
                top=float((patch.argmax(dim=-1) == named).float().mean()))


def prompt_agreement(embeddings: torch.Tensor) -> float:
    """Mean cosine similarity of two different prompts of the same class: embeddings (..., N, C)."""
    unit = F.normalize(embeddings.flatten(0, -3), dim=-1)  # (..., N, C) -> (L, N, C)
    cosines = unit @ unit.transpose(1, 2)  # (L, N, N)
    N = cosines.shape[-1]
    return float(cosines[:, ~torch.eye(N, dtype=torch.bool)].mean())


def specialisation_table(cosine: dict[str, float], after: dict[str, float], agreement: dict[str, float],
                         num_scenes: int, N: int) -> str:
    """The two maps' measurements side by side, and how alike the prompts' embeddings are."""
    rows = [('correlation', 'of two prompts\' maps of a class (1 = the same picture)'),
            ('share', f'of a patch\'s score taken by the prompt naming its pattern ({1 / N:.2f} = even split)'),
            ('top', f'how often that prompt has the largest value (chance {1 / N:.2f})')]
    lines = [f"What the {N} prompts do, on {num_scenes} fresh scenes (patches of one class and one pattern):",
             f"{'':12s} {'cosine S^i':>10s} {'after MPS':>10s}"]
    lines += [f"{key:12s} {cosine[key]:10.2f} {after[key]:10.2f}   {text}" for key, text in rows]
    lines.append(f"Two prompts of a class, mean cosine: {agreement['text']:.2f} as the tiny CLIP's texts t, "
                 f"{agreement['queries']:.2f} as OTSeg's queries q0 (after the relationship descriptor)")
    return '\n'.join(lines)


def prompts_picture(path: str, cosine: torch.Tensor, after: torch.Tensor, images: torch.Tensor,
                    labels: torch.Tensor, parts: torch.Tensor, templates: list[str], count: int = 3,
                    tile: int = 80) -> str:
    """Paper Fig. 5 in the shapes world: the first `count` scenes whose unseen object shows two patterns;
    for the object's class, each prompt's cosine map S^i and its map after MPS (each map min-max scaled).
    cosine, after (B, K, N, h, w); images (B, 3, H, W) normalised; labels, parts (B, H, W)."""
    chosen = []
    for i in range(len(images)):
        for k in (~SEEN).nonzero().flatten().tolist():
            drawn = parts[i][labels[i] == k + 1].unique().tolist()
            if len(drawn) == 2 and len(chosen) < count and (labels[i] == k + 1).sum() >= 150:
                chosen.append((i, k, [PATTERNS[p - 1] for p in drawn]))
    N = len(templates)
    names = [PATTERNS[p] for p in prompt_patterns(templates)]
    columns = ['scene', 'its patterns'] + [f'cosine: {n}' for n in names] + [f'MPS: {n}' for n in names]
    pattern_colours = np.array([BACKGROUND] + [PATTERN_COLOURS[p] for p in PATTERNS], dtype=np.uint8)
    header, gap, left = 30, 6, 120
    canvas = Image.new('RGB', (left + len(columns) * (tile + gap), header + len(chosen) * (tile + gap)), 'white')
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(columns):
        draw.text((left + c * (tile + gap) + 2, header - 14), title, fill='black')
    draw.text((left + (tile + gap) * 2 + 2, 2), 'before transport: S^i', fill='black')
    draw.text((left + (tile + gap) * (2 + N) + 2, 2), 'after MPS: M N T^i S^i', fill='black')
    for r, (i, k, drawn) in enumerate(chosen):
        y = header + r * (tile + gap)
        draw.text((2, y + tile // 2 - 12), f"{CLASSES[k]} (unseen)\n{' and '.join(drawn)}", fill='black')
        drawn_here = torch.where(labels[i] == k + 1, parts[i], 0).numpy()  # the object's halves, 0 elsewhere
        tiles = [visualize.denormalize(images[i]), Image.fromarray(pattern_colours[drawn_here])]
        tiles += [visualize.heatmap(maps[i, k, n]) for maps in (cosine, after) for n in range(N)]
        for c, picture in enumerate(tiles):
            canvas.paste(picture.resize((tile, tile), Image.NEAREST), (left + c * (tile + gap), y))
    return visualize.save_picture(canvas, path)


def demo(out_dir: str = 'runs/shapes', checkpoint: str = CHECKPOINT, seed: int = 0, num_train: int = 2000,
         num_val: int = 300, schedule: dict = DEMO_SCHEDULE, jobs: int = 2, num_pictures: int = 6,
         compare: bool = False, picture: str | None = None, num_scenes: int = 200) -> str:
    """The whole demo (see the module docstring); returns the table it prints."""
    start = time.time()
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    runs = RUNS + (COMPARE_RUNS if compare else [])
    print(f"1. writing the shapes world ({num_train} training and {num_val} validation scenes) to {out_dir}/world",
          flush=True)
    root = write_world(os.path.join(out_dir, 'world'), num_train, num_val, seed)
    meta = read_checkpoint(checkpoint)
    quality = meta['history'][-1]
    print(f"2. the pretrained tiny CLIP: {checkpoint}, made by `{meta.get('command', '?')}`; zero-shot quality "
          f"before any segmentation training: image {quality['image']:.2f}, patch {quality['patch']:.2f} "
          f"(chance {1 / len(CLASSES):.2f}), pattern {quality['pattern']:.2f} (chance {1 / len(TEMPLATES):.2f})")
    weights = write_clip_weights(out_dir, checkpoint, seed)
    print(f"3. training OTSeg on the seen classes' masks ({len(runs)} runs of {schedule['iters']} steps of "
          f"{schedule['batch_size']} images, {jobs} at a time)", flush=True)
    train = []
    for name, clip_name, matching in runs:
        run_dir = os.path.join(out_dir, name)
        argv = [sys.executable, 'train.py', '--dataset', os.path.join(root, PRESET_FILE), '--setting', 'inductive',
                '--data-root', root, '--clip-weights', weights[clip_name], '--matching', matching,
                '--output-dir', run_dir, '--iters', str(schedule['iters']), '--batch-size', str(schedule['batch_size']),
                '--micro-batch', str(schedule['batch_size']), '--lr', str(schedule['lr']),
                '--warmup-iters', str(schedule['warmup_iters']), '--prompt-tokens', str(schedule['prompt_tokens']),
                '--seed', str(seed), '--workers', '0', '--device', 'cpu',
                '--log-every', str(max(1, schedule['iters'] // 4)), '--save-every', str(schedule['iters'])]
        os.makedirs(run_dir, exist_ok=True)
        progress = os.path.join(run_dir, 'log.jsonl')
        if os.path.exists(progress):
            os.remove(progress)  # train.py appends; a rerun's progress starts afresh
        train.append((f"train.py {name}", argv, os.path.join(run_dir, 'train.log'), progress))
    run_commands(train, jobs)
    print("4. evaluate.py on all classes of the validation scenes, with pictures", flush=True)
    pictures = os.path.join(out_dir, 'pictures')
    evaluations = []
    for name, _, _ in runs:
        run_dir = os.path.join(out_dir, name)
        argv = [sys.executable, 'evaluate.py', '--checkpoint', os.path.join(run_dir, 'ckpt.pt'), '--data-root', root,
                '--device', 'cpu', '--workers', '0', '--output-json', os.path.join(run_dir, 'eval.json')]
        if name == 'pretrained-sinkhorn':
            argv += ['--visualize', os.path.join(pictures, name), '--num-visualize', str(num_pictures)]
        evaluations.append((f"evaluate.py {name}", argv, os.path.join(run_dir, 'eval.log'), None))
    run_commands(evaluations, jobs)
    overview = overview_picture(os.path.join(pictures, 'overview.png'), root, {
        'pretrained CLIP\nOTSeg': (os.path.join(out_dir, 'pretrained-sinkhorn', 'ckpt.pt'), 'OTSeg'),
        'pretrained CLIP\nOTSeg+': (os.path.join(out_dir, 'pretrained-sinkhorn', 'ckpt.pt'), 'OTSeg+'),
        'random CLIP\nOTSeg': (os.path.join(out_dir, 'random-sinkhorn', 'ckpt.pt'), 'OTSeg'),
        'random CLIP\nOTSeg+': (os.path.join(out_dir, 'random-sinkhorn', 'ckpt.pt'), 'OTSeg+')}, num_pictures)
    print(f"5. what the prompts do: per-prompt maps of the pretrained OTSeg on {num_scenes} fresh scenes", flush=True)
    model = build_model_from_checkpoint(read_otseg_checkpoint(os.path.join(out_dir, 'pretrained-sinkhorn', 'ckpt.pt')),
                                        None, torch.device('cpu')).eval()
    images, labels, parts = specialisation_scenes(seed, num_scenes)
    cosine, after = visualize.prompt_score_maps(model, images, CLASSES)  # (B, K, N, h, w) each
    measured = {name: prompt_specialisation(maps, labels, parts, model.templates)
                for name, maps in (('cosine', cosine), ('mps', after))}
    with torch.no_grad():
        measured['agreement'] = dict(text=prompt_agreement(model.text_embeddings(CLASSES)),
                                     queries=prompt_agreement(model.encode(images, CLASSES)[1]))
    prompts = prompts_picture(os.path.join(pictures, 'prompts.png'), cosine, after, images, labels, parts,
                              model.templates)
    if picture:
        os.makedirs(os.path.dirname(os.path.abspath(picture)), exist_ok=True)
        shutil.copyfile(prompts, picture)
    results = {}
    for name, _, _ in runs:
        with open(os.path.join(out_dir, name, 'eval.json')) as f:
            results[name] = json.load(f)['results']
    table = results_table(results, seed) + '\n\n' + specialisation_table(
        measured['cosine'], measured['mps'], measured['agreement'], num_scenes, len(model.templates))
    with atomic_save(os.path.join(out_dir, 'results.txt')) as tmp, open(tmp, 'w') as f:
        f.write(table + '\n')
    with atomic_save(os.path.join(out_dir, 'results.json')) as tmp, open(tmp, 'w') as f:
        json.dump(dict(seed=seed, results=results, prompts=measured), f, indent=1)
    print('\n' + table + '\n')
    print(f"pictures: {prompts} (paper Fig. 5: each prompt's map on unseen objects, before and after MPS)"
          + (f", copied to {picture}" if picture else ''))
    print(f"          {overview} (scenes with an unseen colour: truth and predictions in the classes' own colours)")
    print(f"          {pictures}/pretrained-sinkhorn/ (evaluate.py --visualize: image | truth | OTSeg+ prediction, "
          f"and the per-prompt score maps)")
    print(f"table: {out_dir}/results.txt (and .json); logs and checkpoints: {out_dir}/*/")
    print(f"total time: {time.time() - start:.0f} s")
    return table


# ----------------------------------------------------------------------------------------------
# 5. Command line
# ----------------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="The shapes world: zero-shot segmentation end to end on a CPU")
    parser.add_argument("command", nargs="?", default="demo", choices=["demo", "pretrain", "world"],
                        help="demo (default): the whole demo; pretrain: remake the tiny CLIP; world: only the world")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--checkpoint", default=CHECKPOINT, help="the tiny CLIP (pretrain writes, the demo reads it)")
    group = parser.add_argument_group("demo and world")
    group.add_argument("--out", default="runs/shapes", help="the demo's folder (world, runs, pictures, table)")
    group.add_argument("--root", default=None, help="where `world` writes the scenes (default: OUT/world)")
    group.add_argument("--num-train", type=int, default=2000)
    group.add_argument("--num-val", type=int, default=300)
    group.add_argument("--iters", type=int, default=DEMO_SCHEDULE['iters'], help="OTSeg training steps")
    group.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs at a time")
    group.add_argument("--num-pictures", type=int, default=6)
    group.add_argument("--compare", action="store_true",
                       help="also train the softmax baseline (paper Table 5(b)) and add it to the table")
    group.add_argument("--picture", default=None,
                       help="also write the per-prompt picture (paper Fig. 5) here, e.g. assets/shapes_prompts.png")
    group = parser.add_argument_group("pretrain")
    group.add_argument("--steps", type=int, default=600, help="600 made the shipped checkpoint")
    group.add_argument("--batch-size", type=int, default=128)
    group.add_argument("--lr", type=float, default=1e-3)
    return parser


def main(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "demo":
        demo(args.out, args.checkpoint, args.seed, args.num_train, args.num_val,
             dict(DEMO_SCHEDULE, iters=args.iters), args.jobs, args.num_pictures, args.compare, args.picture)
    elif args.command == "world":
        root = args.root or os.path.join(args.out, 'world')
        write_world(root, args.num_train, args.num_val, args.seed)
        print(f"wrote {args.num_train} + {args.num_val} scenes to {root}")
    elif args.command == "pretrain":
        command = "python shapes.py pretrain " + " ".join(sys.argv[2:])
        start = time.time()
        model, history = pretrain(args.steps, args.batch_size, args.lr, seed=args.seed)
        minutes = (time.time() - start) / 60
        save_checkpoint(model, args.checkpoint, command=command.strip(), seed=args.seed, steps=args.steps,
                        batch_size=args.batch_size, lr=args.lr, minutes=minutes, threads=torch.get_num_threads(),
                        history=history, torch_version=str(torch.__version__))
        print(f"wrote {args.checkpoint} ({os.path.getsize(args.checkpoint) / 1e6:.1f} MB) after {minutes:.1f} min: "
              f"zero-shot image {history[-1]['image']:.3f}, patch {history[-1]['patch']:.3f}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
