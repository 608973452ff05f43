"""tools/gpu_check.py (python -m tools.gpu_check): its CPU form runs every stage (the programs for real, at tiny sizes), a failing or
overlong stage is named while the others run, and the pure helpers against brute force.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import clip
import data
import evaluate
from tools import benchmark, gpu_check
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


def test_every_card_of_the_table_finds_its_own_row_and_names_its_source():
    for part, tflops, source in gpu_check.BF16_PEAK_TFLOPS:
        assert gpu_check.bf16_peak_tflops(f"NVIDIA {part}") == tflops, part
        assert "data sheet" in source or "white paper" in source, part
    assert gpu_check.bf16_peak_tflops("Some Other Accelerator") is None


def test_a_card_whose_name_contains_another_cards_gets_its_own_peak():
    """Names as torch.cuda.get_device_name gives them; dense bf16 TFLOP/s from the vendors' data sheets."""
    expected = {"NVIDIA L40": 181.0, "NVIDIA L40S": 362.0, "NVIDIA L4": 121.0,
                "NVIDIA H200 NVL": 835.0, "NVIDIA H200": 989.0, "NVIDIA H100 PCIe": 756.0,
                "NVIDIA H100 80GB HBM3": 989.0, "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100 80GB PCIe": 312.0,
                "NVIDIA GeForce RTX 3090 Ti": 80.0, "NVIDIA GeForce RTX 3090": 71.0, "NVIDIA B200": 2250.0,
                "NVIDIA RTX A1000": None}  # an A1000 is no A100: not in the table
    assert {name: gpu_check.bf16_peak_tflops(name) for name in expected} == expected


def test_the_budgets_add_up_to_at_most_the_whole_runs():
    for sizes in (gpu_check.FULL, gpu_check.QUICK):
        assert set(sizes.budgets) == set(gpu_check.STAGES)
        assert sum(sizes.budgets.values()) <= sizes.total, sizes.budgets


def test_the_capacity_guess_is_capped():
    GiB = 2**30
    assert gpu_check.capacity_guess(100 * GiB, 2 * GiB, GiB // 2) == 177  # (0.9 * 100 - 1.5) / 0.5
    for per_image in (0, 1, -GiB):  # two nearly equal peaks (or a noisy second one)
        assert 1 <= gpu_check.capacity_guess(139 * GiB, 2 * GiB, per_image) <= gpu_check.MAX_MICRO_BATCH
    assert gpu_check.capacity_guess(GiB, 2 * GiB, GiB) == 1


def test_a_failed_allocation_is_a_batch_that_does_not_fit_and_other_errors_are_bugs():
    def step_raising(error):
        def make_step(batch):
            def step():
                raise error
            return step
        return make_step
    assert gpu_check.step_fits(lambda batch: (lambda: None), 8)
    for error in (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                  RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
                  RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)")):
        assert not gpu_check.step_fits(step_raising(error), 8), error
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        gpu_check.step_fits(step_raising(RuntimeError("mat1 and mat2 shapes cannot be multiplied")), 8)


def test_the_training_step_draws_its_inputs_on_the_device(monkeypatch):
    model = benchmark.build_otseg("sinkhorn", 32, 2, data.TEMPLATES["N6"][:2], "cpu", sizes=clip.TINY)
    devices = []
    for name in ("randn", "randint"):
        original = getattr(torch, name)

        def drawing(*args, original=original, **kwargs):
            devices.append(kwargs.get("device"))
            return original(*args, **kwargs)
        monkeypatch.setattr(torch, name, drawing)
    benchmark.training_step(model, ["cat", "dog"], 2, 32, torch.device("cpu"))
    assert devices == [torch.device("cpu")] * 2  # drawn there, not drawn elsewhere and copied


def test_the_programs_and_their_peak_memory_run_on_the_gpu_given(monkeypatch, tmp_path, capsys):
    """--device cuda:1: train.py and evaluate.py are given cuda:1, and the peak printed after a program
    is cuda:1's. No GPU needed: the CUDA calls are recorded."""
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    run = gpu_check.Run(gpu_check.get_args_parser().parse_args(["--device", "cuda:1", "--work-dir", str(tmp_path)]))
    run.roots, run.weights = {"voc": "data"}, "clip.pt"
    for command in (run.train_command("voc", "out", 2, 1, True, False), run.evaluate_command("ckpt.pt", "e.json")):
        assert command[command.index("--device") + 1] == "cuda:1", command
    asked = []
    monkeypatch.setattr("runpy.run_path", lambda path, run_name: None)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: asked.append(device) or 123)
    monkeypatch.setattr(sys, "argv", ["-c", "train.py"])
    exec(gpu_check.peak_memory_code(run.device), {})
    assert asked == ["cuda:1"] and gpu_check.peak_bytes(capsys.readouterr().out) == 123


def test_the_compile_stage_says_when_there_is_no_c_compiler(monkeypatch, tmp_path):
    run = gpu_check.Run(gpu_check.get_args_parser().parse_args(["--device", "cpu", "--work-dir", str(tmp_path)]))
    run.cuda = True  # the check comes before anything touches the device
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    out = {}
    with pytest.raises(gpu_check.Check, match="no C compiler"):
        gpu_check.stage_compile(run, out)
    assert out["c_compiler"] is None
    names = list(gpu_check.STAGES)
    assert names.index("sinkhorn") < names.index("compile") < names.index("mfu")


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
    command = [sys.executable, "-m", "tools.gpu_check", "--device", "cpu", "--quick", "--json", str(report),
               "--work-dir", str(work)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    stages = json.loads(report.read_text())["stages"]
    assert list(stages) == list(gpu_check.STAGES)
    skipped = {name for name, r in stages.items() if r["status"] == "skipped"}
    assert skipped == {"tests", "capacity", "compile", "distributed"}, stages  # they need CUDA or two GPUs
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
    assert [row[:2] for row in mfu["table"]["rows"]] == [["train.py fp32, eager (launch-bound)", 4],
                                                         ["eager, in this process", 4]]


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
    checkpoint.save(checkpoint.make_checkpoint(
        checkpoint.trainable_state_dict(model), checkpoint.describe_clip(clip_model, run.weights), model.templates,
        "sinkhorn", "voc", "inductive", preset["classes"], preset["unseen"], 64, dict(crop=[64, 64], stride=[40, 40]),
        step=0, args={}, schedule={}), path)
    run.runs["fp32"] = dict(checkpoint=path)
    run.one_process_eval = str(tmp_path / "one.json")
    evaluate.main(evaluate.get_args_parser().parse_args(
        ["--checkpoint", path, "--data-root", run.roots["voc"], "--device", "cpu", "--workers", "0",
         "--output-json", run.one_process_eval]))
    out = {}
    gpu_check.stage_distributed(run, out)
    assert out["processes"] == 2 and out["confusion_max_difference"] == 0, out


def test_the_inference_modes_table_gives_each_model_its_time_over_the_softmax_matchings():
    """Eager on the CPU (the compiled modes are CUDA's): one row per model and mode it runs in, the
    softmax matching the baseline of its mode, and the rows appended to the stage's tables at once."""
    otseg = benchmark.build_otseg("sinkhorn", 32, 2, data.TEMPLATES["N6"][:2], "cpu", sizes=clip.TINY)
    models = {"softmax matching": (OTSeg(otseg.clip, otseg.templates, matching="softmax"), ["eager"]),
              "OTSeg+": (otseg, ["eager"]), "OTSeg+, sync-free": (otseg, ["torch.compile"])}
    tables = []
    table = gpu_check.inference_modes(models, torch.randn(1, 3, 32, 32), ["cat", "dog"], ["eager"], 2, tables)
    assert tables == [table]
    assert [(r[0], r[1]) for r in table.rows] == [("softmax matching", "eager"), ("OTSeg+", "eager")]
    softmax, ours = table.rows
    assert softmax[3] == 1.0 and ours[3] == pytest.approx(softmax[2] / ours[2]), table.rows
