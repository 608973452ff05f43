"""Tests of data.py: the real loaders on generated datasets in the real layouts, the label tables against
hand-written expectations, the MMSeg training pipeline (ranges, alignment, class limit, reproducibility,
the label resize and the photometric distortion against OpenCV), normalisation per preset against
open_clip's and torchvision's constants, and every error message (also from DataLoader workers)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

import data
from conftest import raw_label
from tools import datasets

pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py


# ---------------------------------------------------------------------------------------------- presets

def test_presets_hold_the_protocol():
    expected = {'voc': (20, 5, 6, 512, 426), 'context': (59, 10, 8, 480, 80),
                'coco': (171, 15, 8, 512, 426), 'ade': (150, 0, 8, 512, 426)}
    for name, (k, u, n, crop, stride) in expected.items():
        p = data.DATASETS[name]
        got = (len(p['classes']), len(p['unseen']), len(p['templates']), p['window_crop'], p['window_stride'])
        assert got == (k, u, n, crop, stride), (name, got)
        assert all(t.count('{}') == 1 for t in p['templates'])
    assert data.DATASETS['context']['crop_size'] == 480 and data.DATASETS['context']['train_scale'] == (520, 520)
    assert data.DATASETS['voc']['sizes']['train'] == 1464 + 10582


def test_dict_preset_fills_defaults_and_unknown_name_fails():
    preset = data.get_preset(dict(classes=['a', 'b'], splits={}))
    assert preset['crop_size'] == 512 and preset['unseen'] == [] and preset['reduce_zero_label'] is False
    with pytest.raises(ValueError, match='voc'):
        data.get_preset('pascal')
    with pytest.raises(ValueError, match='splits'):
        data.get_preset(dict(classes=['a']))


@pytest.mark.parametrize('classes, unseen, message', [
    ([], [], 'non-empty'),
    (['cat', ' '], [], 'non-empty'),
    (['cat', 'dog', 'cat'], [], r"\['cat'\] appear more than once"),
    (['cat', 'dog'], [2], 'distinct class indices in 0..1'),
    (['cat', 'dog', 'cow'], [1, 1], 'distinct'),
    (['cat', 'dog'], [0, 1], 'at least one class must be seen'),
])
def test_a_class_list_that_cannot_be_right_is_refused(classes, unseen, message):
    with pytest.raises(ValueError, match=message):
        data.get_preset(dict(classes=classes, unseen=unseen, splits={}))


def test_normalisation_per_preset_is_imagenet_or_clip():
    """ADE20K as the release's ADE config: CLIP's statistics; the others ImageNet's. The references are
    open_clip's OpenAI constants and torchvision's ImageNet weights' preprocessing, times 255."""
    open_clip_constants = pytest.importorskip('open_clip.constants')
    from torchvision.models import ResNet50_Weights
    imagenet = ResNet50_Weights.IMAGENET1K_V1.transforms()
    references = {'imagenet': (imagenet.mean, imagenet.std),
                  'clip': (open_clip_constants.OPENAI_DATASET_MEAN, open_clip_constants.OPENAI_DATASET_STD)}
    grey = tv_tensors.Image(torch.full((3, 40, 60), 128, dtype=torch.uint8))    # resizing keeps 128 exactly
    mask = tv_tensors.Mask(torch.zeros(40, 60, dtype=torch.uint8))
    for name in data.DATASETS:
        mean, std = (255 * np.array(v, dtype=np.float64) for v in references['clip' if name == 'ade' else 'imagenet'])
        preset = data.get_preset(name)
        err = max(np.abs(np.array(preset['mean']) - mean).max(), np.abs(np.array(preset['std']) - std).max())
        assert err < 1e-9, f'{name}: mean/std differ from the reference by {err}'
        normalise = [t for t in data.train_transform(name).transforms if isinstance(t, v2.Compose)]
        for transform in (data.test_transform(name), normalise[0]):
            image = transform(grey, mask)[0]
            err = np.abs(image[:, 0, 0].double().numpy() - (128 - mean) / std).max()
            assert err < 1e-5, f'{name}: {transform} normalises differently, by {err}'


# ---------------------------------------------------------------------------------------------- label tables

def test_reduce_zero_label_table_by_hand():
    table = data.reduce_zero_label_table()
    assert {v: int(table[v]) for v in (0, 1, 2, 20, 59, 150, 254, 255)} == \
        {0: 255, 1: 0, 2: 1, 20: 19, 59: 58, 150: 149, 254: 253, 255: 255}


def test_remap_table_voc_by_hand():
    inductive = data.label_remap_table(data.seen_mask(20, data.VOC_UNSEEN), 'inductive')
    expected = list(range(15)) + [255] * 5          # classes 15..19 (pottedplant..tvmonitor) unseen
    assert inductive[:20].tolist() == expected and inductive[255] == 255 and (inductive[20:] == 255).all()
    for setting in ('transductive', 'fully'):
        table = data.label_remap_table(data.seen_mask(20, data.VOC_UNSEEN), setting)
        assert table[:20].tolist() == list(range(20)) and table[255] == 255


def test_remap_table_context_by_hand():
    table = data.label_remap_table(data.seen_mask(59, data.CONTEXT_UNSEEN), 'inductive')
    # unseen 0, 6, 7, 14, 19, 24, 31, 33, 48, 54: a seen class moves down by the unseen ones before it
    hand = {0: 255, 1: 0, 5: 4, 6: 255, 7: 255, 8: 5, 13: 10, 14: 255, 15: 11, 58: 48, 255: 255}
    assert {k: int(table[k]) for k in hand} == hand
    assert sorted(table[:59][table[:59] != 255].tolist()) == list(range(49))


# ---------------------------------------------------------------------------------------------- loaders

@pytest.mark.parametrize('name', list(data.DATASETS))
def test_every_loader_reads_the_real_layout(fake_roots, name):
    preset = data.DATASETS[name]
    for split, count in (('train', 12 if name == 'voc' else 4), ('val', 2)):
        dataset = data.SegmentationDataset(name, fake_roots[name], split, 'transductive')
        assert len(dataset) == count
        item = dataset[0]
        assert item['image'].dtype == torch.float32 and item['image'].shape == (3, 96, 128)
        assert item['label'].dtype == torch.long and item['orig_size'] == (96, 128)
        raw = raw_label(dataset.samples[0][1])
        if preset['reduce_zero_label']:        # by hand: 0 -> 255, k -> k - 1, 255 -> 255
            raw = np.where((raw == 0) | (raw == 255), 255, raw - 1)
        assert np.array_equal(item['label'].numpy(), raw)
        image = np.asarray(Image.open(dataset.samples[0][0]).convert('RGB')).astype(np.float32)
        expected = (image - np.array(dataset.preset['mean'])) / np.array(dataset.preset['std'])
        err = np.abs(item['image'].permute(1, 2, 0).numpy() - expected).max()
        assert err < 1e-5, f'normalisation differs by {err}'


def test_parent_folder_is_accepted(fake_roots):
    parent = fake_roots['voc'].rsplit('/VOCdevkit', 1)[0]
    assert len(data.SegmentationDataset('voc', parent, 'val', 'fully')) == 2


def test_voc_train_is_train_plus_trainaug_with_their_label_dirs(fake_roots):
    root = fake_roots['voc']
    dataset = data.SegmentationDataset('voc', root, 'train', 'inductive')
    lists = f'{root}/ImageSets/Segmentation'
    train = open(f'{lists}/train.txt').read().split()
    trainaug = open(f'{lists}/trainaug.txt').read().split()
    assert set(train) <= set(trainaug) and len(dataset) == len(train) + len(trainaug)
    expected = [(f'{root}/JPEGImages/{n}.jpg', f'{root}/SegmentationClass/{n}.png', n) for n in train] + \
               [(f'{root}/JPEGImages/{n}.jpg', f'{root}/SegmentationClassAug/{n}.png', n) for n in trainaug]
    assert dataset.samples == expected
    assert Image.open(expected[0][1]).mode == 'P'        # VOC's own annotations are palette PNGs


def test_inductive_view_and_val_view(fake_roots):
    root = fake_roots['voc']
    seen = [c for c in range(20) if c not in data.VOC_UNSEEN]
    train = data.SegmentationDataset('voc', root, 'train', 'inductive')
    assert train.class_names == [data.VOC_CLASSES[c] for c in seen]
    for index in range(len(train)):
        raw = raw_label(train.samples[index][1])
        hand = np.full_like(raw, 255)                       # by hand: seen class -> index among the seen
        for c in seen:
            hand[raw == c + 1] = seen.index(c)
        assert np.array_equal(train[index]['label'].numpy(), hand)
    val_inductive = data.SegmentationDataset('voc', root, 'val', 'inductive')
    val_fully = data.SegmentationDataset('voc', root, 'val', 'fully')
    assert val_inductive.class_names == data.VOC_CLASSES
    assert torch.equal(val_inductive[0]['label'], val_fully[0]['label'])


def test_dict_preset_with_plain_folder_layout(tmp_path):
    shapes = dict(classes=['circle', 'square', 'triangle'], unseen=[2], folder=None, crop_size=64,
                  splits={split: [dict(images=f'images/{split}', labels=f'annotations/{split}')]
                          for split in ('train', 'val')})
    root = datasets.make_fake_dataset(shapes, str(tmp_path), num_train=3, num_val=1, size=(40, 56))
    assert sorted(p.name for p in (tmp_path / 'images' / 'train').iterdir())[0].endswith('.jpg')
    dataset = data.SegmentationDataset(shapes, root, 'train', 'inductive', data.train_transform(shapes))
    item = dataset[0]
    assert len(dataset) == 3 and item['image'].shape == (3, 64, 64)
    assert set(item['label'].unique().tolist()) <= {0, 1, 255}
    # the same preset as a JSON file (how train.py --dataset takes it): the same items
    (tmp_path / 'mine.json').write_text(json.dumps(shapes))
    from_file = data.SegmentationDataset(str(tmp_path / 'mine.json'), root, 'val', 'fully')
    from_dict = data.SegmentationDataset(shapes, root, 'val', 'fully')
    assert from_file.class_names == shapes['classes'] and from_file.samples == from_dict.samples
    assert torch.equal(from_file[0]['image'], from_dict[0]['image'])
    assert data.preset_stem(str(tmp_path / 'mine.json')) == 'mine' and data.preset_stem('voc') == 'voc'


def test_a_preset_file_that_cannot_be_read_is_a_value_error(tmp_path):
    (tmp_path / 'list.json').write_text('["cat", "dog"]')
    (tmp_path / 'broken.json').write_text('{"classes": ["cat", ')
    for name, message in (('missing.json', 'No such file'), ('list.json', 'holds a list'), ('broken.json', 'Expecting')):
        with pytest.raises(ValueError, match=message):
            data.get_preset(str(tmp_path / name))


# ---------------------------------------------------------------------------------------------- the pipeline

@pytest.mark.parametrize('name', list(data.DATASETS))
def test_pipeline_keeps_labels_in_range(fake_roots, name):
    crop = data.DATASETS[name]['crop_size']
    for setting in data.SETTINGS:
        dataset = data.SegmentationDataset(name, fake_roots[name], 'train', setting, data.train_transform(name))
        k = len(dataset.class_names)
        torch.manual_seed(0)
        for index in range(2):
            item = dataset[index]
            assert item['image'].shape == (3, crop, crop) and item['label'].shape == (crop, crop)
            values = set(item['label'].unique().tolist())
            assert values <= set(range(k)) | {255}, (name, setting, sorted(values))
    val = data.SegmentationDataset(name, fake_roots[name], 'val', 'inductive', data.test_transform(name))
    item = val[0]
    assert min(item['image'].shape[-2:]) == data.DATASETS[name]['test_short_side']
    assert item['label'].shape == (96, 128)                   # scored at the original size


def test_rescale_size_by_hand():
    assert data.rescale_size(375, 500, 512, 2048) == (512, 683)       # VOC-like image, ratio 1
    assert data.rescale_size(375, 500, 256, 1024) == (256, 341)       # ratio 0.5: 500 * 256/375 = 341.3
    assert data.rescale_size(100, 1000, 512, 2048) == (205, 2048)     # the long side caps
    assert data.rescale_size(375, 500, 520) == (520, 693)             # Context test resize
    assert data.rescale_size(1000, 100, 512) == (5120, 512)           # no cap: short side exactly 512


def opencv_nearest_index(n_in, n_out):
    """OpenCV's resizeNN (imgproc/src/resize.cpp) in numpy: fx = out / in, ifx = 1 / fx, both double;
    source x = min(cvFloor(x * ifx), in - 1)."""
    ifx = 1.0 / (np.float64(n_out) / np.float64(n_in))
    return np.minimum(np.floor(np.arange(n_out, dtype=np.float64) * ifx).astype(np.int64), n_in - 1)


def torch_nearest_index(n_in, n_out):
    """The index torch's own nearest mode takes (computed in float32), found by resizing 0..in-1."""
    ramp = torch.arange(n_in, dtype=torch.float32).view(1, 1, n_in)
    return F.interpolate(ramp, size=n_out, mode='nearest').view(-1).long().numpy()


def test_nearest_index_by_hand():
    # A row [a, b] stretched to 82: output 41 sits at source 41 * 2/82 = 1 exactly -> b. torch's float32
    # scale 2/82 rounds down and takes a. Stretched to 98, OpenCV's double 1/49 also rounds down:
    # 49 * 0.020408163265306120 = 0.9999999999999999 -> a, which OpenCV does and so must we.
    assert data.nearest_index(2, 82)[41] == 1 and torch_nearest_index(2, 82)[41] == 0
    assert data.nearest_index(2, 98)[49] == 0
    assert data.nearest_index(5, 5).tolist() == [0, 1, 2, 3, 4]
    assert data.nearest_index(6, 3).tolist() == [0, 2, 4]
    assert data.nearest_index(3, 7).tolist() == [0, 0, 0, 1, 1, 2, 2]     # floor(i * 3/7)


def test_nearest_index_on_many_sizes():
    pairs = [(n_in, n_out) for n_in in range(1, 121) for n_out in range(1, 241)]
    wrong = [(a, b) for a, b in pairs if not np.array_equal(data.nearest_index(a, b).numpy(), opencv_nearest_index(a, b))]
    assert not wrong, f'{len(wrong)} size pairs differ from OpenCV\'s rule, e.g. {wrong[:3]}'
    # the pairs tell the float32 rule apart: torch's own index differs on some of them
    assert sum(not np.array_equal(torch_nearest_index(a, b), opencv_nearest_index(a, b)) for a, b in pairs) > 100


def test_label_resize_matches_opencv():
    """OpenCV's INTER_NEAREST (the same rule in 4.x, which MMSegmentation 0.24 ran on, and in 5.x)."""
    cv2 = pytest.importorskip('cv2')
    rng = np.random.default_rng(0)
    sizes = [((2, 2), (82, 98)), ((375, 500), (257, 343))] + \
            [(tuple(rng.integers(1, 400, 2)), tuple(rng.integers(1, 800, 2))) for _ in range(40)]
    for (h, w), (oh, ow) in sizes:
        label = rng.integers(0, 256, (h, w), dtype=np.uint8)
        ours = data.resize_nearest(torch.from_numpy(label), [int(oh), int(ow)]).numpy()
        expected = cv2.resize(label, (int(ow), int(oh)), interpolation=cv2.INTER_NEAREST)
        assert np.array_equal(ours, expected), f'{(h, w)} -> {(oh, ow)}: {(ours != expected).sum()} pixels differ'


def test_random_rescale_resizes_the_label_as_opencv():
    """As above, through the training transform (OpenCV 4.x and 5.x)."""
    cv2 = pytest.importorskip('cv2')
    rng = np.random.default_rng(1)
    rescale = data.RandomRescale((512, 128), (0.5, 2.0))
    for seed in range(16):        # small labels: torch's float32 index errs on about 1 in 10 of their sizes
        label = rng.integers(0, 21, (6, 8), dtype=np.uint8)
        torch.manual_seed(seed)
        image, out = rescale(colour_coded(torch.from_numpy(label)), tv_tensors.Mask(torch.from_numpy(label)))
        assert isinstance(out, tv_tensors.Mask) and out.shape == image.shape[-2:]
        expected = cv2.resize(label, (out.shape[1], out.shape[0]), interpolation=cv2.INTER_NEAREST)
        assert np.array_equal(out.numpy(), expected), f'seed {seed}: {(out.numpy() != expected).sum()} pixels differ'


def colour_coded(label):
    """An image whose red channel encodes the label: 10 * c + 5."""
    red = label.to(torch.int64) * 10 + 5
    return tv_tensors.Image(torch.stack([red, 255 - red, torch.full_like(red, 77)]).to(torch.uint8))


def test_image_and_label_stay_aligned_through_rescale_crop_flip():
    # 24 classes in 16 x 16 blocks, increasing left to right along each row of blocks
    label = torch.arange(24, dtype=torch.uint8).view(4, 6).repeat_interleave(16, 0).repeat_interleave(16, 1)
    pipeline = v2.Compose([data.RandomRescale((96, 64), (0.5, 2.0)), data.RandomCropWithClassLimit(48, 0.75),
                           v2.RandomHorizontalFlip(0.5), data.PadToSize(48)])
    flipped = []
    for seed in range(12):
        torch.manual_seed(seed)
        image, out = pipeline(colour_coded(label), tv_tensors.Mask(label))
        out = out.as_subclass(torch.Tensor).long()
        # compare where the label is constant over a 7x7 neighbourhood (bilinear and nearest differ at edges)
        lab = out.float()[None, None]
        uniform = (F.max_pool2d(lab, 7, 1, 3) == -F.max_pool2d(-lab, 7, 1, 3))[0, 0] & (out != 255)
        decoded = (image[0].long() - 5) // 10
        assert uniform.sum() > 50
        mismatch = (decoded != out)[uniform]
        assert not mismatch.any(), f'seed {seed}: {int(mismatch.sum())} pixels disagree'
        row = out[0][out[0] != 255]
        if row.unique().numel() > 1:
            flipped.append(bool(row[0] > row[-1]))
    assert True in flipped and False in flipped       # both flipped and unflipped crops were checked


def test_crop_class_limit_by_hand():
    ok = data.crop_passes_class_limit
    assert not ok(torch.tensor([0, 0, 0, 1]), 0.75)            # 75% is not below 75%
    assert ok(torch.tensor([0, 0, 1, 255]), 0.75)              # 2/3 among the counted pixels
    assert not ok(torch.tensor([0, 0, 255, 255]), 0.75)        # one class: 255 is not counted
    assert not ok(torch.tensor([255, 255]), 0.75)
    assert ok(torch.tensor([3, 4, 5, 6]), 0.75)


def crop_is_acceptable(left):
    """Columns 0..31 ignored, 32..47 class 0, 48..63 class 1; a 32-wide crop at `left`, by hand."""
    class0 = max(0, min(left + 32, 48) - max(left, 32))
    class1 = max(0, left + 32 - 48)
    return class0 > 0 and class1 > 0 and max(class0, class1) / (class0 + class1) < 0.75


def test_crop_class_limit_is_enforced_and_ignores_255():
    label = torch.full((32, 64), 255, dtype=torch.uint8)
    label[:, 32:48], label[:, 48:] = 0, 1
    columns = tv_tensors.Image(torch.arange(64, dtype=torch.uint8).expand(3, 32, 64))   # pixel value = column

    def acceptable_fraction(ratio):
        crop = data.RandomCropWithClassLimit(32, ratio)
        good = 0
        for seed in range(40):
            torch.manual_seed(seed)
            image, _ = crop(columns, tv_tensors.Mask(label))
            good += crop_is_acceptable(int(image[0, 0, 0]))
        return good / 40

    # 11 of 33 offsets pass; with 10 redraws (2/3)**11 ~ 1% of crops fail, without the limit 2/3 do.
    # Counting 255 as a class would accept offsets 1..16 as well (ignored + class 0 only).
    limited, unlimited = acceptable_fraction(0.75), acceptable_fraction(1.0)
    assert limited >= 0.9 and unlimited < 0.6, (limited, unlimited)


def test_crop_gives_up_after_ten_tries_and_keeps_small_images():
    crop = data.RandomCropWithClassLimit(32, 0.75)
    one_class = tv_tensors.Mask(torch.zeros(40, 50, dtype=torch.uint8))
    image, label = crop(colour_coded(one_class), one_class)
    assert image.shape == (3, 32, 32) and label.shape == (32, 32)
    small = tv_tensors.Mask(torch.zeros(20, 50, dtype=torch.uint8))
    image, label = crop(colour_coded(small), small)
    image, label = data.PadToSize(32)(image, label)
    assert label.shape == (32, 32) and (label[20:] == 255).all() and (image[:, 20:] == 0).all()


def test_hsv_conversions_by_hand():
    rgb = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128], [255, 128, 0], [0, 0, 0]],
                       dtype=torch.uint8).t().reshape(3, 1, 6)
    hsv = data.rgb_to_hsv_uint8(rgb)
    # OpenCV's 8-bit HSV: H in degrees / 2; orange: 60 * 128/255 = 30.1 degrees -> 15
    assert hsv.reshape(3, 6).t().tolist() == [[0, 255, 255], [60, 255, 255], [120, 255, 255], [0, 0, 128],
                                               [15, 255, 255], [0, 0, 0]]
    back = data.hsv_to_rgb_uint8(hsv)
    err = (back.int() - rgb.int()).abs().max()
    assert err <= 2, f'round trip differs by {err}'


def opencv_has_avx2(cv2) -> bool:
    """OpenCV's vector code for HSV -> RGB, which truncates, runs on x86 CPUs with AVX2."""
    return any(cv2.getHardwareFeatureName(i) == 'AVX2' and cv2.checkHardwareSupport(i) for i in range(1, 64))


def opencv_4x():
    """OpenCV of the 4.x line (requirements-test.txt pins 4.11), the one MMSegmentation 0.24 ran on.

    OpenCV 5 may convert HSV with wider vectors on some CPUs, which moves the scalar tail whose pixels
    round; data.py follows 4.x, where the release's numbers came from (docs/release.md, item 23)."""
    cv2 = pytest.importorskip('cv2')
    if not cv2.__version__.startswith('4.'):
        pytest.skip(f'holds for OpenCV 4.x; OpenCV {cv2.__version__} is installed')
    return cv2


@pytest.mark.parametrize('width', [256, 100, 33, 31, 1])
def test_hsv_conversions_match_opencv(width):
    """Bit-exact at widths with and without a scalar tail (width % 32 pixels of every row), OpenCV 4.x."""
    cv2 = opencv_4x()
    rng = np.random.default_rng(width)
    rgb = rng.integers(0, 256, (64, width, 3), dtype=np.uint8)
    ours = data.rgb_to_hsv_uint8(torch.from_numpy(rgb).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    diff = np.abs(ours.astype(int) - cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)).max()
    assert diff == 0, f'RGB -> HSV differs from OpenCV by {diff}'
    hsv = np.stack([rng.integers(0, 180, (64, width)), rng.integers(0, 256, (64, width)),
                    rng.integers(0, 256, (64, width))], -1).astype(np.uint8)
    ours = data.hsv_to_rgb_uint8(torch.from_numpy(hsv).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    diff = np.abs(ours.astype(int) - cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)).max()
    assert diff <= (0 if opencv_has_avx2(cv2) else 1), f'HSV -> RGB differs from OpenCV by {diff}'


class ScriptedDistortion(data.PhotoMetricDistortion):
    """The distortion with its random draws replaced by a script."""

    def __init__(self, draws):
        super().__init__()
        self.draws = iter(draws)

    def _randint(self, low, high):
        return next(self.draws)

    def _uniform(self, low, high):
        return next(self.draws)


def test_photometric_arithmetic_by_hand():
    grey = tv_tensors.Image(torch.full((3, 2, 2), 100, dtype=torch.uint8))
    # draws: brightness coin, beta, contrast-first coin, [contrast coin, alpha], saturation coin, hue coin, ...
    out = ScriptedDistortion([1, 10.7, 0, 0, 0, 1, 1.5])(grey, None)[0]
    assert (out == 165).all()                    # trunc(100 + 10.7) = 110, then 110 * 1.5
    assert torch.equal(ScriptedDistortion([0, 0, 0, 0, 0])(grey, None)[0], grey)
    dark = tv_tensors.Image(torch.full((3, 1, 1), 20, dtype=torch.uint8))
    assert (ScriptedDistortion([1, -32.0, 0, 0, 0, 0])(dark, None)[0] == 0).all()      # clipped at 0
    # hue +30 (60 degrees) turns pure red (H 0) into yellow (H 30)
    red = tv_tensors.Image(torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1))
    assert ScriptedDistortion([0, 0, 0, 1, 30, 0])(red, None)[0].flatten().tolist() == [255, 255, 0]
    # saturation x 0.5: S = trunc(255 * 0.5) = 127; back to RGB g = b = 255 * (1 - 127/255), 128 exactly
    # but 127.99998 in float32, which OpenCV's vector code truncates to 127 and its scalar code, which
    # converts the last width % 32 pixels of each row, rounds to 128: on a row of 33, only the last is 128
    row = tv_tensors.Image(torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1).expand(3, 2, 33))
    pale = ScriptedDistortion([0, 0, 1, 0.5, 0, 0])(row, None)[0]
    assert (pale[0] == 255).all() and (pale[1:, :, :32] == 127).all() and (pale[1:, :, 32] == 128).all()


def test_photometric_contrast_first_or_last():
    x = tv_tensors.Image(torch.tensor([200, 120, 40], dtype=torch.uint8).view(3, 1, 1))
    convert = data.PhotoMetricDistortion._convert

    def hue(t, shift):
        hsv = data.rgb_to_hsv_uint8(t)
        hsv[0] = (hsv[0].long() + shift) % 180
        return data.hsv_to_rgb_uint8(hsv)

    first = ScriptedDistortion([0, 1, 1, 1.5, 0, 1, 50])(x, None)[0]
    last = ScriptedDistortion([0, 0, 0, 1, 50, 1, 1.5])(x, None)[0]
    assert torch.equal(first, hue(convert(x, alpha=1.5), 50)) and torch.equal(last, convert(hue(x, 50), alpha=1.5))
    assert not torch.equal(first, last)           # the order matters once values clip


def test_photometric_draws_stay_in_mmseg_ranges():
    draws = []

    class Recording(data.PhotoMetricDistortion):
        def _randint(self, low, high):
            value = super()._randint(low, high)
            draws.append(('int', low, high, value))
            return value

    torch.manual_seed(0)
    image = tv_tensors.Image(torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8))
    for _ in range(200):
        Recording()(image, None)
    hue = [v for kind, low, high, v in draws if low == -18]
    assert min(hue) == -18 and max(hue) == 17      # numpy's randint(-18, 18) excludes 18, as MMSeg


# ---------------------------------------------------------------------------------------------- reproducibility

def test_seeding_torch_fixes_an_item_whatever_numpy_and_random_do(fake_roots):
    """The pipeline draws from torch's generator only, which is what train.py seeds for each sample."""
    import random
    dataset = data.SegmentationDataset('voc', fake_roots['voc'], 'train', 'inductive', data.train_transform('voc'))
    items = []
    for other_seed in (1, 2):
        random.seed(other_seed)
        np.random.seed(other_seed)
        torch.manual_seed(7)
        items.append(dataset[3])
    torch.manual_seed(8)
    other = dataset[3]
    assert torch.equal(items[0]['label'], items[1]['label'])
    assert torch.equal(items[0]['image'], items[1]['image']), \
        f"images differ by {(items[0]['image'] - items[1]['image']).abs().max()}"
    assert not torch.equal(items[0]['image'], other['image'])


def test_a_dataloader_repeats_with_the_same_generator_seed(fake_roots):
    dataset = data.SegmentationDataset('voc', fake_roots['voc'], 'train', 'inductive', data.train_transform('voc'))

    def batches(seed):
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=True, num_workers=2,
                                             generator=torch.Generator().manual_seed(seed))
        return [(b['image'], b['label'], b['name']) for _, b in zip(range(2), loader)]

    first, again, other = batches(0), batches(0), batches(1)
    for (i1, l1, n1), (i2, l2, n2) in zip(first, again):
        assert n1 == n2 and torch.equal(l1, l2)
        assert torch.equal(i1, i2), f'images differ by {(i1 - i2).abs().max()}'
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, other))


# ---------------------------------------------------------------------------------------------- errors

def test_missing_root(tmp_path):
    with pytest.raises(data.DatasetError, match='does not exist.*python -m tools.datasets fake'):
        data.SegmentationDataset('voc', str(tmp_path / 'nowhere'), 'train')


def test_missing_split_file(small_voc):
    (Path(small_voc) / 'ImageSets/Segmentation/trainaug.txt').unlink()
    with pytest.raises(data.DatasetError, match='trainaug.txt not found.*prepare-voc-aug'):
        data.SegmentationDataset('voc', small_voc, 'train')


def test_wrong_layout(tmp_path):
    with pytest.raises(data.DatasetError, match='JPEGImages'):
        data.SegmentationDataset('voc', str(tmp_path), 'val')


def test_image_without_label(small_voc):
    name = open(f'{small_voc}/ImageSets/Segmentation/val.txt').read().split()[0]
    (Path(small_voc) / 'SegmentationClass' / f'{name}.png').unlink()
    with pytest.raises(data.DatasetError, match=f'no label.*{name}.jpg needs .*SegmentationClass/{name}.png'):
        data.SegmentationDataset('voc', small_voc, 'val')


def test_label_removed_after_listing_is_named_in_getitem(small_voc):
    dataset = data.SegmentationDataset('voc', small_voc, 'val')
    Path(dataset.samples[0][1]).unlink()
    with pytest.raises(data.DatasetError, match=dataset.samples[0][1]):
        dataset[0]


def truncate_image(dataset):
    path = dataset.samples[0][0]
    content = open(path, 'rb').read()
    open(path, 'wb').write(content[:len(content) // 3])          # a download that stopped
    return rf'cannot read image {path} \(.*\): the file is corrupt or truncated'


def label_out_of_range(dataset):
    label = np.zeros((32, 48), dtype=np.uint8)
    label[0, 0] = 21                                              # VOC PNGs hold 0..20 and 255
    Image.fromarray(label).save(dataset.samples[0][1])
    return rf'label {dataset.samples[0][1]} holds \[21\], outside the PASCAL VOC 2012 range 0\.\.20'


def label_of_another_size(dataset):
    Image.fromarray(np.zeros((48, 32), dtype=np.uint8)).save(dataset.samples[0][1])
    image, label = dataset.samples[0][:2]
    return rf'image {image} is \(32, 48\) but its label {label} is \(48, 32\)'


@pytest.mark.parametrize('break_it', [truncate_image, label_out_of_range, label_of_another_size])
def test_bad_file_is_named_and_the_error_survives_a_worker(small_voc, break_it):
    """The same one-line DatasetError in the main process and from a DataLoader worker, which rebuilds
    the exception from the worker's traceback text."""
    dataset = data.SegmentationDataset('voc', small_voc, 'val', 'fully', data.test_transform('voc'))
    pattern = break_it(dataset)
    with pytest.raises(data.DatasetError, match=pattern) as direct:
        dataset[0]
    with pytest.raises(data.DatasetError) as from_worker:
        next(iter(torch.utils.data.DataLoader(dataset, num_workers=1)))
    assert str(from_worker.value) == str(direct.value) and '\n' not in str(direct.value), str(from_worker.value)


def test_exif_orientation_is_ignored_so_image_and_label_stay_aligned(small_voc):
    """OpenCV (MMSeg's image loader) turns a JPEG tagged 'rotate 90' upright; we read the pixels as stored,
    as the label is, so the pair still lines up."""
    dataset = data.SegmentationDataset('voc', small_voc, 'val', 'fully')
    path = dataset.samples[0][0]
    stored = np.asarray(Image.open(path).convert('RGB'))
    exif = Image.Exif()
    exif[0x0112] = 6                                              # Orientation: rotate 90 clockwise to view
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    item = dataset[0]
    assert item['image'].shape[-2:] == item['label'].shape == (32, 48)
    cv2 = pytest.importorskip('cv2')
    assert cv2.imread(path).shape[:2] == (48, 32)                 # what MMSeg's loader would give


def run_data_main(monkeypatch, *argv):
    monkeypatch.setattr('sys.argv', ['data.py', *argv])
    with pytest.raises(SystemExit) as stop:
        data.main()
    return stop.value.code


def test_command_line_errors_are_one_line(small_voc, tmp_path, monkeypatch):
    split_file = Path(small_voc) / 'ImageSets/Segmentation/trainaug.txt'
    split_file.unlink()
    for argv, named in [(['--data-root', small_voc], str(split_file)),
                        (['--data-root', str(tmp_path / 'nowhere')], str(tmp_path / 'nowhere')),
                        (['--data-root', str(tmp_path / 'VOCdevkit')], 'JPEGImages')]:
        code = run_data_main(monkeypatch, *argv)
        assert isinstance(code, str) and code.startswith('error: ') and '\n' not in code and named in code, code


def test_demonstration_runs(small_voc, monkeypatch, capsys):
    monkeypatch.setattr('sys.argv', ['data.py', '--data-root', small_voc, '--index', '1'])
    data.main()
    steps = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert list(steps) == ['as', 'RandomRescale', 'RandomCropWithClassLimit', 'RandomHorizontalFlip',
                           'PhotoMetricDistortion', 'ToDtype', 'PadToSize', 'inductive'], list(steps)
    assert 'image (3, 512, 512) float32' in steps['PadToSize'], steps['PadToSize']
