"""Tests of data.py: the real loaders on generated datasets in the real layouts, the label tables against
hand-written expectations, the MMSeg training pipeline (ranges, alignment, class limit, reproducibility,
the photometric distortion's arithmetic), the preparation helpers and every error message."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

import data


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """The transforms run in DataLoader workers, which use one thread each; so do these tests (on a busy
    2-core machine two threads make the per-pixel HSV work ten times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def fake_roots(tmp_path_factory):
    base = tmp_path_factory.mktemp('fake')
    return {name: data.make_fake_dataset(name, str(base), seed=i) for i, name in enumerate(data.DATASETS)}


@pytest.fixture
def small_voc(tmp_path):
    """A fresh tiny VOC that a test may break."""
    return data.make_fake_dataset('voc', str(tmp_path), num_train=2, num_val=1, size=(32, 48))


def raw_label(path):
    return np.asarray(Image.open(path)).astype(np.int64)


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


# ---------------------------------------------------------------------------------------------- label tables

def test_reduce_zero_label_table_by_hand():
    table = data.reduce_zero_label_table()
    assert {v: int(table[v]) for v in (0, 1, 2, 20, 59, 150, 254, 255)} == \
        {0: 255, 1: 0, 2: 1, 20: 19, 59: 58, 150: 149, 254: 253, 255: 255}


def test_remap_table_voc_by_hand():
    inductive = data.label_remap_table(20, data.VOC_UNSEEN, 'inductive')
    expected = list(range(15)) + [255] * 5          # classes 15..19 (pottedplant..tvmonitor) unseen
    assert inductive[:20].tolist() == expected and inductive[255] == 255 and (inductive[20:] == 255).all()
    for setting in ('transductive', 'fully'):
        table = data.label_remap_table(20, data.VOC_UNSEEN, setting)
        assert table[:20].tolist() == list(range(20)) and table[255] == 255


def test_remap_table_context_by_hand():
    table = data.label_remap_table(59, data.CONTEXT_UNSEEN, 'inductive')
    # unseen 0, 6, 7, 14, 19, 24, 31, 33, 48, 54: a seen class moves down by the unseen ones before it
    hand = {0: 255, 1: 0, 5: 4, 6: 255, 7: 255, 8: 5, 13: 10, 14: 255, 15: 11, 58: 48, 255: 255}
    assert {k: int(table[k]) for k in hand} == hand
    assert sorted(table[:59][table[:59] != 255].tolist()) == list(range(49))


def test_coco_stuff_table_by_hand(tmp_path):
    table = data.coco_stuff_train_id_table()
    hand = {0: 0, 10: 10, 11: 255, 12: 11, 24: 23, 25: 255, 26: 24, 27: 25, 28: 255, 29: 255, 30: 26,
            44: 255, 45: 40, 65: 255, 66: 60, 67: 255, 68: 255, 69: 61, 70: 255, 71: 62, 82: 255, 83: 73,
            90: 255, 91: 80, 181: 170, 182: 255, 255: 255}
    assert {k: int(table[k]) for k in hand} == hand
    assert data.COCO_CLASSES[table[12]] == 'stop sign' and data.COCO_CLASSES[table[91]] == 'banner'
    # the converter writes *_labelTrainIds.png beside each stuffthingmap
    for split in ('train2017', 'val2017'):
        (tmp_path / 'annotations' / split).mkdir(parents=True)
    raw = np.array([[0, 11, 12, 255], [91, 181, 90, 45]], dtype=np.uint8)
    Image.fromarray(raw).save(tmp_path / 'annotations' / 'val2017' / '000000000139.png')
    assert data.prepare_coco_stuff(str(tmp_path)) == 1
    out = raw_label(tmp_path / 'annotations' / 'val2017' / '000000000139_labelTrainIds.png')
    assert out.tolist() == [[0, 255, 11, 255], [80, 170, 255, 40]]


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
        expected = (image - np.array(data.IMAGENET_MEAN)) / np.array(data.IMAGENET_STD)
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
    root = data.make_fake_dataset(shapes, str(tmp_path), num_train=3, num_val=1, size=(40, 56))
    assert sorted(p.name for p in (tmp_path / 'images' / 'train').iterdir())[0].endswith('.jpg')
    dataset = data.SegmentationDataset(shapes, root, 'train', 'inductive', data.train_transform(shapes))
    item = dataset[0]
    assert len(dataset) == 3 and item['image'].shape == (3, 64, 64)
    assert set(item['label'].unique().tolist()) <= {0, 1, 255}


# ---------------------------------------------------------------------------------------------- the pipeline

@pytest.mark.parametrize('name', list(data.DATASETS))
def test_pipeline_keeps_labels_in_range(fake_roots, name):
    crop = data.DATASETS[name]['crop_size']
    for setting in ('inductive', 'transductive', 'fully'):
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
        uniform = (nnf.max_pool2d(lab, 7, 1, 3) == -nnf.max_pool2d(-lab, 7, 1, 3))[0, 0] & (out != 255)
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


def test_hsv_conversions_match_opencv_when_installed():
    cv2 = pytest.importorskip('cv2')
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (64, 256, 3), dtype=np.uint8)
    ours = data.rgb_to_hsv_uint8(torch.from_numpy(rgb).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    assert np.array_equal(ours, cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV))
    hsv = np.stack([rng.integers(0, 180, (64, 256)), rng.integers(0, 256, (64, 256)),
                    rng.integers(0, 256, (64, 256))], -1).astype(np.uint8)
    ours = data.hsv_to_rgb_uint8(torch.from_numpy(hsv).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    diff = np.abs(ours.astype(int) - cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)).max()
    assert diff <= 1, f'HSV -> RGB differs from OpenCV by {diff}'


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
    # but 127.99998 in float32, which OpenCV truncates to 127
    pale = ScriptedDistortion([0, 0, 1, 0.5, 0, 0])(red, None)[0]
    assert pale.flatten().tolist() == [255, 127, 127]


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

def test_reproducible_with_a_fixed_seed(fake_roots):
    dataset = data.SegmentationDataset('voc', fake_roots['voc'], 'train', 'inductive', data.train_transform('voc'))

    def batches(seed):
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=True, num_workers=2,
                                             worker_init_fn=data.seed_worker,
                                             generator=torch.Generator().manual_seed(seed))
        return [(b['image'], b['label'], b['name']) for _, b in zip(range(2), loader)]

    first, again, other = batches(0), batches(0), batches(1)
    for (i1, l1, n1), (i2, l2, n2) in zip(first, again):
        assert n1 == n2 and torch.equal(l1, l2)
        assert torch.equal(i1, i2), f'images differ by {(i1 - i2).abs().max()}'
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, other))


# ---------------------------------------------------------------------------------------------- errors

def test_missing_root(tmp_path):
    with pytest.raises(data.DatasetError, match='does not exist.*make-fake'):
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


def test_label_out_of_range(small_voc):
    dataset = data.SegmentationDataset('voc', small_voc, 'val')
    label = np.zeros((32, 48), dtype=np.uint8)
    label[0, 0] = 21                                              # VOC PNGs hold 0..20 and 255
    Image.fromarray(label).save(dataset.samples[0][1])
    with pytest.raises(data.DatasetError, match=r'holds \[21\], outside .* 0\.\.20'):
        dataset[0]


def test_corrupt_image_is_named_even_in_a_worker(small_voc):
    dataset = data.SegmentationDataset('voc', small_voc, 'val')
    path = dataset.samples[0][0]
    content = open(path, 'rb').read()
    open(path, 'wb').write(content[:len(content) // 3])          # a truncated download
    with pytest.raises(data.DatasetError, match='corrupt'):
        dataset[0]
    loader = torch.utils.data.DataLoader(dataset, num_workers=1)
    with pytest.raises(data.DatasetError, match=path):
        next(iter(loader))


# ---------------------------------------------------------------------------------------------- preparation

def test_prepare_voc_aug_from_sbd_mat_files(small_voc, tmp_path):
    savemat = pytest.importorskip('scipy.io').savemat
    voc = Path(small_voc)
    lists = voc / 'ImageSets/Segmentation'
    train, val = lists.joinpath('train.txt').read_text().split(), lists.joinpath('val.txt').read_text().split()
    sbd = tmp_path / 'benchmark_RELEASE' / 'dataset'
    (sbd / 'cls').mkdir(parents=True)
    sbd_names = {'sbd_a': 3, 'sbd_b': 7, train[0]: 9, val[0]: 11}        # SBD also covers VOC images
    for name in ('sbd_a', 'sbd_b'):                                        # SBD's images are VOC 2011 images
        shutil.copy(voc / 'JPEGImages' / f'{train[0]}.jpg', voc / 'JPEGImages' / f'{name}.jpg')
    for name, value in sbd_names.items():
        savemat(str(sbd / 'cls' / f'{name}.mat'),
                {'GTcls': {'Segmentation': np.full((32, 48), value, dtype=np.uint8), 'Boundaries': 0}})
    (sbd / 'train.txt').write_text('sbd_a\n' + train[0] + '\n')
    (sbd / 'val.txt').write_text('sbd_b\n' + val[0] + '\n')
    assert data.prepare_voc_aug(str(voc), str(tmp_path / 'benchmark_RELEASE')) == (2, 4)
    assert lists.joinpath('aug.txt').read_text().split() == ['sbd_a', 'sbd_b']
    assert lists.joinpath('trainaug.txt').read_text().split() == sorted(['sbd_a', 'sbd_b'] + train)
    assert (raw_label(voc / 'SegmentationClassAug' / 'sbd_b.png') == 7).all()
    assert (raw_label(voc / 'SegmentationClassAug' / f'{train[0]}.png') == 9).all()       # SBD's mask
    copied = raw_label(voc / 'SegmentationClassAug' / f'{train[1]}.png')                  # not in SBD: VOC's
    assert np.array_equal(copied, raw_label(voc / 'SegmentationClass' / f'{train[1]}.png'))
    assert len(data.SegmentationDataset('voc', str(voc), 'train')) == 2 + 4


def test_check_context(fake_roots, tmp_path):
    assert data.check_context(fake_roots['context']) == {'train': 4, 'val': 2}
    root = shutil.copytree(fake_roots['context'], tmp_path / 'VOC2010')
    path = next((root / 'SegmentationClassContext').glob('val_*.png'))
    Image.fromarray(np.full((96, 128), 60, dtype=np.uint8)).save(path)
    with pytest.raises(data.DatasetError, match=r'holds \[60\].*0\.\.59'):
        data.check_context(str(root))


def test_statistics_and_samples(fake_roots, tmp_path):
    dataset = data.SegmentationDataset('voc', fake_roots['voc'], 'val', 'inductive', data.test_transform('voc'))
    pixels, images, ignored = data.class_statistics(dataset)
    raw = np.concatenate([raw_label(s[1]).ravel() for s in dataset.samples])
    hand = np.bincount(raw, minlength=256)
    assert pixels.tolist() == hand[1:21].tolist() and ignored == hand[0] + hand[255]
    written = data.save_samples(dataset, str(tmp_path), count=1)
    label = Image.open(written[0] + '_label.png')
    assert label.mode == 'P' and label.getpalette()[255 * 3:] == [224, 224, 192]
    assert np.array_equal(np.asarray(label), dataset[0]['label'].numpy())
