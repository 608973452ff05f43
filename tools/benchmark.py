"""What optimal transport costs: OTSeg's Sinkhorn, MPS and MPSA measured against their baselines.

OTSeg's claim is accuracy at almost no cost: the paper's Table 3 gives 22.5 images/s for OTSeg+
against 25.6 for ZegCLIP (a ratio of 1.14) on one RTX 3090. This script measures the same question
for this code, side by side in one run, so that every figure is read as a ratio between rows
measured on the same machine at the same time:

1. `sinkhorn`: our batched `sinkhorn_log` against POT (`ot.sinkhorn(method='sinkhorn_log')`, one
   problem at a time, and `ot.batch.solve_batch` on the same device) at OTSeg's sizes: B*K problems
   of M=1024 pixels x N prompts (VOC: B=16, K=15, N=6; COCO-Stuff: B=4, K=156, N=8). Forward and
   forward+backward, iterations actually run, host synchronisations per call, and memory (peak CUDA
   memory on a GPU; on a CPU, the bytes that autograd keeps for the backward pass, which is what
   grows with the number of unrolled iterations).
2. `compile`: the block of Sinkhorn iterations between two convergence tests
   (`sinkhorn.sinkhorn_log_block`) compiled with torch.compile against eager, beside the floor of
   two exp passes over the log-plan per iteration.
3. `inference`: full-size ViT-B/16 OTSeg+ at 512x512 (random weights: speed does not depend on
   them) against the same model with softmax matching, batch 1 and batch 8.
4. `training`: one optimisation step (forward, both losses, backward, AdamW) for MPSA and softmax;
   a small scale on the CPU, and the real scale (512x512, VOC and COCO-Stuff settings, fp32 and
   bf16 autocast) on a GPU.
5. `table3`: the paper's Table 3 columns (learnable parameters, GMACs in the paper's convention, full
   GFLOPs, images/s at batch 1) for OTSeg (decoder only), OTSeg+ and the softmax matching, with the
   release's own way of counting; and at batch 32 (bf16 on a GPU) OTSeg+ against the bare ViT-B/16
   image tower it is built on.
6. `syncs`: the host synchronisations of one training step and of one evaluated image, by source
   line: the operators that make the CPU wait for a GPU (`.item()`, `bool()`, `nonzero`, boolean-mask
   indexing, `bincount`, device-to-host copies), counted on any device.
7. `kernels`: the CUDA kernels that one training step and one inference window would launch in eager
   mode, for OTSeg+, the softmax matching and the bare image tower, counted on any device as the
   operators that do work (views and allocations launch nothing); Sinkhorn at its first convergence
   test and at all of its 100 iterations, and in its sync-free form. On a GPU each launch costs a
   few microseconds of CPU time whatever its size, so this count, not the FLOPs, bounds a small step.

    python -m tools.benchmark --only syncs        # host synchronisations per step and per image
    python -m tools.benchmark --only kernels      # CUDA kernels per step and per window, eager
    python -m tools.benchmark                     # everything (CPU: several minutes)
    python -m tools.benchmark --only sinkhorn     # one table
    python -m tools.benchmark --quick             # smaller, for a first look
    python -m tools.benchmark --threads 1         # steadier CPU timings on a machine shared with other jobs

`tools/gpu_check.py` runs these measurements, with the training and evaluation programs, on a GPU in one
command. POT is a test-time dependency (`requirements-test.txt`); without it the POT rows are
skipped. A CPU time is only indicative (and is quoted with the machine it ran on); the figures that
count for deployment are GPU figures.
"""
import argparse
import collections
import math
import os
import platform
import tempfile
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import checkpoint
import clip
import common
import data
import evaluate
import losses
import sinkhorn
from model import OTSeg, trainable_parameters, upsample
from mpsa import MATCHINGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the project root, above tools/

# ----------------------------------------------------------------------------------------------
# Measuring helpers
# ----------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn, device: torch.device, repeats: int = 5, warmup: int = 1) -> float | dict:
    """Median wall time of fn() in seconds (after warm-up calls), synchronising CUDA around it.

    fn may be a dict of functions to compare: their calls are interleaved (a, b, a, b, ...), so that a
    machine whose load changes during the run slows every row alike, and a dict of medians returned.
    """
    fns = fn if isinstance(fn, dict) else {None: fn}
    for f in fns.values():
        for _ in range(warmup):
            f()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            sync(device)
            start = time.perf_counter()
            f()
            sync(device)
            times[name].append(time.perf_counter() - start)
    medians = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    return medians if isinstance(fn, dict) else medians[None]


@contextmanager
def saved_for_backward():
    """Count the bytes autograd stores for the backward pass (each storage once).

    On a CPU there is no allocator counter like CUDA's `max_memory_allocated`; what autograd keeps
    alive between forward and backward is the part of training memory that Sinkhorn's unrolled
    iterations make grow, and this hook sees exactly that.
    """
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    counter = {"bytes": 0}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield counter
    counter["bytes"] = sum(seen.values())


@contextmanager
def count_host_syncs():
    """Count the host-device synchronisations that Python code asks for (`bool()`, `.item()`).

    On CUDA each one stalls the CPU until the GPU has caught up. Counted on any device by
    wrapping the two Tensor methods that Sinkhorn's stopping rule could use.
    """
    counter = {"n": 0}
    original_bool, original_item = torch.Tensor.__bool__, torch.Tensor.item

    def counting_bool(self):
        counter["n"] += 1
        return original_bool(self)

    def counting_item(self):
        counter["n"] += 1
        return original_item(self)

    torch.Tensor.__bool__, torch.Tensor.item = counting_bool, counting_item
    try:
        yield counter
    finally:
        torch.Tensor.__bool__, torch.Tensor.item = original_bool, original_item


def peak_memory(fn, device: torch.device) -> int | None:
    """Peak CUDA memory of fn() above what was allocated before it, in bytes (None on CPU)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def mib(n: int | None) -> float | None:
    return None if n is None else n / 2**20


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


@dataclass
class Table:
    """One printed table: rows of numbers (None prints as '-'), each column with its format."""
    title: str
    header: list[str]
    formats: list[str]                  # per column, e.g. "{:.1f}"; "{}" for text
    rows: list[list] = field(default_factory=list)
    note: str = ""

    def column(self, name: str) -> list:
        i = self.header.index(name)
        return [row[i] for row in self.rows]

    def as_dict(self) -> dict:
        return dict(title=self.title, header=self.header, rows=self.rows, note=self.note)


def format_table(table: Table) -> str:
    cells = [[("-" if x is None else f.format(x)) for x, f in zip(row, table.formats)] for row in table.rows]
    widths = [max(len(str(x)) for x in col) for col in zip(table.header, *cells)]
    line = "  ".join(f"{{:{'<' if f == '{}' else '>'}{w}}}" for w, f in zip(widths, table.formats))
    lines = [table.title, line.format(*table.header), line.format(*["-" * w for w in widths])]
    lines += [line.format(*row) for row in cells]
    return "\n".join(lines + ([table.note] if table.note else []))


def print_table(table: Table) -> None:
    print("\n" + format_table(table), flush=True)


# ----------------------------------------------------------------------------------------------
# 1. Sinkhorn at OTSeg's sizes
# ----------------------------------------------------------------------------------------------

# (name, P, M, N): P = B*K problems of M pixels (1024: a 32x32 grid at 512 px) x N prompts.
SINKHORN_SIZES = [("VOC", 16 * 15, 1024, 6), ("COCO-Stuff", 4 * 156, 1024, 8)]
EPS = 0.05


def similarity_problems(problems: int, m: int, n: int, dim: int = 64, seed: int = 0,
                        device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Cosine similarities (P, M, N) shaped like OTSeg's: N prompts of one class are close to
    each other, pixels range from on-class to off-class (so that the plan is not uniform)."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(problems, 1, dim, generator=g)
    prompts = torch.nn.functional.normalize(centre + 0.6 * torch.randn(problems, n, dim, generator=g), dim=-1)
    on_class = torch.rand(problems, m, 1, generator=g)
    pixels = torch.nn.functional.normalize(on_class * centre + torch.randn(problems, m, dim, generator=g), dim=-1)
    return (pixels @ prompts.transpose(1, 2)).to(device)                  # (P, M, N)


def bench_sinkhorn(device: torch.device, quick: bool, sizes: list | None = None) -> list[Table]:
    """One table per size: ours (unrolled and implicit gradient) against POT's loop and batch solver."""
    try:
        import ot
    except ImportError:
        ot = None
    if sizes is None:
        sizes = [(name, p // 4 if quick else p, m, n) for name, p, m, n in SINKHORN_SIZES]
    tables = []
    for name, problems, m, n in sizes:
        sim = similarity_problems(problems, m, n, device=device)
        cost = 1.0 - sim
        table = Table(
            f"Sinkhorn, {name}: {problems} problems of {m} x {n}, eps {EPS} ({machine(device)})",
            ["solver", "pass", "ms", "x ours fwd", "iters", "host syncs", "peak MiB", "saved MiB", "plan diff"],
            ["{}", "{}", "{:.1f}", "{:.2f}", "{}", "{}", "{:.1f}", "{:.1f}", "{:.1e}"],
            note="peak MiB: CUDA only. saved MiB: tensors autograd keeps for backward. "
                 "plan diff: max |T - T_ours| / max T.")

        def ours_forward():
            return sinkhorn.sinkhorn_log(cost, EPS)

        with count_host_syncs() as syncs:
            plan, iters = sinkhorn.sinkhorn_log(cost, EPS, return_iters=True)
        t_fwd = time_it(ours_forward, device)
        table.rows.append(["ours, batched", "forward", t_fwd * 1e3, 1.0, iters, syncs["n"],
                           mib(peak_memory(ours_forward, device)), None, 0.0])

        def ours_backward(implicit: bool):
            c = cost.clone().requires_grad_(True)
            with saved_for_backward() as saved:
                p = sinkhorn.sinkhorn_log(c, EPS, implicit_grad=implicit)
            (p * sim).sum().backward()
            return saved["bytes"]

        for label, implicit in (("ours, batched", False), ("ours, implicit grad", True)):
            saved_bytes = ours_backward(implicit)
            t = time_it(lambda: ours_backward(implicit), device)
            table.rows.append([label, "fwd+bwd", t * 1e3, t / t_fwd, iters, None,
                               mib(peak_memory(lambda: ours_backward(implicit), device)), mib(saved_bytes), None])
        if ot is None:
            table.note += " POT is not installed: its rows are left out."
        else:
            try:
                table.rows += pot_rows(cost, sim, plan, t_fwd, device)
            except Exception as error:  # noqa: BLE001 -- a POT version that fails here must not cost our rows
                table.note += f" POT failed: {type(error).__name__}: {error}"
        tables.append(table)
    return tables


def pot_rows(cost: torch.Tensor, sim: torch.Tensor, plan: torch.Tensor, t_fwd: float,
             device: torch.device) -> list[list]:
    """POT's rows of a Sinkhorn table: its one-problem loop (NumPy, on the CPU) and its batch solver
    (on `device`), on the same problems as ours; times also as multiples of ours (t_fwd)."""
    import numpy as np
    import ot
    import ot.batch
    problems, m, n = cost.shape
    cost64 = cost.double().cpu().numpy()
    uniform_m, uniform_n = np.full(m, 1 / m), np.full(n, 1 / n)
    subset = min(problems, 24)   # POT's loop is timed on a subset and scaled up (linear in P)

    def pot_loop():
        return [ot.sinkhorn(uniform_m, uniform_n, cost64[i], EPS, method="sinkhorn_log",
                            numItermax=100, stopThr=1e-6) for i in range(subset)]

    t_loop = time_it(pot_loop, torch.device("cpu"), repeats=3) * problems / subset
    loop_plans = np.stack(pot_loop())
    diff = np.abs(loop_plans - plan[:subset].double().cpu().numpy()).max() / loop_plans.max()

    def pot_batch(grad="detach"):
        c = cost.clone().requires_grad_(grad != "detach")
        res = ot.batch.solve_batch(c, reg=EPS, method="log_sinkhorn", max_iter=100, tol=1e-6, grad=grad)
        if grad != "detach":
            (res.plan * sim).sum().backward()
        return res.plan

    t_batch = time_it(pot_batch, device, repeats=3)
    diff_batch = ((pot_batch() - plan).abs().max() / plan.abs().max()).item()
    t_batch_bwd = time_it(lambda: pot_batch("autodiff"), device, repeats=3)
    return [["POT sinkhorn_log, one at a time", "forward", t_loop * 1e3, t_loop / t_fwd, "<=100", None, None,
             None, float(diff)],
            ["POT solve_batch (log)", "forward", t_batch * 1e3, t_batch / t_fwd, "<=100", None,
             mib(peak_memory(pot_batch, device)), None, diff_batch],
            ["POT solve_batch (log)", "fwd+bwd", t_batch_bwd * 1e3, t_batch_bwd / t_fwd, "<=100", None,
             mib(peak_memory(lambda: pot_batch("autodiff"), device)), None, None]]


# ----------------------------------------------------------------------------------------------
# 2. The Sinkhorn block compiled against eager
# ----------------------------------------------------------------------------------------------

def bench_compile(device: torch.device, quick: bool) -> Table:
    """One block of CHECK_EVERY log-domain iterations (the work between two convergence tests),
    eager and compiled, at VOC's size; and the floor of two exp passes over the log-plan per
    iteration, the least any implementation must read and compute (its row and column log-sum-exps)."""
    name, problems, m, n = SINKHORN_SIZES[0]
    problems = problems // 4 if quick else problems
    cost = 1.0 - similarity_problems(problems, m, n, device=device)
    log_plan = (-cost / EPS).mT.contiguous()                              # P^T at the start, (P, N, M)
    log_mu = torch.full((problems, 1, m), -math.log(m), device=device)    # (P, 1, M)
    log_nu = torch.full((problems, n, 1), -math.log(n), device=device)    # (P, N, 1)
    steps = sinkhorn.CHECK_EVERY
    table = Table(f"Sinkhorn block of {steps} iterations, {name}: {problems} problems of {m} x {n} "
                  f"({machine(device)})", ["version", "ms per block", "x eager", "compile s", "max diff"],
                  ["{}", "{:.2f}", "{:.2f}", "{:.1f}", "{:.1e}"])
    block = getattr(sinkhorn, "sinkhorn_log_block", None)
    if block is None:
        table.note = "sinkhorn.py has no sinkhorn_log_block: nothing to compile."
        return table
    eager = block(log_mu, log_nu, log_plan, steps)
    t_eager = time_it(lambda: block(log_mu, log_nu, log_plan, steps), device)
    table.rows.append(["eager", t_eager * 1e3, 1.0, None, 0.0])
    compiled_block = torch.compile(block, fullgraph=True)  # fullgraph: a graph break is an error here
    start = time.perf_counter()
    compiled = compiled_block(log_mu, log_nu, log_plan, steps)
    sync(device)
    compile_s = time.perf_counter() - start
    diff = max((a - b).abs().max().item() for a, b in zip(eager, compiled))
    t_compiled = time_it(lambda: compiled_block(log_mu, log_nu, log_plan, steps), device)
    table.rows.append(["torch.compile", t_compiled * 1e3, t_compiled / t_eager, compile_s, diff])

    def floor():
        for _ in range(steps):
            torch.exp(log_plan)
            torch.exp(log_plan)
    t_floor = time_it(floor, device)
    table.rows.append([f"floor: 2 exp passes x {steps}", t_floor * 1e3, t_floor / t_eager, None, None])
    table.note = "max diff: largest difference of the log-plan and the error between compiled and eager."
    return table


# ----------------------------------------------------------------------------------------------
# 3. Inference: OTSeg+ with MPS/MPSA against the same model with softmax matching
# ----------------------------------------------------------------------------------------------

VIT_B_16 = dict(embed_dim=512, vision_layers=12, vision_width=768, vision_patch_size=16, context_length=77,
                vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12)


def build_otseg(matching: str, image_size: int, prompt_tokens: int, templates: list[str], device,
                sizes: dict = VIT_B_16, **options) -> OTSeg:
    """OTSeg on a CLIP of `sizes` (ViT-B/16's by default) with random weights: speed and counts do
    not depend on the weights. Initialised on `device` itself: a ViT-B/16's random initialisation
    takes seconds on a CPU and milliseconds on a GPU."""
    torch.manual_seed(0)
    clip_sizes = {k: v for k, v in sizes.items() if k != "image_resolution"}
    with torch.device(device):  # the default device of the factory functions inside
        clip_model = clip.CLIP(image_resolution=image_size, prompt_tokens=prompt_tokens, **clip_sizes)
        model = OTSeg(clip_model, templates, matching=matching, **options)
    return model.to(device)


def bench_inference(device: torch.device, quick: bool) -> Table:
    size = 256 if quick else 512
    batches = [1] if quick else [1, 8]
    classes = data.VOC_CLASSES
    table = Table(f"OTSeg+ inference, ViT-B/16, {size}x{size}, K={len(classes)} classes, N=6 prompts "
                  f"({machine(device)})", ["matching", "batch", "ms/image", "images/s", "x softmax"],
                  ["{}", "{}", "{:.0f}", "{:.2f}", "{:.3f}"])
    models = {m: build_otseg(m, size, 10, data.TEMPLATES["N6"], device).eval() for m in MATCHINGS}
    def run(model, images):
        with torch.no_grad():
            out = model(images, classes)
            return model.ensemble(out["decoder"], out["score"], lam=0.5)

    for batch in batches:
        images = torch.randn(batch, 3, size, size, device=device)
        times = time_it({matching: (lambda m=model: run(m, images)) for matching, model in models.items()},
                        device, repeats=3)
        for matching in models:
            table.rows.append([matching if matching == "softmax" else "sinkhorn (OTSeg+)", batch,
                               times[matching] / batch * 1e3, batch / times[matching],
                               times[matching] / times["softmax"]])
    return table


# ----------------------------------------------------------------------------------------------
# 4. Training: one optimisation step
# ----------------------------------------------------------------------------------------------

def training_step(model: OTSeg, classes: list[str], batch: int, size: int, device: torch.device,
                  precision: torch.dtype | None = None, seed: int = 0, foreach: bool | None = None):
    """A closure running one optimisation step of `model` on random images and labels, as train.py's
    (forward under autocast, focal + dice on both outputs, backward, AdamW). It returns the bytes
    autograd kept for the backward pass. The random inputs are drawn on `device`: on a CPU, a batch
    of 512x512 images and labels takes seconds to draw and copy, on the GPU next to nothing.
    foreach: AdamW's multi-tensor form (None: PyTorch's choice, which is it on CUDA only)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01, foreach=foreach)
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g, device=device)
    labels = torch.randint(0, len(classes), (batch, size, size), generator=g, device=device)
    model.text_embeddings(classes)   # computed once per run, not per step

    def step() -> int:
        # No autocast object at all for fp32: torch 2.1 refuses a CPU autocast of any dtype but bf16,
        # even a disabled one.
        with (torch.autocast(device.type, dtype=precision) if precision else nullcontext()):
            with saved_for_backward() as counter:
                out = model(images, classes)
                num_masks = losses.count_masks(labels, len(classes)).clamp(min=1)
                loss = losses.otseg_loss(out, labels, num_masks)["total"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return counter["bytes"]
    return step


def bench_training(device: torch.device, quick: bool) -> list[Table]:
    if device.type == "cuda":   # the real scale: 512x512, VOC and COCO-Stuff settings
        settings = [("VOC", 512, 4, 10, data.VOC_CLASSES[:15], data.TEMPLATES["N6"]),
                    ("COCO-Stuff", 512, 4, 100, data.COCO_CLASSES[:156], data.TEMPLATES["N8"])]
        precisions = [None, torch.bfloat16]
    else:                       # a small CPU scale: same model, smaller crops and batch
        settings = [("VOC", 128 if quick else 224, 2, 10, data.VOC_CLASSES[:15], data.TEMPLATES["N6"])]
        precisions = [None]
    variants = [("sinkhorn", {}), ("sinkhorn, implicit grad", {"implicit_grad": True}), ("softmax", {})]
    tables = []
    for name, size, batch, tokens, classes, templates in settings:
        table = Table(f"Training step, {name}: ViT-B/16 + {tokens} prompt tokens, {size}x{size}, batch {batch}, "
                      f"K={len(classes)}, N={len(templates)} ({machine(device)})",
                      ["matching", "precision", "s/step", "x softmax", "peak MiB", "saved MiB"],
                      ["{}", "{}", "{:.2f}", "{:.2f}", "{:.0f}", "{:.0f}"])
        models = {label: build_otseg("softmax" if label == "softmax" else "sinkhorn", size, tokens, templates,
                                     device, **options).train() for label, options in variants}
        for precision in precisions:
            steps = {label: training_step(model, list(classes), batch, size, device, precision)
                     for label, model in models.items()}
            seconds = time_it(steps, device, repeats=3)
            for label, step in steps.items():
                table.rows.append([label, "bf16" if precision else "fp32", seconds[label],
                                   seconds[label] / seconds["softmax"], mib(peak_memory(step, device)), mib(step())])
        del models, steps
        tables.append(table)
    return tables


# ----------------------------------------------------------------------------------------------
# 5. Paper Table 3: learnable parameters, compute per image, images per second
# ----------------------------------------------------------------------------------------------

def paper_macs(model: OTSeg, images: torch.Tensor, class_names: list[str]) -> int:
    """Multiply-accumulates of nn.Linear and nn.Conv2d modules, CLIP's attention blocks left out.

    The convention of the MMCV counter behind the paper's "GFLOPs" (Table 3; docs/release.md): attention products,
    the attention projections of CLIP, norms, Sinkhorn and matrix products outside modules uncounted.
    """
    total = [0]
    skip = {id(m) for block in model.modules() if isinstance(block, (clip.Attention, nn.MultiheadAttention))
            for m in block.modules()}

    def linear(module, inputs, output):
        total[0] += inputs[0].numel() // module.in_features * module.in_features * module.out_features

    def conv(module, inputs, output):
        kernel = math.prod(module.kernel_size) * module.in_channels // module.groups
        total[0] += output.numel() * kernel

    handles = [m.register_forward_hook(linear if isinstance(m, nn.Linear) else conv)
               for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in skip]
    with torch.no_grad():
        model(images, class_names)
    for handle in handles:
        handle.remove()
    return total[0]


def full_flops(fn) -> int:
    """FLOPs of every matrix product, convolution and attention in fn() (2 per multiply-accumulate)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def release_overheads(model: OTSeg, num_queries: int, num_pixels: int) -> tuple[int, int]:
    """(parameters, MACs) the release adds to ours by building and running weights it never uses
    (its `decode_seg.py`): every decoder layer's self-attention and norm1 (built, never called), and the last
    layer's value and output projections, norms and FFN (built and run, their output unused)."""
    d = model.relationship_descriptor.out_features
    ffn = model.decoder.layers[0].linear1.out_features
    parameters = (len(model.decoder.layers) * (4 * d * d + 4 * d + 2 * d)
                  + 2 * (d * d + d) + 4 * d + (d * ffn + ffn) + (ffn * d + d))
    macs = num_pixels * d * d + num_queries * d * d + 2 * num_queries * d * ffn
    return parameters, macs


def decoder_only(model: OTSeg):
    """OTSeg's inference (lambda = 1 in Eq. 17) needs only the decoder path: model.forward without
    the score path (MPS), as a function of (images, class_names) -> decoder logits (B, K, H, W)."""
    def forward(images: torch.Tensor, class_names: list[str]) -> torch.Tensor:
        pixels, queries, grid = model.encode(images, class_names)
        decoder, _ = model.decoder(queries, pixels)                       # (B, K, M)
        return upsample(decoder, grid, tuple(images.shape[-2:]))          # (B, K, H, W)
    return forward


def images_per_second(forwards: dict, images: torch.Tensor, class_names: list[str], repeats: int,
                      amp: bool = False) -> dict[str, float]:
    """Images per second of each forward(images, class_names), timed side by side without gradients
    (bf16 autocast on CUDA with amp)."""
    def run(forward):
        with torch.no_grad(), common.autocast(images.device, amp):
            forward(images, class_names)
    times = time_it({name: (lambda f=forward: run(f)) for name, forward in forwards.items()}, images.device,
                    repeats=repeats)
    return {name: images.shape[0] / t for name, t in times.items()}


def efficiency_table(model: OTSeg, class_names: list[str], crop: int, device: torch.device,
                     repeats: int, amp: bool = False) -> Table:
    """Table 3's columns for OTSeg (decoder only), OTSeg+ and the softmax matching, one crop-sized image."""
    images = torch.randn(1, 3, crop, crop, device=device)
    model.eval().text_embeddings(class_names)  # cached before counting: the text tower runs once per class list
    softmax = OTSeg(model.clip, model.templates, matching="softmax").to(device).eval()
    checkpoint.load_trainable(softmax, checkpoint.trainable_state_dict(model), "the MPSA model")  # same parameters
    softmax.text_embeddings(class_names)
    patch = model.clip.visual.conv1.kernel_size[0]
    extra_params, extra_macs = release_overheads(model, len(class_names) * len(model.templates),
                                                 (crop // patch) ** 2)
    table = Table(f"Table 3: {len(class_names)} classes x {len(model.templates)} prompts, one {crop}x{crop} "
                  f"image, batch 1 ({machine(device)}{', bf16' if amp and device.type == 'cuda' else ''})",
                  ["model", "learnable M", "as release M", "GMACs", "as release", "GFLOPs full", "images/s",
                   "x softmax time"],
                  ["{}", "{:.2f}", "{:.2f}", "{:.1f}", "{:.1f}", "{:.1f}", "{:.2f}", "{:.3f}"],
                  note="GMACs: nn.Linear and conv modules, CLIP's attention not counted, the convention of the "
                       "paper's 'GFLOPs'; 'as release' adds the weights it builds and runs without using them. "
                       "OTSeg scores the decoder alone and skips the score path. Paper Table 3, RTX 3090: "
                       "OTSeg 23.6 and OTSeg+ 22.5 images/s, ZegCLIP 25.6; 13.8M, 61.9 GFLOPs.")
    rows = (("OTSeg (decoder only)", model, decoder_only(model)), ("OTSeg+ (MPSA)", model, model),
            ("softmax cross-attention", softmax, softmax))
    speeds = images_per_second({name: forward for name, _, forward in rows}, images, class_names, repeats, amp)
    for name, m, forward in rows:
        learnable = sum(p.numel() for _, p in trainable_parameters(m))
        macs = paper_macs(m, images, class_names)
        with torch.no_grad():
            flops = full_flops(lambda: forward(images, class_names))
        table.rows.append([name, learnable / 1e6, (learnable + extra_params) / 1e6, macs / 1e9,
                           (macs + extra_macs) / 1e9, flops / 1e9, speeds[name],
                           speeds["softmax cross-attention"] / speeds[name]])
    return table


def bare_tower(clip_model: clip.CLIP) -> clip.CLIP:
    """The same CLIP without the prompt parameters: the plain image tower OTSeg is built on."""
    weights = {k: v for k, v in clip_model.state_dict().items() if not k.startswith(clip.PROMPT_PARAMETERS)}
    return clip.build_model(weights, prompt_tokens=0).requires_grad_(False)


def backbone_table(model: OTSeg, class_names: list[str], crop: int, batch: int, device: torch.device,
                   repeats: int) -> Table:
    """OTSeg+ against the bare image tower it is built on (the same CLIP without prompts or head) at
    one batch, bf16 autocast on CUDA: what the prompts, text matching and decoder cost at scale."""
    images = torch.randn(batch, 3, crop, crop, device=device)
    model.eval().text_embeddings(class_names)
    bare = bare_tower(model.clip).to(device)
    amp = device.type == "cuda"
    table = Table(f"Batch {batch}, {crop}x{crop}{', bf16' if amp else ''}: OTSeg+ against its bare image tower "
                  f"({machine(device)})", ["model", "images/s", "x tower"], ["{}", "{:.1f}", "{:.3f}"])
    speeds = images_per_second({"tower": lambda x, _: bare.encode_image(x), "OTSeg+": model}, images,
                               class_names, repeats, amp)
    table.rows += [["bare CLIP image tower", speeds["tower"], 1.0],
                   ["OTSeg+", speeds["OTSeg+"], speeds["OTSeg+"] / speeds["tower"]]]
    return table


def bench_table3(device: torch.device, quick: bool) -> list[Table]:
    """Table 3 at ViT-B/16 size (random weights: counts and speed do not depend on them), VOC's classes."""
    size = 256 if quick else 512
    model = build_otseg("sinkhorn", size, 10, data.TEMPLATES["N6"], device).eval()
    cuda = device.type == "cuda"
    repeats = 10 if cuda else 3
    batch = 32 if cuda else 4   # 32 images of 512x512 would take minutes per pass on a CPU
    return [efficiency_table(model, list(data.VOC_CLASSES), size, device, repeats),
            backbone_table(model, list(data.VOC_CLASSES), size, batch, device, repeats)]


# ----------------------------------------------------------------------------------------------
# 6. Host synchronisations per training step and per evaluated image
# ----------------------------------------------------------------------------------------------

aten = torch.ops.aten
WAITS_FOR_THE_DEVICE = {aten._local_scalar_dense.default: "item()/bool()/float()", aten.nonzero.default: "nonzero",
                        aten.bincount.default: "bincount", aten.masked_select.default: "masked_select",
                        aten._unique2.default: "unique", aten.repeat_interleave.Tensor: "repeat_interleave"}


class HostSyncs(TorchDispatchMode):
    """Counts, by the project line that asks for it, every operator after which the CPU must wait for
    a GPU: a value read on the host, an output whose size is data (nonzero, boolean-mask indexing,
    bincount, which reads the largest value), a copy to the host. Counted on any device: on a CPU the
    same operators run, without the wait."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = WAITS_FOR_THE_DEVICE.get(func)
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and any(
                i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
            kind = "boolean-mask indexing"
        if (func is aten._to_copy.default and args[0].device.type == "cuda"
                and torch.device(kwargs.get("device") or "cuda").type == "cpu"):
            kind = "device-to-host copy"
        where = self.asked_by() if kind is not None else None
        if where is not None:
            self.counts[(kind, where)] += 1
        return func(*args, **kwargs)

    @staticmethod
    def asked_by() -> str | None:
        """The line of a project module (not a tool) that asked for the operator, or None: asked by
        a library on tensors it keeps on the CPU by design (AdamW's step counters), or by the data
        loader, whose work is CPU work on any device."""
        stack = traceback.extract_stack()
        if any(os.sep + os.path.join("torch", "utils", "data") + os.sep in frame.filename for frame in stack):
            return None
        for frame in reversed(stack):
            path = os.path.abspath(frame.filename)
            if path.startswith(os.path.dirname(torch.__file__)) or frame.name in ("__torch_dispatch__", "asked_by"):
                continue  # inside torch, or this counter
            inside = (os.path.isfile(path) and path.startswith(ROOT + os.sep)
                      and not path.startswith(os.path.join(ROOT, "tools") + os.sep))
            return f"{os.path.relpath(path, ROOT)}:{frame.lineno} ({frame.name})" if inside else None
        return None


def bench_syncs(device: torch.device, quick: bool) -> Table:
    """Host synchronisations of a steady training step (train.py's, as training_step runs it: two
    micro-batches of 2 images) and of one evaluated image (evaluate.evaluate over 2 images minus over 1:
    what is done once per evaluation cancels). Small sizes: the count does not depend on them."""
    from tools import datasets  # tools.datasets writes the generated images
    crop, templates, classes = 64, data.TEMPLATES["N6"][:3], list(data.VOC_CLASSES[:15])
    model = build_otseg("sinkhorn", crop, 4, templates, device, sizes=clip.TINY).train()
    step = training_step(model, classes, 2, crop, device)
    step()  # the first step computes the text embeddings and the optimizer state
    with HostSyncs() as syncs:
        for _ in range(2):  # the micro-batches of one step of train.py's --micro-batch 2 --batch-size 4
            step()
    per_step = syncs.counts
    preset = data.get_preset("voc", crop)
    root = datasets.make_fake_dataset("voc", tempfile.mkdtemp(prefix="syncs_"), num_train=1, num_val=2)
    dataset = data.SegmentationDataset(preset, root, "val", "fully", transform=data.test_transform(preset))
    dataset = [dataset[i] for i in range(2)]  # read before counting: data loading is CPU work on any device
    seen = data.seen_mask(len(preset["classes"]), preset["unseen"])
    counts = []
    for images in (1, 2):
        with HostSyncs() as syncs:
            evaluate.evaluate(model, dataset, list(preset["classes"]), seen, True,
                              data.window_of(preset), device, workers=0, limit=images, progress=False)
        counts.append(syncs.counts)
    per_image = counts[1] - counts[0]
    table = Table(f"Host synchronisations ({machine(device)})", ["where", "what", "per step", "per image"],
                  ["{}", "{}", "{}", "{}"],
                  note="per step: one optimizer step of two micro-batches; per image: one more image evaluated. "
                       "Sinkhorn checks convergence every 5 iterations (at most 19 times in 100 iterations) in "
                       "each of a forward pass's 4 solves (MPS, then MPSA in 3 decoder layers); the random CLIP "
                       "here converges at the first check.")
    for kind, where in sorted(set(per_step) | set(per_image), key=lambda k: k[1]):
        table.rows.append([where, kind, per_step.get((kind, where), 0), per_image.get((kind, where), 0)])
    table.rows.append(["total", "", sum(per_step.values()), sum(per_image.values())])
    return table


# ----------------------------------------------------------------------------------------------
# 7. CUDA kernels per training step and per inference window, eager
# ----------------------------------------------------------------------------------------------

# Operators that only make a tensor's metadata or memory (no kernel on any device); views are found
# from their schema (an output aliasing an input, not written). `_local_scalar_dense` (`.item()`,
# `bool()`) is a copy to the host: counted by the syncs table, not here. `prim.device` is a query.
NO_KERNEL = {torch.ops.prim.device.default, aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default,
             aten.new_empty.default, aten.new_empty_strided.default, aten._unsafe_view.default,
             aten.lift_fresh.default, aten.scalar_tensor.default, aten._local_scalar_dense.default,
             aten.resize_.default, aten.set_.source_Storage, aten.is_same_size.default}


# Operators whose one ATen function launches several kernels, with how many: logsumexp runs amax, abs,
# eq, masked_fill_ (the guard for infinite rows), sub, exp_, sum, log_ and add_ (ATen's
# logsumexp_out_impl, the same code on the CPU and on CUDA; tests/test_benchmark.py checks it against
# what the profiler records). Sinkhorn's convergence test runs one per block of iterations.
SEVERAL_KERNELS = {aten.logsumexp.default: 9}


def is_view(func) -> bool:
    """An operator whose output aliases an input without writing to it: a view, no kernel."""
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


class KernelLaunches(TorchDispatchMode):
    """Counts the kernels that the operators reaching the dispatcher below autograd would launch on a
    GPU: one each, none for views and allocations, the kernels it runs for an operator whose ATen
    function is itself several (SEVERAL_KERNELS: logsumexp). A lower bound of the launches on a GPU (a
    multi-tensor `_foreach_*` operator or a cuDNN call may launch several) and an estimate: the CPU
    dispatches a few operators differently (attention, autocast's casts).

    run_every_iteration: every `bool()` of a tensor reads False, so that Sinkhorn's convergence test
    never stops it and it runs all of its iterations (a model trained on real data converges after tens
    of them; the random one here at the first test). Sinkhorn's test is the only value a step reads on
    the host (the syncs table), so nothing else changes path."""

    def __init__(self, run_every_iteration: bool = False):
        super().__init__()
        self.run_every_iteration = run_every_iteration
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if (self.run_every_iteration and func is aten._local_scalar_dense.default
                and args[0].dtype == torch.bool):
            return False
        if func not in NO_KERNEL and not is_view(func):
            self.n += SEVERAL_KERNELS.get(func, 1)
        return func(*args, **(kwargs or {}))


def count_kernels(fn, run_every_iteration: bool = False) -> int:
    """Kernels that fn() would launch (KernelLaunches), after one call outside the count (caches,
    optimizer state)."""
    fn()
    with KernelLaunches(run_every_iteration) as launches:
        fn()
    return launches.n


KERNEL_GOAL = 1.5   # OTSeg+'s eager training step within 1.5x the softmax model's kernels


def bench_kernels(device: torch.device, quick: bool, sizes: dict = VIT_B_16, size: int = 64) -> Table:
    """Kernels per training step (one micro-batch: forward, both losses, backward, AdamW in its
    multi-tensor form as on CUDA) and per inference window (one forward pass without gradients) at
    ViT-B/16's sizes and VOC's setting (15 training classes, 20 at inference, 6 prompts, 10 prompt
    tokens). The count does not depend on the image size or the batch, so a 64x64 image of batch 1
    stands for a 512x512 crop of micro-batch 4. In fp32: bf16 autocast adds its casts on CUDA."""
    templates = data.TEMPLATES["N6"]
    train_classes, classes = list(data.VOC_CLASSES[:15]), list(data.VOC_CLASSES)
    otseg = build_otseg("sinkhorn", size, 10, templates, device, sizes=sizes)
    models = {  # name: (model, [(how Sinkhorn runs, run_every_iteration)])
        "OTSeg+ (Sinkhorn)": (otseg, [("first test", False), ("100 iterations", True)]),
        "OTSeg+ (Sinkhorn, sync-free)": (OTSeg(otseg.clip, templates, sync_free=True).to(device),
                                         [("100 iterations", False)]),
        "softmax matching": (OTSeg(otseg.clip, templates, matching="softmax").to(device), [("-", False)])}
    images = torch.randn(1, 3, size, size, device=device)
    tower = bare_tower(otseg.clip).to(device)
    table = Table(f"CUDA kernels, eager: ViT-B/16 + 10 prompt tokens, VOC (15 classes training, 20 inference, "
                  f"6 prompts), fp32", ["model", "Sinkhorn runs", "per step", "x softmax", "per window",
                                        "x softmax"], ["{}", "{}", "{}", "{:.2f}", "{}", "{:.2f}"])
    counts = {}
    for name, (model, runs) in models.items():
        one_step = training_step(model, train_classes, 1, size, device, foreach=True)

        def step(model=model, one_step=one_step):
            model.train()
            one_step()

        def window(model=model):
            with torch.no_grad():
                model.eval()(images, classes)
        for label, every in runs:
            counts[name, label] = (count_kernels(step, every), count_kernels(window, every))

    def tower_step():
        tower_images = images.clone().requires_grad_(True)  # the gradient OTSeg's prompts need crosses
        tower.encode_dense(tower_images)[1].sum().backward()   # every layer of the frozen tower

    def tower_window():
        with torch.no_grad():
            tower.encode_dense(images)
    counts["bare image tower", "-"] = (count_kernels(tower_step), count_kernels(tower_window))
    softmax_step, softmax_window = counts["softmax matching", "-"]
    for (name, label), (per_step, per_window) in counts.items():
        table.rows.append([name, label, per_step, per_step / softmax_step, per_window, per_window / softmax_window])
    verdicts = [f"{name} at {label} {counts[name, label][0] / softmax_step:.2f}x "
                f"({'met' if counts[name, label][0] / softmax_step <= KERNEL_GOAL else 'NOT met'})"
                for name, label in counts if name.startswith("OTSeg+")]
    table.note = (f"Goal: OTSeg+'s eager step within {KERNEL_GOAL:g}x the softmax model's kernels: "
                  + "; ".join(verdicts) + ". Counted as the operators that do work (KernelLaunches): views "
                  "and allocations launch nothing, logsumexp counts its nine, a multi-tensor or cuDNN operator "
                  "once. The sync-free Sinkhorn always runs its 100 iterations. The tower's step: its forward "
                  "and the backward to its input, which OTSeg's prompt gradients cross (it has no weights to "
                  "train).")
    return table


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

BENCHMARKS = {
    "sinkhorn": bench_sinkhorn,
    "compile": bench_compile,
    "inference": bench_inference,
    "training": bench_training,
    "table3": bench_table3,
    "syncs": bench_syncs,
    "kernels": bench_kernels,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=list(BENCHMARKS), action="append",
                        help="run only these tables (repeatable); default: all")
    parser.add_argument("--quick", action="store_true", help="smaller problems and fewer repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (1 gives steadier timings on a shared machine)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__} on {machine(device)}")
    for name in args.only or list(BENCHMARKS):
        tables = BENCHMARKS[name](device, args.quick)
        for table in tables if isinstance(tables, list) else [tables]:
            print_table(table)


if __name__ == "__main__":
    main()
