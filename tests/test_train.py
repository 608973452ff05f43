"""train.py: the schedule, the data order, one optimisation step, pseudo-labels, exact resumption,
a two-process torchrun run, and one clear error for each kind of bad input.

Everything runs on the CPU with the small random CLIP ('random-tiny') and generated VOC-layout data.
"""
import copy
import errno
import json
import math
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
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
from conftest import assert_close, expect_error, run_main
from tools.datasets import make_fake_dataset
from model import OTSeg, trainable_parameters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "voc", "--clip-weights", "random-tiny", "--crop-size", "64", "--device", "cpu",
        "--workers", "0", "--batch-size", "2", "--warmup-iters", "1", "--log-every", "1"]


def read_log(run_dir):
    """The records of a run's log.jsonl. Some tests read it while the run is still writing: a last line
    without its newline is a record half written (a reader can see a write in part), left out."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


@pytest.fixture(scope="module")
def fake_voc(tmp_path_factory):
    return make_fake_dataset("voc", str(tmp_path_factory.mktemp("data")), num_train=2, num_val=2)


@pytest.fixture(scope="module")
def finished_run(fake_voc, tmp_path_factory):
    """Three uninterrupted steps: the reference of the resume test and the checkpoint of the others."""
    out = tmp_path_factory.mktemp("run") / "full"
    run_main(train, *TINY, "--data-root", fake_voc, "--iters", 3, "--output-dir", out)
    return str(out)


# ----------------------------------------------------------------------------------------------
# Schedule and data order
# ----------------------------------------------------------------------------------------------

def test_learning_rate_is_torch_polynomial_times_linear_warmup():
    """mmcv's poly (with a floor) times its linear warmup factor, rebuilt from torch's own schedulers:
    PolynomialLR decays lr - min_lr to 0, LinearLR ramps a factor from warmup_ratio to 1."""
    schedule = dict(train.SCHEDULE, iters=2000, warmup_iters=150)
    poly_optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=schedule["lr"] - schedule["min_lr"])
    poly = torch.optim.lr_scheduler.PolynomialLR(poly_optimizer, total_iters=2000, power=schedule["poly_power"])
    warm_optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    warmup = torch.optim.lr_scheduler.LinearLR(warm_optimizer, start_factor=schedule["warmup_ratio"],
                                               end_factor=1.0, total_iters=150)
    worst = 0.0
    for step in range(2101):
        expected = (poly.get_last_lr()[0] + schedule["min_lr"]) * warmup.get_last_lr()[0]
        worst = max(worst, abs(train.learning_rate(step, schedule) - expected) / expected)
        poly_optimizer.step(), poly.step(), warm_optimizer.step(), warmup.step()
    assert worst < 1e-6, f"largest relative difference {worst}"
    # and the two ends by hand: lr * warmup_ratio at step 0, the floor from the last step on
    assert train.learning_rate(0, schedule) == pytest.approx(2e-4 * 1e-6, rel=1e-9)
    assert train.learning_rate(2000, schedule) == train.learning_rate(2100, schedule) == pytest.approx(1e-6)


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
    values = train.train_step(model, optimizer, micro_batches, class_names, 1e-3, params, 1, nullcontext(), schedule)
    grads = [p.grad.clone() for p in params]
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    return grads, values


def test_accumulation_changes_nothing_and_loss_is_normalised_over_the_global_batch(tiny_model):
    model, images, labels, names = tiny_model
    whole, stats = gradients_after_step(model, [(images, labels)], names)
    halves, stats_2 = gradients_after_step(model, [(images[:1], labels[:1]), (images[1:], labels[1:])], names)
    assert_close(torch.cat([g.flatten() for g in halves]), torch.cat([g.flatten() for g in whole]), rtol=1e-5,
                 what="gradients")
    assert set(stats) == set(train.STEP_VALUES)
    for name in stats:
        assert_close(stats_2[name], stats[name], rtol=1e-5, what=name)
    # independent: autograd of the losses module's own normalisation by the global pair count
    params = [p for _, p in trainable_parameters(model)]
    num_masks = losses.count_masks(labels, len(names))
    total = losses.otseg_loss(model(images, names), labels, num_masks)["total"]
    direct = torch.autograd.grad(total, params, allow_unused=True)
    direct = [torch.zeros_like(p) if g is None else g for g, p in zip(direct, params)]
    assert_close(torch.cat([g.flatten() for g in whole]), torch.cat([g.flatten() for g in direct]), rtol=1e-5,
                 what="gradients against loss / num_masks")
    assert stats["num_masks"] == num_masks and stats["loss"].item() == pytest.approx(total.item(), rel=1e-5)


def test_implicit_gradient_step_equals_the_unrolled_one(tiny_model):
    """--implicit-grad: the same step's gradients through the converged plans as through the unrolled
    Sinkhorn iterations (equal at convergence; here within 1e-3 of the largest gradient)."""
    model, images, labels, names = tiny_model
    implicit = OTSeg(model.clip, model.templates, implicit_grad=True).eval()  # the same CLIP and prompts
    implicit.load_state_dict(model.state_dict())
    unrolled_grads, unrolled = gradients_after_step(model, [(images, labels)], names)
    implicit_grads, values = gradients_after_step(implicit, [(images, labels)], names)
    assert values["loss"].item() == unrolled["loss"].item()  # the forward pass is the same
    assert_close(torch.cat([g.flatten() for g in implicit_grads]), torch.cat([g.flatten() for g in unrolled_grads]),
                 rtol=1e-3, what="implicit against unrolled gradients")


@pytest.mark.cuda
def test_bf16_autocast_step_on_cuda_is_close_to_fp32(tiny_model):
    model, images, labels, names = tiny_model
    model = copy.deepcopy(model).cuda()
    params = [p for _, p in trainable_parameters(model)]
    batch = [(images.cuda(), labels.cuda())]
    losses_by_precision = []
    for amp in (False, True):
        optimizer = torch.optim.AdamW(params, lr=0.0)  # lr 0: both steps see the same weights
        values = train.train_step(model, optimizer, batch, names, 0.0, params, 1,
                                  common.autocast(torch.device("cuda"), amp), dict(train.SCHEDULE))
        assert values["loss"].dtype == torch.float32  # the losses stay in fp32 under autocast
        losses_by_precision.append(values["loss"].item())
    assert all(math.isfinite(x) for x in losses_by_precision)
    assert losses_by_precision[1] == pytest.approx(losses_by_precision[0], rel=0.05), losses_by_precision


def test_pseudo_labels_are_the_unseen_argmax_of_the_ensemble():
    K = 4  # classes 2 and 3 unseen
    seen = torch.tensor([True, True, False, False])
    decoder = torch.tensor([5.0, 0.0, 1.0, 2.0]).view(1, K, 1, 1).expand(1, K, 2, 2).clone()
    score = torch.tensor([5.0, 0.0, 3.0, -2.0]).view(1, K, 1, 1).expand(1, K, 2, 2).clone()
    # 0.5 D + 0.5 S = [5, 0, 2, 0]: seen class 0 wins overall, unseen class 2 among the unseen
    labels = torch.tensor([[[0, 2], [3, 255]]])
    got = train.pseudo_label(dict(decoder=decoder, score=score), labels, seen)
    assert got.tolist() == [[[0, 2], [2, 255]]]  # seen and 255 pixels kept, unseen pixels -> 2


# ----------------------------------------------------------------------------------------------
# Whole runs
# ----------------------------------------------------------------------------------------------

def test_interrupted_and_resumed_run_equals_uninterrupted(fake_voc, finished_run, tmp_path):
    out = tmp_path / "split"
    run_main(train, *TINY, "--data-root", fake_voc, "--iters", 3, "--output-dir", out, "--stop-after", 1)
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 1
    run_main(train, *TINY, "--data-root", fake_voc, "--iters", 3, "--resume", out / "ckpt.pt")
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


TORCHRUN_ITERS = 60  # long enough (about 4 s of steps) for a test to signal or kill it in the middle


def torchrun(out, fake_voc, *extra):
    """train.py under torchrun, two processes on gloo, in a session of its own (a hang kills all)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *extra,
               os.path.join(ROOT, "train.py"), *TINY, "--data-root", fake_voc, "--iters", str(TORCHRUN_ITERS),
               "--lr", "1e-3", "--warmup-iters", "0", "--save-every", "5", "--output-dir", str(out),
               "--resume", "auto"]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(process, timeout=300) -> str:
    try:
        return process.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"torchrun did not finish in {timeout} s: {process.communicate()[1][-3000:]}")


def wait_for_step(out, step: int, process) -> None:
    """Until log.jsonl shows `step` (then the run is still going: the test fails if it has ended)."""
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if os.path.exists(out / "log.jsonl") and any(r.get("step", 0) >= step and "loss" in r for r in read_log(out)):
            return
        time.sleep(0.02)
    pytest.fail(f"the run ended or stalled before step {step}: {finish(process)[-2000:]}")


@pytest.fixture(scope="module")
def torchrun_run(fake_voc, tmp_path_factory):
    """An uninterrupted two-process run: the reference of the fault tests below."""
    out = tmp_path_factory.mktemp("ddp") / "ddp"
    process = torchrun(out, fake_voc)
    stderr = finish(process)
    assert process.returncode == 0, stderr[-3000:]
    return out


def test_two_process_torchrun_and_the_loss_falls(torchrun_run):
    log = read_log(torchrun_run)
    assert log[0]["world_size"] == 2 and log[0]["micro_batch"] == 1
    loss = [r["loss"] for r in log if "loss" in r]
    assert len(loss) == TORCHRUN_ITERS
    assert sum(loss[-2:]) / 2 < 0.5 * loss[0], f"loss did not fall: {loss}"
    ckpt = torch.load(torchrun_run / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == TORCHRUN_ITERS and len(ckpt["rng"]) == 2
    assert os.path.isfile(torchrun_run / f"iter_{TORCHRUN_ITERS // 2}.pt")


def scripted_evaluation(scores):
    """A stand-in for evaluate.evaluate returning the next of `scores` as hIoU (other metrics 0)."""
    def evaluate_stub(*args, **kwargs):
        score = scores.pop(0)
        metrics = dict(miou_seen=0.0, miou_unseen=0.0, hiou=score, miou=0.0)
        return {"OTSeg": dict(metrics), "OTSeg+": dict(metrics)}
    return evaluate_stub


def test_best_checkpoint_is_kept_by_hiou_across_a_resume(fake_voc, tmp_path, monkeypatch):
    """hIoU 0.2, 0.6 | resume | 0.5, 0.7, 0.1: best.pt is step 2 before the resume, step 4 after; the
    resumed run keeps the 0.6 to beat (0.5 at step 3 does not replace it)."""
    monkeypatch.setattr(evaluate, "evaluate", scripted_evaluation([0.2, 0.6, 0.5, 0.7, 0.1]))
    out = tmp_path / "best"
    run_main(train, *TINY, "--data-root", fake_voc, "--iters", 5, "--eval-every", 1, "--output-dir", out,
             "--stop-after", 2)
    best = torch.load(out / "best.pt", weights_only=True)
    assert (best["step"], best["best"]) == (2, 0.6)
    run_main(train, *TINY, "--data-root", fake_voc, "--iters", 5, "--eval-every", 1, "--resume", out / "ckpt.pt",
             "--stop-after", 1)
    assert torch.load(out / "best.pt", weights_only=True)["step"] == 2  # 0.5 < 0.6
    run_main(train, *TINY, "--data-root", fake_voc, "--iters", 5, "--eval-every", 1, "--resume", out / "ckpt.pt")
    best = torch.load(out / "best.pt", weights_only=True)
    assert (best["step"], best["best"], best["metrics"]["OTSeg+"]["hiou"]) == (4, 0.7, 0.7)
    assert [r["OTSeg+"]["hiou"] for r in read_log(out) if r.get("event") == "eval"] == [0.2, 0.6, 0.5, 0.7, 0.1]
    assert torch.load(out / "ckpt.pt", weights_only=True)["best"] == 0.7


def test_eval_every_scores_the_weights_it_saves(fake_voc, tmp_path):
    """The evaluation logged at step 2 is the one evaluate.py computes from best.pt."""
    out = tmp_path / "eval"
    run_main(train, *TINY, "--data-root", fake_voc, "--iters", 2, "--eval-every", 2, "--output-dir", out)
    logged = [r for r in read_log(out) if r.get("event") == "eval"]
    assert [r["step"] for r in logged] == [2]
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["step"] == 2 and best["metrics"]["OTSeg+"]["hiou"] == logged[0]["OTSeg+"]["hiou"]
    preset = data.get_preset("voc", 64)
    model = checkpoint.build_model_from_checkpoint(best, None, torch.device("cpu"))
    val_set = data.SegmentationDataset(preset, fake_voc, "val", "inductive", transform=data.test_transform(preset))
    seen = data.seen_mask(len(best["classes"]), best["unseen"])
    again = evaluate.evaluate(model, val_set, best["classes"], seen, True, data.window_of(preset),
                              torch.device("cpu"), workers=0, progress=False)
    for name in ("OTSeg", "OTSeg+"):
        for key in ("miou_seen", "miou_unseen", "hiou"):
            assert again[name][key] == pytest.approx(logged[0][name][key], abs=1e-9, nan_ok=True), (name, key)


def test_transductive_run_starts_from_the_half_way_checkpoint_and_uses_pseudo_labels(
        fake_voc, finished_run, tmp_path, monkeypatch):
    half = torch.load(os.path.join(finished_run, "iter_1.pt"), weights_only=True)  # 3 steps: half-way is 1
    loaded, labelled = [], []
    load_trainable, pseudo_label = checkpoint.load_trainable, train.pseudo_label

    def load_spy(model, state_dict, what):
        loaded.append((what, state_dict))
        load_trainable(model, state_dict, what)

    def label_spy(outputs, labels, seen):
        labelled.append((labels, pseudo_label(outputs, labels, seen), seen))
        return labelled[-1][1]

    monkeypatch.setattr(checkpoint, "load_trainable", load_spy)
    monkeypatch.setattr(train, "pseudo_label", label_spy)
    out = tmp_path / "transductive"
    run_main(train, *TINY, "--data-root", fake_voc, "--setting", "transductive", "--iters", 2,
             "--init-from", os.path.join(finished_run, "iter_1.pt"), "--output-dir", out)
    assert [what for what, _ in loaded] == ["the --init-from checkpoint"]
    assert all(torch.equal(loaded[0][1][k], v) for k, v in half["model"].items())
    assert len(labelled) == 2  # every step, each micro-step
    preset = data.get_preset("voc")
    unseen_pixels = 0
    for before, after, seen in labelled:
        unseen = torch.cat([~seen, torch.zeros(256 - len(seen), dtype=torch.bool)])  # (256,) over label values
        was_unseen = unseen[before]
        assert torch.equal(after[~was_unseen], before[~was_unseen])  # seen and ignored pixels kept
        assert unseen[after[was_unseen]].all()  # unseen pixels get an unseen class
        unseen_pixels += int(was_unseen.sum())
    assert unseen_pixels > 0, "the fake data has no unseen pixel: the test checks nothing"
    assert unseen.nonzero().flatten().tolist() == sorted(preset["unseen"])
    final = torch.load(out / "ckpt.pt", weights_only=True)
    assert final["setting"] == "transductive" and final["step"] == 2
    assert all(s["step"] == 2 for s in final["optimizer"]["state"].values())  # a fresh optimizer
    log = [r for r in read_log(out) if "loss" in r]
    assert log[0]["lr"] == pytest.approx(2e-4 * 1e-6)  # and a fresh warmup


def test_num_prompts_uses_the_first_templates(fake_voc, tmp_path):
    out = tmp_path / "two"
    run_main(train, *TINY, "--data-root", fake_voc, "--iters", 1, "--num-prompts", 2, "--output-dir", out)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["templates"] == list(data.get_preset("voc")["templates"][:2])
    model = checkpoint.build_model_from_checkpoint(ckpt, None, torch.device("cpu"))
    assert model.text_embeddings(["cat", "dog"]).shape[:2] == (2, 2)  # (K, N, C)
    for wrong in (0, len(data.get_preset("voc")["templates"]) + 1):
        expect_error(train, "--num-prompts must be 1..", *TINY, "--data-root", fake_voc, "--num-prompts", wrong,
                     "--output-dir", tmp_path / "never", unchanged=tmp_path)


def test_implicit_grad_run_trains_like_the_unrolled_one(fake_voc, tmp_path):
    """Same first loss (same forward), nearly the same second loss (gradients equal at convergence)."""
    runs = {}
    for flag in ([], ["--implicit-grad"]):
        out = tmp_path / ("implicit" if flag else "unrolled")
        run_main(train, *TINY, "--data-root", fake_voc, "--iters", 2, "--warmup-iters", 0, "--output-dir", out, *flag)
        runs[bool(flag)] = [r["loss"] for r in read_log(out) if "loss" in r]
        assert torch.load(out / "ckpt.pt", weights_only=True)["args"]["implicit_grad"] == bool(flag)
    assert runs[True][0] == runs[False][0]
    assert runs[True][1] == pytest.approx(runs[False][1], rel=1e-3), runs


# ----------------------------------------------------------------------------------------------
# Bad input: one line `error: ...` naming the flag or file, a non-zero exit code, nothing written
# ----------------------------------------------------------------------------------------------

def test_missing_clip_weights(fake_voc, tmp_path):
    out = tmp_path / "never"
    command = [sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--data-root", fake_voc,
               "--clip-weights", str(tmp_path / "ViT-B-16.pt"), "--output-dir", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --clip-weights"), result.stderr
    assert "ViT-B-16.pt" in lines[0] and not out.exists()


@pytest.mark.parametrize("kind", ["random bytes", "not a CLIP state dict"])
def test_clip_weights_that_are_not_clip(kind, fake_voc, tmp_path):
    path = tmp_path / "weights.pt"
    if kind == "random bytes":
        path.write_bytes(os.urandom(4096))
    else:
        torch.save({"layer.weight": torch.zeros(3, 3)}, path)
    expect_error(train, str(path), *TINY, "--data-root", fake_voc, "--clip-weights", path,
                 "--output-dir", tmp_path / "out", unchanged=tmp_path)


def test_wrong_data_root(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "build_clip", None)  # the data is checked before any CLIP is loaded
    expect_error(train, "does not exist", *TINY, "--data-root", tmp_path / "nowhere", "--output-dir", tmp_path / "out",
                 unchanged=tmp_path)


def test_output_dir_that_is_a_file(fake_voc, tmp_path):
    (tmp_path / "taken").write_text("a file")
    expect_error(train, "--output-dir", *TINY, "--data-root", fake_voc, "--output-dir", tmp_path / "taken",
                 unchanged=tmp_path)


def test_duplicated_class_names(fake_voc, tmp_path, monkeypatch):
    voc = data.DATASETS["voc"]
    monkeypatch.setitem(data.DATASETS, "voc", dict(voc, classes=list(voc["classes"][:-1]) + [voc["classes"][0]]))
    expect_error(train, voc["classes"][0], *TINY, "--data-root", fake_voc, "--output-dir", tmp_path / "out",
                 unchanged=tmp_path)


def test_unknown_dataset_or_unreadable_preset_file(fake_voc, tmp_path):
    for dataset, message in (("pascal", "unknown dataset 'pascal'"),
                             (tmp_path / "mine.json", f"cannot read the dataset preset {tmp_path / 'mine.json'}")):
        expect_error(train, ("--dataset", message), *TINY, "--dataset", dataset, "--data-root", fake_voc,
                     "--output-dir", tmp_path / "out", unchanged=tmp_path)


def damage(root: str, kind: str) -> None:
    """Damage every training sample of a fake VOC: a label value out of range, a truncated JPEG, or a
    label of another size than its image."""
    from PIL import Image
    for name in sorted(os.listdir(os.path.join(root, "JPEGImages"))):
        if not name.startswith("train"):
            continue
        image = os.path.join(root, "JPEGImages", name)
        labels = [os.path.join(root, folder, name.replace(".jpg", ".png"))
                  for folder in ("SegmentationClass", "SegmentationClassAug")]
        if kind == "truncated JPEG":
            with open(image, "rb") as f:
                head = f.read()[:400]
            with open(image, "wb") as f:
                f.write(head)
        for label in labels:
            if not os.path.exists(label):
                continue
            if kind == "label out of range":
                Image.new("L", Image.open(label).size, 200).save(label)
            elif kind == "label of another size":
                Image.open(label).resize((50, 30), Image.NEAREST).save(label)


@pytest.mark.parametrize("kind", ["label out of range", "truncated JPEG", "label of another size"])
def test_damaged_data_met_by_a_worker(kind, tmp_path, monkeypatch):
    """The DatasetError of a data-loading worker becomes one line; the failed start leaves no folder."""
    root = make_fake_dataset("voc", str(tmp_path / "data"), num_train=2, num_val=1)
    damage(root, kind)
    out = tmp_path / "out"
    message = expect_error(train, "train_", *TINY, "--data-root", root, "--iters", 2, "--workers", 1,
                           "--output-dir", out, unchanged=tmp_path)
    assert "Traceback" not in message and "worker" not in message, message
    # The worker ignores SIGTERM; left alive (the run's exception still holds its loader), it would make
    # this very test process wait for it for ever at exit: train() ends it on its way out.
    assert not multiprocessing.active_children(), multiprocessing.active_children()


def test_checkpoint_with_other_prompt_tokens(fake_voc, finished_run, tmp_path):
    expect_error(train, "prompt_tokens 10 (this CLIP: 4)", *TINY, "--data-root", fake_voc, "--prompt-tokens", 4,
                 "--init-from", os.path.join(finished_run, "ckpt.pt"), "--output-dir", tmp_path / "out",
                 unchanged=tmp_path)


def test_init_from_another_backbone(fake_voc, finished_run, tmp_path):
    other = dict(clip.TINY, vision_width=128)
    torch.save(clip.CLIP(**other).state_dict(), tmp_path / "wide.pt")
    expect_error(train, "vision_width 64 (this CLIP: 128)", *TINY, "--data-root", fake_voc,
                 "--clip-weights", tmp_path / "wide.pt", "--init-from", os.path.join(finished_run, "ckpt.pt"),
                 "--output-dir", tmp_path / "out", unchanged=tmp_path)


def test_resume_with_other_settings(fake_voc, finished_run, tmp_path):
    expect_error(train, "--seed 0 (now 1)", *TINY, "--data-root", fake_voc, "--iters", 3, "--seed", 1,
                 "--resume", os.path.join(finished_run, "ckpt.pt"), unchanged=finished_run)
    expect_error(train, "schedule iters 3 (now 5)", *TINY, "--data-root", fake_voc, "--iters", 5,
                 "--resume", os.path.join(finished_run, "ckpt.pt"), unchanged=finished_run)
    expect_error(train, "--dataset voc (now context)", *TINY, "--dataset", "context", "--data-root", tmp_path,
                 "--iters", 3, "--resume", os.path.join(finished_run, "ckpt.pt"), unchanged=finished_run)


def test_resume_or_init_from_a_file_that_is_no_run_of_this_project(fake_voc, finished_run, tmp_path):
    converted = dict(torch.load(os.path.join(finished_run, "ckpt.pt"), weights_only=True), args=None, schedule=None)
    torch.save(converted, tmp_path / "converted.pt")  # as evaluate.py --convert writes a release checkpoint
    expect_error(train, "give it to --init-from instead", *TINY, "--data-root", fake_voc, "--iters", 3,
                 "--resume", tmp_path / "converted.pt", "--output-dir", tmp_path / "out", unchanged=tmp_path)
    torch.save(dict(state_dict={"decode_head.q_proj.weight": torch.zeros(2, 2)}, meta={}), tmp_path / "release.pth")
    expect_error(train, "--convert", *TINY, "--data-root", fake_voc, "--init-from", tmp_path / "release.pth",
                 "--output-dir", tmp_path / "out", unchanged=tmp_path)


# ----------------------------------------------------------------------------------------------
# Faults a long run meets: divergence, a stop signal, a restarted worker, a failed write
# ----------------------------------------------------------------------------------------------

def all_finite(path) -> bool:
    ckpt = torch.load(path, weights_only=True)
    tensors = list(ckpt["model"].values()) + [v for s in ckpt["optimizer"]["state"].values()
                                              for v in s.values() if torch.is_tensor(v)]
    return all(bool(t.float().isfinite().all()) for t in tensors)


def test_a_diverging_run_stops_with_one_line_and_saves_no_non_finite_weight(fake_voc, tmp_path):
    out = tmp_path / "diverged"
    message = expect_error(train, "at step", *TINY, "--data-root", fake_voc, "--iters", 12, "--lr", 1e9,
                           "--warmup-iters", 0, "--save-every", 1, "--output-dir", out)
    assert re.search(r"(loss is (nan|inf|-inf) at step \d+|weights are no longer finite).*--lr", message), message
    saved = sorted(os.listdir(out))
    assert "ckpt.pt" not in saved or all_finite(out / "ckpt.pt"), saved
    stopped = [r["step"] for r in read_log(out) if "loss" in r]
    assert stopped and max(stopped) < 12, f"the run went on to the end: {stopped}"


def test_a_full_disk_is_one_line_and_the_previous_checkpoint_stays(fake_voc, tmp_path, monkeypatch):
    out = tmp_path / "full"
    run_main(train, *TINY, "--data-root", fake_voc, "--iters", 6, "--output-dir", out, "--stop-after", 1)
    before = (out / "ckpt.pt").read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)          # a part of the file is written, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", full_disk)
    message = expect_error(train, "No space left on device", *TINY, "--data-root", fake_voc, "--iters", 6,
                           "--resume", "auto", "--output-dir", out)
    assert str(out) in message and "kept" in message, message
    assert (out / "ckpt.pt").read_bytes() == before
    assert sorted(os.listdir(out)) == ["ckpt.pt", "log.jsonl"]   # no temporary file left behind


def test_sigterm_finishes_the_step_saves_and_resumes_exactly(fake_voc, finished_run, tmp_path, monkeypatch):
    out, calls, real_step = tmp_path / "preempted", [], train.train_step

    def step_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:      # the scheduler's SIGTERM arrives in the middle of step 2
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)
    monkeypatch.setattr(train, "train_step", step_then_signal)
    with pytest.raises(SystemExit) as stopped:
        run_main(train, *TINY, "--data-root", fake_voc, "--iters", 3, "--output-dir", out)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL    # the handler is put back
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(train, "train_step", real_step)
    run_main(train, *TINY, "--data-root", fake_voc, "--iters", 3, "--output-dir", out, "--resume", "auto")
    full = torch.load(os.path.join(finished_run, "ckpt.pt"), weights_only=True)
    resumed = torch.load(out / "ckpt.pt", weights_only=True)
    assert resumed["step"] == 3
    for name, weight in full["model"].items():
        assert torch.equal(weight, resumed["model"][name]), name


def test_resume_auto_starts_fresh_in_an_empty_folder_and_refuses_another_runs_checkpoint(
        fake_voc, finished_run, tmp_path):
    out = tmp_path / "auto"
    run_main(train, *TINY, "--data-root", fake_voc, "--iters", 3, "--output-dir", out, "--resume", "auto")
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 3
    full = torch.load(os.path.join(finished_run, "ckpt.pt"), weights_only=True)
    assert all(torch.equal(w, torch.load(out / "ckpt.pt", weights_only=True)["model"][k])
               for k, w in full["model"].items())
    expect_error(train, "other settings", *TINY, "--data-root", fake_voc, "--iters", 5, "--output-dir", out,
                 "--resume", "auto", unchanged=out)


def test_sigterm_to_the_whole_job_with_data_workers_saves_and_leaves_no_process(fake_voc, tmp_path):
    """A scheduler signals every process of a job, data-loading workers included: the workers ignore it,
    the training process finishes its step, saves, exits with 143 and takes its workers with it."""
    out = tmp_path / "preempted"
    command = [sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--workers", "1", "--data-root", fake_voc,
               "--iters", "1000", "--save-every", "1000", "--output-dir", str(out)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)   # a process group of its own: the job
    wait_for_step(out, 3, process)
    os.killpg(process.pid, signal.SIGTERM)
    stderr = finish(process, timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    saved = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert saved == max(r["step"] for r in read_log(out) if "loss" in r) >= 3
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.killpg(process.pid, 0)       # is any process of the job still there?
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    pytest.fail("a process of the job outlived the training process")


def same_weights(a, b) -> None:
    a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert a["step"] == b["step"]
    for name, weight in a["model"].items():
        assert torch.equal(weight, b["model"][name]), \
            f"{name}: largest difference {(weight - b['model'][name]).abs().max()}"
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(x["exp_avg_sq"], y["exp_avg_sq"])


def test_sigterm_to_torchrun_reaches_the_workers_and_the_run_resumes_exactly(fake_voc, torchrun_run, tmp_path):
    out = tmp_path / "preempted"
    process = torchrun(out, fake_voc)
    wait_for_step(out, 10, process)
    os.kill(process.pid, signal.SIGTERM)              # what a scheduler sends the job's launcher
    stderr = finish(process)
    assert process.returncode != 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert 10 <= ckpt["step"] < TORCHRUN_ITERS and len(ckpt["rng"]) == 2, (ckpt["step"], stderr[-2000:])
    stopped = [r["step"] for r in read_log(out) if "loss" in r]
    assert max(stopped) == ckpt["step"]               # the step in progress was finished and saved
    process = torchrun(out, fake_voc)                 # the requeued job: the same command
    stderr = finish(process)
    assert process.returncode == 0, stderr[-3000:]
    same_weights(torchrun_run / "ckpt.pt", out / "ckpt.pt")


def worker_of_rank(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker process of this rank (read from /proc, Linux)."""
    children = open(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read().split()
    for pid in children:
        environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} among {children}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers in /proc")
def test_a_worker_killed_mid_run_is_restarted_and_ends_with_the_uninterrupted_weights(
        fake_voc, torchrun_run, tmp_path):
    out = tmp_path / "restarted"
    process = torchrun(out, fake_voc, "--max-restarts", "1")
    wait_for_step(out, 10, process)
    os.kill(worker_of_rank(process.pid, 1), signal.SIGKILL)
    stderr = finish(process)
    assert process.returncode == 0, stderr[-3000:]
    starts = [r["step"] for r in read_log(out) if r.get("event") == "start"]
    # the restarted workers continued from ckpt.pt: step 10's (or step 5's, when the kill came between
    # step 10's log line and its save)
    assert len(starts) == 2 and starts[1] >= 5, starts
    same_weights(torchrun_run / "ckpt.pt", out / "ckpt.pt")
