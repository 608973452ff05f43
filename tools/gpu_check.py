"""tools/gpu_check.py -- one command that proves every CUDA path of the project and measures it, in minutes.

GPU time is short and the CUDA paths (NCCL, bf16 autocast, pinned-memory copies, memory at 4 images
of 512x512) cannot be exercised on a CPU. This script is prepared beforehand so that one run on a
machine with CUDA GPUs, without any download, proves the real programs and measures them:

    tests        the CUDA-marked tests (`pytest -m cuda`)
    data         a generated dataset in the real layouts (VOC, Context, COCO-Stuff) at VOC's real
                 image size (500x375 JPEGs) and a random CLIP of ViT-B/16's sizes, saved as a weights file
    train        `train.py` at ViT-B/16 size, 512x512, micro-batch 4: 30 steps in fp32 and 30 in bf16
                 (`--amp`), each with and without `--implicit-grad`; loss finite and falling, time per
                 step (from its log), peak CUDA memory
    classes      the same at the training class counts of Context-59 (49) and COCO-Stuff (156)
    capacity     the largest micro-batch that fits, per class count (bf16, one step in this process)
    evaluate     `evaluate.py` with sliding windows on the generated validation images; every labelled
                 pixel counted once
    table3       the paper's Table 3 (tools/benchmark.py): parameters, GFLOPs, images/s at batch 1 for OTSeg,
                 OTSeg+ and the softmax baseline; at batch 32 in bf16 OTSeg+ against the bare image tower
    sinkhorn     tools/benchmark.py's Sinkhorn table on the device: ours against POT's solvers
    compile      torch.compile's first (cold) compile and the compiled Sinkhorn block against eager, then
                 OTSeg+ and the softmax matching at batch 1 eager, compiled and as CUDA graphs (the
                 sync-free Sinkhorn); it says first when the C compiler or Python headers that Triton
                 needs are missing
    mfu          training model FLOPs per step / (time per step x the card's bf16 peak): train.py's
                 eager step at micro-batch 4 (bound by kernel launches), and at the largest micro-batch
                 of the capacity stage, eager and compiled
    distributed  with two or more GPUs: `torchrun --standalone` over NCCL, training steps, and an
                 evaluation whose confusion matrices equal the one-process run's

The programs are run as a user runs them (`python train.py ...`, `torchrun ... evaluate.py ...`),
so what passes here is the real thing. Every stage has a time budget; a stage that fails or runs past
it is named, and the others still run; the budgets add up to the whole run's (FULL.total), so the
last stage is not starved. One table is printed at the end and one JSON file written.

    python -m tools.gpu_check                              # on a machine with CUDA GPUs (at most 8 minutes)
    python -m tools.gpu_check --device cuda:1              # one GPU of several (the distributed stage uses all)
    python -m tools.gpu_check --peak-tflops 312            # a card missing from BF16_PEAK_TFLOPS
    python -m tools.gpu_check --device cpu --quick         # every stage at tiny sizes (what the tests run)
    python -m tools.gpu_check --only train --only mfu      # some stages (the ones they need run too)

Goals the figures are read against (docs/benchmarks.md): training at >= 35% of the card's bf16 peak
in model FLOPs; OTSeg+ at >= 0.8x the bare backbone's throughput at batch 32; OTSeg+ / softmax
<= 1.05x at batch 1; our Sinkhorn >= 20x POT's one-problem-at-a-time loop.
"""
import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass

import torch

from tools import benchmark
import clip
import data
import common
from common import atomic_save
from tools import datasets
import evaluate
from model import OTSeg
from tools.benchmark import Table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the project root, above tools/

# Dense bf16 tensor-core peak in TFLOP/s, per GPU, and where the figure comes from. Data sheets that
# give only the figure with 2:4 sparsity are halved; GeForce cards count bf16 with fp32 accumulation.
BF16_PEAK_TFLOPS = [
    ("B200", 2250.0, "NVIDIA HGX B200 data sheet: 4.5 PFLOPS per GPU with sparsity"),
    ("H200", 989.0, "NVIDIA H200 data sheet, H200 SXM: 1,979 with sparsity"),
    ("H200 NVL", 835.0, "NVIDIA H200 data sheet, H200 NVL: 1,671 with sparsity"),
    ("H100", 989.0, "NVIDIA H100 data sheet, H100 SXM: 1,979 with sparsity"),
    ("H100 PCIe", 756.0, "NVIDIA H100 data sheet, H100 PCIe: 1,513 with sparsity"),
    ("H100 NVL", 835.0, "NVIDIA H100 data sheet, H100 NVL: 1,671 with sparsity"),
    ("A100", 312.0, "NVIDIA A100 data sheet: 312 dense, 624 with sparsity (SXM and PCIe)"),
    ("L40S", 362.0, "NVIDIA L40S data sheet: 362.05 dense"),
    ("L40", 181.0, "NVIDIA L40 data sheet: 181.05 dense"),
    ("L4", 121.0, "NVIDIA L4 data sheet: 242 with sparsity"),
    ("RTX 4090", 165.2, "NVIDIA Ada architecture white paper, appendix: 165.2 dense, fp32 accumulate"),
    ("RTX 3090", 71.0, "NVIDIA GA102 (Ampere) white paper: 71 dense, fp32 accumulate"),
    ("RTX 3090 Ti", 80.0, "the GA102 white paper's RTX 3090 rate (71 at 82 SMs, 1.695 GHz) at the 3090 Ti's "
                          "84 SMs and 1.86 GHz boost clock (NVIDIA's product page)"),
]


def name_words(name: str) -> list[str]:
    """'NVIDIA A100-SXM4-80GB' -> ['nvidia', 'a100', 'sxm4', '80gb']."""
    return re.findall(r"[a-z0-9]+", name.lower())


def bf16_peak_tflops(device_name: str) -> float | None:
    """The row of BF16_PEAK_TFLOPS whose name is a run of whole words of `device_name`, the longest
    if several are ('H200 NVL' before 'H200'); whole words, so that an 'L40' is no 'L4' and an
    'RTX A1000' no 'A100'. None for a card not in the table."""
    words = name_words(device_name)
    best = None
    for part, tflops, _ in BF16_PEAK_TFLOPS:
        p = name_words(part)
        found = any(words[i:i + len(p)] == p for i in range(len(words) - len(p) + 1))
        if found and (best is None or len(p) > best[0]):
            best = (len(p), tflops)
    return None if best is None else best[1]


# ----------------------------------------------------------------------------------------------
# Sizes: the real ones on a GPU, tiny ones for the CPU form that the test suite runs
# ----------------------------------------------------------------------------------------------

@dataclass
class Sizes:
    clip: dict                  # the random CLIP's constructor sizes
    crop: int                   # training crop and sliding window
    image: tuple[int, int]      # generated images (height, width)
    train_images: int
    val_images: int
    steps: int                  # training steps per run of the train stage
    log_every: int
    class_steps: int            # steps per run of the classes stage
    workers: int                # data loading processes of train.py and evaluate.py
    repeats: int                # timed repeats in Table 3
    big_batch: int              # Table 3's second batch size
    sinkhorn: list              # benchmark.bench_sinkhorn's sizes
    budgets: dict               # seconds per stage
    total: int                  # seconds for the whole run


FULL = Sizes(clip=dict(benchmark.VIT_B_16, image_resolution=224), crop=512, image=(375, 500),
             train_images=16, val_images=4, steps=30, log_every=5, class_steps=6, workers=6, repeats=10,
             big_batch=32, sinkhorn=benchmark.SINKHORN_SIZES,
             budgets=dict(tests=35, data=15, train=105, classes=60, capacity=30, evaluate=25,
                          table3=30, sinkhorn=20, compile=50, mfu=55, distributed=45),
             total=470)  # seconds, the budgets' sum: 8 minutes with the start of this script
QUICK = Sizes(clip=dict(clip.TINY), crop=64, image=(96, 128), train_images=4, val_images=2, steps=8,
              log_every=1, class_steps=2, workers=0, repeats=2, big_batch=32,
              sinkhorn=[("VOC (tiny)", 8, 64, 6)],
              budgets=dict(tests=60, data=30, train=90, classes=60, capacity=60, evaluate=45,
                           table3=45, sinkhorn=45, compile=20, mfu=45, distributed=90),
              total=600)

DATASETS = ("voc", "context", "coco")   # the three training class counts: 15, 49, 156


def training_classes(dataset: str) -> list[str]:
    """The seen classes, which an inductive run trains on (paper Sec. 5.1)."""
    preset = data.get_preset(dataset)
    seen = data.seen_mask(len(preset["classes"]), preset["unseen"])
    return [name for name, s in zip(preset["classes"], seen.tolist()) if s]


# ----------------------------------------------------------------------------------------------
# Running the programs, with their peak CUDA memory
# ----------------------------------------------------------------------------------------------

def peak_memory_code(device: torch.device) -> str:
    """`python -c CODE train.py ARGS` runs train.py exactly as `python train.py ARGS` does, then prints
    the one figure a program cannot report after it has exited: its peak memory on `device`, the
    GPU the program was given (not whichever is current when it ends)."""
    return ("import runpy, sys, torch; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__'); "
            f"print('peak CUDA bytes:', torch.cuda.max_memory_allocated({str(device)!r}) "
            "if torch.cuda.is_initialized() else -1)")


class StageTimeout(BaseException):
    """A stage ran past its budget (BaseException: no `except Exception` inside a stage swallows it)."""


class Check(Exception):
    """A check of a stage did not hold; the message says which."""


def run_program(name: str, argv: list[str], log_path: str, env: dict | None = None) -> str:
    """Run a program from the repository root; its output goes to log_path and is returned.

    A non-zero exit raises Check with the program's last line of error output. Whatever stops us
    while it runs (the stage's budget, ^C) kills its whole process group: torchrun's workers too."""
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env, start_new_session=True)
    try:
        output, _ = process.communicate()
    except BaseException:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:  # it had just finished
            pass
        process.communicate()
        raise
    with open(log_path, "w") as f:
        f.write(" ".join(argv) + "\n" + output)
    if process.returncode:
        lines = [line.strip() for line in output.replace("\r", "\n").splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()] or lines or ["no output"]
        raise Check(f"{name} exited with {process.returncode}: {errors[-1][:300]} (log: {log_path})")
    return output


def peak_bytes(output: str) -> int | None:
    for line in output.splitlines()[::-1]:
        if line.startswith("peak CUDA bytes:"):
            value = int(line.split(":")[1])
            return None if value < 0 else value
    return None


def read_log(run_dir: str) -> list[dict]:
    """train.py's logged steps (log.jsonl), without the start record."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def seconds_per_step(records: list[dict]) -> float:
    """Median time per step over the logged windows after the first (which holds the warm-up)."""
    steady = sorted(1 / r["it_per_s"] for r in (records[1:] or records))
    return steady[len(steady) // 2]


def loss_falls(losses: list[float]) -> bool:
    """The mean of the last third of the logged losses is below the mean of the first third."""
    third = max(1, len(losses) // 3)
    return sum(losses[-third:]) / third < sum(losses[:third]) / third


# ----------------------------------------------------------------------------------------------
# The run's context, and the stages
# ----------------------------------------------------------------------------------------------

class Run:
    """What the stages share: options, device, sizes, the work folder and what earlier stages made."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is not None:
            torch.cuda.set_device(self.device)  # what this process runs without naming a GPU runs on it
        self.sizes = QUICK if args.quick else FULL
        self.work = args.work_dir or tempfile.mkdtemp(prefix="gpu_check_")
        os.makedirs(self.work, exist_ok=True)
        self.env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
        self.roots: dict[str, str] = {}         # dataset -> data root
        self.weights: str | None = None          # the random CLIP's weights file
        self.runs: dict[str, dict] = {}          # train stage: run name -> its figures
        self.one_process_eval: str | None = None  # evaluate stage's JSON
        self.largest_micro_batch: dict[str, int] = {}  # capacity stage: dataset -> images that fit

    def path(self, *parts) -> str:
        return os.path.join(self.work, *parts)

    def workers(self, processes: int = 1) -> int:
        """Data-loading workers per program process: the sizes', fewer when many processes share the CPUs."""
        if self.sizes.workers == 0:
            return 0
        return max(1, min(self.sizes.workers, (os.cpu_count() or 1) // processes))

    def train_command(self, dataset: str, out: str, steps: int, log_every: int, amp: bool,
                      implicit: bool, batch: int = 4, processes: int = 1) -> list[str]:
        command = ["train.py", "--dataset", dataset, "--data-root", self.roots[dataset],
                   "--clip-weights", self.weights, "--crop-size", str(self.sizes.crop), "--device", str(self.device),
                   "--workers", str(self.workers(processes)), "--batch-size", str(batch), "--micro-batch", "4",
                   "--warmup-iters", "0", "--iters", str(steps), "--log-every", str(log_every),
                   "--save-every", str(steps), "--output-dir", out]
        return command + (["--amp"] if amp else []) + (["--implicit-grad"] if implicit else [])

    def evaluate_command(self, checkpoint: str, out: str, processes: int = 1) -> list[str]:
        return ["evaluate.py", "--checkpoint", checkpoint, "--data-root", self.roots["voc"],
                "--device", str(self.device), "--workers", str(self.workers(processes)), "--output-json", out] \
            + (["--amp"] if self.cuda else [])

    def python(self, command: list[str], log: str) -> tuple[str, int | None]:
        """Run `python PROGRAM ARGS`; returns its output and peak CUDA memory."""
        output = run_program(command[0], [sys.executable, "-c", peak_memory_code(self.device), *command],
                             self.path(log), self.env)
        return output, peak_bytes(output)

    def torchrun(self, processes: int, command: list[str], log: str) -> str:
        return run_program(f"torchrun {command[0]}", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc_per_node", str(processes), *command], self.path(log), self.env)


def stage_tests(run: Run, out: dict) -> None:
    """The CUDA-marked tests of the suite."""
    if not run.cuda:
        out["skipped"] = "needs CUDA (the CUDA-marked tests skip themselves without it)"
        return
    output = run_program("pytest -m cuda", [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p",
                                            "no:cacheprovider"], run.path("tests.log"), run.env)
    out["summary"] = output.strip().splitlines()[-1]


def stage_data(run: Run, out: dict) -> None:
    """Generated datasets in the real layouts, and a random CLIP of the run's sizes as a weights file."""
    s = run.sizes
    for dataset in DATASETS:
        val = s.val_images if dataset == "voc" else 1
        run.roots[dataset] = datasets.make_fake_dataset(dataset, run.path("data"), num_train=s.train_images,
                                                          num_val=val, size=s.image)
    torch.manual_seed(0)
    state_dict = {k: v.half() if v.is_floating_point() else v
                  for k, v in clip.CLIP(**s.clip).state_dict().items()}  # fp16, as OpenAI's file
    run.weights = run.path("random_clip.pt")
    torch.save(state_dict, run.weights)
    out.update(image_size=list(s.image), train_images=s.train_images, val_images=s.val_images,
               clip={k: v for k, v in s.clip.items() if k != "vocab_size"})


def train_variants(run: Run) -> list[tuple[str, bool, bool]]:
    """(name, amp, implicit grad); bf16 autocast is for CUDA (train.py trains in fp32 elsewhere)."""
    variants = [("fp32", False, False), ("fp32, implicit grad", False, True)]
    if run.cuda:
        variants += [("bf16", True, False), ("bf16, implicit grad", True, True)]
    return variants


def stage_train(run: Run, out: dict) -> None:
    """train.py on VOC at micro-batch 4: loss finite and falling, time per step, peak memory."""
    s = run.sizes
    table = Table(f"train.py, VOC ({len(training_classes('voc'))} classes), {s.crop}x{s.crop}, micro-batch 4, "
                  f"{s.steps} steps", ["run", "first loss", "last loss", "finite", "falling", "s/step", "peak MiB"],
                  ["{}", "{:.2f}", "{:.2f}", "{}", "{}", "{:.3f}", "{:.0f}"])
    out["table"] = table
    if not run.cuda:
        table.note = "bf16 (--amp) runs: CUDA only, skipped."
    failures = []
    for name, amp, implicit in train_variants(run):
        folder = run.path("runs", "voc-" + name.replace(", ", "-").replace(" ", "-"))
        _, peak = run.python(run.train_command("voc", folder, s.steps, s.log_every, amp, implicit),
                             f"train-{os.path.basename(folder)}.log")
        records = read_log(folder)
        losses = [r["loss"] for r in records]
        finite, falling = all(map(math.isfinite, losses)), loss_falls(losses)
        step = seconds_per_step(records)
        table.rows.append([name, losses[0], losses[-1], finite, falling, step, benchmark.mib(peak)])
        run.runs[name] = dict(folder=folder, seconds_per_step=step, peak=peak,
                              checkpoint=os.path.join(folder, "ckpt.pt"))
        if not (finite and falling):
            failures.append(f"{name}: loss {'not finite' if not finite else 'not falling'} ({losses})")
    if failures:
        raise Check("; ".join(failures))


def stage_classes(run: Run, out: dict) -> None:
    """train.py at the training class counts of Context-59 and COCO-Stuff, micro-batch 4."""
    s = run.sizes
    table = Table(f"train.py at the training class counts, {s.crop}x{s.crop}, micro-batch 4",
                  ["dataset", "classes K", "prompts N", "precision", "s/step", "peak MiB"],
                  ["{}", "{}", "{}", "{}", "{:.3f}", "{:.0f}"])
    out["table"] = table
    for name in ("fp32", "bf16"):
        if name in run.runs:
            r = run.runs[name]
            table.rows.append(["voc", 15, len(data.get_preset("voc")["templates"]), name, r["seconds_per_step"],
                               benchmark.mib(r["peak"])])
    for dataset in DATASETS[1:]:
        for precision, amp in (("fp32", False), ("bf16", True))[:2 if run.cuda else 1]:
            folder = run.path("runs", f"{dataset}-{precision}")
            _, peak = run.python(run.train_command(dataset, folder, s.class_steps, max(1, s.class_steps // 2),
                                                   amp, False), f"train-{dataset}-{precision}.log")
            records = read_log(folder)
            if not all(math.isfinite(r["loss"]) for r in records):
                raise Check(f"{dataset} {precision}: loss not finite")
            table.rows.append([dataset, len(training_classes(dataset)), len(data.get_preset(dataset)["templates"]),
                               precision, seconds_per_step(records), benchmark.mib(peak)])


def largest_fitting(fits, guess: int, trials: int) -> tuple[int, int | None]:
    """(largest b known to fit, smallest b known not to) after at most `trials` calls of fits(b),
    fits being monotone (true up to some b, false beyond): from the guess, steps of a quarter of it,
    doubling, until both sides are known; then bisection."""
    fit, fail = 0, None
    b, step = max(1, guess), max(1, guess // 4)
    for _ in range(trials):
        if fits(b):
            fit = b
        else:
            fail = b
        if fail is not None and fail - fit <= 1:
            break
        if fail is None:
            b, step = fit + step, 2 * step
        elif fit == 0:
            b, step = max(1, fail - step), 2 * step
        else:
            b = (fit + fail) // 2
    return fit, fail


MAX_MICRO_BATCH = 1024   # the capacity guess's cap: two nearly equal peaks would otherwise guess ~10^5 images


def capacity_guess(free: int, peak_one: int, per_image: int) -> int:
    """Images that fit in 90% of the free memory, from the peaks of micro-batches 1 and 2 (peak_one and
    peak_one + per_image), between 1 and MAX_MICRO_BATCH."""
    per_image = max(per_image, 2**20)
    return min(MAX_MICRO_BATCH, max(1, int((0.9 * free - (peak_one - per_image)) // per_image)))


def is_allocation_failure(error: RuntimeError) -> bool:
    """torch.cuda.OutOfMemoryError, and the RuntimeErrors of an allocation that failed elsewhere (cuBLAS's
    or cuDNN's workspace, the CPU allocator): the batch does not fit. Any other RuntimeError is a bug."""
    text = str(error).lower()
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in text or "alloc" in text


def step_fits(make_step, batch: int) -> bool:
    """Whether one training step of `batch` images runs: make_step(batch) builds it (inputs included)."""
    try:
        make_step(batch)()
        return True
    except RuntimeError as error:
        if not is_allocation_failure(error):
            raise
        return False


def stage_capacity(run: Run, out: dict) -> None:
    """The largest micro-batch that fits, per class count: bf16 training steps in this process."""
    if not run.cuda:
        out["skipped"] = "needs CUDA (peak memory)"
        return
    s, device = run.sizes, run.device
    table = Table(f"Largest micro-batch, bf16, {s.crop}x{s.crop} ({benchmark.machine(device)}, "
                  f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB)",
                  ["dataset", "classes K", "MiB per image", "predicted", "fits", "does not fit"],
                  ["{}", "{}", "{:.0f}", "{}", "{}", "{}"])
    out["table"] = table
    out["largest"] = run.largest_micro_batch
    for dataset in DATASETS:
        preset = data.get_preset(dataset)
        tokens = 100 if dataset == "coco" else 10  # train.py's SCHEDULES
        model = benchmark.build_otseg("sinkhorn", s.crop, tokens, preset["templates"], device, sizes=s.clip).train()
        classes = training_classes(dataset)

        def make_step(batch: int):
            return benchmark.training_step(model, classes, batch, s.crop, device, torch.bfloat16)

        def fits(batch: int) -> bool:
            try:
                return step_fits(make_step, batch)
            finally:
                for p in model.parameters():
                    p.grad = None
                torch.cuda.empty_cache()

        make_step(1)()  # one-time allocations first
        peaks = [benchmark.peak_memory(make_step(b), device) for b in (1, 2)]
        torch.cuda.empty_cache()  # what the allocator keeps cached would not count as free
        free, _ = torch.cuda.mem_get_info(device)
        guess = capacity_guess(free, peaks[0], peaks[1] - peaks[0])
        fit, fail = largest_fitting(fits, guess, trials=4)
        table.rows.append([dataset, len(classes), benchmark.mib(max(peaks[1] - peaks[0], 2**20)), guess, fit, fail])
        run.largest_micro_batch[dataset] = fit
        model = None  # its memory goes back before the next dataset's model
        torch.cuda.empty_cache()


def stage_evaluate(run: Run, out: dict) -> None:
    """evaluate.py with sliding windows on the generated validation images of VOC."""
    name = "bf16" if "bf16" in run.runs else "fp32"
    if name not in run.runs:
        raise Check("needs the checkpoint of the train stage")
    json_path = run.path("eval_one_process.json")
    start = time.perf_counter()
    _, peak = run.python(run.evaluate_command(run.runs[name]["checkpoint"], json_path), "evaluate.log")
    seconds = time.perf_counter() - start
    results = json.load(open(json_path))["results"]
    preset = data.get_preset("voc", run.sizes.crop)
    dataset = data.SegmentationDataset(preset, run.roots["voc"], "val", "fully", transform=data.test_transform(preset))
    labelled = sum(int((dataset[i]["label"] < len(preset["classes"])).sum()) for i in range(len(dataset)))
    counted = sum(map(sum, results["OTSeg+"]["confusion"]))
    height, width = dataset[0]["image"].shape[-2:]
    windows = (len(evaluate.window_starts(height, preset["window_crop"], preset["window_stride"]))
               * len(evaluate.window_starts(width, preset["window_crop"], preset["window_stride"])))
    out.update(images=len(dataset), windows_per_image=windows, seconds_with_start=seconds,
               peak_mib=benchmark.mib(peak), miou={k: r["miou"] for k, r in results.items()})
    run.one_process_eval = json_path
    if counted != labelled:
        raise Check(f"the confusion matrix counts {counted} pixels, the labels have {labelled}")


def stage_distributed(run: Run, out: dict) -> None:
    """torchrun over every GPU (NCCL): training steps, and an evaluation equal to one process's."""
    processes = torch.cuda.device_count() if run.cuda else run.args.processes
    if processes < 2:
        out["skipped"] = (f"{processes} GPU: torchrun over NCCL needs two or more" if run.cuda
                          else "needs two or more CUDA GPUs (on a CPU: --processes 2 runs it with gloo)")
        return
    s = run.sizes
    folder = run.path("runs", "voc-torchrun")
    run.torchrun(processes, run.train_command("voc", folder, max(2, s.class_steps), 1, run.cuda, False,
                                              batch=4 * processes, processes=processes), "torchrun-train.log")
    records = read_log(folder)
    with open(os.path.join(folder, "log.jsonl")) as f:
        world = json.loads(f.readline())["world_size"]
    if world != processes or not all(math.isfinite(r["loss"]) for r in records):
        raise Check(f"torchrun training: world size {world} of {processes}, losses {[r['loss'] for r in records]}")
    if run.one_process_eval is None:
        raise Check("needs the one-process evaluation of the evaluate stage")
    name = "bf16" if "bf16" in run.runs else "fp32"
    json_path = run.path("eval_torchrun.json")
    run.torchrun(processes, run.evaluate_command(run.runs[name]["checkpoint"], json_path, processes),
                 "torchrun-evaluate.log")
    one = json.load(open(run.one_process_eval))["results"]
    many = json.load(open(json_path))["results"]
    difference = max(abs(a - b) for k in one for row_a, row_b in zip(one[k]["confusion"], many[k]["confusion"])
                     for a, b in zip(row_a, row_b))
    out.update(processes=processes, train_steps=records[-1]["step"], loss=records[-1]["loss"],
               confusion_max_difference=difference)
    if difference:
        raise Check(f"evaluation over {processes} processes differs from one process by {difference} pixels")


def stage_table3(run: Run, out: dict) -> None:
    """Table 3 at batch 1, and OTSeg+ against the bare image tower at batch 32 (bf16 on CUDA)."""
    s = run.sizes
    model = benchmark.build_otseg("sinkhorn", s.crop, 10, data.TEMPLATES["N6"], run.device, sizes=s.clip).eval()
    classes = list(data.VOC_CLASSES)
    table = benchmark.efficiency_table(model, classes, s.crop, run.device, s.repeats)
    out["table"] = table
    batch = benchmark.backbone_table(model, classes, s.crop, s.big_batch, run.device, s.repeats)
    out["table_batch"] = batch
    ratio = dict(zip(table.column("model"), table.column("x softmax time")))["OTSeg+ (MPSA)"]
    tower = batch.column("x tower")[-1]
    out["goals"] = {"OTSeg+ / softmax time at batch 1 <= 1.05": [ratio, ratio <= 1.05],
                    f"OTSeg+ / bare tower throughput at batch {s.big_batch} >= 0.8": [tower, tower >= 0.8]}


def stage_sinkhorn(run: Run, out: dict) -> None:
    """tools/benchmark.py's Sinkhorn table on the device: ours against POT's solvers."""
    out["tables"] = []
    out["goals"] = {}
    for size in run.sizes.sinkhorn:  # one table at a time: a timeout keeps the tables and goals done
        table, = benchmark.bench_sinkhorn(run.device, run.args.quick, sizes=[size])
        out["tables"].append(table)
        rows = {(r[0], r[1]): r for r in table.rows}
        loop = rows.get(("POT sinkhorn_log, one at a time", "forward"))
        if loop is not None:
            out["goals"][f"{table.title.split(':')[0]}: POT loop / ours >= 20"] = [loop[3], loop[3] >= 20]


def c_compiler() -> str | None:
    """The C compiler Triton would build torch.compile's CUDA launchers with ($CC, else cc, gcc, clang)."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


INFERENCE_MODES = ["eager", "torch.compile", "CUDA graphs"]


def inference_modes(models: dict, images: torch.Tensor, class_names: list[str], modes: list[str],
                    repeats: int, tables: list) -> Table:
    """Images per second of each model's forward pass (`OTSeg.segment` from cached text embeddings, no
    gradients, bf16 autocast on CUDA) run eager, compiled (torch.compile) and as CUDA graphs
    (torch.compile's "reduce-overhead" mode, which replays the whole pass as one launch; it needs a
    pass with no host sync, so the sync-free Sinkhorn). One row at a time, appended to `tables` first,
    so that a stage out of time keeps the rows it measured. models: name -> (model, the modes it runs
    in), the softmax matching first: it is each mode's baseline of the ratio column."""
    device = images.device
    table = Table(f"Inference, batch {images.shape[0]}, {images.shape[-1]}x{images.shape[-1]}, "
                  f"{len(class_names)} classes ({benchmark.machine(device)}{', bf16' if device.type == 'cuda' else ''})",
                  ["model", "mode", "images/s", "x softmax time", "compile s"],
                  ["{}", "{}", "{:.1f}", "{:.3f}", "{:.1f}"],
                  note="x softmax time: seconds per image over the softmax matching's in the same mode.")
    tables.append(table)
    compile_options = {"eager": None, "torch.compile": {}, "CUDA graphs": {"mode": "reduce-overhead"}}
    baseline: dict[str, float] = {}
    for mode in modes:
        for name, (model, runs_in) in models.items():
            if mode not in runs_in:
                continue
            model.eval()
            text = model.text_embeddings(class_names)
            options = compile_options[mode]
            forward = model.segment if options is None else torch.compile(model.segment, **options)

            def run(forward=forward):
                with torch.no_grad(), common.autocast(device, True):
                    forward(images, text)
            start = time.perf_counter()
            run()  # the compile, if any
            benchmark.sync(device)
            compile_seconds = None if options is None else time.perf_counter() - start
            seconds = benchmark.time_it(run, device, repeats=repeats)
            if model.matching == "softmax":
                baseline[mode] = seconds
            table.rows.append([name, mode, images.shape[0] / seconds,
                               seconds / baseline[mode] if mode in baseline else None, compile_seconds])
    return table


def stage_compile(run: Run, out: dict) -> None:
    """torch.compile on the device: the Sinkhorn block compiled against eager and the cold compile's time;
    then OTSeg+ and the softmax matching at batch 1, eager, compiled and as CUDA graphs (Table 3's
    images per second, without the launch overhead of eager mode).

    The first compile on a fresh machine takes tens of seconds (inductor generates and Triton builds
    the kernels), and Triton builds its launchers with a C compiler and Python's headers at run time;
    without them train.py --compile cannot run, which this stage says before it tries."""
    if not run.cuda:
        out["skipped"] = "on CUDA (on a CPU: python -m tools.benchmark --only compile)"
        return
    compiler = c_compiler()
    headers = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    out.update(c_compiler=compiler, python_headers=os.path.isfile(headers))
    if compiler is None:
        raise Check("no C compiler (cc, gcc or clang on PATH, or $CC): Triton needs one to build "
                    "torch.compile's kernels; install gcc (e.g. apt-get install gcc), then rerun")
    if not os.path.isfile(headers):
        raise Check(f"no Python headers ({headers}): Triton needs them to build torch.compile's kernels; install "
                    f"the Python development package (e.g. apt-get install python{sys.version_info[0]}."
                    f"{sys.version_info[1]}-dev), then rerun")
    out["tables"] = [benchmark.bench_compile(run.device, run.args.quick)]
    s, device = run.sizes, run.device
    otseg = benchmark.build_otseg("sinkhorn", s.crop, 10, data.TEMPLATES["N6"], device, sizes=s.clip)
    templates = otseg.templates
    with torch.device(device):
        models = {"softmax matching": (OTSeg(otseg.clip, templates, matching="softmax"), INFERENCE_MODES),
                  "OTSeg+": (otseg, ["eager"]),  # its convergence test breaks the graph and syncs
                  "OTSeg+, sync-free": (OTSeg(otseg.clip, templates, sync_free=True), INFERENCE_MODES)}
    images = torch.randn(1, 3, s.crop, s.crop, device=device)
    inference_modes(models, images, list(data.VOC_CLASSES), INFERENCE_MODES, s.repeats, out["tables"])


def stage_mfu(run: Run, out: dict) -> None:
    """Model FLOPs of a VOC training step over its time and the card's bf16 peak, three ways.

    train.py's step at micro-batch 4 in eager mode is bound by kernel launches, not by its FLOPs: some
    1,500 CUDA kernels in bf16 (about 4,800 while Sinkhorn runs all its iterations; `python -m
    tools.benchmark --only kernels`) for 2 TFLOP, which the tensor cores need under 6 ms for, so a few
    microseconds per launch cost as much or more. It is reported as that. MFU means something at the
    largest micro-batch the capacity stage found (4 without it), eager and compiled as train.py
    --compile compiles (the whole model, with the sync-free Sinkhorn), measured here in this process."""
    name = "bf16" if "bf16" in run.runs else "fp32"
    if name not in run.runs:
        raise Check("needs a run of the train stage")
    s, device = run.sizes, run.device
    precision = torch.bfloat16 if run.cuda else None
    device_name = benchmark.machine(device)
    peak = run.args.peak_tflops or (bf16_peak_tflops(device_name) if run.cuda else None)
    classes = training_classes("voc")
    table = Table(f"MFU, VOC training step ({len(classes)} classes), {s.crop}x{s.crop}, "
                  f"{'bf16' if precision else 'fp32'} ({device_name}, peak "
                  f"{f'{peak:g}' if peak else '?'} TFLOP/s)",
                  ["step", "micro-batch", "TFLOP/step", "s/step", "TFLOP/s", "MFU"],
                  ["{}", "{}", "{:.3f}", "{:.4f}", "{:.1f}", "{:.3f}"])
    out.update(table=table, run=name, peak_tflops=peak, mfu=None)

    def add(label: str, batch: int, flops: int, seconds: float) -> float | None:
        achieved = flops / seconds / 1e12
        mfu = achieved / peak if peak else None
        table.rows.append([label, batch, flops / 1e12, seconds, achieved, mfu])
        return mfu

    model = benchmark.build_otseg("sinkhorn", s.crop, 10, data.TEMPLATES["N6"], device, sizes=s.clip).train()
    step = benchmark.training_step(model, classes, 4, s.crop, device, precision)
    step()  # the first step allocates the optimizer state; count a steady one
    flops = benchmark.full_flops(step)
    out["model_tflop_per_step"] = flops / 1e12
    add(f"train.py {name}, eager (launch-bound)", 4, flops, run.runs[name]["seconds_per_step"])
    batch = run.largest_micro_batch.get("voc", 4)
    try:
        if batch != 4:  # at the edge of the memory: one step's inputs at a time
            step = benchmark.training_step(model, classes, batch, s.crop, device, precision)
            step()
            flops = benchmark.full_flops(step)
        out["mfu"] = add("eager, in this process", batch, flops, benchmark.time_it(step, device, repeats=3))
        del step
        if run.cuda:  # compiled as train.py --compile compiles: the whole model
            torch.cuda.empty_cache()
            with torch.device(device):  # as train.py --compile: the sync-free model's tensor program compiled
                sync_free = OTSeg(model.clip, model.templates, sync_free=True).train()
            sync_free.segment = torch.compile(sync_free.segment)
            compiled = benchmark.training_step(sync_free, classes, batch, s.crop, device, precision)
            start = time.perf_counter()
            compiled()
            benchmark.sync(device)
            out["compile_seconds"] = time.perf_counter() - start
            out["mfu"] = add("torch.compile, in this process", batch, flops,
                             benchmark.time_it(compiled, device, repeats=3))
    except RuntimeError as error:  # the capacity stage's single step fitted, repeated ones did not
        if not is_allocation_failure(error):
            raise
        table.note = f"micro-batch {batch}: out of memory after {len(table.rows)} row(s) ({str(error)[:120]})"
    if peak and out["mfu"] is not None:  # the last row measured: compiled on CUDA
        last = table.rows[-1]
        out["goals"] = {f"MFU at micro-batch {last[1]}, {last[0].split(',')[0]} >= 0.35": [out["mfu"], out["mfu"] >= 0.35]}
    elif not peak:
        out["note"] = (f"no bf16 peak known for {device_name}: give --peak-tflops" if run.cuda
                       else "no bf16 peak for a CPU: give --peak-tflops for an MFU")


STAGES = {
    "tests": (stage_tests, []),
    "data": (stage_data, []),
    "train": (stage_train, ["data"]),
    "classes": (stage_classes, ["data"]),
    "capacity": (stage_capacity, []),
    "evaluate": (stage_evaluate, ["data", "train"]),
    "table3": (stage_table3, []),
    "sinkhorn": (stage_sinkhorn, []),
    "compile": (stage_compile, []),
    "mfu": (stage_mfu, ["data", "train"]),  # after capacity (its largest micro-batch) and compile (warm caches)
    "distributed": (stage_distributed, ["data", "train", "evaluate"]),  # last: one GPU's figures come first
}


# ----------------------------------------------------------------------------------------------
# Running the stages within their budgets, the table and the JSON file
# ----------------------------------------------------------------------------------------------

def run_stage(name: str, run: Run, budget: float) -> dict:
    """One stage under its budget: {status: ok/failed/skipped, seconds, error, and its figures}."""
    function, _ = STAGES[name]
    out: dict = {}

    def too_long(signum, frame):
        raise StageTimeout()

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.setitimer(signal.ITIMER_REAL, budget)
    start = time.perf_counter()
    try:
        function(run, out)
        status, error = ("skipped" if "skipped" in out else "ok"), None
    except StageTimeout:
        status, error = "failed", f"ran past its budget of {budget:.0f} s"
    except Exception as e:  # noqa: BLE001 -- any failure is reported, and the other stages still run
        status, error = "failed", f"{type(e).__name__}: {e}" if not isinstance(e, Check) else str(e)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if run.cuda:
        torch.cuda.empty_cache()
    return dict(status=status, seconds=time.perf_counter() - start, budget=budget, error=error, **out)


def headline(name: str, result: dict) -> str:
    """A stage's figures in one line of the summary table."""
    if result["status"] != "ok":
        return result.get("error") or result.get("skipped") or ""
    goals = "; ".join(f"{goal}: {value:.3g} ({'met' if met else 'NOT met'})"
                      for goal, (value, met) in result.get("goals", {}).items())
    if name == "mfu":
        rows = "; ".join(f"{r[0]} at {r[1]}: {r[4]:.3g} TFLOP/s" for r in result["table"].rows)
        return "; ".join(part for part in (rows, goals, result.get("note")) if part)
    if goals:
        return goals
    if name == "train":
        t = result["table"]
        return "; ".join(f"{r[0]} {r[5]:.3f} s/step" + ("" if r[6] is None else f" {r[6]:.0f} MiB")
                         for r in t.rows)
    if name == "classes":
        return "; ".join(f"{r[0]} K={r[1]} {r[3]} {r[4]:.3f} s/step" + ("" if r[5] is None else f" {r[5]:.0f} MiB")
                         for r in result["table"].rows)
    if name == "capacity":
        return "; ".join(f"{r[0]}: {r[4]} fit" + (f", {r[5]} not" if r[5] else "") for r in result["table"].rows)
    if name == "evaluate":
        return (f"{result['images']} images x {result['windows_per_image']} windows, "
                f"{result['seconds_with_start']:.1f} s with start-up")
    if name == "distributed":
        return f"{result['processes']} processes: same confusion matrices"
    if name == "compile":
        rows = {r[0]: r for r in result["tables"][0].rows}
        compiled = rows.get("torch.compile")
        parts = [] if compiled is None else [f"Sinkhorn block {compiled[2]:.2f}x eager, first compile "
                                             f"{compiled[3]:.0f} s"]
        for r in (result["tables"][1].rows if len(result["tables"]) > 1 else []):
            if r[0].startswith("OTSeg+") and r[3] is not None:
                parts.append(f"{r[0]} {r[1]} {r[2]:.1f} images/s ({r[3]:.2f}x softmax time)")
        return "; ".join(parts)
    if name == "tests":
        return result["summary"] or ""
    if "table" in result:
        return f"{len(result['table'].rows)} rows"
    return ""


def to_json(x):
    """Tables as dicts, NaN and infinity as None (standard JSON)."""
    if isinstance(x, Table):
        return to_json(x.as_dict())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: to_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_json(v) for v in x]
    return x


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Prove and measure every CUDA path in one run "
                                                 "(see the module docstring)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda, cuda:N (the one-GPU stages on GPU N; the distributed stage uses every GPU) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: every stage in about a minute on a CPU")
    parser.add_argument("--only", action="append", choices=list(STAGES),
                        help="run only these stages and those they need (repeatable)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the card's dense bf16 peak, for a card missing from BF16_PEAK_TFLOPS")
    parser.add_argument("--processes", type=int, default=0,
                        help="CPU only: processes of the distributed stage (gloo); 0 skips it")
    parser.add_argument("--json", default=os.path.join("runs", "gpu_check.json"), help="the report")
    parser.add_argument("--work-dir", default=None, help="generated data and runs (default: a temporary "
                                                         "folder, removed at the end)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of every process")
    return parser


def main(args) -> int:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA GPU (run with --device cpu --quick for the CPU form)")
        return 2
    if args.device.startswith("cuda") and torch.device(args.device).index is not None \
            and torch.device(args.device).index >= torch.cuda.device_count():
        print(f"error: --device {args.device} but torch sees {torch.cuda.device_count()} GPU(s), numbered from 0")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Run(args)
    names = list(STAGES)
    if args.only:
        wanted = set(args.only) | {need for name in args.only for need in STAGES[name][1]}
        names = [n for n in names if n in wanted]
    print(f"gpu_check: torch {torch.__version__}, {benchmark.machine(run.device)}"
          f"{f', {torch.cuda.device_count()} GPU(s)' if run.cuda else ''}; stages {', '.join(names)}; "
          f"work folder {run.work}", flush=True)
    start = time.perf_counter()
    results = {}
    for name in names:
        left = run.sizes.total - (time.perf_counter() - start)
        missing = [n for n in STAGES[name][1] if results.get(n, {}).get("status") == "failed"]
        if missing:
            results[name] = dict(status="failed", seconds=0.0, error=f"needs stage {', '.join(missing)}")
        elif left < 5:
            results[name] = dict(status="failed", seconds=0.0, error="no time left of the whole run's budget")
        else:
            results[name] = run_stage(name, run, min(run.sizes.budgets[name], left))
        result = results[name]
        for key in ("table", "table_batch"):
            if key in result:
                benchmark.print_table(result[key])
        for table in result.get("tables", []):
            benchmark.print_table(table)
        print(f"[{name}] {result['status']} in {result['seconds']:.1f} s"
              + (f": {result['error']}" if result.get("error") else ""), flush=True)
    total = time.perf_counter() - start

    summary = Table(f"gpu_check on {benchmark.machine(run.device)}, torch {torch.__version__}, {total:.0f} s",
                    ["stage", "status", "seconds", "budget", "figures"], ["{}", "{}", "{:.1f}", "{:.0f}", "{}"])
    for name, result in results.items():
        summary.rows.append([name, result["status"], result["seconds"], result.get("budget"),
                             headline(name, result)])
    benchmark.print_table(summary)
    report = dict(machine=benchmark.machine(run.device), platform=platform.platform(), torch=torch.__version__,
                  cuda=torch.version.cuda, gpus=torch.cuda.device_count() if run.cuda else 0,
                  quick=args.quick, seconds=total, stages=results)
    with atomic_save(args.json) as tmp, open(tmp, "w") as f:
        json.dump(to_json(report), f, indent=1)
    print(f"wrote {args.json}")
    if args.work_dir is None:
        shutil.rmtree(run.work, ignore_errors=True)
    failed = [name for name, r in results.items() if r["status"] == "failed"]
    if failed:
        print("error: failed stages: " + "; ".join(f"{n} ({results[n]['error']})" for n in failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
