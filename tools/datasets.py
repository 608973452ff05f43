"""tools/datasets.py -- preparing the datasets of data.py, tiny fake ones in the same layouts, and a look at them.

data.py is the chapter (presets, label views, the training pipeline, the dataset); this module holds the
tools around it, which a reader of the method can skip:

    preparation    prepare_voc_aug (SBD's .mat files -> VOC2012/SegmentationClassAug and the split
                   lists), prepare_coco_stuff (stuffthingmaps -> *_labelTrainIds.png), check_context
                   (checks the output of the standard PASCAL Context conversion)
    fake data      make_fake_dataset: a few JPEGs and label PNGs in the real layout of a preset, for the
                   tests and for trying the programs without a download
    a look         class_statistics / print_statistics (pixels and images per class, seen or unseen) and
                   save_samples (what the model sees after the training pipeline, as PNGs)

Where each dataset comes from and the layout each preparation produces: docs/datasets.md.

Run
---
    python -m tools.datasets fake /tmp/fake --dataset voc          # a tiny VOC under /tmp/fake/VOCdevkit/VOC2012
    python -m tools.datasets stats --dataset voc --data-root /tmp/fake --samples samples/
    python -m tools.datasets prepare-voc-aug VOCdevkit/VOC2012 benchmark_RELEASE   # needs scipy
    python -m tools.datasets prepare-coco coco_stuff164k
    python -m tools.datasets check-context VOCdevkit/VOC2010
Every command stops with one line `error: ...` on a missing folder, a wrong layout or a bad file.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import data
import visualize
from common import atomic_save
from data import DatasetError, SegmentationDataset


def save_png(array: np.ndarray, path: Path, palette: list[int] | None = None) -> None:
    """Write a PNG through a temporary name, so an interrupted run never leaves a truncated label."""
    image = Image.fromarray(array)
    if palette is not None:
        image = image.convert('P')                # 'L' -> 'P' keeps the values
        image.putpalette(palette)
    with atomic_save(str(path)) as tmp:
        image.save(tmp, format='PNG')


def write_names(names: list[str], path: Path) -> None:
    """A split file, one name a line, through a temporary name: a stopped run never leaves half a list."""
    with atomic_save(str(path)) as tmp:
        Path(tmp).write_text(''.join(n + '\n' for n in names))


# ----------------------------------------------------------------------------------------------
# Preparation (the conversions of MMSegmentation's tools/convert_datasets; downloads: docs/datasets.md)
# ----------------------------------------------------------------------------------------------

# COCO-Stuff: the stuffthingmaps hold COCO category id - 1 (0..181) and 255; 11 thing ids are never used.
COCO_STUFF_UNUSED_IDS = [11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90]


def coco_stuff_train_id_table() -> np.ndarray:
    """stuffthingmaps value -> labelTrainIds value: 0..181 without the unused ids -> 0..170; else 255."""
    table = np.full(256, data.IGNORE_INDEX, dtype=np.uint8)
    used = [i for i in range(182) if i not in COCO_STUFF_UNUSED_IDS]
    table[used] = np.arange(len(used))       # 171 train ids
    return table


def prepare_coco_stuff(root: str) -> int:
    """Write *_labelTrainIds.png beside every stuffthingmap PNG in root/annotations/{train2017,val2017}
    (root = coco_stuff164k), as MMSegmentation's coco_stuff164k.py. Returns the number of files written."""
    table = coco_stuff_train_id_table()
    folders = [Path(root) / 'annotations' / split for split in ('train2017', 'val2017')]
    for folder in folders:
        if not folder.is_dir():
            raise DatasetError(f"{folder} not found: unpack stuffthingmaps_trainval2017.zip into "
                               f"{Path(root) / 'annotations'} (see docs/datasets.md)")
    written = 0
    for folder in folders:
        for path in sorted(folder.glob('*.png')):
            if path.name.endswith('_labelTrainIds.png'):
                continue
            save_png(table[data.read_label(str(path)).numpy()], path.with_name(path.stem + '_labelTrainIds.png'))
            written += 1
    return written


def prepare_voc_aug(voc_root: str, sbd_root: str) -> tuple[int, int]:
    """SBD -> VOC2012/SegmentationClassAug/*.png and ImageSets/Segmentation/{aug,trainaug}.txt, as
    MMSegmentation's voc_aug.py (lists sorted here). sbd_root = benchmark_RELEASE. A VOC train image that
    SBD does not annotate gets its SegmentationClass label copied, so every trainaug name has a label.
    The lists are written last, so a run that stops half-way leaves no list naming a missing label.
    Returns (len(aug), len(trainaug)): (9118, 10582) for the real data."""
    try:
        from scipy.io import loadmat
        from scipy.io.matlab import MatReadError
    except ImportError:
        raise DatasetError("reading SBD's .mat files needs scipy: pip install scipy") from None
    voc, sbd = Path(voc_root), Path(sbd_root) / 'dataset'
    lists = voc / 'ImageSets' / 'Segmentation'
    for needed in (sbd / 'cls', sbd / 'train.txt', sbd / 'val.txt', lists / 'train.txt', lists / 'val.txt'):
        if not needed.exists():
            raise DatasetError(f"{needed} not found: give VOCdevkit/VOC2012 and benchmark_RELEASE "
                               "(see docs/datasets.md)")

    def read(path):
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]

    sbd_names = set(read(sbd / 'train.txt') + read(sbd / 'val.txt'))
    train, val = set(read(lists / 'train.txt')), set(read(lists / 'val.txt'))
    copied = {name: voc / 'SegmentationClass' / (name + '.png') for name in sorted(train - sbd_names)}
    missing = [str(path) for path in copied.values() if not path.is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} VOC train labels are missing, e.g. {missing[0]}: unpack "
                           "VOCtrainval_11-May-2012.tar completely")
    out = voc / 'SegmentationClassAug'
    out.mkdir(exist_ok=True)
    for mat in sorted((sbd / 'cls').glob('*.mat')):
        try:
            mask = loadmat(str(mat))['GTcls'][0]['Segmentation'][0].astype(np.uint8)
        except (MatReadError, OSError, ValueError, KeyError, IndexError) as err:
            raise DatasetError(f"cannot read {mat} ({err}): download benchmark.tgz again") from None
        save_png(mask, out / (mat.stem + '.png'))
    for name, path in copied.items():
        save_png(data.read_label(str(path)).numpy(), out / (name + '.png'))   # palette indices
    aug, trainaug = sorted(sbd_names - train - val), sorted((train | sbd_names) - val)
    write_names(aug, lists / 'aug.txt')
    write_names(trainaug, lists / 'trainaug.txt')
    return len(aug), len(trainaug)


def check_context(root: str) -> dict:
    """Check the output of the standard PASCAL Context conversion (root = VOCdevkit/VOC2010): every listed
    image has a label PNG with values in 0..59 or 255. Returns {split: number of images}; raises DatasetError."""
    counts = {}
    for split in ('train', 'val'):
        dataset = SegmentationDataset('context', root, split, 'fully')
        for index in range(len(dataset)):
            dataset.load_label(index)         # raises on a missing, unreadable or out-of-range label
        counts[split] = len(dataset)
    return counts


# ----------------------------------------------------------------------------------------------
# Small fake datasets in the real layouts (for the tests and for trying the code without downloads)
# ----------------------------------------------------------------------------------------------

def _fake_sample(rng: np.random.Generator, preset: dict, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A label of a few rectangles with 1-pixel 255 borders, and an image whose colour follows the label."""
    height, width = size
    num_classes = len(preset['classes'])
    first = 1 if preset['reduce_zero_label'] else 0            # PNG values of the classes: 1..K or 0..K-1
    label = np.full(size, 0 if preset['reduce_zero_label'] else rng.integers(num_classes), dtype=np.uint8)
    for _ in range(rng.integers(2, 5)):
        top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
        bottom, right = top + rng.integers(height // 4, height // 2), left + rng.integers(width // 4, width // 2)
        label[top:bottom, left:right] = data.IGNORE_INDEX
        label[top + 1:bottom - 1, left + 1:right - 1] = first + rng.integers(num_classes)
    colours = np.array(visualize.color_palette(), dtype=np.int16).reshape(256, 3)
    image = colours[label] + rng.integers(-20, 21, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8), label


def make_fake_dataset(dataset: str | dict, root: str, num_train: int = 4, num_val: int = 2,
                      size: tuple[int, int] = (96, 128), seed: int = 0) -> str:
    """Write a tiny dataset in the real layout of a preset (JPEG images, PNG labels, split files) under
    root/<preset folder>, and return that folder (the data root to pass). A later part of a split lists the
    earlier parts' images again plus new ones, as VOC's trainaug.txt contains train.txt. VOC's own
    SegmentationClass labels are palette PNGs like the real ones; the converted labels are grayscale."""
    preset = data.get_preset(dataset)
    base = Path(root) / preset['folder'] if preset['folder'] else Path(root)
    rng = np.random.default_rng(seed)
    scenes = {}                                   # name -> label, so a name shared by two parts is one image
    for split, count in (('train', num_train), ('val', num_val)):
        previous = []
        for part in preset['splits'][split]:
            names = previous + [f'{split}_{len(scenes) + i:06d}' for i in range(count)]
            (base / part['images']).mkdir(parents=True, exist_ok=True)
            (base / part['labels']).mkdir(parents=True, exist_ok=True)
            for name in names:
                if name not in scenes:
                    image, scenes[name] = _fake_sample(rng, preset, size)
                    Image.fromarray(image).save(base / part['images'] / (name + preset['image_suffix']), quality=90)
                palette = visualize.color_palette() if part['labels'].endswith('SegmentationClass') else None
                save_png(scenes[name], base / part['labels'] / (name + preset['label_suffix']), palette)
            if 'list' in part:
                write_names(names, base / part['list'])
            previous = names
    return str(base)


# ----------------------------------------------------------------------------------------------
# A look at a dataset: pixels per class, and a few samples as the model sees them
# ----------------------------------------------------------------------------------------------

def class_statistics(dataset: SegmentationDataset,
                     max_images: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Pixels and images per class over all classes (after label reduction, before any remap), and the
    number of ignored pixels, from the raw labels of the first max_images samples."""
    num_classes = len(dataset.preset['classes'])
    pixels = torch.zeros(num_classes + 1, dtype=torch.long)   # the last bin counts ignored pixels
    images = torch.zeros(num_classes + 1, dtype=torch.long)
    for index in range(min(len(dataset), max_images or len(dataset))):
        label = dataset.load_label(index)
        counts = torch.bincount(label.long().flatten().clamp(max=num_classes), minlength=num_classes + 1)
        pixels += counts
        images += counts > 0
    return pixels[:-1], images[:-1], int(pixels[-1])


def save_samples(dataset: SegmentationDataset, out_dir: str, count: int = 4) -> list[str]:
    """Write `count` transformed samples as NAME_image.png and NAME_label.png (palette: class k has VOC's
    colour of k + 1, 255 is VOC's boundary colour), so a user can see what the model sees."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    palette = visualize.color_palette()
    palette = palette[3:768] + palette[765:768]            # index k -> VOC colour k + 1; 255 unchanged
    written = []
    for index in range(min(count, len(dataset))):
        item = dataset[index]
        stem = out / f"{index:02d}_{item['name']}"
        picture = visualize.denormalize(item['image'], dataset.preset['mean'], dataset.preset['std'])
        visualize.save_picture(picture, f'{stem}_image.png')
        save_png(item['label'].to(torch.uint8).numpy(), Path(f'{stem}_label.png'), palette)
        written.append(str(stem))
    return written


def print_statistics(dataset: SegmentationDataset, max_images: int | None = None) -> None:
    preset = dataset.preset
    expected = preset['sizes'].get(dataset.split)
    print(f"{preset['name']}: split {dataset.split}, {len(dataset)} samples"
          + (f" (the release: {expected})" if expected else '') + f", from {dataset.root}")
    seen = dataset.seen.tolist()
    print(f"{sum(seen)} seen and {len(seen) - sum(seen)} unseen classes")
    pixels, images, ignored = class_statistics(dataset, max_images)
    total = int(pixels.sum()) + ignored
    print(f"{'id':>4}  {'class':<22}{'split':<8}{'pixels %':>9}{'images':>8}")
    for c, name in enumerate(preset['classes']):
        kind = 'seen' if seen[c] else 'unseen'
        print(f"{c:>4}  {name:<22}{kind:<8}{100 * int(pixels[c]) / max(total, 1):>9.3f}{int(images[c]):>8}")
    print(f"{'':>4}  {'ignored (255)':<22}{'':<8}{100 * ignored / max(total, 1):>9.3f}")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f'expected a whole number of at least 1, not {text!r}')
    return int(text)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='Prepare the datasets of data.py, write fake ones, look at them.')
    commands = parser.add_subparsers(dest='command', required=True)
    fake = commands.add_parser('fake', help='write a tiny fake dataset in the real layout')
    fake.add_argument('root', help='an empty or new folder; the dataset goes to its preset folder below it')
    fake.add_argument('--dataset', default='voc', choices=sorted(data.DATASETS))
    stats = commands.add_parser('stats', help='pixels and images per class; optionally a few augmented samples')
    stats.add_argument('--dataset', default='voc', choices=sorted(data.DATASETS))
    stats.add_argument('--data-root', required=True, help='the dataset folder (or a folder above it)')
    stats.add_argument('--split', default='train', choices=['train', 'val'])
    stats.add_argument('--max-images', type=positive_int, default=None, help='count only the first N images')
    stats.add_argument('--samples', metavar='DIR', help='also write 4 samples as the inductive model sees them (with --split train)')
    voc = commands.add_parser('prepare-voc-aug', help='SBD -> SegmentationClassAug, aug.txt, trainaug.txt')
    voc.add_argument('voc_root', metavar='VOC2012')
    voc.add_argument('sbd_root', metavar='BENCHMARK_RELEASE')
    coco = commands.add_parser('prepare-coco', help='stuffthingmaps -> *_labelTrainIds.png')
    coco.add_argument('root', metavar='COCO_STUFF164K')
    context = commands.add_parser('check-context', help='check the converted PASCAL Context labels')
    context.add_argument('root', metavar='VOC2010')
    return parser


def run(args) -> None:
    if args.command == 'fake':
        target = Path(args.root) / (data.DATASETS[args.dataset]['folder'] or '')
        if target.exists() and any(target.iterdir()):
            raise DatasetError(f"{target} is not empty: give a new folder for the fake dataset")
        print('wrote', make_fake_dataset(args.dataset, args.root))
    elif args.command == 'stats':
        dataset = SegmentationDataset(args.dataset, args.data_root, args.split, 'inductive',
                                      data.train_transform(args.dataset) if args.split == 'train'
                                      else data.test_transform(args.dataset))
        print_statistics(dataset, args.max_images)
        if args.samples:
            torch.manual_seed(0)
            for path in save_samples(dataset, args.samples):
                print('wrote', path + '_{image,label}.png')
    elif args.command == 'prepare-voc-aug':
        aug, trainaug = prepare_voc_aug(args.voc_root, args.sbd_root)
        print(f'aug.txt: {aug} names, trainaug.txt: {trainaug} names (the real data: 9118, 10582)')
    elif args.command == 'prepare-coco':
        print('wrote', prepare_coco_stuff(args.root), 'label files')
    elif args.command == 'check-context':
        print('PASCAL Context labels look right:', check_context(args.root), '(the real data: 4996 / 5104)')


def main() -> None:
    args = get_args_parser().parse_args()
    try:
        run(args)
    except (DatasetError, OSError) as error:    # bad files and folders: one line, not a traceback
        sys.exit(f"error: {error}")


if __name__ == '__main__':
    main()
