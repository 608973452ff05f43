"""train.py: the schedule, the data order, one optimisation step, pseudo-labels, exact resumption,
a two-process torchrun run, and one clear error for each kind of bad input.

Everything runs on the CPU with the small random CLIP ('random-tiny') and generated VOC-layout data.
"""
import copy
import json
import math
import os
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch

import checkpoint
import clip
import common
import data
import evaluate
import losses
import train
from model import OTSeg, trainable_parameters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "voc", "--clip-weights", "random-tiny", "--crop-size", "64", "--device", "cpu",
        "--workers", "0", "--batch-size", "2", "--warmup-iters", "1", "--log-every", "1"]


def run_main(*argv):
    train.main(train.get_args_parser().parse_args([str(a) for a in argv]))


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def fake_voc(tmp_path_factory):
    return data.make_fake_dataset("voc", str(tmp_path_factory.mktemp("data")), num_train=2, num_val=2)


@pytest.fixture(scope="module")
def finished_run(fake_voc, tmp_path_factory):
    """Three uninterrupted steps: the reference of the resume test and the checkpoint of the others."""
    out = tmp_path_factory.mktemp("run") / "full"
    run_main(*TINY, "--data-root", fake_voc, "--iters", 3, "--output-dir", out)
    return str(out)


# ----------------------------------------------------------------------------------------------
# Schedule and data order
# ----------------------------------------------------------------------------------------------

def test_learning_rate_is_mmcv_poly_with_linear_warmup():
    schedule = dict(train.SCHEDULE, iters=20000)
    base, floor = 2e-4, 1e-6
    poly = lambda step: (base - floor) * (1 - step / 20000) ** 0.9 + floor  # noqa: E731
    expected = {0: poly(0) * 1e-6,  # warmup starts at warmup_ratio of the poly value
                750: poly(750) * (1 - 0.5 * (1 - 1e-6)),
                1499: poly(1499) * (1 - (1 / 1500) * (1 - 1e-6)),
                1500: poly(1500), 10000: poly(10000), 20000: floor}
    for step, lr in expected.items():
        assert train.learning_rate(step, schedule) == pytest.approx(lr, rel=1e-12), step


def test_schedule_presets_and_overrides():
    args = train.get_args_parser().parse_args(["--data-root", "x", "--dataset", "coco", "--setting", "transductive"])
    schedule = train.make_schedule(args)
    assert (schedule["iters"], schedule["prompt_tokens"], schedule["batch_size"]) == (40000, 100, 16)
    args = train.get_args_parser().parse_args(["--data-root", "x", "--dataset", "context", "--iters", "7"])
    assert (train.make_schedule(args)["iters"], train.make_schedule(args)["prompt_tokens"]) == (7, 10)


@pytest.mark.parametrize("world_size,micro_batch", [(1, 16), (1, 4), (2, 8), (4, 4), (8, 2), (2, 2)])
def test_global_batches_do_not_depend_on_processes_or_accumulation(world_size, micro_batch):
    batch, n, steps = 16, 37, 5
    accumulation = train.accumulation_steps(batch, micro_batch, world_size)
    per_micro = batch // (world_size * accumulation)
    reference = train.GlobalBatchSampler(n, batch, batch, 0, 1, seed=3)
    want = [p for p, _ in zip(iter(reference), range(steps * batch))]
    streams = [iter(train.GlobalBatchSampler(n, batch, per_micro, r, world_size, seed=3)) for r in range(world_size)]
    got = []
    for _ in range(steps):
        step = []
        for _ in range(accumulation):
            for stream in streams:
                step += [next(stream) for _ in range(per_micro)]
        got += sorted(step)
    assert sorted(got) == sorted(want) and [set(got[i:i + batch]) for i in range(0, len(got), batch)] == \
        [set(want[i:i + batch]) for i in range(0, len(want), batch)]
    # each epoch visits every sample once, and starting at a later step continues the same stream
    epoch = [index for position, index in want if position < n]
    assert sorted(epoch) == list(range(n))
    later = train.GlobalBatchSampler(n, batch, batch, 0, 1, seed=3, start_step=2)
    assert [p for p, _ in zip(iter(later), range(batch))] == want[2 * batch:3 * batch]


def test_uneven_world_size_is_a_clear_error():
    with pytest.raises(SystemExit, match="not divisible"):
        train.accumulation_steps(16, 4, 3)


# ----------------------------------------------------------------------------------------------
# One optimisation step
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(fake_voc):
    torch.manual_seed(0)
    preset = data.get_preset("voc", 64)
    clip_model = checkpoint.build_clip("random-tiny", 4, 64, torch.device("cpu"))
    model = OTSeg(clip_model, preset["templates"][:3]).eval()  # eval: dropout off, the step is deterministic
    dataset = data.SegmentationDataset(preset, fake_voc, "train", "fully", transform=data.train_transform(preset))
    torch.manual_seed(1)
    samples = [dataset[i] for i in range(2)]
    images = torch.stack([s["image"] for s in samples])
    labels = torch.stack([s["label"] for s in samples])
    return model, images, labels, list(preset["classes"])


def gradients_after_step(model, micro_batches, class_names):
    params = [p for _, p in trainable_parameters(model)]
    saved = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params)
    schedule = dict(train.SCHEDULE)
    stats = train.train_step(model, optimizer, micro_batches, class_names, 1e-3, params, 1, nullcontext(), schedule)
    grads = [p.grad.clone() for p in params]
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    return grads, stats


def test_accumulation_changes_nothing_and_loss_is_normalised_over_the_global_batch(tiny_model):
    model, images, labels, names = tiny_model
    whole, stats = gradients_after_step(model, [(images, labels)], names)
    halves, stats_2 = gradients_after_step(model, [(images[:1], labels[:1]), (images[1:], labels[1:])], names)
    scale = max(g.abs().max() for g in whole)
    diff = max((a - b).abs().max() for a, b in zip(whole, halves))
    assert diff <= 1e-5 * scale, f"largest gradient difference {diff} (scale {scale})"
    assert torch.allclose(stats, stats_2, rtol=1e-5), (stats, stats_2)
    # independent: autograd of the losses module's own normalisation by the global pair count
    params = [p for _, p in trainable_parameters(model)]
    num_masks = losses.count_masks(labels, len(names))
    total = losses.otseg_loss(model(images, names), labels, num_masks)["total"]
    direct = torch.autograd.grad(total, params, allow_unused=True)
    direct = [torch.zeros_like(p) if g is None else g for g, p in zip(direct, params)]
    diff = max((a - b).abs().max() for a, b in zip(whole, direct))
    assert diff <= 1e-5 * scale, f"largest difference to loss / num_masks: {diff}"
    assert stats[5] == num_masks and stats[0] == pytest.approx(total.item(), rel=1e-5)


@pytest.mark.cuda
def test_bf16_autocast_step_on_cuda_is_close_to_fp32(tiny_model):
    model, images, labels, names = tiny_model
    model = copy.deepcopy(model).cuda()
    params = [p for _, p in trainable_parameters(model)]
    batch = [(images.cuda(), labels.cuda())]
    losses_by_precision = []
    for amp in (False, True):
        optimizer = torch.optim.AdamW(params, lr=0.0)  # lr 0: both steps see the same weights
        stats = train.train_step(model, optimizer, batch, names, 0.0, params, 1,
                                 common.autocast(torch.device("cuda"), amp), dict(train.SCHEDULE))
        losses_by_precision.append(stats[0].item())
    assert all(math.isfinite(x) for x in losses_by_precision)
    assert losses_by_precision[1] == pytest.approx(losses_by_precision[0], rel=0.05), losses_by_precision


def test_pseudo_labels_are_the_unseen_argmax_of_the_ensemble():
    K = 4  # classes 2 and 3 unseen
    unseen = torch.zeros(256, dtype=torch.bool)
    unseen[[2, 3]] = True
    decoder = torch.tensor([5.0, 0.0, 1.0, 2.0]).view(1, K, 1, 1).expand(1, K, 2, 2).clone()
    score = torch.tensor([5.0, 0.0, 3.0, -2.0]).view(1, K, 1, 1).expand(1, K, 2, 2).clone()
    # 0.5 D + 0.5 S = [5, 0, 2, 0]: seen class 0 wins overall, unseen class 2 among the unseen
    labels = torch.tensor([[[0, 2], [3, 255]]])
    got = train.pseudo_label(dict(decoder=decoder, score=score), labels, unseen)
    assert got.tolist() == [[[0, 2], [2, 255]]]  # seen and 255 pixels kept, unseen pixels -> 2


# ----------------------------------------------------------------------------------------------
# Whole runs
# ----------------------------------------------------------------------------------------------

def test_interrupted_and_resumed_run_equals_uninterrupted(fake_voc, finished_run, tmp_path):
    out = tmp_path / "split"
    run_main(*TINY, "--data-root", fake_voc, "--iters", 3, "--output-dir", out, "--stop-after", 1)
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 1
    run_main(*TINY, "--data-root", fake_voc, "--iters", 3, "--resume", out / "ckpt.pt")
    full = torch.load(os.path.join(finished_run, "ckpt.pt"), weights_only=True)
    resumed = torch.load(out / "ckpt.pt", weights_only=True)
    assert resumed["step"] == full["step"] == 3
    for name, weight in full["model"].items():
        assert torch.equal(weight, resumed["model"][name]), \
            f"{name}: largest difference {(weight - resumed['model'][name]).abs().max()}"
    for a, b in zip(full["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    losses_full = [r["loss"] for r in read_log(finished_run) if "loss" in r]
    losses_resumed = [r["loss"] for r in read_log(out) if "loss" in r]
    assert losses_full == losses_resumed


def test_two_process_torchrun_and_the_loss_falls(fake_voc, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(ROOT, "train.py"), *TINY, "--data-root", fake_voc, "--iters", "6",
               "--lr", "1e-3", "--warmup-iters", "0", "--output-dir", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = read_log(out)
    assert log[0]["world_size"] == 2 and log[0]["micro_batch"] == 1
    loss = [r["loss"] for r in log if "loss" in r]
    assert len(loss) == 6
    assert sum(loss[-2:]) / 2 < 0.5 * loss[0], f"loss did not fall: {loss}"
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 6 and len(ckpt["rng"]) == 2 and os.path.isfile(out / "iter_3.pt")


# ----------------------------------------------------------------------------------------------
# Bad input: one clear error, a non-zero exit code, nothing written
# ----------------------------------------------------------------------------------------------

def test_missing_clip_weights(fake_voc, tmp_path):
    out = tmp_path / "never"
    command = [sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--data-root", fake_voc,
               "--clip-weights", str(tmp_path / "ViT-B-16.pt"), "--output-dir", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "CLIP weights not found" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not out.exists()


def expect_error(match, *argv):
    with pytest.raises(SystemExit) as error:
        run_main(*argv)
    assert error.value.code != 0 and str(error.value.code).startswith("error:")
    assert match in str(error.value.code), error.value.code


def test_wrong_data_root(tmp_path):
    expect_error("does not exist", *TINY, "--data-root", tmp_path / "nowhere", "--output-dir", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_checkpoint_with_other_prompt_tokens(fake_voc, finished_run, tmp_path):
    expect_error("prompt_tokens 10 (this CLIP: 4)", *TINY, "--data-root", fake_voc, "--prompt-tokens", 4,
                 "--init-from", os.path.join(finished_run, "ckpt.pt"), "--output-dir", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_checkpoint_from_another_backbone(fake_voc, finished_run, tmp_path):
    other = dict(clip.TINY, vision_width=128)
    torch.save(clip.CLIP(**other).state_dict(), tmp_path / "wide.pt")
    expect_error("vision_width 64 (this CLIP: 128)", *TINY, "--data-root", fake_voc,
                 "--clip-weights", tmp_path / "wide.pt", "--init-from", os.path.join(finished_run, "ckpt.pt"),
                 "--output-dir", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_resume_with_other_settings(fake_voc, finished_run):
    before = sorted(os.listdir(finished_run)), os.path.getmtime(os.path.join(finished_run, "ckpt.pt"))
    expect_error("--seed 0 (now 1)", *TINY, "--data-root", fake_voc, "--iters", 3, "--seed", 1,
                 "--resume", os.path.join(finished_run, "ckpt.pt"))
    expect_error("schedule iters 3 (now 5)", *TINY, "--data-root", fake_voc, "--iters", 5,
                 "--resume", os.path.join(finished_run, "ckpt.pt"))
    assert (sorted(os.listdir(finished_run)), os.path.getmtime(os.path.join(finished_run, "ckpt.pt"))) == before
