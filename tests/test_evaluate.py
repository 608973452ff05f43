"""evaluate.py and visualize.py: metrics against torchmetrics and the paper's hIoU, sliding windows, one-
vs two-process evaluation, the release's cross-dataset settings, what `--image` and `--visualize` draw,
and user errors as one line. CPU, small random CLIP, generated data.
"""
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.classification import MulticlassJaccardIndex

import data
from conftest import assert_close, expect_error, run_main
from tools import datasets
import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")
# PASCAL VOC's colour map (its devkit's labelcolormap.m) for label indices 0..20: class k is drawn as k + 1
VOC_COLOURS = [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128), (0, 128, 128),
               (128, 128, 128), (64, 0, 0), (192, 0, 0), (64, 128, 0), (192, 128, 0), (64, 0, 128), (192, 0, 128),
               (64, 128, 128), (192, 128, 128), (0, 64, 0), (128, 64, 0), (0, 192, 0), (128, 192, 0), (0, 64, 128)]
# The normalisations on 0-255 values (test_data.py compares them with torchvision's and open_clip's)
IMAGENET = data.IMAGENET_MEAN, data.IMAGENET_STD
CLIP_STATS = data.CLIP_MEAN, data.CLIP_STD


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    return dict(voc=datasets.make_fake_dataset("voc", root, num_train=1, num_val=3, size=(70, 90)),
                ade=datasets.make_fake_dataset("ade", root, num_train=1, num_val=2, size=(50, 80)))


@pytest.fixture(scope="module")
def checkpoint(make_tiny_checkpoint):
    """A random-tiny model trained on nothing, VOC inductive, 3 prompts."""
    return make_tiny_checkpoint(prompt_tokens=4, num_templates=3)


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------

def test_iou_matches_torchmetrics_with_nan_for_absent_classes():
    torch.manual_seed(0)
    K = 6
    label = torch.randint(0, K - 2, (3, 40, 50))  # classes 4 and 5 never in the labels
    label[:, :5] = 255  # ignored pixels
    pred = torch.randint(0, K - 1, (3, 40, 50))  # class 5 never predicted either: IoU NaN; 4 predicted: 0
    conf = evaluate.confusion_matrix(pred, label, K)
    seen = torch.tensor([True, False, False, True, True, True])  # classes 1 and 2 unseen
    assert torch.equal(data.seen_mask(K, [1, 2]), seen)
    ours = torch.tensor(evaluate.segmentation_metrics(conf, seen)["iou"], dtype=torch.float64) / 100
    jaccard = MulticlassJaccardIndex(K, average="none", ignore_index=255, zero_division=float("nan"))
    theirs = jaccard(pred, label).double()
    assert math.isnan(ours[5]) and ours[4] == 0
    assert_close(ours, theirs, rtol=1e-6, equal_nan=True, what="IoU")  # torchmetrics computes in float32
    metrics = evaluate.segmentation_metrics(conf, seen)
    assert metrics["miou_unseen"] == pytest.approx(theirs[[1, 2]].nanmean().item() * 100)
    assert metrics["miou_seen"] == pytest.approx(theirs[[0, 3, 4, 5]].nanmean().item() * 100)
    keep = label != 255
    assert metrics["pixel_accuracy"] == pytest.approx((pred[keep] == label[keep]).double().mean().item() * 100)


def test_confusion_matrix_equals_boolean_indexing_and_bincount():
    """The scatter_add_ form against the plain one (keep the labelled pixels, bincount their pairs), on
    random predictions and labels with ignored pixels, in both label dtypes a dataset gives."""
    torch.manual_seed(0)
    for K, dtype in ((6, torch.int64), (21, torch.uint8), (171, torch.int64)):
        label = torch.randint(0, K, (2, 37, 53)).to(dtype)
        label[torch.rand(label.shape) < 0.3] = 255  # ignored
        pred = torch.randint(0, K, (2, 37, 53))
        keep = label.long() < K
        plain = torch.bincount(label.long()[keep] * K + pred[keep], minlength=K * K).view(K, K)
        ours = evaluate.confusion_matrix(pred, label, K)
        assert ours.dtype == torch.int64 and torch.equal(ours, plain), f"largest difference {(ours - plain).abs().max()}"
        assert ours.sum() == keep.sum()


def test_confusion_matrix_asks_nothing_of_the_host():
    """No operator whose output size or value the host must read (boolean-mask indexing, nonzero,
    bincount, .item()): on a GPU each one waits for the device, on every evaluated image."""
    from torch.utils._python_dispatch import TorchDispatchMode
    aten = torch.ops.aten

    class Syncs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            boolean_index = func is aten.index.Tensor and any(
                i is not None and i.dtype == torch.bool for i in args[1])
            if boolean_index or func in (aten.nonzero.default, aten.bincount.default, aten.masked_select.default,
                                         aten._local_scalar_dense.default):
                self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    label = torch.randint(0, 6, (40, 50))
    label[:5] = 255
    with Syncs() as syncs:
        evaluate.confusion_matrix(torch.randint(0, 6, (40, 50)), label, 6)
    assert syncs.seen == []


def test_hiou_is_the_harmonic_mean_of_the_papers_rows():
    assert evaluate.harmonic_iou(93.3, 81.6) == pytest.approx(87.06, abs=0.01)  # Table 1, VOC inductive OTSeg+: 87.1
    assert evaluate.harmonic_iou(56.2, 78.4) == pytest.approx(65.47, abs=0.01)  # Context fully: Table 4's S, 1's U
    assert math.isnan(evaluate.harmonic_iou(50.0, float("nan")))
    conf = torch.tensor([[10, 0, 10], [0, 10, 10], [0, 0, 10]])  # rows: truth; IoUs 1/2, 1/2, 1/3
    m = evaluate.segmentation_metrics(conf, data.seen_mask(3, [2]))
    assert (m["miou_seen"], m["miou_unseen"]) == pytest.approx((50.0, 100 / 3))
    assert m["hiou"] == pytest.approx(40.0) and m["pixel_accuracy"] == pytest.approx(60.0)


# ----------------------------------------------------------------------------------------------
# Sliding windows
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(37, 53), (64, 64), (65, 64), (97, 301), (129, 128), (513, 683)])
def test_windows_cover_every_pixel_and_average_overlaps(size):
    torch.manual_seed(0)
    crop, stride = (64, 64), (40, 40)
    image = torch.randn(3, *size)
    seen = []

    def predict(windows):  # a pixel-wise model: averaging identical window outputs must change nothing
        seen.append(windows.shape)
        return {"p": torch.sigmoid(windows), "ones": torch.ones_like(windows[:, :1])}

    out = evaluate.slide_inference(predict, image, crop, stride, window_batch=3)
    assert all(tuple(s[-2:]) == crop for s in seen)  # every window has the crop size (small images padded)
    assert out["ones"].shape == (1, *size) and torch.equal(out["ones"], torch.ones(1, *size))
    assert_close(out["p"], torch.sigmoid(image), atol=1e-6, what="stitched windows")
    for axis, length in enumerate(size):  # MMSegmentation's rule: every stride, the last flush with the end
        starts = evaluate.window_starts(max(length, crop[axis]), crop[axis], stride[axis])
        assert starts[0] == 0 and starts[-1] + crop[axis] == max(length, crop[axis])
        assert all(b - a <= stride[axis] for a, b in zip(starts, starts[1:]))


# ----------------------------------------------------------------------------------------------
# Evaluation: one process vs two, and the release's cross-dataset settings
# ----------------------------------------------------------------------------------------------

def test_two_processes_give_exactly_the_one_process_confusion_matrix(checkpoint, fake_root, tmp_path):
    path, model = checkpoint
    preset = data.get_preset("voc", 64)
    dataset = data.SegmentationDataset(preset, fake_root["voc"], "val", "fully", transform=data.test_transform(preset))
    window = dict(crop=(64, 64), stride=(40, 40))
    seen = data.seen_mask(len(preset["classes"]), preset["unseen"])
    one = evaluate.evaluate(model, dataset, list(preset["classes"]), seen, True, window, CPU,
                            workers=0, progress=False)
    labelled = sum(int((dataset[i]["label"] < 20).sum()) for i in range(len(dataset)))
    assert sum(map(sum, one["OTSeg+"]["confusion"])) == labelled  # each of the 3 images exactly once
    out = tmp_path / "eval.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(ROOT, "evaluate.py"), "--checkpoint", path, "--data-root", fake_root["voc"],
               "--crop-size", "64", "--device", "cpu", "--workers", "0", "--output-json", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.load(open(out))["results"]
    for name in ("OTSeg", "OTSeg+"):
        assert two[name]["confusion"] == one[name]["confusion"], name


class SignalsItsWorker(torch.utils.data.Dataset):
    """A dataset whose every read in a DataLoader worker first sends that worker SIGTERM, as a scheduler
    sends it to every process of a job it preempts."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.dataset[index]


def test_a_stop_signal_to_the_data_workers_leaves_the_evaluation_whole(checkpoint, fake_root):
    """The workers leave SIGTERM to the process they serve (train.py obeys it once the evaluation at
    that step is done): the evaluation ends with the confusion matrices of a run without workers."""
    path, model = checkpoint
    preset = data.get_preset("voc", 64)
    dataset = data.SegmentationDataset(preset, fake_root["voc"], "val", "fully", transform=data.test_transform(preset))
    seen = data.seen_mask(len(preset["classes"]), preset["unseen"])
    args = (list(preset["classes"]), seen, True, dict(crop=(64, 64), stride=(40, 40)), CPU)
    alone = evaluate.evaluate(model, dataset, *args, workers=0, progress=False)
    signalled = evaluate.evaluate(model, SignalsItsWorker(dataset), *args, workers=1, progress=False)
    for name in ("OTSeg", "OTSeg+"):
        assert signalled[name]["confusion"] == alone[name]["confusion"], name


@pytest.fixture
def recorded(monkeypatch):
    """The images and windows evaluate.py slides over, as it runs."""
    calls = []
    slide = evaluate.slide_inference

    def recording(predict, image, crop, stride, window_batch=8):
        calls.append(dict(image=image.clone(), crop=tuple(crop), stride=tuple(stride)))
        return slide(predict, image, crop, stride, window_batch)

    monkeypatch.setattr(evaluate, "slide_inference", recording)
    return calls


def test_cross_dataset_uses_the_targets_names_and_all_its_classes(checkpoint, fake_root, tmp_path):
    path, _ = checkpoint
    out = tmp_path / "ade.json"
    run_main(evaluate, "--checkpoint", path, "--dataset", "ade", "--data-root", fake_root["ade"], "--crop-size", "64",
             "--device", "cpu", "--workers", 0, "--output-json", out)
    report = json.load(open(out))
    assert report["cross_dataset"] and not report["calibration"] and report["unseen"] == []
    assert report["classes"] == data.ADE_CLASSES and len(report["results"]["OTSeg+"]["iou"]) == 150
    assert report["window"]["crop"] == [64, 64]  # the source model's window


def test_ade20k_is_normalised_with_clips_statistics_unless_asked(checkpoint, fake_root, tmp_path, recorded):
    path, _ = checkpoint
    common = ["--checkpoint", path, "--dataset", "ade", "--data-root", fake_root["ade"], "--crop-size", 64,
              "--limit", 1, "--device", "cpu", "--workers", 0, "--output-json", tmp_path / "ade.json"]
    run_main(evaluate, *common)
    run_main(evaluate, *common, "--normalization", "source")
    target, source = recorded[0]["image"], recorded[1]["image"]

    def pixels(x, stats):  # undo a normalisation: the resized uint8 image, if the statistics are right
        mean, std = (torch.tensor(v).view(3, 1, 1) for v in stats)
        return x * std + mean

    for x, stats in ((target, CLIP_STATS), (source, IMAGENET)):
        values = pixels(x, stats)
        off = (values - values.round()).abs().max()
        assert off < 1e-3, f"largest distance to a 0-255 level {off}"
    assert_close(pixels(target, CLIP_STATS), pixels(source, IMAGENET), atol=1e-3, what="pixels")
    assert not torch.allclose(target, source, atol=0.05)


def test_coco_to_voc_slides_with_the_releases_stride_unless_asked(checkpoint, fake_root, tmp_path, recorded):
    path, _ = checkpoint
    ckpt = torch.load(path, weights_only=True)
    coco = data.get_preset("coco")
    ckpt.update(dataset="coco", classes=list(coco["classes"]), unseen=list(coco["unseen"]), crop_size=128,
                window=dict(crop=[128, 128], stride=[106, 106]))  # a COCO model at a quarter of 512
    torch.save(ckpt, tmp_path / "coco.pt")
    common = ["--checkpoint", tmp_path / "coco.pt", "--data-root", fake_root["voc"], "--crop-size", 128, "--limit", 1,
              "--device", "cpu", "--workers", 0, "--output-json", tmp_path / "voc.json"]
    run_main(evaluate, *common, "--dataset", "voc")  # configs/cross_dataset/coco-to-voc.py: stride 380 of 512
    run_main(evaluate, *common, "--dataset", "voc", "--window-stride", 106)
    run_main(evaluate, *common, "--dataset", "coco", "--data-root", datasets.make_fake_dataset(
        "coco", str(tmp_path / "coco"), num_train=1, num_val=1, size=(40, 60)))  # in domain: its own window
    assert [(r["crop"], r["stride"]) for r in recorded] == [((128, 128), (95, 95)), ((128, 128), (106, 106)),
                                                            ((128, 128), (106, 106))]


# ----------------------------------------------------------------------------------------------
# What --image and --visualize draw
# ----------------------------------------------------------------------------------------------

def red_or_not(model, class_names, seen, amp=False):
    """A predictor whose answer is known: the first class where the pixel is redder than the dataset's
    mean colour, the second elsewhere, never the others."""
    def predict(windows):
        red = (windows[:, :1] > 0).float()  # (b, 1, h, w): normalised red channel above its mean
        probs = torch.cat([red, 1 - red, torch.zeros(windows.shape[0], len(class_names) - 2, *windows.shape[2:])], 1)
        return {"OTSeg": probs, "OTSeg+": probs}
    return predict


def test_image_is_drawn_with_its_prediction_at_a_readable_size(checkpoint, tmp_path, monkeypatch, capsys):
    path, _ = checkpoint
    monkeypatch.setattr(evaluate, "make_predictor", red_or_not)
    photo = np.zeros((64, 64, 3), np.uint8)
    photo[:, :32] = (220, 30, 30)  # red left half
    photo[:, 32:] = (30, 30, 220)  # blue right half
    Image.fromarray(photo).save(tmp_path / "photo.png")
    run_main(evaluate, "--checkpoint", path, "--image", tmp_path / "photo.png", "--classes", "cat, grass,sky",
             "--device", "cpu", "--crop-size", 64)
    first = capsys.readouterr().out.splitlines()[0]
    assert "photo.png into 3 classes (cat, grass, sky)" in first and "voc with" not in first
    result = np.asarray(Image.open(tmp_path / "photo_otseg.png").convert("RGB")).astype(int)
    assert result.shape[0] == 256 and result.shape[1] > 256  # 64 pixels enlarged 4 times, a legend on the right
    picture, legend = result[:, :256], result[:, 256:]
    left = (np.array([220, 30, 30]) + VOC_COLOURS[1]) / 2  # half photo, half the colour of class 0 (cat)
    right = (np.array([30, 30, 220]) + VOC_COLOURS[2]) / 2  # class 1 (grass)
    assert np.abs(picture[:, :128] - left).max() <= 1 and np.abs(picture[:, 128:] - right).max() <= 1
    colours = {tuple(c) for c in legend.reshape(-1, 3)}
    assert VOC_COLOURS[1] in colours and VOC_COLOURS[2] in colours and VOC_COLOURS[3] not in colours  # no sky


def test_visualize_draws_truth_prediction_and_one_row_per_prompt(checkpoint, fake_root, tmp_path):
    path, model = checkpoint
    run_main(evaluate, "--checkpoint", path, "--data-root", fake_root["voc"], "--visualize", tmp_path / "vis",
             "--num-visualize", 1, "--limit", 1, "--crop-size", 64, "--device", "cpu", "--workers", 0,
             "--output-json", tmp_path / "x.json")
    name = open(os.path.join(fake_root["voc"], "ImageSets", "Segmentation", "val.txt")).readline().strip()
    raw = np.asarray(Image.open(os.path.join(fake_root["voc"], "SegmentationClass", name + ".png")))  # 0..20, 255
    largest = np.bincount(raw[(raw > 0) & (raw < 255)], minlength=21)[1:].argmax()
    prompts = f"{name}_prompts_{data.VOC_CLASSES[largest].replace(' ', '_')}.png"
    assert sorted(os.listdir(tmp_path / "vis")) == sorted([f"{name}_prediction.png", prompts])

    strip = np.asarray(Image.open(tmp_path / "vis" / f"{name}_prediction.png").convert("RGB"))
    assert strip.shape[0] == 4 * 70  # 70 rows enlarged 4 times to reach 256
    truth = strip[::4, 4 * 90 + 10:][:, :4 * 90:4]  # second panel, one pixel per label pixel
    expected = np.array([VOC_COLOURS[v] if v < 21 else (0, 0, 0) for v in raw.flatten()]).reshape(*raw.shape, 3)
    assert (truth == expected).all(), f"{(truth != expected).any(-1).sum()} pixels of the truth panel differ"

    grid = np.asarray(Image.open(tmp_path / "vis" / prompts).convert("RGB"))
    column = (grid[:, -8] != 255).any(-1)  # through the right-hand maps: tiles are never white
    starts = np.flatnonzero(column[1:] & ~column[:-1]) + 1
    ends = np.flatnonzero(column[:-1] & ~column[1:]) + 1
    assert len(starts) == len(model.templates) == 3 and set(ends - starts) == {96}  # one 96-pixel tile per prompt


# ----------------------------------------------------------------------------------------------
# User errors: one line, exit non-zero, nothing written
# ----------------------------------------------------------------------------------------------

def test_bad_class_lists_images_and_output_paths(checkpoint, fake_root, tmp_path):
    path, _ = checkpoint
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    Image.new("RGB", (8, 8)).save(tmp_path / "in" / "photo.png")
    image = ["--checkpoint", path, "--device", "cpu", "--image"]
    expect_error(evaluate, "--classes holds no class name", *image, tmp_path / "in" / "photo.png", "--classes", " , ",
                 unchanged=tmp_path)
    expect_error(evaluate, "--classes names Cat, cat more than once", *image, tmp_path / "in" / "photo.png",
                 "--classes", "Cat,grass,cat", unchanged=tmp_path)
    expect_error(evaluate, "--image and --classes go together", *image, tmp_path / "in" / "photo.png",
                 unchanged=tmp_path)
    expect_error(evaluate, "is not a picture", *image, tmp_path / "in" / "broken.jpg", "--classes", "cat,sky",
                 unchanged=tmp_path)
    expect_error(evaluate, "no such file", *image, tmp_path / "in" / "missing.jpg", "--classes", "cat,sky",
                 unchanged=tmp_path)
    expect_error(evaluate, "--output", *image, tmp_path / "in" / "photo.png", "--classes", "cat,sky",
                 "--output", tmp_path / "missing" / "out.png", unchanged=tmp_path)
    score = ["--checkpoint", path, "--data-root", fake_root["voc"], "--device", "cpu", "--crop-size", 64]
    expect_error(evaluate, f"--output-json {tmp_path / 'missing' / 'x.json'}: the folder", *score,
                 "--output-json", tmp_path / "missing" / "x.json", unchanged=tmp_path)
    expect_error(evaluate, "--window-stride 65 exceeds the window (64 pixels", *score, "--window-stride", 65,
                 "--output-json", tmp_path / "x.json", unchanged=tmp_path)
    expect_error(evaluate, f"--data-root: data root {tmp_path / 'typo'}", *score[:2], "--data-root", tmp_path / "typo",
                 "--clip-weights", tmp_path / "not_downloaded_yet.pt", unchanged=tmp_path)  # the cheap mistake first
    expect_error(evaluate, "--visualize", *score, "--visualize", tmp_path / "in" / "photo.png", unchanged=tmp_path)
    expect_error(evaluate, "nothing to do", "--checkpoint", path, unchanged=tmp_path)
    expect_error(evaluate, "argument --dataset: invalid choice", *score, "--dataset", "pascal", unchanged=tmp_path)


def test_an_error_is_one_line_on_stderr(checkpoint, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--checkpoint", checkpoint[0],
                             "--image", "photo.jpg", "--classes", " , "], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.startswith("error: --classes") and result.stderr.count("\n") == 1, result.stderr
    assert os.listdir(tmp_path) == []


def test_a_broken_dataset_file_met_in_a_worker_is_one_line(checkpoint, tmp_path):
    root = datasets.make_fake_dataset("voc", str(tmp_path / "in"), num_train=1, num_val=2, size=(40, 52))
    name = open(os.path.join(root, "ImageSets", "Segmentation", "val.txt")).read().split()[1]
    label = os.path.join(root, "SegmentationClass", name + ".png")
    with open(label, "r+b") as f:
        f.truncate(60)  # a truncated PNG, found by the DataLoader worker that reads it
    expect_error(evaluate, f"cannot read label {label}", "--checkpoint", checkpoint[0], "--data-root", root,
                 "--crop-size", 64, "--device", "cpu", "--workers", 1, "--output-json", tmp_path / "x.json",
                 unchanged=tmp_path)
