"""What optimal transport costs: OTSeg's Sinkhorn, MPS and MPSA measured against their baselines.

OTSeg's claim is accuracy at almost no cost: the paper's Table 3 gives 22.5 images/s for OTSeg+
against 25.6 for ZegCLIP (a ratio of 1.14) on one RTX 3090. This script measures the same question
for this code, side by side in one run, so that every figure is read as a ratio between rows
measured on the same machine at the same time:

1. `sinkhorn`: our batched `sinkhorn_log` against POT (`ot.sinkhorn(method='sinkhorn_log')`, one
   problem at a time, and `ot.batch.solve_batch`) at OTSeg's sizes: B*K problems of M=1024 pixels
   x N prompts (VOC: B=16, K=15, N=6; COCO-Stuff: B=4, K=156, N=8). Forward and forward+backward,
   iterations actually run, host synchronisations per call, and memory (peak CUDA memory on a GPU;
   on a CPU, the bytes that autograd keeps for the backward pass, which is what grows with the
   number of unrolled iterations).
2. `inference`: full-size ViT-B/16 OTSeg+ at 512x512 (random weights: speed does not depend on
   them) against the same model with softmax matching, batch 1 and batch 8.
3. `training`: one optimisation step (forward, both losses, backward, AdamW) for MPSA and softmax;
   a small scale on the CPU, and the real scale (512x512, VOC and COCO-Stuff settings, fp32 and
   bf16 autocast) on a GPU.
4. `table3`: the paper's Table 3 columns (learnable parameters, GMACs in the paper's convention, full
   GFLOPs, images/s) for OTSeg+ and the softmax matching, with the release's own way of counting.

    python benchmark.py                     # everything (CPU: several minutes)
    python benchmark.py --only sinkhorn     # one table
    python benchmark.py --quick             # smaller, for a first look
    python benchmark.py --threads 1         # steadier CPU timings on a machine shared with other jobs

POT is a test-time dependency (`requirements-test.txt`); without it the POT rows are skipped.
A CPU time is only indicative (and is quoted with the machine it ran on); the figures that count
for deployment are GPU figures.
"""
import argparse
import math
import platform
import time
from contextlib import contextmanager

import torch
from torch import nn

import checkpoint
import clip
import common
import sinkhorn
from model import OTSeg, trainable_parameters

# ----------------------------------------------------------------------------------------------
# Measuring helpers
# ----------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn, device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds (after warm-up calls), synchronising CUDA around it."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


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


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def print_table(title: str, header: list[str], rows: list[list], note: str = "") -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join(f"{{:>{w}}}" for w in widths)
    print(f"\n{title}")
    print(line.format(*header))
    print(line.format(*["-" * w for w in widths]))
    for row in rows:
        print(line.format(*[str(x) for x in row]))
    if note:
        print(note)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


# ----------------------------------------------------------------------------------------------
# 1. Sinkhorn at OTSeg's sizes
# ----------------------------------------------------------------------------------------------

# (name, B, K, N): B*K problems of M = 1024 pixels (a 32x32 grid at 512 px) x N prompts.
SINKHORN_SIZES = [("VOC", 16, 15, 6), ("COCO-Stuff", 4, 156, 8)]


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


def bench_sinkhorn(device: torch.device, quick: bool) -> None:
    try:
        import numpy as np
        import ot
        import ot.batch
    except ImportError:
        ot = None
    eps = 0.05
    for name, b, k, n in SINKHORN_SIZES:
        problems = b * k if not quick else b * k // 4
        sim = similarity_problems(problems, 1024, n, device=device)
        cost = 1.0 - sim
        rows = []

        def ours_forward():
            return sinkhorn.sinkhorn_log(cost, eps)

        with count_host_syncs() as syncs:
            plan, iters = sinkhorn.sinkhorn_log(cost, eps, return_iters=True)
        t_fwd = time_it(ours_forward, device)
        rows.append(["ours, batched", "forward", f"{t_fwd * 1e3:.1f}", "1.00", iters, syncs["n"],
                     mib(peak_memory(ours_forward, device)), "-", "0"])

        def ours_backward(grad_mode=None):
            c = cost.clone().requires_grad_(True)
            kwargs = {} if grad_mode is None else {"implicit_grad": True}
            with saved_for_backward() as saved:
                p = sinkhorn.sinkhorn_log(c, eps, **kwargs)
            (p * sim).sum().backward()
            return saved["bytes"]

        saved_bytes = ours_backward()
        t_bwd = time_it(ours_backward, device)
        rows.append(["ours, batched", "fwd+bwd", f"{t_bwd * 1e3:.1f}", f"{t_bwd / t_fwd:.2f}", iters, "-",
                     mib(peak_memory(ours_backward, device)), mib(saved_bytes), "-"])
        if "implicit_grad" in sinkhorn.sinkhorn_log.__code__.co_varnames:
            saved_implicit = ours_backward("implicit")
            t_imp = time_it(lambda: ours_backward("implicit"), device)
            rows.append(["ours, implicit grad", "fwd+bwd", f"{t_imp * 1e3:.1f}", f"{t_imp / t_fwd:.2f}", iters,
                         "-", mib(peak_memory(lambda: ours_backward("implicit"), device)),
                         mib(saved_implicit), "-"])

        if ot is not None:
            cost64 = cost.double().cpu().numpy()
            uniform_m, uniform_n = np.full(1024, 1 / 1024), np.full(n, 1 / n)
            subset = min(problems, 24)   # POT's loop is timed on a subset and scaled up (linear in P)

            def pot_loop():
                return [ot.sinkhorn(uniform_m, uniform_n, cost64[i], eps, method="sinkhorn_log",
                                    numItermax=100, stopThr=1e-6) for i in range(subset)]

            t_pot = time_it(pot_loop, torch.device("cpu"), repeats=3) * problems / subset
            pot_plans = np.stack(pot_loop())
            diff = np.abs(pot_plans - plan[:subset].double().cpu().numpy()).max() / pot_plans.max()
            rows.append(["POT sinkhorn_log, one at a time", "forward", f"{t_pot * 1e3:.1f}",
                         f"{t_pot / t_fwd:.2f}", "<=100", "-", "-", "-", f"{diff:.1e}"])

            def pot_batch(grad="detach"):
                c = cost.clone().requires_grad_(grad != "detach")
                res = ot.batch.solve_batch(c, reg=eps, method="log_sinkhorn", max_iter=100, tol=1e-6,
                                           grad=grad)
                if grad != "detach":
                    (res.plan * sim).sum().backward()
                return res.plan

            t_potb = time_it(pot_batch, device, repeats=3)
            diff_b = ((pot_batch() - plan).abs().max() / plan.abs().max()).item()
            rows.append(["POT solve_batch (log)", "forward", f"{t_potb * 1e3:.1f}", f"{t_potb / t_fwd:.2f}",
                         "<=100", "-", mib(peak_memory(pot_batch, device)), "-", f"{diff_b:.1e}"])
            t_potbb = time_it(lambda: pot_batch("autodiff"), device, repeats=3)
            rows.append(["POT solve_batch (log)", "fwd+bwd", f"{t_potbb * 1e3:.1f}", f"{t_potbb / t_fwd:.2f}",
                         "<=100", "-", mib(peak_memory(lambda: pot_batch("autodiff"), device)), "-", "-"])
        print_table(
            f"Sinkhorn, {name}: {problems} problems of 1024 x {n}, eps {eps} ({machine(device)})",
            ["solver", "pass", "ms", "x ours fwd", "iters", "host syncs", "peak MiB", "saved MiB",
             "plan diff"], rows,
            "peak MiB: CUDA only. saved MiB: tensors autograd keeps for backward. plan diff: max |T - T_ours| / max T.")


# ----------------------------------------------------------------------------------------------
# 2. Inference: OTSeg+ with MPS/MPSA against the same model with softmax matching
# ----------------------------------------------------------------------------------------------

VIT_B_16 = dict(embed_dim=512, vision_layers=12, vision_width=768, vision_patch_size=16, context_length=77,
                vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12)


def build_otseg(matching: str, image_size: int, prompt_tokens: int, templates: list[str], device,
                **options):
    """ViT-B/16-sized OTSeg with random weights (speed does not depend on the weights)."""
    from clip import CLIP
    from model import OTSeg
    torch.manual_seed(0)
    clip_model = CLIP(image_resolution=image_size, prompt_tokens=prompt_tokens, **VIT_B_16)
    return OTSeg(clip_model, templates, matching=matching, **options).to(device)


def bench_inference(device: torch.device, quick: bool) -> None:
    import data
    size = 256 if quick else 512
    batches = [1] if quick else [1, 8]
    classes = data.VOC_CLASSES
    rows = []
    models = {m: build_otseg(m, size, 10, data.TEMPLATES["N6"], device).eval() for m in ("sinkhorn", "softmax")}
    for batch in batches:
        images = torch.randn(batch, 3, size, size, device=device)
        times = {}
        for matching, model in models.items():
            def run():
                with torch.no_grad():
                    out = model(images, classes)
                    return model.ensemble(out["decoder"], out["score"], lam=0.5)
            times[matching] = time_it(run, device, repeats=3 if not quick else 2)
        for matching in models:
            rows.append([matching if matching == "softmax" else "sinkhorn (OTSeg+)", batch,
                         f"{times[matching] / batch * 1e3:.0f}", f"{batch / times[matching]:.2f}",
                         f"{times[matching] / times['softmax']:.3f}"])
    print_table(f"OTSeg+ inference, ViT-B/16, {size}x{size}, K={len(classes)} classes, N=6 prompts "
                f"({machine(device)})", ["matching", "batch", "ms/image", "images/s", "x softmax"], rows)


# ----------------------------------------------------------------------------------------------
# 3. Training: one optimisation step
# ----------------------------------------------------------------------------------------------


def bench_training(device: torch.device, quick: bool) -> None:
    import inspect

    import data
    import losses
    from model import OTSeg
    if device.type == "cuda":   # the real scale: 512x512, VOC and COCO-Stuff settings
        settings = [("VOC", 512, 4, 10, data.VOC_CLASSES[:15], data.TEMPLATES["N6"]),
                    ("COCO-Stuff", 512, 4, 100, data.COCO_CLASSES[:156], data.TEMPLATES["N8"])]
        precisions = [None, torch.bfloat16]
    else:                       # a small CPU scale: same model, smaller crops and batch
        settings = [("VOC", 128 if quick else 224, 2, 10, data.VOC_CLASSES[:15], data.TEMPLATES["N6"])]
        precisions = [None]
    variants = [("sinkhorn", {}), ("softmax", {})]
    if "implicit_grad" in inspect.signature(OTSeg).parameters:
        variants.insert(1, ("sinkhorn, implicit grad", {"implicit_grad": True}))
    for name, size, batch, tokens, classes, templates in settings:
        rows = []
        for label, options in variants:
            matching = "softmax" if label == "softmax" else "sinkhorn"
            model = build_otseg(matching, size, tokens, templates, device, **options).train()
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01)
            g = torch.Generator().manual_seed(0)
            images = torch.randn(batch, 3, size, size, generator=g).to(device)
            labels = torch.randint(0, len(classes), (batch, size, size), generator=g).to(device)
            model.text_embeddings(classes)   # computed once per run, not per step
            for precision in precisions:
                saved = {}

                def step():
                    with torch.autocast(device.type, dtype=precision or torch.float32, enabled=precision is not None):
                        with saved_for_backward() as counter:
                            out = model(images, classes)
                            num_masks = losses.count_masks(labels, len(classes)).clamp(min=1)
                            loss = losses.otseg_loss(out, labels, num_masks)["total"]
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    saved["bytes"] = counter["bytes"]

                seconds = time_it(step, device, repeats=3 if not quick else 2)
                rows.append([label, "bf16" if precision else "fp32", f"{seconds:.2f}",
                             mib(peak_memory(step, device)), mib(saved["bytes"])])
            del model, optimizer
        base = {(r[0], r[1]): float(r[2]) for r in rows}
        for r in rows:
            r.insert(3, f"{float(r[2]) / base[('softmax', r[1])]:.2f}")
        print_table(f"Training step, {name}: ViT-B/16 + {tokens} prompt tokens, {size}x{size}, batch {batch}, "
                    f"K={len(classes)}, N={len(templates)} ({machine(device)})",
                    ["matching", "precision", "s/step", "x softmax", "peak MiB", "saved MiB"], rows)


# ----------------------------------------------------------------------------------------------
# 4. Paper Table 3: learnable parameters, compute per image, images per second
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


def full_flops(model: OTSeg, images: torch.Tensor, class_names: list[str]) -> int:
    """FLOPs of every matrix product, convolution and attention (2 per multiply-accumulate)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images, class_names)
    return counter.get_total_flops()


def images_per_second(model: OTSeg, images: torch.Tensor, class_names: list[str], iters: int, amp: bool) -> float:
    with torch.no_grad(), common.autocast(images.device, amp):
        model(images, class_names)  # warm-up (text embeddings, kernels)
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.time()
        for _ in range(iters):
            model(images, class_names)
        if images.device.type == "cuda":
            torch.cuda.synchronize()
    return iters * images.shape[0] / (time.time() - start)


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


def efficiency_table(model: OTSeg, class_names: list[str], crop: int, device: torch.device,
                     iters: int, amp: bool) -> str:
    """Table 3's columns for MPSA and for the softmax matching, on one crop-sized image."""
    images = torch.randn(1, 3, crop, crop, device=device)
    model.text_embeddings(class_names)  # cached before counting: the text tower runs once per class list
    softmax = OTSeg(model.clip, model.templates, matching="softmax").to(device).eval()
    checkpoint.load_trainable(softmax, checkpoint.trainable_state_dict(model), "the MPSA model")  # same parameters
    softmax.text_embeddings(class_names)
    patch = model.clip.visual.conv1.kernel_size[0]
    extra_params, extra_macs = release_overheads(model, len(class_names) * len(model.templates),
                                                 (crop // patch) ** 2)
    rows = [f"{'':24s} {'learnable (M)':>13s} {'as release (M)':>14s} {'GMACs':>6s} {'as release':>10s} "
            f"{'GFLOPs full':>11s} {'images/s':>8s}"]
    for name, m in (("OTSeg+ (MPSA)", model.eval()), ("softmax cross-attention", softmax)):
        learnable = sum(p.numel() for _, p in trainable_parameters(m))
        macs = paper_macs(m, images, class_names)
        rows.append(f"{name:24s} {learnable / 1e6:13.2f} {(learnable + extra_params) / 1e6:14.2f} "
                    f"{macs / 1e9:6.1f} {(macs + extra_macs) / 1e9:10.1f} "
                    f"{full_flops(m, images, class_names) / 1e9:11.1f} "
                    f"{images_per_second(m, images, class_names, iters, amp):8.2f}")
    rows.append(f"({len(class_names)} classes x {len(model.templates)} prompts, one {crop}x{crop} image on "
                f"{device}. GMACs: nn.Linear and conv modules, CLIP's attention not counted, the convention "
                "of the paper's 'GFLOPs'; 'as release' adds the weights it builds and runs without using "
                "them. Paper Table 3, RTX 3090: OTSeg+ 13.8M, 61.9 GFLOPs, 22.5 FPS)")
    return "\n".join(rows)




def bench_table3(device: torch.device, quick: bool) -> None:
    """Table 3 at ViT-B/16 size (random weights: counts and speed do not depend on them), VOC's classes."""
    import data
    size = 256 if quick else 512
    model = build_otseg("sinkhorn", size, 10, data.TEMPLATES["N6"], device).eval()
    print(efficiency_table(model, list(data.VOC_CLASSES), size, device, iters=2 if quick else 10, amp=False))


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["sinkhorn", "inference", "training", "table3"], action="append",
                        help="run only these tables (repeatable); default: all")
    parser.add_argument("--quick", action="store_true", help="smaller problems and fewer repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (1 gives steadier timings on a shared machine)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(args.only or ["sinkhorn", "inference", "training", "table3"])
    print(f"torch {torch.__version__} on {machine(device)}")
    if "sinkhorn" in only:
        bench_sinkhorn(device, args.quick)
    if "inference" in only:
        bench_inference(device, args.quick)
    if "training" in only:
        bench_training(device, args.quick)
    if "table3" in only:
        bench_table3(device, args.quick)


if __name__ == "__main__":
    main()
