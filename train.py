"""train.py -- train OTSeg with the paper's protocol, on one device or many with torchrun.

One plain loop (nanoGPT's shape): options, distributed set-up, data, model, loop. The schedule of the
authors' release (docs/release.md, "Optimisation") is SCHEDULE below (optimiser, learning rate, batch,
loss weights) with one row of SCHEDULES per dataset (iterations, prompt tokens); it is printed at the
start and saved into every checkpoint, so evaluate.py needs nothing from this file.

Single process (one GPU, or the CPU):
    python train.py --dataset voc --setting inductive --data-root data/VOCdevkit/VOC2012/.. \
        --clip-weights ~/.cache/clip/ViT-B-16.pt --output-dir runs/voc-inductive
Several GPUs on one node (the global batch stays 16: 4 GPUs x 4 images, or accumulation on fewer):
    torchrun --standalone --nproc_per_node 4 train.py --dataset voc --setting inductive ...
Several nodes (run on every node; node 0's address as the rendezvous endpoint):
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 train.py ...
Transductive (from the inductive run's half-way checkpoint, fresh optimizer and warmup):
    python train.py --dataset voc --setting transductive --init-from runs/voc-inductive/iter_10000.pt ...
Without downloads (a small random CLIP, generated data; what the tests run):
    python train.py --dataset voc --data-root /tmp/fake --clip-weights random-tiny --crop-size 64 \
        --iters 20 --batch-size 4 --warmup-iters 0 --device cpu

The loss is normalised over the whole global batch as losses.py's docstring says (paper Eq. 18; the
release's `models/losses/criterion.py`), so gradient accumulation changes nothing but memory.

Randomness. The data order is a pure function of (seed, step) (GlobalBatchSampler), and each
sample's augmentation is seeded by its position in that order (SeededSamples): neither depends on
the number of processes, micro-steps or data-loader workers, so the workers need no seeding of their
own. Dropout is seeded by seed + rank, so that processes draw different masks; its random states
are saved in every checkpoint. `--resume` therefore continues exactly where a run stopped.

Checkpoints (rank 0, written atomically; the format is checkpoint.py's): trainable weights only (VPT
prompts and the head), the optimizer, step, random states of every process, arguments, schedule,
the CLIP's description, templates, classes and test windows.

Bad input (a path, a checkpoint of another run, a damaged file met by a data-loading worker) stops
the program with one line `error: ...` before anything is written, or, met during training, leaves
no directory behind that holds nothing but the log of the failed start.

Faults of long runs (StopSignal, Divergence below). SIGTERM or ^C (a scheduler's preemption; torchrun
passes its own on to the workers): the step in progress is finished, every process agrees, ckpt.pt is
written at that step, and the program exits with 143 or 130 (data-loading workers ignore the signal;
one that comes during an evaluation, --eval-every, is obeyed when the evaluation has ended). A loss
that is not finite: the run stops with one `error:` line at the next logged step (at most --log-every
steps late) and writes no checkpoint, so the last good ckpt.pt and iter_N.pt stay. A checkpoint that
cannot be written (a full disk): one line naming the folder, every process stops, the previous file
stays (atomic writes).
`--resume auto` continues from OUTPUT_DIR/ckpt.pt when it is there and starts fresh otherwise, so the
same command serves a requeued job and `torchrun --max-restarts N` (which restarts every worker when
one dies): at most the steps since the last save are lost.
    torchrun --standalone --nproc_per_node 4 --max-restarts 3 train.py ... --output-dir runs/voc --resume auto
"""
import argparse
import json
import math
import os
import shutil
import signal
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import clip
import data
import evaluate
import losses
from common import (STOP_SIGNALS, autocast, close_distributed, ignore_stop_signals, print0, setup_distributed,
                    stop_workers)
from model import OTSeg, trainable_parameters
from mpsa import MATCHINGS

# ----------------------------------------------------------------------------------------------
# The schedule of the release, one row per dataset (docs/release.md, "Schedule"; the release's
# `configs/_base_/schedules/schedule_20k.py` and model configs); data presets live in data.py
# ----------------------------------------------------------------------------------------------

SCHEDULE = dict(
    lr=2e-4,              # AdamW; the configs say 2e-5 with a x10 multiplier that covers every trained weight
    weight_decay=0.01,    # on every trained weight (the configs' decay_mult 0 on norms never matches first)
    betas=(0.9, 0.999),
    poly_power=0.9,       # lr = (lr - min_lr) * (1 - step / iters) ** 0.9 + min_lr, by iteration
    min_lr=1e-6,
    warmup_iters=1500,    # mmcv 'linear' warmup: lr * (1 - (1 - step / 1500) * (1 - 1e-6))
    warmup_ratio=1e-6,
    batch_size=16,        # global: 4 GPUs x 4 images in the release (paper Sec. 5.2: batch 16)
    micro_batch=4,        # images per process per forward (the release's samples_per_gpu)
    focal_weight=100.0,   # the release's model configs (paper Sec. 4.3 names the weights, not their values)
    dice_weight=1.0,
)
SCHEDULES = {  # iterations inductive / fully supervised, transductive (after the half-way checkpoint)
    "voc": dict(iters=20000, transductive_iters=10000, prompt_tokens=10),
    "context": dict(iters=40000, transductive_iters=20000, prompt_tokens=10),
    "coco": dict(iters=80000, transductive_iters=40000, prompt_tokens=100),
}
DEFAULT_SCHEDULE = SCHEDULES["voc"]  # datasets without a row (the demo's) start from VOC's


def make_schedule(args) -> dict:
    """The preset of the dataset and setting with the command line's overrides applied."""
    row = SCHEDULES.get(args.dataset, DEFAULT_SCHEDULE)
    schedule = dict(SCHEDULE, prompt_tokens=row["prompt_tokens"],
                    iters=row["transductive_iters"] if args.setting == "transductive" else row["iters"])
    for key in ("iters", "batch_size", "micro_batch", "lr", "warmup_iters", "prompt_tokens"):
        if getattr(args, key) is not None:
            schedule[key] = getattr(args, key)
    schedule["betas"] = list(schedule["betas"])
    return schedule


def learning_rate(step: int, schedule: dict) -> float:
    """Learning rate of optimizer step `step` (0-based): mmcv's poly with linear warmup, by iteration."""
    progress = min(step / schedule["iters"], 1.0)
    lr = (schedule["lr"] - schedule["min_lr"]) * (1 - progress) ** schedule["poly_power"] + schedule["min_lr"]
    if step < schedule["warmup_iters"]:  # mmcv scales the poly value itself, from warmup_ratio up to 1
        lr *= 1 - (1 - step / schedule["warmup_iters"]) * (1 - schedule["warmup_ratio"])
    return lr


def default_workers() -> int:
    """Data-loading processes per training process: 4, or as many as this machine has cores if fewer."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(4, cores)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train OTSeg (see the module docstring for commands)")
    group = parser.add_argument_group("data and setting")
    group.add_argument("--dataset", default="voc",
                       help=f"training dataset: one of {', '.join(sorted(data.DATASETS))} (presets in data.py), or a "
                            f".json file holding a preset dict of one's own")
    group.add_argument("--setting", default="inductive", choices=data.SETTINGS,
                       help="zero-shot setting (paper Sec. 2.1 and 5.3; docs/release.md, 'Settings')")
    group.add_argument("--data-root", required=True, help="dataset root in the MMSegmentation layout")
    group.add_argument("--num-prompts", type=int, default=None,
                       help="use the first N templates (paper Table 5(a); default: all of the preset, 6 or 8)")
    group.add_argument("--crop-size", type=int, default=None,
                       help="override the preset's crop, test resize and window (small test runs)")
    group = parser.add_argument_group("model")
    group.add_argument("--clip-weights", default=clip.DEFAULT_WEIGHTS,
                       help="OpenAI's ViT-B-16.pt (or a CLIP state dict); 'random-tiny' = small random CLIP")
    group.add_argument("--matching", default="sinkhorn", choices=MATCHINGS,
                       help="MPSA/MPS or the softmax baseline of Table 5(b)")
    group.add_argument("--prompt-tokens", type=int, default=None, help="VPT tokens per layer (preset: 10 or 100)")
    group.add_argument("--implicit-grad", action="store_true",
                       help="memory-light Sinkhorn backward through the converged plan (the release unrolls)")
    group = parser.add_argument_group("schedule overrides (default: SCHEDULE and the dataset's row of SCHEDULES)")
    group.add_argument("--iters", type=int, default=None, help="optimizer steps")
    group.add_argument("--batch-size", type=int, default=None, help="global batch (16)")
    group.add_argument("--micro-batch", type=int, default=None,
                       help="at most this many images per process per forward (4); more = accumulation")
    group.add_argument("--lr", type=float, default=None, help="peak learning rate (2e-4)")
    group.add_argument("--warmup-iters", type=int, default=None, help="linear warmup steps (1500)")
    group = parser.add_argument_group("run")
    group.add_argument("--output-dir", default=None, help="default: runs/DATASET-SETTING")
    group.add_argument("--resume", default=None,
                       help="a checkpoint of this run to continue exactly; 'auto': OUTPUT_DIR/ckpt.pt if it "
                            "exists, else a fresh start (for requeued jobs and torchrun --max-restarts)")
    group.add_argument("--init-from", default=None,
                       help="start from these trained weights (transductive: the inductive iter_HALF.pt)")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--workers", type=int, default=default_workers(),
                       help="data loading processes per GPU (default: 4, or the number of cores if fewer)")
    group.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    group.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (Sinkhorn stays fp32)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the model's tensor program (OTSeg.segment), Sinkhorn sync-free")
    group.add_argument("--eval-every", type=int, default=0,
                       help="evaluate every N steps and keep best.pt by hIoU (0: off, as the release)")
    group.add_argument("--log-every", type=int, default=10)
    group.add_argument("--save-every", type=int, default=1000, help="overwrite ckpt.pt every N steps")
    group.add_argument("--stop-after", type=int, default=None,
                       help="stop after N steps of this invocation, saving ckpt.pt (time-limited jobs)")
    return parser


def accumulation_steps(batch_size: int, micro_batch: int, world_size: int) -> int:
    """Fewest micro-steps A such that every process's micro-batch, batch_size / (world_size * A), is a
    whole number of at most micro_batch images."""
    if batch_size % world_size:
        sys.exit(f"error: the global batch {batch_size} is not divisible by the {world_size} processes")
    steps = math.ceil(batch_size / (world_size * micro_batch))
    while batch_size % (world_size * steps):
        steps += 1
    return steps


# ----------------------------------------------------------------------------------------------
# Data order: a pure function of (seed, step), whatever the number of processes and micro-steps
# ----------------------------------------------------------------------------------------------

class GlobalBatchSampler(torch.utils.data.Sampler):
    """Endless stream of (position, index) pairs for one process.

    The dataset is visited in a new random order each epoch (seeded by seed and epoch), and the
    epochs are concatenated into one stream. Step s's global batch is stream positions
    [s * G, (s + 1) * G); micro-step a of process r takes the slice starting at s * G + (a * P + r) * b
    (G global batch, P processes, b images per micro-step). Starting at `start_step` is resuming.
    """

    def __init__(self, dataset_size: int, batch_size: int, micro_batch: int, rank: int,
                 world_size: int, seed: int, start_step: int = 0):
        self.n, self.batch_size, self.micro_batch = dataset_size, batch_size, micro_batch
        self.rank, self.world_size, self.seed, self.start_step = rank, world_size, seed, start_step

    def order(self, epoch: int) -> list[int]:
        # One generator seed per (seed, epoch). The multiplier only has to exceed a run's number of
        # epochs (27 for VOC, 128 for Context), so that seed s at epoch e never meets seed s + 1 at
        # epoch 0; any such number would do, this one is a prime.
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=generator).tolist()

    def __iter__(self):
        accumulation = self.batch_size // (self.world_size * self.micro_batch)
        epoch, order = -1, []
        step = self.start_step
        while True:
            for a in range(accumulation):
                first = step * self.batch_size + (a * self.world_size + self.rank) * self.micro_batch
                for position in range(first, first + self.micro_batch):
                    if position // self.n != epoch:
                        epoch = position // self.n
                        order = self.order(epoch)
                    yield position, order[position % self.n]
            step += 1


class SeededSamples(torch.utils.data.Dataset):
    """Each sample's random augmentation seeded by its position in the data order.

    So a sample is the same whichever process, worker or micro-step loads it, and after a resume.
    The caller's random state is put back afterwards (with workers = 0 this is the main process).
    """

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        position, index = item
        # One seed per (seed, position), as in GlobalBatchSampler.order: with a multiplier above the
        # number of samples a run draws (a million; only COCO's 1.28 million go past it), --seed s + 1
        # does not repeat the augmentations of --seed s; any such number would do, this one is a prime.
        seed = (self.seed * 1_000_003 + position) % 2 ** 32
        with torch.random.fork_rng(devices=[]):  # the transforms draw from torch's generator only (data.py)
            torch.manual_seed(seed)
            return self.dataset[index]


# ----------------------------------------------------------------------------------------------
# One optimisation step
# ----------------------------------------------------------------------------------------------

def pseudo_label(outputs: dict, labels: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """Transductive labels: pixels whose true class is unseen get the model's unseen guess.

    P = sigmoid(0.5 S + 0.5 D) with both maps detached; the seen channels are set to -1 so that the
    argmax is over the unseen classes; no threshold (docs/release.md, "Transductive"; the release's
    `decode_seg.py`, `forward_train`). seen: bool (K,) on the labels' device (data.seen_mask).
    """
    with torch.no_grad():
        p = torch.sigmoid(0.5 * outputs["score"].float() + 0.5 * outputs["decoder"].float())  # (B, K, H, W)
        guess = p.masked_fill(seen.view(1, -1, 1, 1), -1).argmax(dim=1)  # (B, H, W); masked_fill: no host sync
    unseen = torch.cat([~seen, seen.new_zeros(256 - len(seen))])  # (256,) over label values; 255 is no class
    return torch.where(unseen[labels], guess, labels)


STEP_VALUES = ("loss", "decoder_focal", "decoder_dice", "score_focal", "score_dice", "num_masks")
LOSS_PARTS = ("total", "decoder_focal", "decoder_dice", "score_focal", "score_dice")  # losses.otseg_loss's


def train_step(model, optimizer, micro_batches: list, class_names: list[str], lr: float,
               params: list[torch.Tensor], world_size: int, precision, schedule: dict,
               seen: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One optimizer step over the global batch given as this process's micro-batches.

    The normaliser num_masks of Eq. 18 is applied as losses.py's docstring says (the release's, taken
    from summed losses and gradients). `precision` is the autocast context of the forward pass; the
    losses run in fp32 outside it (losses.py casts the logits).
    Returns STEP_VALUES as 0-d tensors on the device (no host synchronisation): the losses
    normalised like the gradients, and the global batch's num_masks, all reduced over processes.
    """
    optimizer.zero_grad(set_to_none=True)
    sums = torch.zeros(len(STEP_VALUES), device=params[0].device)  # the loss parts, then the pair count
    for images, labels in micro_batches:
        with precision:
            outputs = model(images, class_names)  # dict(decoder, score): (b, K, H, W) logits
        if seen is not None:  # transductive: pseudo-labels for the unseen classes' pixels
            labels = pseudo_label(outputs, labels, seen)
        parts = losses.otseg_loss(outputs, labels, num_masks=1.0, focal_weight=schedule["focal_weight"],
                                  dice_weight=schedule["dice_weight"])
        parts["total"].backward()
        sums += torch.stack([parts[k].detach() for k in LOSS_PARTS] + [losses.count_masks(labels, len(class_names))])
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    if world_size > 1:
        dist.all_reduce(flat)  # sums of gradients over processes ...
        dist.all_reduce(sums)  # ... and of losses and pair counts
    # ... divided by max(global pair count, P) = P * max(count / P, 1): the release's clamp (losses.py)
    pairs = sums[-1].clamp(min=world_size)
    flat /= pairs
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return dict(zip(STEP_VALUES, torch.cat([sums[:-1] / pairs, sums[-1:]]).unbind()))


# ----------------------------------------------------------------------------------------------
# Set-up: the cheap checks first (options, paths, checkpoints, the dataset's files), then the CLIP
# ----------------------------------------------------------------------------------------------

def class_texts(args, preset: dict) -> tuple[list[str], list[str], torch.Tensor, list[str]]:
    """-> (templates, classes, seen (data.seen_mask), the classes trained on) of the preset."""
    if args.num_prompts is not None and not 1 <= args.num_prompts <= len(preset["templates"]):
        sys.exit(f"error: --num-prompts must be 1..{len(preset['templates'])} for {args.dataset}")
    classes = list(preset["classes"])
    seen = data.seen_mask(len(classes), preset["unseen"])  # bool (K,)
    # inductive: text and labels for the seen classes only (docs/release.md, "Inductive")
    train_classes = [c for c, s in zip(classes, seen.tolist()) if s or args.setting != "inductive"]
    return preset["templates"][:args.num_prompts], classes, seen, train_classes


def output_directory(args) -> str:
    """--output-dir, or the --resume checkpoint's folder, or runs/DATASET-SETTING; not an existing file."""
    output_dir = args.output_dir or (os.path.dirname(args.resume) if args.resume not in (None, "auto")
                                     else os.path.join("runs", f"{data.preset_stem(args.dataset)}-{args.setting}"))
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        sys.exit(f"error: --output-dir {output_dir} is a file: give a directory (it is created if missing)")
    return output_dir


def resume_path(args, output_dir: str) -> str | None:
    """The checkpoint to continue from: --resume's, or with `--resume auto` OUTPUT_DIR/ckpt.pt if there is one
    (it must then be this run's: another run's checkpoint in the folder is an error, never overwritten)."""
    if args.resume != "auto":
        return args.resume
    path = os.path.join(output_dir, "ckpt.pt")
    return path if os.path.isfile(path) else None


def read_start_checkpoints(args, schedule: dict, resume_from: str | None) -> tuple[dict | None, dict | None]:
    """-> (the checkpoint to resume, checked against this run's settings; the --init-from checkpoint)."""
    resume = checkpoint.read_checkpoint(resume_from) if resume_from else None
    if resume is not None:
        checkpoint.check_resume(resume, args, schedule, resume_from)
    init = checkpoint.read_checkpoint(args.init_from) if args.init_from and resume is None else None
    if init is not None and ("model" not in init or "clip" not in init):
        sys.exit(f"error: --init-from {args.init_from} is not a checkpoint of this project "
                 "(convert a release checkpoint with evaluate.py --convert first)")
    if args.setting == "transductive" and args.init_from is None and resume is None:
        print0("warning: the transductive setting starts from the inductive run's half-way checkpoint "
               "(--init-from RUN/iter_HALF.pt); training from scratch instead")
    return resume, init


def build_datasets(args, preset: dict) -> tuple[data.SegmentationDataset, data.SegmentationDataset | None]:
    """The training set, and the validation set with --eval-every; the layout checked, no image read."""
    try:
        train_set = data.SegmentationDataset(preset, args.data_root, "train", args.setting,
                                             transform=data.train_transform(preset))
        val_set = (data.SegmentationDataset(preset, args.data_root, "val", args.setting,
                                            transform=data.test_transform(preset)) if args.eval_every else None)
    except data.DatasetError as error:
        sys.exit(f"error: --data-root: {error}")
    return train_set, val_set


def build_model(args, schedule: dict, crop: int, templates: list[str], device: torch.device,
                resume: dict | None, init: dict | None) -> tuple[OTSeg, dict]:
    """-> (OTSeg on `device` with the start checkpoint's weights loaded, the CLIP's description)."""
    torch.manual_seed(args.seed)  # the same initial prompts and head on every process
    clip_model = checkpoint.build_clip(args.clip_weights, schedule["prompt_tokens"], crop, device)
    description = checkpoint.describe_clip(clip_model, args.clip_weights)
    model = OTSeg(clip_model, templates, matching=args.matching, implicit_grad=args.implicit_grad,
                  sync_free=args.compile).to(device)  # sync-free: no host sync to break the compiled graph
    for what, ckpt in (("the --resume checkpoint", resume), ("the --init-from checkpoint", init)):
        if ckpt is not None:
            checkpoint.check_same_clip(ckpt["clip"], description, what, strict=ckpt is resume)
            checkpoint.load_trainable(model, ckpt["model"], what)
    return model, description


def build_optimizer(params: list[torch.Tensor], schedule: dict,
                    resume: dict | None) -> tuple[torch.optim.AdamW, int, float]:
    """-> (AdamW, the first step, the best score so far), from the --resume checkpoint if any."""
    optimizer = torch.optim.AdamW(params, lr=schedule["lr"], betas=tuple(schedule["betas"]),
                                  weight_decay=schedule["weight_decay"])
    if resume is None:
        return optimizer, 0, -math.inf
    optimizer.load_state_dict(resume["optimizer"])
    return optimizer, resume["step"], resume.get("best", -math.inf)


def seed_processes(seed: int, rank: int, world_size: int, resume: dict | None) -> None:
    """Dropout differs between processes (data randomness is per sample); a resume restores it."""
    torch.manual_seed(seed + rank)
    if resume is not None:
        if len(resume["rng"]) == world_size:
            checkpoint.set_rng_state(resume["rng"][rank])
        else:
            print0(f"note: resuming with {world_size} processes instead of {len(resume['rng'])}: "
                   "the same data, other dropout masks")


def make_loader(train_set, batch_size: int, micro_batch: int, rank: int, world_size: int, seed: int,
                start_step: int, workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    """This process's micro-batches from `start_step` on, in the order of GlobalBatchSampler."""
    sampler = GlobalBatchSampler(len(train_set), batch_size, micro_batch, rank, world_size, seed, start_step)
    return torch.utils.data.DataLoader(
        SeededSamples(train_set, seed), batch_size=micro_batch, sampler=sampler, num_workers=workers,
        pin_memory=device.type == "cuda",  # pinned: train's non_blocking copies to the GPU do not wait
        generator=torch.Generator().manual_seed(seed),  # its own: the workers' base seed leaves dropout's alone
        persistent_workers=workers > 0, worker_init_fn=ignore_stop_signals)


# ----------------------------------------------------------------------------------------------
# Faults a long run meets: a stop signal, a diverging loss, a failed write
# ----------------------------------------------------------------------------------------------

class StopSignal:
    """SIGTERM (a scheduler's preemption, torchrun passing on its own) or ^C is noted, not obeyed at once:
    the loop finishes the step it is in, all processes agree to stop after the same step, ckpt.pt is
    written there and the program exits with 128 + the signal's number (143, 130), as a shell reports a
    process the signal ended. A second signal ends the process at once.

    The agreement is one integer all-reduced per step, on the host: the default group under gloo, a
    gloo group of its own beside NCCL, so that the GPU's stream never waits for it.
    """

    def __init__(self, world_size: int):
        self.received, self.world_size = 0, world_size
        self.group = dist.new_group(backend="gloo") if world_size > 1 and dist.get_backend() != "gloo" else None
        self.previous = {number: signal.signal(number, self.note) for number in STOP_SIGNALS}

    def note(self, number, frame) -> None:
        self.received = number
        for other in STOP_SIGNALS:
            signal.signal(other, signal.SIG_DFL)

    def agreed(self) -> int:
        """The signal any process has received (0: none), the same on every process."""
        if self.world_size == 1:
            return self.received
        flag = torch.tensor([self.received])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag)

    def restore(self) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


class Divergence:
    """The first step whose loss is not finite, kept on the device: no host sync of its own. It is read
    where the host waits anyway (a logged step, a save), so a diverged run stops at most --log-every
    steps late, and never saves a checkpoint holding a non-finite weight (checked again at each save:
    a non-finite gradient makes the next weights so even where the loss was still finite)."""

    def __init__(self, device: torch.device):
        self.step = torch.zeros((), dtype=torch.long, device=device)  # 0: every loss so far finite
        self.loss = torch.zeros((), device=device)

    def update(self, done: int, loss: torch.Tensor) -> None:
        first = ~torch.isfinite(loss) & (self.step == 0)
        self.loss = torch.where(first, loss.float(), self.loss)
        self.step = torch.where(first, done, self.step)

    def message(self, params: list[torch.Tensor], saving: bool) -> str | None:
        """None while all is well; else the error line (the stop's reason and what to try)."""
        step = int(self.step)
        if step:
            reason = f"loss is {float(self.loss)} at step {step}"
        elif saving and not bool(torch.stack([p.detach().isfinite().all() for p in params]).all()):
            reason = "the weights are no longer finite (a non-finite gradient)"
        else:
            return None
        return (f"error: {reason}: stopped without saving, the last checkpoint is kept; try a lower --lr, "
                "or train without --amp")


class RunLog:
    """Rank 0's account of a run: log.jsonl (one JSON object a line), and a progress bar on a terminal
    or, in a batch job's log, a printed line every --log-every steps. Other ranks write nothing."""

    def __init__(self, output_dir: str | None, iters: int, start_step: int):
        self.output_dir = output_dir
        self.file = open(os.path.join(output_dir, "log.jsonl"), "a") if output_dir else None
        self.bar = tqdm(total=iters, initial=start_step, dynamic_ncols=True,
                        disable=True if output_dir is None else None)  # None: off when not a terminal
        self.iters, self.last_time, self.last_step = iters, time.time(), start_step

    def start(self, args, schedule: dict, clip_description: dict, start_step: int, world_size: int,
              micro_batch: int, accumulation: int, trainable: int, summary: str) -> None:
        self.write(dict(event="start", step=start_step, world_size=world_size, micro_batch=micro_batch,
                        accumulation=accumulation, args=vars(args), schedule=schedule, clip=clip_description,
                        trainable_parameters=trainable))
        print0(f"OTSeg on {args.dataset} ({args.setting}): {summary}")
        print0("schedule: " + ", ".join(f"{k} {v}" for k, v in schedule.items()))
        print0(f"trainable parameters: {trainable:,}; output: {self.output_dir}")
        if accumulation > 1:
            print0(f"note: gradient accumulation: {accumulation} micro-steps of {micro_batch} images on each "
                   f"of {world_size} processes make the global batch of {schedule['batch_size']}")

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def step(self, done: int, lr: float, values: dict[str, torch.Tensor] | None) -> None:
        """Every step moves the bar; a step with `values` is logged (the step's one host sync)."""
        self.bar.update(1)
        if values is None or self.file is None:
            return
        record = dict(zip(values, torch.stack(list(values.values())).tolist()))
        now = time.time()
        speed = (done - self.last_step) / (now - self.last_time)
        self.last_time, self.last_step = now, done
        self.write(dict(step=done, lr=lr, **record, it_per_s=speed, eta_s=(self.iters - done) / speed))
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
        if self.bar.disable:
            print0(f"step {done}/{self.iters}: loss {record['loss']:.4f}, lr {lr:.2e}, {speed:.2f} it/s")

    def evaluation(self, done: int, results: dict) -> None:
        summary = {name: {k: r[k] for k in ("miou_seen", "miou_unseen", "hiou", "miou")}
                   for name, r in results.items()}
        self.write(dict(event="eval", step=done, **summary))
        if self.file is not None:
            self.bar.write(f"step {done}: " + json.dumps(summary))

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def main(args) -> None:
    try:
        train(args)
    except checkpoint.CheckpointError as error:  # a checkpoint or weights file that does not fit: one line
        sys.exit(f"error: {error}")


def train(args) -> None:
    rank, world_size, device = setup_distributed(args.device)
    master = rank == 0
    schedule = make_schedule(args)
    iters = schedule["iters"]
    try:
        preset = data.get_preset(args.dataset, args.crop_size)
    except ValueError as error:  # a preset that cannot be right (e.g. a class named twice)
        sys.exit(f"error: --dataset {args.dataset}: {error}")
    templates, classes, seen, train_classes = class_texts(args, preset)
    accumulation = accumulation_steps(schedule["batch_size"], schedule["micro_batch"], world_size)
    micro_batch = schedule["batch_size"] // (world_size * accumulation)

    # Everything that can be wrong is checked before anything is written; the CLIP's weights last.
    output_dir = output_directory(args)
    resume, init = read_start_checkpoints(args, schedule, resume_path(args, output_dir))
    train_set, val_set = build_datasets(args, preset)
    model, description = build_model(args, schedule, preset["crop_size"], templates, device, resume, init)
    params = [p for _, p in trainable_parameters(model)]
    if world_size > 1:
        for p in params:
            dist.broadcast(p.data, src=0)
    optimizer, start_step, best = build_optimizer(params, schedule, resume)  # best: best.pt's hIoU
    seed_processes(args.seed, rank, world_size, resume)

    window = data.window_of(preset)
    created = master and not os.path.isdir(output_dir)
    if master:
        try:
            os.makedirs(output_dir, exist_ok=True)
        except OSError as error:
            sys.exit(f"error: --output-dir {output_dir}: cannot create it ({error.strerror})")
    log = RunLog(output_dir if master else None, iters, start_step)
    log.start(args, schedule, description, start_step, world_size, micro_batch, accumulation,
              sum(p.numel() for p in params), f"{len(train_classes)} training classes, {len(templates)} "
              f"prompts, {len(train_set)} training images, {world_size} process(es)")

    def save(name: str, step: int, **more) -> None:
        """Every process takes part (random states); a failed write (a full disk, a folder gone) ends
        the run on every process with one line, and the previous checkpoint stays as it was."""
        path, failed = os.path.join(output_dir, name), None
        message = divergence.message(params, saving=True)
        if message:
            stop_run(message)
        ckpt = checkpoint.make_checkpoint(
            checkpoint.trainable_state_dict(model), description, templates, args.matching, args.dataset,
            args.setting, classes, list(preset["unseen"]), preset["crop_size"], window, step, vars(args), schedule,
            optimizer=optimizer.state_dict(), best=best, **more)
        try:
            checkpoint.save_checkpoint(path, ckpt, master, world_size)
        except OSError as error:
            failed = error
        if world_size > 1:  # rank 0 writes: every process learns whether it could
            flag = torch.tensor([failed is not None])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=stop_signal.group)
            failed = failed or (OSError("rank 0 could not write it") if flag else None)
        if failed:
            stop_run(f"error: cannot write {path} ({failed.strerror or failed}): stopped; the previous "
                     f"checkpoint in {output_dir} is kept (free space, then rerun with --resume auto)")

    def stop_run(message: str | None, code: int = 1) -> None:
        """End the run on this process (every process comes here together): one line from rank 0."""
        log.close()
        sys.exit(message if message and master else code)

    loader = make_loader(train_set, schedule["batch_size"], micro_batch, rank, world_size, args.seed,
                         start_step, args.workers, device)
    if args.compile:  # one graph, forward and backward; the names' text embeddings stay in Python (model.py)
        model.segment = torch.compile(model.segment)
    precision = autocast(device, args.amp)
    if args.amp and device.type != "cuda":
        print0("note: --amp is for CUDA; training in fp32")
    pseudo_seen = seen.to(device) if args.setting == "transductive" else None  # train_step pseudo-labels with it
    stop = iters if args.stop_after is None else min(iters, start_step + args.stop_after)
    divergence, stop_signal = Divergence(device), StopSignal(world_size)

    model.train()
    batches = iter(loader)
    try:
        for step in range(start_step, stop):
            micro_batches = [next(batches) for _ in range(accumulation)]  # pinned: the copies do not block
            micro_batches = [(b["image"].to(device, non_blocking=True), b["label"].to(device, non_blocking=True))
                             for b in micro_batches]
            lr = learning_rate(step, schedule)
            values = train_step(model, optimizer, micro_batches, train_classes, lr, params, world_size,
                                precision, schedule, pseudo_seen)
            done = step + 1
            divergence.update(done, values["loss"])
            logged = done % args.log_every == 0 or done == stop
            log.step(done, lr, values if logged else None)
            if logged:  # the host has just waited for this step's values: reading the flag costs nothing
                message = divergence.message(params, saving=False)
                if message:
                    stop_run(message)
            if args.eval_every and done % args.eval_every == 0:
                results = evaluate.evaluate(model, val_set, classes, seen, args.setting == "inductive",
                                            window, device, args.amp, args.workers, progress=False)
                log.evaluation(done, results)
                score = results["OTSeg+"]["miou"] if seen.all() else results["OTSeg+"]["hiou"]
                if score > best:
                    best = score
                    save("best.pt", done, metrics=results)
            if done == iters // 2:  # the transductive setting starts from here (docs/release.md, "Transductive")
                save(f"iter_{done}.pt", done)
            received = stop_signal.agreed()
            if done % args.save_every == 0 or done == stop or received:
                save("ckpt.pt", done)
            if received:
                print0(f"stopped by {signal.Signals(received).name} after step {done}: saved "
                       f"{os.path.join(output_dir, 'ckpt.pt')} (continue with --resume auto)")
                close_distributed()
                stop_run(None, 128 + received)
    except data.DatasetError as error:  # a damaged file met by a worker: one line, no empty run left
        log.close()
        if created and os.listdir(output_dir) == ["log.jsonl"]:
            shutil.rmtree(output_dir)
        sys.exit(f"error: {error}")
    finally:
        stop_signal.restore()
        stop_workers(batches)
    log.close()
    if start_step >= stop:
        print0(f"nothing to do: {os.path.join(output_dir, 'ckpt.pt')} is at step {start_step} of {iters}")
    else:
        print0(f"saved {os.path.join(output_dir, 'ckpt.pt')} at step {stop} of {iters}")
    close_distributed()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
