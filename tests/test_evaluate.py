"""evaluate.py: metrics against torchmetrics and the paper's hIoU, sliding windows, one- vs
two-process evaluation, cross-dataset scoring, the release's checkpoint layout, Table 3's compute
count, pictures, and clear errors. CPU, small random CLIP, generated data.
"""
import copy
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torchmetrics.classification import MulticlassJaccardIndex

import benchmark
import checkpoint as checkpoints  # the module; `checkpoint` is the fixture below
import clip
import data
import evaluate
import visualize
from model import OTSeg, trainable_parameters
from mpsa import MPSADecoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


def run_main(*argv):
    evaluate.main(evaluate.get_args_parser().parse_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    return dict(voc=data.make_fake_dataset("voc", root, num_train=1, num_val=3, size=(70, 90)),
                ade=data.make_fake_dataset("ade", root, num_train=1, num_val=2, size=(50, 80)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint in train.py's format: a random-tiny model trained on nothing, VOC inductive."""
    torch.manual_seed(0)
    preset = data.get_preset("voc", 64)
    clip_model = checkpoints.build_clip("random-tiny", 4, 64, CPU)
    model = OTSeg(clip_model, preset["templates"][:3]).eval()
    ckpt = dict(format=checkpoints.FORMAT, model=checkpoints.trainable_state_dict(model),
                clip=checkpoints.describe_clip(clip_model, "random-tiny"), templates=model.templates,
                matching="sinkhorn", dataset="voc", setting="inductive", classes=list(preset["classes"]),
                unseen=list(preset["unseen"]), crop_size=64, window=dict(crop=[64, 64], stride=[40, 40]),
                step=0, args={}, schedule={})
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    checkpoints.atomic_save(ckpt, str(path))
    return str(path), model


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
    ours = torch.tensor(evaluate.segmentation_metrics(conf, unseen=[1, 2])["iou"], dtype=torch.float64) / 100
    jaccard = MulticlassJaccardIndex(K, average="none", ignore_index=255, zero_division=float("nan"))
    theirs = jaccard(pred, label).double()
    assert math.isnan(ours[5]) and ours[4] == 0
    assert torch.allclose(ours, theirs, equal_nan=True), f"largest difference {(ours - theirs).abs().nanmax()}"
    metrics = evaluate.segmentation_metrics(conf, unseen=[1, 2])
    assert metrics["miou_unseen"] == pytest.approx(theirs[[1, 2]].nanmean().item() * 100)
    assert metrics["miou_seen"] == pytest.approx(theirs[[0, 3, 4, 5]].nanmean().item() * 100)
    keep = label != 255
    assert metrics["pixel_accuracy"] == pytest.approx((pred[keep] == label[keep]).double().mean().item() * 100)


def test_hiou_is_the_harmonic_mean_of_the_papers_rows():
    assert evaluate.harmonic_iou(93.3, 81.6) == pytest.approx(87.06, abs=0.01)  # VOC inductive OTSeg+: 87.1
    assert evaluate.harmonic_iou(56.2, 78.4) == pytest.approx(65.47, abs=0.01)  # Context fully (FACTS 10)
    assert math.isnan(evaluate.harmonic_iou(50.0, float("nan")))
    conf = torch.tensor([[10, 0, 10], [0, 10, 10], [0, 0, 10]])  # rows: truth; IoUs 1/2, 1/2, 1/3
    m = evaluate.segmentation_metrics(conf, unseen=[2])
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
    assert torch.allclose(out["p"], torch.sigmoid(image), atol=1e-6)
    for axis, length in enumerate(size):  # MMSegmentation's rule: every stride, the last flush with the end
        starts = evaluate.window_starts(max(length, crop[axis]), crop[axis], stride[axis])
        assert starts[0] == 0 and starts[-1] + crop[axis] == max(length, crop[axis])
        assert all(b - a <= stride[axis] for a, b in zip(starts, starts[1:]))


# ----------------------------------------------------------------------------------------------
# Evaluation: one process vs two, cross-dataset, pictures
# ----------------------------------------------------------------------------------------------

def test_two_processes_give_exactly_the_one_process_confusion_matrix(checkpoint, fake_root, tmp_path):
    path, model = checkpoint
    preset = data.get_preset("voc", 64)
    dataset = data.SegmentationDataset(preset, fake_root["voc"], "val", "fully", transform=data.test_transform(preset))
    window = dict(crop=(64, 64), stride=(40, 40))
    one = evaluate.evaluate(model, dataset, list(preset["classes"]), list(preset["unseen"]), True, window, CPU,
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
    assert "mIoU(U)" in result.stdout and "hIoU" in result.stdout


def test_cross_dataset_uses_the_targets_names_and_all_its_classes(checkpoint, fake_root, tmp_path):
    path, _ = checkpoint
    out = tmp_path / "ade.json"
    run_main("--checkpoint", path, "--dataset", "ade", "--data-root", fake_root["ade"], "--crop-size", "64",
             "--device", "cpu", "--workers", 0, "--output-json", out)
    report = json.load(open(out))
    assert report["cross_dataset"] and not report["calibration"] and report["unseen"] == []
    assert report["classes"] == data.ADE_CLASSES and len(report["results"]["OTSeg+"]["iou"]) == 150
    assert report["window"]["crop"] == [64, 64]  # the source model's window


def test_image_with_any_class_names_and_visualisations(checkpoint, fake_root, tmp_path):
    path, _ = checkpoint
    Image.new("RGB", (70, 45), (30, 120, 200)).save(tmp_path / "photo.jpg")
    run_main("--checkpoint", path, "--image", tmp_path / "photo.jpg", "--classes", "cat, grass,sky",
             "--device", "cpu", "--crop-size", 64)
    result = Image.open(tmp_path / "photo_otseg.png")
    assert result.width > 70 and result.height >= 45  # the picture and a legend beside it
    run_main("--checkpoint", path, "--data-root", fake_root["voc"], "--visualize", tmp_path / "vis",
             "--num-visualize", 1, "--limit", 1, "--crop-size", 64, "--device", "cpu", "--workers", 0,
             "--output-json", tmp_path / "x.json")
    names = sorted(os.listdir(tmp_path / "vis"))
    assert len(names) == 2 and names[0].endswith("_prediction.png") and "_prompts_" in names[1]


# ----------------------------------------------------------------------------------------------
# The release's checkpoints
# ----------------------------------------------------------------------------------------------

def release_layout(model: OTSeg, clip_model) -> dict:
    """Our weights written under the release's MMSegmentation key names (from its model code),
    with the weights it builds and never uses, the frozen backbone and the text encoder."""
    w = {name: p.detach().clone() for name, p in trainable_parameters(model)}
    d = model.relationship_descriptor.out_features
    sd = {"backbone.conv1.weight": clip_model.visual.conv1.weight.detach().clone(),
          "backbone.ln_post.weight": torch.ones(64), "text_encoder.ln_final.weight": torch.ones(64)}
    for name in ("prompt_embeddings", "deep_prompt_embeddings", "prompt_proj.weight", "prompt_proj.bias",
                 "prompt_norm.weight", "prompt_norm.bias"):
        sd[f"backbone.{name}"] = w[f"clip.visual.{name}"]
    sd["decode_head.q_proj.weight"] = w["relationship_descriptor.weight"]
    sd["decode_head.q_proj.bias"] = w["relationship_descriptor.bias"]
    for i in range(3):
        ours, theirs = f"decoder.layers.{i}.", f"decode_head.decoder_1.layers.{i}."
        for a, b in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("proj", "out_proj")):
            for t in ("weight", "bias"):
                sd[f"{theirs}multihead_attn.{a}.{t}"] = w.get(f"{ours}cross_attn.{b}.{t}", torch.randn(d, d) if t == "weight" else torch.randn(d))
        for t in ("weight", "bias"):
            for layer in ("linear1", "linear2", "norm1", "norm2", "norm3"):
                sd[f"{theirs}{layer}.{t}"] = w.get(f"{ours}{layer}.{t}", torch.randn(3))
        sd[f"{theirs}self_attn.in_proj_weight"] = torch.randn(3 * d, d)
        sd[f"{theirs}self_attn.out_proj.weight"] = torch.randn(d, d)
    return sd


def test_release_checkpoint_converts_to_the_same_model(checkpoint, tmp_path):
    model = copy.deepcopy(checkpoint[1])
    torch.manual_seed(1)
    for _, p in trainable_parameters(model):  # weights no init would give
        p.data.normal_()
    state_dict = release_layout(model, model.clip)
    torch.save({"meta": {"iter": 20000}, "state_dict": state_dict}, tmp_path / "release.pth")
    ckpt = checkpoints.convert_release_checkpoint(torch.load(tmp_path / "release.pth", weights_only=True), "voc",
                                               "inductive", "random-tiny", CPU)
    assert ckpt["clip"]["prompt_tokens"] == 4 and ckpt["step"] == 20000 and ckpt["setting"] == "inductive"
    converted = dict(ckpt["model"])
    for name, p in trainable_parameters(model):
        assert torch.equal(converted[name], p.detach()), name
    state_dict["decode_head.unknown.weight"] = torch.ones(1)
    with pytest.raises(SystemExit, match="unknown keys"):
        checkpoints.convert_release_state_dict(state_dict, dict(trainable_parameters(model)))


# ----------------------------------------------------------------------------------------------
# Efficiency: the paper's compute convention by hand
# ----------------------------------------------------------------------------------------------

def test_paper_macs_count_linear_and_conv_outside_clip_attention(checkpoint):
    _, model = checkpoint
    names = list(data.VOC_CLASSES)
    model.text_embeddings(names)
    K, N, C, T, W, M, layers = 20, 3, 64, 4, 64, 16, 2  # 64x64 image: 4x4 patches of 16
    tokens = 1 + T + M
    expected = (M * 3 * 16 * 16 * W  # patch embedding
                + layers * T * W * W  # prompt_proj on every layer's prompts
                + layers * tokens * 2 * W * 4 * W  # CLIP's MLPs (its attention is not counted)
                + K * N * 2 * C * C  # relationship descriptor
                + 2 * (2 * K * N * C * C + 2 * M * C * C + 2 * K * N * C * 4 * C)  # decoder layers 1-2
                + K * N * C * C + M * C * C)  # layer 3: query and key projections
    macs = benchmark.paper_macs(model, torch.randn(1, 3, 64, 64), names)
    assert macs == expected, (macs, expected)
    assert benchmark.full_flops(model, torch.randn(1, 3, 64, 64), names) > 2 * macs  # attention counted
    table = benchmark.efficiency_table(model, names, 64, CPU, iters=1, amp=False)
    assert "OTSeg+ (MPSA)" in table and "softmax cross-attention" in table


def test_release_overheads_are_the_papers_13_8m():
    head = SimpleNamespace(relationship_descriptor=torch.nn.Linear(1024, 512), decoder=MPSADecoder(512))
    parameters, macs = benchmark.release_overheads(head, num_queries=20 * 6, num_pixels=32 * 32)
    assert parameters == 3_154_944 + 2_627_072  # FACTS 3: self-attention + the last layer's unused weights
    assert 8_039_168 + parameters == pytest.approx(13.8e6, abs=0.05e6)
    assert macs == 32 * 32 * 512 * 512 + 120 * 512 * 512 + 2 * 120 * 512 * 2048  # ~0.55 G: 61.3 -> 61.9


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

def test_checkpoint_from_another_backbone_or_unreadable(checkpoint, fake_root, tmp_path):
    path, _ = checkpoint
    torch.save(clip.CLIP(**dict(clip.TINY, vision_layers=3)).state_dict(), tmp_path / "deep.pt")
    with pytest.raises(SystemExit, match=r"vision_layers 2 \(this CLIP: 3\)"):
        run_main("--checkpoint", path, "--clip-weights", tmp_path / "deep.pt", "--data-root", fake_root["voc"],
                 "--device", "cpu", "--output-json", tmp_path / "never.json")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="cannot read"):
        run_main("--checkpoint", tmp_path / "junk.pt", "--data-root", fake_root["voc"])
    with pytest.raises(SystemExit, match="needs --source"):
        torch.save({"state_dict": {"decode_head.q_proj.weight": torch.ones(1)}}, tmp_path / "release.pth")
        run_main("--checkpoint", tmp_path / "release.pth", "--data-root", fake_root["voc"])
    assert not (tmp_path / "never.json").exists()
