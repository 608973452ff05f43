"""gpu_check.py: its CPU form runs every stage (the programs for real, at tiny sizes), a failing or
overlong stage is named while the others run, and the pure helpers against brute force.
"""
import json
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

import checkpoint
import data
import evaluate
import gpu_check
from model import OTSeg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_largest_fitting_finds_the_limit_as_a_search_of_every_size_would():
    for limit in (1, 5, 37, 100):
        for guess in (1, limit - 3, limit, limit + 9, 4 * limit):
            calls = []

            def fits(b):
                calls.append(b)
                return b <= limit
            fit, fail = gpu_check.largest_fitting(fits, guess, trials=20)
            brute = max(b for b in range(1, 10 * limit) if b <= limit)
            assert (fit, fail) == (brute, brute + 1), (limit, guess, fit, fail, calls)
            assert len(calls) <= 20


def test_every_card_of_the_table_finds_its_own_row():
    """Longer names come before the names they contain (an 'L40S' is not an 'L4')."""
    for part, tflops in gpu_check.BF16_PEAK_TFLOPS:
        assert gpu_check.bf16_peak_tflops(f"NVIDIA {part} 80GB") == tflops, part
    assert gpu_check.bf16_peak_tflops("Some Other Accelerator") is None


def test_a_failing_and_an_overlong_stage_are_named_and_the_others_run(monkeypatch, tmp_path):
    def broken(run, out):
        raise RuntimeError("broken on purpose")

    def endless(run, out):
        while True:
            pass

    monkeypatch.setitem(gpu_check.STAGES, "tests", (broken, []))
    monkeypatch.setitem(gpu_check.STAGES, "capacity", (endless, []))
    monkeypatch.setitem(gpu_check.QUICK.budgets, "capacity", 1)
    report = tmp_path / "report.json"
    args = gpu_check.get_args_parser().parse_args(
        ["--device", "cpu", "--quick", "--only", "tests", "--only", "capacity", "--only", "sinkhorn",
         "--json", str(report)])
    assert gpu_check.main(args) == 1
    stages = json.loads(report.read_text())["stages"]
    assert stages["tests"]["status"] == "failed" and "broken on purpose" in stages["tests"]["error"]
    assert stages["capacity"]["status"] == "failed" and "budget of 1 s" in stages["capacity"]["error"]
    assert stages["sinkhorn"]["status"] == "ok"


def labelled_pixels(voc_root: str) -> int:
    """Pixels of a class (PNG values 1..20) in the validation labels, read straight from the files."""
    names = open(os.path.join(voc_root, "ImageSets", "Segmentation", "val.txt")).read().split()
    return sum(int(((label >= 1) & (label <= 20)).sum()) for label in
               (np.array(Image.open(os.path.join(voc_root, "SegmentationClass", n + ".png"))) for n in names))


def test_the_cpu_form_runs_every_stage(tmp_path):
    report, work = tmp_path / "report.json", tmp_path / "work"
    command = [sys.executable, "gpu_check.py", "--device", "cpu", "--quick", "--json", str(report),
               "--work-dir", str(work)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    stages = json.loads(report.read_text())["stages"]
    assert list(stages) == list(gpu_check.STAGES)
    skipped = {name for name, r in stages.items() if r["status"] == "skipped"}
    assert skipped == {"tests", "capacity", "distributed"}, stages  # they need CUDA or two GPUs
    assert all(r["status"] == "ok" for name, r in stages.items() if name not in skipped)

    train = stages["train"]["table"]
    assert [row[0] for row in train["rows"]] == ["fp32", "fp32, implicit grad"]
    for row in train["rows"]:
        first, last, finite, falling = row[1:5]
        assert finite and falling and last < first, row
    classes = {row[0]: row[1] for row in stages["classes"]["table"]["rows"]}
    assert classes == {"voc": 15, "context": 49, "coco": 156}

    voc = os.path.join(work, "data", "VOCdevkit", "VOC2012")
    evaluation = json.load(open(os.path.join(work, "eval_one_process.json")))["results"]["OTSeg+"]
    assert sum(map(sum, evaluation["confusion"])) == labelled_pixels(voc)

    table3 = {row[0]: row for row in stages["table3"]["table"]["rows"]}
    assert set(table3) == {"OTSeg (decoder only)", "OTSeg+ (MPSA)", "softmax cross-attention"}
    mfu = stages["mfu"]
    assert mfu["model_tflop_per_step"] > 0 and mfu["mfu"] is None  # no bf16 peak for a CPU


def test_the_distributed_stage_with_gloo_on_the_cpu(tmp_path):
    """The stage's own work (torchrun training, torchrun evaluation compared with one process), from a
    checkpoint and a one-process evaluation made here instead of by the earlier stages."""
    args = gpu_check.get_args_parser().parse_args(["--device", "cpu", "--quick", "--processes", "2",
                                                   "--work-dir", str(tmp_path)])
    run = gpu_check.Run(args)
    gpu_check.stage_data(run, {})
    torch.manual_seed(0)
    preset = data.get_preset("voc", 64)
    clip_model = checkpoint.build_clip(run.weights, 4, 64, torch.device("cpu"))
    model = OTSeg(clip_model, preset["templates"][:3])
    path = str(tmp_path / "ckpt.pt")
    checkpoint.atomic_save(dict(
        format=checkpoint.FORMAT, model=checkpoint.trainable_state_dict(model),
        clip=checkpoint.describe_clip(clip_model, run.weights), templates=model.templates, matching="sinkhorn",
        dataset="voc", setting="inductive", classes=list(preset["classes"]), unseen=list(preset["unseen"]),
        crop_size=64, window=dict(crop=[64, 64], stride=[40, 40]), step=0, args={}, schedule={}), path)
    run.runs["fp32"] = dict(checkpoint=path)
    run.one_process_eval = str(tmp_path / "one.json")
    evaluate.main(evaluate.get_args_parser().parse_args(
        ["--checkpoint", path, "--data-root", run.roots["voc"], "--device", "cpu", "--workers", "0",
         "--output-json", run.one_process_eval]))
    out = {}
    gpu_check.stage_distributed(run, out)
    assert out["processes"] == 2 and out["confusion_max_difference"] == 0, out
