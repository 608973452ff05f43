"""Tests of tools/datasets.py (python -m tools.datasets): the preparation helpers against hand-made inputs in the real formats (COCO-Stuff
maps, SBD .mat files, converted Context labels), the statistics against numpy's bincount, the saved
samples against the dataset's items, and the command line: one line `error: ...` for every bad input."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conftest import raw_label
from tools import datasets

pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- preparation

def test_coco_stuff_table_by_hand(tmp_path):
    table = datasets.coco_stuff_train_id_table()
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
    assert datasets.prepare_coco_stuff(str(tmp_path)) == 1
    out = raw_label(tmp_path / 'annotations' / 'val2017' / '000000000139_labelTrainIds.png')
    assert out.tolist() == [[0, 255, 11, 255], [80, 170, 255, 40]]


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
    assert datasets.prepare_voc_aug(str(voc), str(tmp_path / 'benchmark_RELEASE')) == (2, 4)
    assert lists.joinpath('aug.txt').read_text().split() == ['sbd_a', 'sbd_b']
    assert lists.joinpath('trainaug.txt').read_text().split() == sorted(['sbd_a', 'sbd_b'] + train)
    assert (raw_label(voc / 'SegmentationClassAug' / 'sbd_b.png') == 7).all()
    assert (raw_label(voc / 'SegmentationClassAug' / f'{train[0]}.png') == 9).all()       # SBD's mask
    copied = raw_label(voc / 'SegmentationClassAug' / f'{train[1]}.png')                  # not in SBD: VOC's
    assert np.array_equal(copied, raw_label(voc / 'SegmentationClass' / f'{train[1]}.png'))
    assert len(data.SegmentationDataset('voc', str(voc), 'train')) == 2 + 4


def test_check_context(fake_roots, tmp_path):
    assert datasets.check_context(fake_roots['context']) == {'train': 4, 'val': 2}
    root = shutil.copytree(fake_roots['context'], tmp_path / 'VOC2010')
    path = next((root / 'SegmentationClassContext').glob('val_*.png'))
    Image.fromarray(np.full((96, 128), 60, dtype=np.uint8)).save(path)
    with pytest.raises(data.DatasetError, match=r'holds \[60\].*0\.\.59'):
        datasets.check_context(str(root))


def test_statistics_and_samples(fake_roots, tmp_path):
    dataset = data.SegmentationDataset('voc', fake_roots['voc'], 'val', 'inductive', data.test_transform('voc'))
    pixels, images, ignored = datasets.class_statistics(dataset)
    raw = np.concatenate([raw_label(s[1]).ravel() for s in dataset.samples])
    hand = np.bincount(raw, minlength=256)
    assert pixels.tolist() == hand[1:21].tolist() and ignored == hand[0] + hand[255]
    labelled = [set(np.unique(np.where(raw_label(s[1]) == 0, 255, raw_label(s[1])))) for s in dataset.samples]
    assert images.tolist() == [sum(c + 1 in values for values in labelled) for c in range(20)]


def test_saved_samples_show_what_the_model_sees(fake_roots, tmp_path):
    """A test-time sample of ADE20K (CLIP's normalisation, undone with the preset's statistics): the saved
    picture is the resized JPEG, and the saved label holds the item's label values."""
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF
    dataset = data.SegmentationDataset('ade', fake_roots['ade'], 'val', 'fully', data.test_transform('ade'))
    written = datasets.save_samples(dataset, str(tmp_path), count=1)
    jpeg = torch.from_numpy(np.asarray(Image.open(dataset.samples[0][0]).convert('RGB')).copy()).permute(2, 0, 1)
    resized = TF.resize(jpeg, [512, 683], interpolation=v2.InterpolationMode.BILINEAR, antialias=False)
    saved = torch.from_numpy(np.asarray(Image.open(written[0] + '_image.png')).copy()).permute(2, 0, 1)
    err = (saved.int() - resized.int()).abs().max()
    assert err <= 1, f'the saved picture differs from the resized JPEG by {err} levels'
    label = Image.open(written[0] + '_label.png')
    assert label.mode == 'P' and label.getpalette()[255 * 3:] == [224, 224, 192]
    assert np.array_equal(np.asarray(label), dataset[0]['label'].numpy())


def test_prepare_voc_aug_writes_no_list_when_a_mat_file_is_bad(small_voc, tmp_path):
    pytest.importorskip('scipy.io')
    sbd = tmp_path / 'benchmark_RELEASE' / 'dataset'
    (sbd / 'cls').mkdir(parents=True)
    (sbd / 'cls' / 'broken.mat').write_bytes(b'not a mat file')
    (sbd / 'train.txt').write_text('broken\n')
    (sbd / 'val.txt').write_text('')
    with pytest.raises(data.DatasetError, match='broken.mat'):
        datasets.prepare_voc_aug(small_voc, str(tmp_path / 'benchmark_RELEASE'))
    assert sorted(p.name for p in (Path(small_voc) / 'ImageSets/Segmentation').iterdir()) == \
        ['train.txt', 'trainaug.txt', 'val.txt']                  # the fake's own lists, no aug.txt


# ---------------------------------------------------------------------------------------------- command line

def run_main(monkeypatch, *argv):
    """tools.datasets.main with these arguments; returns its exit message (None when it ends normally)."""
    monkeypatch.setattr('sys.argv', ['tools/datasets.py', *argv])
    try:
        datasets.main()
    except SystemExit as stop:
        return stop.code
    return None


def test_fake_stats_and_samples_from_the_command_line(tmp_path, monkeypatch, capsys):
    assert run_main(monkeypatch, 'fake', str(tmp_path / 'fake'), '--dataset', 'voc') is None
    assert run_main(monkeypatch, 'stats', '--dataset', 'voc', '--data-root', str(tmp_path / 'fake'),
                    '--samples', str(tmp_path / 'samples')) is None
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    table = [row for row in rows if len(row) > 3 and row[-3] in ('seen', 'unseen')]
    assert [int(row[0]) for row in table] == list(range(20))
    ignored = next(row for row in rows if row and row[0] == 'ignored')
    assert sum(float(row[-2]) for row in table) + float(ignored[-1]) == pytest.approx(100, abs=0.02)
    picture = Image.open(tmp_path / 'samples' / '00_train_000000_image.png')
    assert picture.size == (512, 512)                             # the training crop


def test_command_line_errors_are_one_line(small_voc, tmp_path, monkeypatch):
    split_file = Path(small_voc) / 'ImageSets/Segmentation/val.txt'
    empty = tmp_path / 'empty'
    empty.mkdir()
    cases = [
        (['fake', str(tmp_path), '--dataset', 'voc'], str(Path(small_voc))),          # not empty
        (['stats', '--data-root', str(tmp_path / 'nowhere')], str(tmp_path / 'nowhere')),
        (['stats', '--data-root', str(empty)], 'JPEGImages'),
        (['prepare-coco', str(empty)], str(empty / 'annotations' / 'train2017')),
        (['prepare-voc-aug', small_voc, str(empty)], str(empty / 'dataset' / 'cls')),
        (['check-context', str(empty)], 'JPEGImages'),
    ]
    split_file.unlink()
    cases.append((['stats', '--data-root', small_voc, '--split', 'val'], str(split_file)))
    for argv, named in cases:
        code = run_main(monkeypatch, *argv)
        assert isinstance(code, str) and code.startswith('error: ') and '\n' not in code and named in code, \
            (argv, code)
    assert run_main(monkeypatch, 'stats', '--data-root', small_voc, '--max-images', '0') == 2   # argparse's usage error


def test_a_bad_label_met_by_stats_is_one_line(small_voc, monkeypatch):
    dataset = data.SegmentationDataset('voc', small_voc, 'val')
    Image.fromarray(np.full((32, 48), 30, dtype=np.uint8)).save(dataset.samples[0][1])
    code = run_main(monkeypatch, 'stats', '--data-root', small_voc, '--split', 'val')
    assert code == f'error: {pytest.raises(data.DatasetError, dataset.load_label, 0).value}'


@pytest.mark.parametrize('program', [['-m', 'tools.datasets', 'stats'], ['data.py']])
def test_the_real_program_prints_one_line_and_no_traceback(program, tmp_path):
    argv = [*program, '--data-root', str(tmp_path / 'nowhere')]
    result = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 1 and result.stdout == ''
    assert result.stderr.startswith('error: data root ') and result.stderr.count('\n') == 1, result.stderr
