"""data.py -- the datasets of the OTSeg protocol: PASCAL VOC 2012, PASCAL Context-59 and COCO-Stuff 164K
(the zero-shot benchmarks of the paper's Table 1, Sec. 5.1) and ADE20K-150 (a cross-dataset target of
Table 2, Sec. 5.4), with their class lists, zero-shot splits, prompt templates (Sec. 5.2) and the training
pipeline of the authors' release, which runs on MMSegmentation 0.24: its dataset configs
(`configs/_base_/datasets/*.py`) and the transforms of MMSegmentation's `mmseg/datasets/pipelines/transforms.py`.
Where to download each dataset, the layouts on disk, the preparation commands and what each error means:
docs/datasets.md. Preparation, fake datasets and statistics are tools, in tools/datasets.py.

What an item is
---------------
    dict(image=float (3, H, W) normalised with the preset's mean and std (ImageNet's; CLIP's for ADE20K),
         label=long (H, W) in {0..K'-1, 255}, name=str, orig_size=(H0, W0))

Labels are class indices after MMSegmentation's label reduction: VOC's and Context's background and
ADE's "other" (value 0 in the PNGs) become 255 = ignored and classes 1..K become 0..K-1 (COCO-Stuff's
*_labelTrainIds.png are already 0..170). K' depends on the setting (paper Sec. 2.1 and 5.1):

    setting        train split                                              val split
    inductive      K' = #seen: seen class -> its index among the seen,      K' = K (all classes)
                   unseen pixels -> 255 (the images stay in the set)
    transductive   K' = K: labels over all classes (the training loop,      K' = K
                   which knows the unseen classes, overwrites their pixels
                   with pseudo-labels)
    fully          K' = K (every class is seen)                            K' = K

Training pipeline (MMSegmentation's order, the release's dataset configs) and who does each step
-------------------------------------------------------------------------------------------------
    random rescale  r ~ U(0.5, 2) of (2048, 512) (Context (520, 520)), keep aspect   size rule: by hand
                    image bilinear (torchvision), label nearest as OpenCV's          label: by hand
    random crop     512 (Context 480), < 75% of the crop one class, 10 tries         by hand
    flip            horizontal, p = 0.5                                               torchvision
    photometric     brightness, contrast, saturation, hue in OpenCV's 8-bit HSV       by hand
    normalise       the preset's mean/std on 0-255 values                             torchvision
    pad             to the crop, image 0, label 255                                   torchvision
Test time: resize so that the short side is 512 (Context 520), keep aspect; the label stays at the
original size for scoring. evaluate.py then runs the sliding window of the preset (window_of).
Given the same random draws, every step gives MMSegmentation's integers exactly, except the image's
bilinear resize: OpenCV's works in 11-bit fixed point, torchvision's in floats, so about one value in five
differs by one grey level (never more).

Reproducible loading
--------------------
Every random draw of the transforms comes from torch's global generator (none from numpy or `random`), so
seeding torch before `dataset[i]` fixes the augmentation of that item. train.py seeds it for each sample
from the run's seed and the sample's position in the data order (its SeededSamples): a sample is
augmented the same whichever process or DataLoader worker loads it, and again after a resume. A plain
DataLoader seeds each worker from its `generator` argument instead (base seed + worker id), which repeats
only with the same number of workers.

Run
---
    python -m tools.datasets fake /tmp/fake --dataset voc              # no download: a tiny VOC
    python data.py --dataset voc --data-root /tmp/fake             # one sample through the pipeline
"""
import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import clip
from losses import IGNORE_INDEX  # 255: a label that is a negative for every class (losses.py)

# ----------------------------------------------------------------------------------------------
# Prompt templates (paper Sec. 5.2: N = 6 for VOC, N = 8 for Context and COCO-Stuff).
# ----------------------------------------------------------------------------------------------

TEMPLATES = {'N6': [
    'a photo of a {}.',
    'a portrait of a {}.',
    'a part of a {}.',
    'a segment of a {}.',
    'a photo of small {}.',
    'a photo of medium {}.',
]}
TEMPLATES['N8'] = TEMPLATES['N6'] + ['a photo of large {}.', 'a background of a {}.']  # the six, then two more

# ----------------------------------------------------------------------------------------------
# Class lists (0-based, in label order after label reduction) and unseen classes (ZS3Net/ZegCLIP
# splits, the same in ZegCLIP and OTSeg).
# ----------------------------------------------------------------------------------------------

VOC_CLASSES = [
    'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
    'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa',
    'train', 'tvmonitor',
]
VOC_UNSEEN = [  # pottedplant, sheep, sofa, train, tvmonitor
    15, 16, 17, 18, 19,
]

CONTEXT_CLASSES = [
    'aeroplane', 'bag', 'bed', 'bedclothes', 'bench', 'bicycle', 'bird', 'boat', 'book',
    'bottle', 'building', 'bus', 'cabinet', 'car', 'cat', 'ceiling', 'chair', 'cloth',
    'computer', 'cow', 'cup', 'curtain', 'dog', 'door', 'fence', 'floor', 'flower', 'food',
    'grass', 'ground', 'horse', 'keyboard', 'light', 'motorbike', 'mountain', 'mouse',
    'person', 'plate', 'platform', 'pottedplant', 'road', 'rock', 'sheep', 'shelves',
    'sidewalk', 'sign', 'sky', 'snow', 'sofa', 'table', 'track', 'train', 'tree', 'truck',
    'tv monitor', 'wall', 'water', 'window', 'wood',
]
CONTEXT_UNSEEN = [  # aeroplane, bird, boat, cat, cow, fence, keyboard, motorbike, sofa, tv monitor
    0, 6, 7, 14, 19, 24, 31, 33, 48, 54,
]

COCO_CLASSES = [
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat',
    'traffic light', 'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat',
    'dog', 'horse', 'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'backpack',
    'umbrella', 'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball',
    'kite', 'baseball bat', 'baseball glove', 'skateboard', 'surfboard', 'tennis racket',
    'bottle', 'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple',
    'sandwich', 'orange', 'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair',
    'couch', 'potted plant', 'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse',
    'remote', 'keyboard', 'cell phone', 'microwave', 'oven', 'toaster', 'sink', 'refrigerator',
    'book', 'clock', 'vase', 'scissors', 'teddy bear', 'hair drier', 'toothbrush', 'banner',
    'blanket', 'branch', 'bridge', 'building-other', 'bush', 'cabinet', 'cage', 'cardboard',
    'carpet', 'ceiling-other', 'ceiling-tile', 'cloth', 'clothes', 'clouds', 'counter',
    'cupboard', 'curtain', 'desk-stuff', 'dirt', 'door-stuff', 'fence', 'floor-marble',
    'floor-other', 'floor-stone', 'floor-tile', 'floor-wood', 'flower', 'fog', 'food-other',
    'fruit', 'furniture-other', 'grass', 'gravel', 'ground-other', 'hill', 'house', 'leaves',
    'light', 'mat', 'metal', 'mirror-stuff', 'moss', 'mountain', 'mud', 'napkin', 'net',
    'paper', 'pavement', 'pillow', 'plant-other', 'plastic', 'platform', 'playingfield',
    'railing', 'railroad', 'river', 'road', 'rock', 'roof', 'rug', 'salad', 'sand', 'sea',
    'shelf', 'sky-other', 'skyscraper', 'snow', 'solid-other', 'stairs', 'stone', 'straw',
    'structural-other', 'table', 'tent', 'textile-other', 'towel', 'tree', 'vegetable',
    'wall-brick', 'wall-concrete', 'wall-other', 'wall-panel', 'wall-stone', 'wall-tile',
    'wall-wood', 'water-other', 'waterdrops', 'window-blind', 'window-other', 'wood',
]
COCO_UNSEEN = [  # cow, giraffe, suitcase, frisbee, skateboard, carrot, scissors, cardboard, clouds, grass, playingfield, river, road, tree, wall-concrete
    19, 23, 28, 29, 36, 51, 76, 88, 94, 112, 133, 136, 137, 157, 160,
]

ADE_CLASSES = [
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed ', 'windowpane',
    'grass', 'cabinet', 'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant',
    'curtain', 'chair', 'car', 'water', 'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror',
    'rug', 'field', 'armchair', 'seat', 'fence', 'desk', 'rock', 'wardrobe', 'lamp', 'bathtub',
    'railing', 'cushion', 'base', 'box', 'column', 'signboard', 'chest of drawers', 'counter',
    'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator', 'grandstand', 'path', 'stairs',
    'runway', 'case', 'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge',
    'bookcase', 'blind', 'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench',
    'countertop', 'stove', 'palm', 'kitchen island', 'computer', 'swivel chair', 'boat', 'bar',
    'arcade machine', 'hovel', 'bus', 'towel', 'light', 'truck', 'tower', 'chandelier',
    'awning', 'streetlight', 'booth', 'television receiver', 'airplane', 'dirt track',
    'apparel', 'pole', 'land', 'bannister', 'escalator', 'ottoman', 'bottle', 'buffet',
    'poster', 'stage', 'van', 'ship', 'fountain', 'conveyer belt', 'canopy', 'washer',
    'plaything', 'swimming pool', 'stool', 'barrel', 'basket', 'waterfall', 'tent', 'bag',
    'minibike', 'cradle', 'oven', 'ball', 'food', 'step', 'tank', 'trade name', 'microwave',
    'pot', 'animal', 'bicycle', 'lake', 'dishwasher', 'screen', 'blanket', 'sculpture', 'hood',
    'sconce', 'vase', 'traffic light', 'tray', 'ashcan', 'fan', 'pier', 'crt screen', 'plate',
    'monitor', 'bulletin board', 'shower', 'radiator', 'glass', 'clock', 'flag',
]
ADE_UNSEEN = []  # a cross-dataset target only: every class is scored

# ----------------------------------------------------------------------------------------------
# Dataset presets: everything that belongs to the data, one plain dict per dataset, with the
# paper's / release's value beside each entry. train.py and evaluate.py both read this table.
# Adding a dataset = adding one entry, or passing such a dict wherever a name is accepted (on the
# command line: a JSON file holding it, as the shapes demo passes its world's preset, shapes.PRESET).
# ----------------------------------------------------------------------------------------------

SETTINGS = ('inductive', 'transductive', 'fully')  # paper Sec. 5.1: which classes train (the docstring's table)
# Normalisation on 0-255 RGB values. The release normalises VOC, Context and COCO-Stuff with ImageNet's
# statistics and ADE20K with CLIP's (0..1 values times 255, as its config writes them).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
CLIP_MEAN = tuple(v * 255 for v in clip.CLIP_MEAN)
CLIP_STD = tuple(v * 255 for v in clip.CLIP_STD)

# A split is a list of parts; each part names an image folder, a label folder and either a split file
# (`list`: one image name per line) or nothing, in which case the image folder is listed. Paths are
# relative to the dataset folder. Image file = images/NAME + image_suffix, label = labels/NAME + label_suffix.
DATASETS = {
    'voc': dict(
        name='PASCAL VOC 2012',
        classes=VOC_CLASSES,                 # 20 classes; background -> 255, not scored
        unseen=VOC_UNSEEN,                   # 5 unseen (ZS3Net split)
        templates=TEMPLATES['N6'],           # N = 6 prompts (paper Sec. 5.2)
        folder='VOCdevkit/VOC2012',          # conventional folder name under a data root
        splits={
            # The release trains on train.txt + trainaug.txt, each with its own labels (its
            # configs/_base_/datasets/voc12_20_aug_512x512.py); ZegCLIP used train + aug = 10,582.
            'train': [dict(images='JPEGImages', labels='SegmentationClass',
                           list='ImageSets/Segmentation/train.txt'),
                      dict(images='JPEGImages', labels='SegmentationClassAug',
                           list='ImageSets/Segmentation/trainaug.txt')],
            'val': [dict(images='JPEGImages', labels='SegmentationClass',
                         list='ImageSets/Segmentation/val.txt')],
        },
        sizes={'train': 12046, 'val': 1449},  # 1,464 + 10,582 training samples
        image_suffix='.jpg', label_suffix='.png',
        reduce_zero_label=True,              # PNG 0 = background -> 255, 1..20 -> 0..19
        mean=IMAGENET_MEAN, std=IMAGENET_STD,  # the release's configs/_base_/datasets/voc12_20_512x512.py
        crop_size=512,                       # training crop
        train_scale=(2048, 512),             # random rescale of this scale ...
        ratio_range=(0.5, 2.0),              # ... by r ~ U(0.5, 2)
        cat_max_ratio=0.75,                  # at most 75% of a crop from one class
        test_short_side=512,                 # test resize: short side 512, keep aspect
        test_max_long_side=None,             # (the release's min_size=512 lifts the 2048 cap)
        window_crop=512, window_stride=426,  # sliding-window inference
        help='see docs/datasets.md: VOC 2012 + SBD, then python -m tools.datasets prepare-voc-aug',
    ),
    'context': dict(
        name='PASCAL Context-59',
        classes=CONTEXT_CLASSES,             # 59 classes; background -> 255, not scored
        unseen=CONTEXT_UNSEEN,               # 10 unseen
        templates=TEMPLATES['N8'],           # N = 8
        folder='VOCdevkit/VOC2010',
        splits={
            'train': [dict(images='JPEGImages', labels='SegmentationClassContext',
                           list='ImageSets/SegmentationContext/train.txt')],
            'val': [dict(images='JPEGImages', labels='SegmentationClassContext',
                         list='ImageSets/SegmentationContext/val.txt')],
        },
        sizes={'train': 4996, 'val': 5104},
        image_suffix='.jpg', label_suffix='.png',
        reduce_zero_label=True,              # 0 = background -> 255, 1..59 -> 0..58
        mean=IMAGENET_MEAN, std=IMAGENET_STD,  # the release's configs/_base_/datasets/context59.py
        crop_size=480,                       # Context trains on 480 crops
        train_scale=(520, 520),
        ratio_range=(0.5, 2.0),
        cat_max_ratio=0.75,
        test_short_side=520,
        test_max_long_side=None,
        window_crop=480, window_stride=80,
        help='see docs/datasets.md: VOC 2010 + the Detail API conversion (SegmentationClassContext)',
    ),
    'coco': dict(
        name='COCO-Stuff 164K',
        classes=COCO_CLASSES,                # 171 classes, every one scored
        unseen=COCO_UNSEEN,                  # 15 unseen
        templates=TEMPLATES['N8'],           # N = 8
        folder='coco_stuff164k',
        splits={
            'train': [dict(images='images/train2017', labels='annotations/train2017')],
            'val': [dict(images='images/val2017', labels='annotations/val2017')],
        },
        sizes={'train': 118287, 'val': 5000},
        image_suffix='.jpg', label_suffix='_labelTrainIds.png',
        reduce_zero_label=False,             # labelTrainIds already hold 0..170 and 255
        mean=IMAGENET_MEAN, std=IMAGENET_STD,  # the release's configs/_base_/datasets/cocostuff_512x512.py
        crop_size=512,
        train_scale=(2048, 512),
        ratio_range=(0.5, 2.0),
        cat_max_ratio=0.75,
        test_short_side=512,
        test_max_long_side=None,
        window_crop=512, window_stride=426,
        help='see docs/datasets.md: COCO 2017 images + stuffthingmaps, then python -m tools.datasets prepare-coco',
    ),
    'ade': dict(
        name='ADE20K-150',
        classes=ADE_CLASSES,                 # 150 classes, a cross-dataset target: all scored
        unseen=ADE_UNSEEN,
        templates=TEMPLATES['N8'],
        folder='ADEChallengeData2016',
        splits={
            'train': [dict(images='images/training', labels='annotations/training')],
            'val': [dict(images='images/validation', labels='annotations/validation')],
        },
        sizes={'train': 20210, 'val': 2000},
        image_suffix='.jpg', label_suffix='.png',
        reduce_zero_label=True,              # 0 = other -> 255, 1..150 -> 0..149
        mean=CLIP_MEAN, std=CLIP_STD,        # CLIP's: the release's configs/_base_/datasets/ade.py
        crop_size=512,
        train_scale=(2048, 512),
        ratio_range=(0.5, 2.0),
        cat_max_ratio=0.75,
        test_short_side=512,
        test_max_long_side=2048,             # the release's ADE test resize has no min_size: fit (2048, 512)
        window_crop=512, window_stride=426,
        help='see docs/datasets.md: ADEChallengeData2016.zip, used as is',
    ),
}

# What a dict preset may leave out (the shapes demo's, a user's own dataset): the common values above.
PRESET_DEFAULTS = dict(
    name='custom dataset', unseen=[], templates=TEMPLATES['N8'], folder=None, sizes={},
    image_suffix='.jpg', label_suffix='.png', reduce_zero_label=False, crop_size=512,
    train_scale=(2048, 512), ratio_range=(0.5, 2.0), cat_max_ratio=0.75, test_short_side=512,
    test_max_long_side=None, window_crop=512, window_stride=426, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    help='check the layout in the preset',
)


class DatasetError(ValueError):
    """A problem with the files on disk; the message names the file and what to do.

    An exception in a DataLoader worker reaches the main process as a new one built from a single string,
    the worker's whole traceback ("Caught DatasetError in DataLoader worker process 0. Original Traceback
    ... DatasetError: MESSAGE"). The constructor keeps only MESSAGE, so a program prints the same one line
    whether the error happened in a worker or not.
    """

    def __init__(self, message: str):
        if message.startswith('Caught DatasetError') and 'DatasetError: ' in message:
            message = message.rsplit('DatasetError: ', 1)[1].strip()
        super().__init__(message)


def check_classes(preset: dict) -> None:
    """Raise ValueError when a preset's class list or unseen split cannot be right."""
    classes, unseen = preset['classes'], preset['unseen']
    if not classes or not all(isinstance(c, str) and c.strip() for c in classes):
        raise ValueError(f"{preset['name']}: the class list must be non-empty names, not {classes!r}")
    names = [c.strip() for c in classes]
    repeated = sorted({c for c in names if names.count(c) > 1})
    if repeated:
        raise ValueError(f"{preset['name']}: class names must differ (the text embeddings tell the classes "
                         f"apart by name), but {repeated} appear more than once")
    if len(set(unseen)) != len(unseen) or not all(isinstance(k, int) and 0 <= k < len(classes) for k in unseen):
        raise ValueError(f"{preset['name']}: unseen must list distinct class indices in 0..{len(classes) - 1}, "
                         f"not {list(unseen)}")
    if len(unseen) == len(classes):
        raise ValueError(f"{preset['name']}: every class is unseen; at least one class must be seen")


def read_preset_file(path: str) -> dict:
    """The preset dict a JSON file holds (a dataset of one's own on the command line)."""
    try:
        with open(os.path.expanduser(path)) as f:
            preset = json.load(f)
    except (OSError, ValueError) as err:  # json's decoding errors are ValueErrors
        raise ValueError(f"cannot read the dataset preset {path} ({err})") from None
    if not isinstance(preset, dict):
        raise ValueError(f"{path} holds a {type(preset).__name__}, not a dataset preset (a JSON object)")
    return preset


def preset_stem(dataset: str) -> str:
    """A short name for file names: the preset's name, or a preset file's name without folder and .json."""
    return os.path.splitext(os.path.basename(dataset))[0]


def get_preset(dataset: str | dict, crop_size: int | None = None) -> dict:
    """A preset by name ('voc', 'context', 'coco', 'ade'), a dict, or the path of a JSON file holding one;
    missing keys from PRESET_DEFAULTS.

    crop_size, for small runs (tests, CPU trials): crop, rescale, test resize and windows of the preset
    shrink together, so that a 64-pixel trial keeps the proportions of the 512-pixel protocol.
    """
    if isinstance(dataset, str) and dataset.endswith('.json'):
        dataset = read_preset_file(dataset)
    if isinstance(dataset, str):
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}: choose one of {sorted(DATASETS)} or give a preset "
                             f"(a dict; on the command line a .json file of one)")
        preset = {**PRESET_DEFAULTS, **DATASETS[dataset]}
    else:
        missing = {'classes', 'splits'} - set(dataset)
        if missing:
            raise ValueError(f"a dataset preset needs {sorted(missing)} (see DATASETS in data.py for the keys)")
        preset = {**PRESET_DEFAULTS, **dataset}
    check_classes(preset)
    if crop_size is not None:
        scale = crop_size / preset['crop_size']
        preset.update(
            crop_size=crop_size, window_crop=crop_size,
            window_stride=max(1, round(preset['window_stride'] * scale)),
            train_scale=tuple(round(s * scale) for s in preset['train_scale']),
            test_short_side=round(preset['test_short_side'] * scale),
            test_max_long_side=(None if preset['test_max_long_side'] is None
                                else round(preset['test_max_long_side'] * scale)))
    return preset


def window_of(preset: dict) -> dict:
    """The sliding window of evaluation: dict(crop=(h, w), stride=(h, w))."""
    return dict(crop=(preset['window_crop'],) * 2, stride=(preset['window_stride'],) * 2)


def seen_mask(num_classes: int, unseen: list[int]) -> torch.Tensor:
    """bool (K,): True for the seen classes. Presets and checkpoints store the unseen class indices;
    every part of the code that needs to know which classes are seen takes this mask (names of the seen
    classes: `[n for n, s in zip(names, seen.tolist()) if s]`)."""
    seen = torch.ones(num_classes, dtype=torch.bool)
    seen[torch.tensor(list(unseen), dtype=torch.long)] = False
    return seen


# ----------------------------------------------------------------------------------------------
# Label tables. Each is a pure function returning a 256-entry lookup table (uint8 label -> label),
# so a label map is converted with one indexing operation and the tests can check it by hand.
# ----------------------------------------------------------------------------------------------

def reduce_zero_label_table() -> torch.Tensor:
    """MMSegmentation's reduce_zero_label: 0 -> 255, k -> k - 1 for 1..254, 255 -> 255. Long (256,)."""
    table = torch.arange(256) - 1
    table[0] = IGNORE_INDEX
    table[255] = IGNORE_INDEX
    return table


def label_remap_table(seen: torch.Tensor, setting: str) -> torch.Tensor:
    """Lookup table from labels over all classes to the labels a setting trains on. Long (256,).

    inductive: seen class c -> its index among the seen classes, unseen -> 255;
    transductive / fully: identity on 0..K-1. 255 stays 255; values >= K map to 255. seen: bool (K,).
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, not {setting!r}")
    table = torch.full((256,), IGNORE_INDEX, dtype=torch.long)
    kept = seen.nonzero().flatten() if setting == 'inductive' else torch.arange(len(seen))  # classes trained on
    table[kept] = torch.arange(len(kept))
    return table


# ----------------------------------------------------------------------------------------------
# Reading the files. Every failure becomes a DatasetError that names the file, so that an error in a
# DataLoader worker says which file and what to do.
# ----------------------------------------------------------------------------------------------

def read_image(path: str) -> torch.Tensor:
    """uint8 (3, H, W) RGB, the pixels as stored.

    The EXIF orientation tag is ignored on purpose. MMSegmentation's loader (OpenCV's imdecode) turns a
    tagged JPEG upright but reads its label PNG as stored, so there a tagged image and its label no longer
    line up; read as stored, both stay aligned.
    """
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert('RGB'))   # convert() forces the full decode
    except FileNotFoundError:
        raise DatasetError(f"image {path} not found: is the dataset complete? (the split file lists it)") from None
    except (OSError, ValueError) as err:              # PIL.UnidentifiedImageError is an OSError
        raise DatasetError(f"cannot read image {path} ({err}): the file is corrupt or truncated; "
                           "download it again or remove its name from the split") from err
    return torch.from_numpy(array.copy()).permute(2, 0, 1)   # (H, W, 3) -> (3, H, W)


def read_label(path: str) -> torch.Tensor:
    """uint8 (H, W) class indices (a palette PNG gives its indices, as VOC's SegmentationClass)."""
    try:
        with Image.open(path) as img:
            if img.mode not in ('P', 'L', 'I', 'I;16'):
                raise DatasetError(f"label {path} is a {img.mode} image; labels must be single-channel "
                                   "index PNGs (palette or grayscale), as written by the standard preparation")
            array = np.asarray(img)
    except FileNotFoundError:
        raise DatasetError(f"label {path} not found: every image needs a label PNG; "
                           "check the preparation step") from None
    except DatasetError:
        raise
    except (OSError, ValueError) as err:
        raise DatasetError(f"cannot read label {path} ({err}): the file is corrupt; prepare it again") from err
    if array.min() < 0 or array.max() > 255:
        raise DatasetError(f"label {path} holds values outside 0..255 ({array.min()}..{array.max()})")
    return torch.from_numpy(array.astype(np.uint8))


def resolve_root(preset: dict, root: str) -> Path:
    """The dataset folder: `root` itself, or root/<preset folder> when that exists
    (data/ -> data/VOCdevkit/VOC2012)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data root {root} does not exist ({preset['name']}: {preset['help']}; or write a "
                           f"tiny fake one with `python -m tools.datasets fake DIR --dataset NAME`)")
    if preset['folder'] and (root / preset['folder']).is_dir():
        return root / preset['folder']
    return root


def list_samples(preset: dict, root: Path, split: str) -> list[tuple[str, str, str]]:
    """(image path, label path, name) of every sample of a split, checked against the folders on disk."""
    if split not in preset['splits']:
        raise ValueError(f"split must be one of {sorted(preset['splits'])}, not {split!r}")
    samples = []
    for part in preset['splits'][split]:
        image_dir, label_dir = root / part['images'], root / part['labels']
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                raise DatasetError(f"folder {folder} not found: {root} does not have the {preset['name']} layout "
                                   f"(expected {part['images']}/ and {part['labels']}/; {preset['help']})")
        images = {f for f in os.listdir(image_dir) if f.endswith(preset['image_suffix'])}
        labels = set(os.listdir(label_dir))
        if 'list' in part:
            list_file = root / part['list']
            if not list_file.is_file():
                raise DatasetError(f"split file {list_file} not found ({preset['help']})")
            names = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
        else:
            names = sorted(f[:-len(preset['image_suffix'])] for f in images)
        # One directory listing per folder is cheap even for COCO's 118k images; the files themselves are
        # read (and checked) in __getitem__.
        no_image = [n for n in names if n + preset['image_suffix'] not in images]
        no_label = [n for n in names if n + preset['label_suffix'] not in labels]
        if no_image:
            raise DatasetError(f"{len(no_image)} images of {part.get('list', image_dir)} are missing from "
                               f"{image_dir}, e.g. {no_image[0] + preset['image_suffix']}")
        if no_label:
            raise DatasetError(f"{len(no_label)} images have no label in {label_dir}, e.g. "
                               f"{image_dir / (no_label[0] + preset['image_suffix'])} needs "
                               f"{label_dir / (no_label[0] + preset['label_suffix'])} ({preset['help']})")
        samples += [(str(image_dir / (n + preset['image_suffix'])), str(label_dir / (n + preset['label_suffix'])), n)
                    for n in names]
    return samples


# ----------------------------------------------------------------------------------------------
# Training transforms, in MMSegmentation's order (mmseg/datasets/pipelines/transforms.py, with the
# settings of the release's dataset configs). Each takes and returns (image, label) with image a
# tv_tensors.Image (uint8 until normalised) and label a tv_tensors.Mask (uint8), so they chain in a
# v2.Compose. torchvision does the flip, the image resizing, the normalisation and the padding; written
# here are only the pieces torchvision has no equal for. Every random draw uses torch's global generator.
# ----------------------------------------------------------------------------------------------

def rescale_size(height: int, width: int, short_side: float, long_side: float | None = None) -> tuple[int, int]:
    """MMCV's keep-ratio rescale: the largest size with short side <= short_side and long <= long_side.

    factor = min(short_side / min(h, w), long_side / max(h, w)); new = int(side * factor + 0.5).
    """
    factor = short_side / min(height, width)
    if long_side is not None:
        factor = min(factor, long_side / max(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def nearest_index(in_size: int, out_size: int) -> torch.Tensor:
    """Source index of each output pixel of a nearest-neighbour resize, as OpenCV's INTER_NEAREST (which
    MMSegmentation resizes labels with): floor(i * (1 / scale)) with scale = out / in, each step rounded
    to float64 as OpenCV's resize.cpp does (floor(i * in / out) differs for some sizes). Long (out,).

    torch's nearest mode computes the index in float32, which for some sizes picks the neighbouring row or
    column: a row of 2 pixels stretched to 82 takes output pixel 41 from source 41 * 2/82 = 1 in float64,
    from source 0 in float32.
    """
    scale = out_size / in_size                                    # a Python float: float64, as OpenCV's double
    index = torch.floor(torch.arange(out_size, dtype=torch.float64) * (1.0 / scale)).long()
    return index.clamp(max=in_size - 1)


def resize_nearest(label: torch.Tensor, size: list[int]) -> torch.Tensor:
    """(..., H, W) -> (..., h, w) with the source rows and columns of nearest_index."""
    rows, cols = nearest_index(label.shape[-2], size[0]), nearest_index(label.shape[-1], size[1])
    return label.index_select(-2, rows).index_select(-1, cols)


class RandomRescale:
    """MMSeg's Resize(img_scale=scale, ratio_range, keep_ratio=True): scale * r, r ~ U(ratio_range), then the
    keep-ratio rule of rescale_size. By hand: torchvision's RandomResize / ScaleJitter draw and round the
    size differently. The image is resized by torchvision (bilinear), the label by resize_nearest."""

    def __init__(self, scale: tuple[int, int] = (2048, 512), ratio_range: tuple[float, float] = (0.5, 2.0)):
        self.scale, self.ratio_range = scale, ratio_range

    def __call__(self, image, label):
        low, high = self.ratio_range
        ratio = low + float(torch.rand((), dtype=torch.float64)) * (high - low)
        target = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        size = list(rescale_size(*image.shape[-2:], short_side=min(target), long_side=max(target)))
        # antialias=False: the release resizes with OpenCV's bilinear, which does not antialias. OpenCV
        # interpolates uint8 in 11-bit fixed point, torchvision in floats: about one value in five differs
        # by one grey level, never more (a fixed-point copy would depend on OpenCV's SIMD path).
        image = TF.resize(image, size, interpolation=v2.InterpolationMode.BILINEAR, antialias=False)
        return image, tv_tensors.Mask(resize_nearest(label.as_subclass(torch.Tensor), size))


def crop_passes_class_limit(window: torch.Tensor, cat_max_ratio: float, ignore_index: int = IGNORE_INDEX) -> bool:
    """MMSeg's test: at least two classes among the non-ignored pixels and the largest below cat_max_ratio."""
    counts = torch.bincount(window.flatten().long(), minlength=256)
    counts = counts[torch.arange(256) != ignore_index]      # ignored pixels are not counted
    counts = counts[counts > 0]
    return len(counts) > 1 and (counts.max() / counts.sum()).item() < cat_max_ratio


class RandomCropWithClassLimit:
    """MMSeg's RandomCrop(crop_size, cat_max_ratio): up to 10 redraws of the window while one class covers
    >= cat_max_ratio of it; after 10 failures the 11th draw is used unchecked (as MMSeg). A smaller image
    gives a smaller crop (padded later). By hand: torchvision's RandomCrop does not look at the labels."""

    def __init__(self, crop_size: int = 512, cat_max_ratio: float = 0.75, tries: int = 10):
        self.crop_size, self.cat_max_ratio, self.tries = crop_size, cat_max_ratio, tries

    def _draw(self, height: int, width: int) -> tuple[int, int]:
        top = int(torch.randint(0, max(height - self.crop_size, 0) + 1, ()))
        left = int(torch.randint(0, max(width - self.crop_size, 0) + 1, ()))
        return top, left

    def __call__(self, image, label):
        height, width = label.shape[-2:]
        crop_h, crop_w = min(self.crop_size, height), min(self.crop_size, width)
        top, left = self._draw(height, width)
        if self.cat_max_ratio < 1.0:
            for _ in range(self.tries):
                if crop_passes_class_limit(label[top:top + crop_h, left:left + crop_w], self.cat_max_ratio):
                    break
                top, left = self._draw(height, width)
        return TF.crop(image, top, left, crop_h, crop_w), TF.crop(label, top, left, crop_h, crop_w)


# OpenCV's 8-bit HSV (H in 0..179, S and V in 0..255), which MMSeg's PhotoMetricDistortion works in.
_HSV_SHIFT = 12


def rgb_to_hsv_uint8(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) RGB -> uint8 (3, H, W) HSV as cv2.cvtColor(COLOR_RGB2HSV): OpenCV's fixed-point
    arithmetic with its rounded division tables (matches OpenCV 4.10 and 5.0 on all 256**3 colours)."""
    r, g, b = image.int().unbind(0)
    v = torch.maximum(torch.maximum(r, g), b)
    diff = v - torch.minimum(torch.minimum(r, g), b)
    i = torch.arange(256, dtype=torch.float64).clamp(min=1)
    sdiv = torch.round((255 << _HSV_SHIFT) / i).int()                # OpenCV's division tables
    hdiv = torch.round((180 << _HSV_SHIFT) / (6 * i)).int()
    sdiv[0], hdiv[0] = 0, 0
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * sdiv[v] + half) >> _HSV_SHIFT
    h = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * hdiv[diff] + half) >> _HSV_SHIFT                         # arithmetic shift: floor
    h = torch.where(h < 0, h + 180, h)
    return torch.stack([h, s, v]).clamp(0, 255).to(torch.uint8)


def hsv_to_rgb_uint8(hsv: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) HSV (H in 0..179) -> uint8 RGB as cv2.cvtColor(COLOR_HSV2RGB) in float32.

    OpenCV converts each row in blocks of 32 pixels with vector code (x86 with AVX2) and the last
    width % 32 pixels of every row with scalar code. Both fuse 1 - s * f into one multiply-add (reproduced
    by forming the product in float64); the vector code truncates value * 255 to uint8, the scalar code
    rounds it. Matches OpenCV 4.10 and 5.0 on all 180 * 256 * 256 inputs, at any width.
    """
    h, s, v = hsv.float().unbind(0)
    s, v = s * (1.0 / 255), v * (1.0 / 255)
    h = h * (6.0 / 180)
    sector = torch.floor(h)
    f = h - sector

    def one_minus(a, b):   # fused 1 - a * b: exact product, one rounding to float32
        return (1 - a.double() * b.double()).float()

    tab = torch.stack([v, v * (1 - s), v * one_minus(s, f), v * one_minus(s, 1 - f)])   # (4, H, W)
    # For each of the 6 sectors of the hue circle, which entry of tab is r, g and b.
    order = torch.tensor([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])
    index = order.t()[:, torch.fmod(sector, 6).long()]                 # (3, H, W): which tab entry is r, g, b
    rgb = torch.gather(tab, 0, index) * 255                            # (3, H, W)
    width = rgb.shape[-1]
    tail = rgb[..., width - width % 32:]                               # (3, H, width % 32): the scalar pixels
    tail.copy_(tail.round())                                           # round half to even, as cvRound
    return rgb.clamp(0, 255).to(torch.uint8)                           # float -> uint8 truncates


class PhotoMetricDistortion:
    """MMSeg's PhotoMetricDistortion on uint8 values, with its order and draws:

    brightness (p 0.5, + U(-32, 32)); contrast first or last (a fair coin); saturation (p 0.5, S * U(0.5, 1.5))
    and hue (p 0.5, H + randint(-18, 18) mod 180, numpy's exclusive upper bound: -18..17) in OpenCV's 8-bit
    HSV; every step clips to 0..255 and truncates to uint8. By hand: torchvision's ColorJitter multiplies
    brightness, blends contrast and saturation with grey images, shifts hue in float HSV and applies the
    four in a random permutation, so it is a different distribution.
    """

    def __init__(self, brightness_delta: int = 32, contrast_range: tuple[float, float] = (0.5, 1.5),
                 saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18):
        self.brightness_delta, self.hue_delta = brightness_delta, hue_delta
        self.contrast_range, self.saturation_range = contrast_range, saturation_range

    @staticmethod
    def _randint(low: int, high: int) -> int:   # numpy's randint: high excluded
        return int(torch.randint(low, high, ()))

    @staticmethod
    def _uniform(low: float, high: float) -> float:
        return low + float(torch.rand((), dtype=torch.float64)) * (high - low)

    @staticmethod
    def _convert(x: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
        return (x.float() * alpha + beta).clamp(0, 255).to(torch.uint8)   # float -> uint8 truncates, as numpy

    def _contrast(self, x):
        return self._convert(x, alpha=self._uniform(*self.contrast_range)) if self._randint(0, 2) else x

    def __call__(self, image, label):
        x = image.as_subclass(torch.Tensor)
        if self._randint(0, 2):
            x = self._convert(x, beta=self._uniform(-self.brightness_delta, self.brightness_delta))
        contrast_first = self._randint(0, 2)
        if contrast_first:
            x = self._contrast(x)
        if self._randint(0, 2):
            hsv = rgb_to_hsv_uint8(x)
            hsv[1] = self._convert(hsv[1], alpha=self._uniform(*self.saturation_range))
            x = hsv_to_rgb_uint8(hsv)
        if self._randint(0, 2):
            hsv = rgb_to_hsv_uint8(x)
            shift = self._randint(-self.hue_delta, self.hue_delta)
            hsv[0] = ((hsv[0].long() + shift) % 180).to(torch.uint8)
            x = hsv_to_rgb_uint8(hsv)
        if not contrast_first:
            x = self._contrast(x)
        return tv_tensors.Image(x), label


class PadToSize:
    """MMSeg's Pad(size=crop): pad bottom and right to size x size, image with 0 (after normalisation),
    label with 255. torchvision's Pad does the padding; only the amounts depend on the input."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image, label):
        pad_h, pad_w = max(self.size - image.shape[-2], 0), max(self.size - image.shape[-1], 0)
        pad = v2.Pad([0, 0, pad_w, pad_h], fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX})
        return pad(image, label)


class ResizeShortSide:
    """Test-time resize of the image only (the label stays at the original size for scoring): MMSeg's
    Resize(keep_ratio=True, min_size=512) with img_scale (2048, 512) makes the short side exactly
    max(512, min(img_scale)), with no long-side cap; max_long_side gives the plain keep-ratio fit instead."""

    def __init__(self, short_side: int = 512, max_long_side: int | None = None):
        self.short_side, self.max_long_side = short_side, max_long_side

    def __call__(self, image, label):
        size = list(rescale_size(*image.shape[-2:], short_side=self.short_side, long_side=self.max_long_side))
        return TF.resize(image, size, interpolation=v2.InterpolationMode.BILINEAR, antialias=False), label


def normalize_transform(mean: tuple[float, float, float] = IMAGENET_MEAN,
                        std: tuple[float, float, float] = IMAGENET_STD) -> v2.Compose:
    """uint8 Image -> float, (x - mean) / std on 0-255 values (the Mask is left alone by both)."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=False), v2.Normalize(mean, std)])


def train_transform(preset: str | dict) -> v2.Compose:
    """The release's training pipeline for a dataset preset (its dataset configs' train_pipeline).
    Call as transform(image, label)."""
    preset = get_preset(preset)
    return v2.Compose([
        RandomRescale(preset['train_scale'], preset['ratio_range']),
        RandomCropWithClassLimit(preset['crop_size'], preset['cat_max_ratio']),
        v2.RandomHorizontalFlip(p=0.5),
        PhotoMetricDistortion(),
        normalize_transform(preset['mean'], preset['std']),
        PadToSize(preset['crop_size']),
    ])


def test_transform(preset: str | dict) -> v2.Compose:
    """Test-time: resize the image (short side of the preset), normalise with the preset's mean and std;
    the label is untouched. A cross-dataset run normalises as its target dataset (as the release's
    configs/cross_dataset/*.py, which take the target's dataset config)."""
    preset = get_preset(preset)
    return v2.Compose([ResizeShortSide(preset['test_short_side'], preset['test_max_long_side']),
                       normalize_transform(preset['mean'], preset['std'])])


# ----------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------

class SegmentationDataset(torch.utils.data.Dataset):
    """Images and labels of one split of a preset, in the label view of a setting (see the docstring).

    transform(image, label) receives a tv_tensors.Image uint8 (3, H, W) and a tv_tensors.Mask uint8 (H, W)
    over all classes and must return the normalised image (train_transform / test_transform do);
    without a transform the image is only normalised. The inductive remap comes after the transform, as
    in the release (its model remaps the labels): the crop's class limit counts unseen classes too.
    """

    def __init__(self, dataset: str | dict, root: str, split: str = 'train', setting: str = 'inductive',
                 transform=None):
        self.preset = get_preset(dataset)
        if setting not in SETTINGS:
            raise ValueError(f"setting must be one of {SETTINGS}, not {setting!r}")
        self.split, self.setting = split, setting
        self.root = resolve_root(self.preset, root)
        self.samples = list_samples(self.preset, self.root, split)
        self.transform = transform if transform is not None else normalize_transform(self.preset['mean'],
                                                                                     self.preset['std'])

        num_classes = len(self.preset['classes'])
        self.seen = seen_mask(num_classes, self.preset['unseen'])    # bool (K,) over all classes
        view = setting if split == 'train' else 'fully'          # val: always all classes
        self.label_table = label_remap_table(self.seen, view)   # (256,)
        self.class_names = [n for n, s in zip(self.preset['classes'], self.seen.tolist())   # the K' classes
                            if s or view != 'inductive']                                     # the labels index
        self.reduce_table = reduce_zero_label_table() if self.preset['reduce_zero_label'] else None
        # Largest valid value in the PNGs: K with a background 0 (then 1..K are classes), else K - 1.
        self.max_label = num_classes if self.preset['reduce_zero_label'] else num_classes - 1

    def __len__(self) -> int:
        return len(self.samples)

    def load_label(self, index: int) -> torch.Tensor:
        """The label of a sample, uint8 (H, W) over all classes (after reduction), its values checked."""
        label_path = self.samples[index][1]
        label = read_label(label_path)
        bad = (label > self.max_label) & (label != IGNORE_INDEX)
        if bad.any():
            values = sorted(set(label[bad].tolist()))[:8]
            raise DatasetError(f"label {label_path} holds {values}, outside the {self.preset['name']} range "
                               f"0..{self.max_label} (and 255): wrong dataset preset or an unconverted "
                               f"annotation ({self.preset['help']})")
        if self.reduce_table is not None:
            label = self.reduce_table[label.long()].to(torch.uint8)
        return label

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw sample: image uint8 (3, H, W), label uint8 (H, W) over all classes (after reduction)."""
        image_path, label_path, _ = self.samples[index]
        image, label = read_image(image_path), self.load_label(index)
        if image.shape[-2:] != label.shape:
            raise DatasetError(f"image {image_path} is {tuple(image.shape[-2:])} but its label {label_path} is "
                               f"{tuple(label.shape)}: the label belongs to another image; prepare it again")
        return image, label

    def __getitem__(self, index: int) -> dict:
        image, label = self.load(index)
        orig_size = tuple(label.shape)
        image, label = self.transform(tv_tensors.Image(image), tv_tensors.Mask(label))
        label = self.label_table[label.as_subclass(torch.Tensor).long()]   # (H, W) in {0..K'-1, 255}
        return dict(image=image.as_subclass(torch.Tensor), label=label,
                    name=self.samples[index][2], orig_size=orig_size)


# ----------------------------------------------------------------------------------------------
# Demonstration: one sample through the training pipeline, step by step
# ----------------------------------------------------------------------------------------------

def describe(image: torch.Tensor, label: torch.Tensor, class_names: list[str]) -> str:
    """One line: the image's size, type and range, and the classes its label holds."""
    image, label = image.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor)
    values = label.unique().tolist()
    names = ', '.join(class_names[v] if v < len(class_names) else str(v) for v in values if v != IGNORE_INDEX)
    ignored = f', {100 * (label == IGNORE_INDEX).float().mean():.0f}% ignored' if IGNORE_INDEX in values else ''
    return (f"image {tuple(image.shape)} {str(image.dtype)[6:]} in [{image.min():.4g}, {image.max():.4g}]; "
            f"label {tuple(label.shape)}: {names or 'no class'}{ignored}")


def main() -> None:
    parser = argparse.ArgumentParser(description='Follow one training sample of a dataset through the pipeline.')
    parser.add_argument('--dataset', default='voc', choices=sorted(DATASETS))
    parser.add_argument('--data-root', required=True,
                        help='the dataset folder or a folder above it (a tiny fake one: python -m tools.datasets fake DIR)')
    parser.add_argument('--index', type=int, default=0, help='which training sample')
    parser.add_argument('--seed', type=int, default=0, help='seeds the random draws of the pipeline')
    args = parser.parse_args()
    try:
        dataset = SegmentationDataset(args.dataset, args.data_root, 'train', 'inductive',
                                      train_transform(args.dataset))
        if not 0 <= args.index < len(dataset):
            raise DatasetError(f"--index {args.index} is outside the {len(dataset)} training samples")
        image, label = dataset.load(args.index)
    except DatasetError as error:
        sys.exit(f"error: {error}")
    preset, every_class = dataset.preset, dataset.preset['classes']
    print(f"{preset['name']}: {len(dataset)} training samples in {dataset.root}; {len(every_class)} classes, "
          f"unseen: {', '.join(n for n, s in zip(every_class, dataset.seen.tolist()) if not s) or 'none'}")
    print(f"sample {dataset.samples[args.index][2]}")
    print(f"  {'as read':<28}{describe(image, label, every_class)}")
    torch.manual_seed(args.seed)
    image, label = tv_tensors.Image(image), tv_tensors.Mask(label)
    for step in dataset.transform.transforms:
        image, label = step(image, label)
        name = 'ToDtype + Normalize' if isinstance(step, v2.Compose) else type(step).__name__
        print(f"  {name:<28}{describe(image, label, every_class)}")
    label = dataset.label_table[label.as_subclass(torch.Tensor).long()]
    print(f"  {'inductive view':<28}{describe(image, label, dataset.class_names)} "
          f"(unseen classes -> {IGNORE_INDEX}; indices among the {len(dataset.class_names)} seen classes)")


if __name__ == '__main__':
    main()
