"""checkpoint.py -- what a checkpoint of this project holds, and how the model is rebuilt from one.

A checkpoint is a plain dict saved with torch.save and read back with `weights_only=True` (a file that
would run code when unpickled is refused). It holds only what training changed and what is needed to
rebuild the rest:

    format      "otseg-reference/1"
    model       the trainable weights: VPT prompts and the head (never the frozen CLIP: ~8M numbers)
    clip        the CLIP it was trained with: sizes, prompt tokens, where the weights came from, and a
                fingerprint of the frozen patch embedding (another CLIP of the same size is caught)
    templates   the prompt templates (N of them), matching ("sinkhorn" or "softmax")
    dataset, setting, classes, unseen, crop_size, window (the sliding window of evaluation)
    step, args, schedule, optimizer, rng, best      (train.py's own, for --resume)

`make_checkpoint` builds that dict (train.py, the release's converter and the tests all call it);
`save_checkpoint` gathers the random states of every process and writes it; `check_resume` says
whether a run may continue from one. `build_model_from_checkpoint` turns that back into an OTSeg: it
rebuilds the CLIP from the weights file (OpenAI's `ViT-B-16.pt`, or 'random-tiny' for trials without
downloads), checks that it is the one the checkpoint was trained with, and loads the trained weights. The second part of the file reads the
authors' released MMSegmentation checkpoints into this format (see docs/release.md); the last reads
OpenAI's CLIP weights (a TorchScript archive) without running any code from the file.

This is the plumbing of the programs (train.py, evaluate.py): a file a user gave that does not fit
(unreadable, another model, another CLIP, another dataset) raises CheckpointError, whose message names
it and says what to do; the programs print it as one line `error: ...`.
"""
import hashlib
import io
import os
import pickle
import re
import sys
import zipfile
from collections import OrderedDict

import torch
import torch.distributed as dist
from torch import nn

import clip
import data
from common import atomic_save, print0
from model import OTSeg, trainable_parameters

FORMAT = "otseg-reference/1"  # written into every checkpoint of this project


class CheckpointError(Exception):
    """A checkpoint or weights file that cannot be used, with a message that names it and says what to do."""


def build_clip(weights: str, prompt_tokens: int, image_size: int, device: torch.device) -> clip.CLIP:
    """OpenAI's CLIP from `weights` (or 'random-tiny') with deep VPT, positions resized to the crop."""
    if weights == "random-tiny":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same random CLIP in every run, so its checkpoints evaluate
            state_dict = clip.CLIP(**clip.TINY).state_dict()
        return clip.build_model(state_dict, prompt_tokens, image_size).to(device)
    try:
        state_dict = read_clip_weights(weights)
        model = clip.build_model(state_dict, prompt_tokens, image_size)
    except CheckpointError as error:  # the message names the file and what to do
        raise CheckpointError("--clip-weights: " + " ".join(str(error).split())) from error
    except Exception as error:  # tensors that are no CLIP
        raise CheckpointError(f"--clip-weights: {weights} is not CLIP weights ({first_line(error)}). "
                              + GIVE_CLIP_WEIGHTS) from error
    return model.to(device)


def describe_clip(clip_model: clip.CLIP, weights: str) -> dict:
    """Sizes of the CLIP, its prompt tokens and a fingerprint of its frozen weights."""
    state_dict = clip_model.state_dict()
    conv = state_dict["visual.conv1.weight"].float().cpu().contiguous()
    return dict(clip.architecture(state_dict), prompt_tokens=clip_model.visual.prompt_tokens,
                weights=weights, fingerprint=hashlib.sha256(conv.numpy().tobytes()).hexdigest()[:16])


def check_same_clip(saved: dict, built: dict, what: str, strict: bool = False) -> None:
    """Raise CheckpointError if `what` was trained on another CLIP or number of prompt tokens.

    Other frozen weights of the same sizes are a warning, or with `strict` (resuming) an error.
    """
    keys = [k for k in saved if k not in ("image_resolution", "weights", "fingerprint")]
    wrong = [f"{k} {saved[k]} (this CLIP: {built.get(k)})" for k in keys if saved[k] != built.get(k)]
    if wrong:
        raise CheckpointError(f"{what} was trained with another CLIP: " + ", ".join(wrong)
                              + f". It was trained with --clip-weights {saved['weights']}.")
    if saved["fingerprint"] != built["fingerprint"]:
        message = (f"{what} was trained with CLIP weights {saved['weights']}, whose frozen weights differ "
                   f"from those of {built['weights']}")
        if strict:
            raise CheckpointError(message)
        print0(f"warning: {message}: its numbers will not be reproduced")


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights OTSeg trains (VPT prompts and head), on the CPU: all a checkpoint needs."""
    return {name: p.detach().cpu().clone() for name, p in trainable_parameters(model)}


def load_trainable(model: nn.Module, state_dict: dict, what: str) -> None:
    """Load the trained weights; CheckpointError with the list of differences if they do not fit."""
    params = dict(trainable_parameters(model))
    missing = sorted(set(params) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(params))
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(params[k].shape)}"
             for k in set(params) & set(state_dict) if state_dict[k].shape != params[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"the weights in {what} do not fit this model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}, other shapes {wrong[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state_dict[name])


def make_checkpoint(model: dict[str, torch.Tensor], clip: dict, templates: list[str], matching: str,
                    dataset: str, setting: str, classes: list[str], unseen: list[int], crop_size: int,
                    window: dict, step: int | None, args: dict | None = None, schedule: dict | None = None,
                    **more) -> dict:
    """The checkpoint dict of this project (the module docstring); `more`: train.py's optimizer, rng, best."""
    return dict(format=FORMAT, model=model, clip=clip, templates=list(templates), matching=matching,
                dataset=dataset, setting=setting, classes=list(classes), unseen=list(unseen),
                crop_size=crop_size, window={k: list(v) for k, v in window.items()}, step=step, args=args,
                schedule=schedule, **more)


def save(ckpt: dict, path: str) -> None:
    """torch.save, atomically: a crash never leaves half a checkpoint."""
    with atomic_save(path) as tmp:
        torch.save(ckpt, tmp)


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def load_failure(path: str, error: Exception) -> str:
    """Why torch.load(weights_only=True) could not read `path`, in our words (torch's text advises running
    the file). Since torch 1.6 torch.save writes a zip; a refusal to unpickle is an UnpicklingError."""
    if not zipfile.is_zipfile(path):
        return "damaged, or not a file written by torch.save"
    if isinstance(error, pickle.UnpicklingError):
        return "it holds more than tensors and plain containers, and reading it could run code"
    return f"a damaged file: {first_line(error)}"


def read_checkpoint(path: str) -> dict:
    """A checkpoint of this project, or the release's MMSegmentation file (converted by the caller)."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder; give the checkpoint file in it (e.g. {os.path.join(path, 'ckpt.pt')})")
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch file, or a pickle holding more than tensors and containers
        raise CheckpointError(f"cannot read {path} as a checkpoint ({load_failure(path, error)}): give a checkpoint "
                              f"of train.py or a released OTSeg .pth") from error
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint: give a checkpoint of "
                              f"train.py or a released OTSeg .pth")
    return ckpt


# ----------------------------------------------------------------------------------------------
# Training checkpoints: the random states of every process, and the checks a resumed run must pass
# ----------------------------------------------------------------------------------------------

MUST_MATCH_ON_RESUME = ("dataset", "setting", "num_prompts", "crop_size", "matching", "seed")


def rng_state() -> dict:
    """This process's random states (torch's CPU and CUDA generators: the only ones training draws from)."""
    return dict(torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None)


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"])


def check_resume(ckpt: dict, args, schedule: dict, path: str) -> None:
    """A run continues only with the settings it started with: one message listing what differs."""
    saved = ckpt.get("args") or {}
    if not saved or not ckpt.get("schedule"):
        raise CheckpointError(f"--resume {path} is not a checkpoint of a train.py run (a converted release "
                              "checkpoint?): give it to --init-from instead")
    wrong = [f"--{k.replace('_', '-')} {saved.get(k)} (now {getattr(args, k)})"
             for k in MUST_MATCH_ON_RESUME if saved.get(k) != getattr(args, k)]
    wrong += [f"schedule {k} {ckpt['schedule'].get(k)} (now {v})" for k, v in schedule.items()
              if k != "micro_batch" and ckpt["schedule"].get(k) != v]
    if wrong:
        raise CheckpointError(f"--resume {path} was started with other settings: " + ", ".join(wrong))


def save_checkpoint(path: str, ckpt: dict, master: bool, world_size: int) -> None:
    """Every process contributes its random states (ckpt['rng'], one per rank); rank 0 writes the file."""
    states = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(states, rng_state())  # CPU tensors inside: pickled, whatever the backend
    else:
        states = [rng_state()]
    if master:
        save(dict(ckpt, rng=states), path)


def build_model_from_checkpoint(ckpt: dict, clip_weights: str | None, device: torch.device) -> OTSeg:
    """Rebuild the CLIP the checkpoint describes, check it, and load the trained weights."""
    saved = ckpt["clip"]
    weights = clip_weights or saved["weights"]
    clip_model = build_clip(weights, saved["prompt_tokens"], ckpt["crop_size"], device)
    check_same_clip(saved, describe_clip(clip_model, weights), "the checkpoint")
    model = OTSeg(clip_model, ckpt["templates"], matching=ckpt["matching"]).to(device)
    load_trainable(model, ckpt["model"], "the checkpoint")
    return model.eval()


# ----------------------------------------------------------------------------------------------
# The authors' released checkpoints (MMSegmentation 0.24 state dicts) -> this project's names
# ----------------------------------------------------------------------------------------------

# Key names read from the release's model code (github.com/cubeyoung/OTSeg): VPTCLIPVisionTransformer
# in models/backbone/img_encoder.py ('backbone.*'), ATMSingleHeadSeg, TPN_DecoderLayer (a subclass of
# nn.TransformerDecoderLayer) and AttentionOT in models/decode_heads/decode_seg.py ('decode_head.*').
# The release's decoder is 'decoder_1' (one stage) and its relationship descriptor 'q_proj'.
RELEASE_KEYS = [  # (release key, this project's key), as regular expressions
    (r"backbone\.(prompt_embeddings|deep_prompt_embeddings)", r"clip.visual.\1"),
    (r"backbone\.(prompt_proj|prompt_norm)\.(weight|bias)", r"clip.visual.\1.\2"),
    (r"decode_head\.q_proj\.(weight|bias)", r"relationship_descriptor.\1"),
    (r"decode_head\.decoder_1\.layers\.(\d+)\.multihead_attn\.q\.(weight|bias)", r"decoder.layers.\1.cross_attn.q_proj.\2"),
    (r"decode_head\.decoder_1\.layers\.(\d+)\.multihead_attn\.k\.(weight|bias)", r"decoder.layers.\1.cross_attn.k_proj.\2"),
    (r"decode_head\.decoder_1\.layers\.(\d+)\.multihead_attn\.v\.(weight|bias)", r"decoder.layers.\1.cross_attn.v_proj.\2"),
    (r"decode_head\.decoder_1\.layers\.(\d+)\.multihead_attn\.proj\.(weight|bias)", r"decoder.layers.\1.cross_attn.out_proj.\2"),
    (r"decode_head\.decoder_1\.layers\.(\d+)\.(linear1|linear2|norm2|norm3)\.(weight|bias)", r"decoder.layers.\1.\2.\3"),
]
# Saved by MMCV but no weight of the model (docs/release.md): the decoder layers' self-attention and its
# norm, built and never called by the release's `decode_seg.py` (the last layer's unused parts are
# mapped above, then not found among ours), and the loss module's persistent buffers (its
# `criterion.py` registers `empty_weight`, the class weights of a loss term OTSeg does not use).
RELEASE_UNUSED = (r"decode_head\.decoder_1\.layers\.\d+\.(self_attn\..*|norm1\.(weight|bias))"
                  r"|decode_head\.loss_decode\..*")


def is_release_checkpoint(ckpt: dict) -> bool:
    return "state_dict" in ckpt and any(k.startswith("decode_head.") for k in ckpt["state_dict"])


def convert_release_state_dict(state_dict: dict, trainable: dict[str, torch.Tensor]) -> dict:
    """The release's state dict -> this project's trainable weights (names and shapes of `trainable`).

    Frozen CLIP weights ('backbone.*' but the prompts, 'text_encoder.*') are dropped: they are
    OpenAI's, rebuilt from --clip-weights (the caller compares the patch embedding). Unused weights of
    the release's decoder and the loss module's buffers are dropped. Anything else left over, or
    missing, is an error.
    """
    converted, unknown = {}, []
    for key, value in state_dict.items():
        if key.startswith("text_encoder.") or re.fullmatch(RELEASE_UNUSED, key):
            continue
        for pattern, target in RELEASE_KEYS:
            if re.fullmatch(pattern, key):
                name = re.sub(pattern, target, key)
                if name in trainable:
                    converted[name] = value.float()
                elif not name.startswith("decoder.layers."):
                    unknown.append(key)
                break
        else:
            if not key.startswith("backbone."):
                unknown.append(key)
    missing = sorted(set(trainable) - set(converted))
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(trainable[k].shape)}" for k, v in converted.items()
             if v.shape != trainable[k].shape]
    if unknown or missing or wrong:
        raise CheckpointError(f"not an OTSeg release checkpoint of this CLIP: unknown keys {unknown[:5]}, "
                              f"missing {missing[:5]}, other shapes {wrong[:5]}")
    return converted


def convert_release_checkpoint(ckpt: dict, source: str, setting: str, clip_weights: str,
                               device: torch.device) -> dict:
    """A checkpoint of this project's format from the release's file (trained on `source`)."""
    state_dict = ckpt["state_dict"]
    if "backbone.prompt_embeddings" not in state_dict:
        raise CheckpointError("the release checkpoint has no visual prompts (backbone.prompt_embeddings)")
    prompt_tokens = state_dict["backbone.prompt_embeddings"].shape[1]
    preset = data.get_preset(source)
    classes = ckpt.get("meta", {}).get("CLASSES")  # MMSegmentation writes its dataset's class names there
    if classes is not None and len(classes) != len(preset["classes"]):
        raise CheckpointError(f"the release checkpoint was trained on a dataset of {len(classes)} classes, not on "
                              f"{source} ({len(preset['classes'])}): give its dataset as --source")
    clip_model = build_clip(clip_weights, prompt_tokens, preset["crop_size"], device)
    description = describe_clip(clip_model, clip_weights)
    if "backbone.conv1.weight" in state_dict:  # the release saves the frozen weights too: compare
        conv = state_dict["backbone.conv1.weight"].float().contiguous()
        description["fingerprint"] = hashlib.sha256(conv.numpy().tobytes()).hexdigest()[:16]
    model = OTSeg(clip_model, preset["templates"])
    trainable = dict(trainable_parameters(model))
    converted = convert_release_state_dict(state_dict, trainable)
    return make_checkpoint(converted, description, preset["templates"], "sinkhorn", source, setting,
                           preset["classes"], preset["unseen"], preset["crop_size"], data.window_of(preset),
                           step=ckpt.get("meta", {}).get("iter"))


# ----------------------------------------------------------------------------------------------
# OpenAI's CLIP weights, read without running any code from the file
# ----------------------------------------------------------------------------------------------
# A reader who copies clip.py takes this section too, down to is_torchscript_archive (it needs only torch
# and Python), to load OpenAI's ViT-B-16.pt: clip.build_model(read_torchscript_weights(path)).

# OpenAI ships its weights as TorchScript archives: a zip holding the model's code (`code/`), a
# pickle of the module tree (`data.pkl`) and one raw file per tensor storage (`data/0`, `data/1`, ...).
# torch.jit.load would compile and run that code, and an ordinary unpickler calls whatever function
# a pickle names: a weights file from an untrusted source could run anything. We read the tensors
# with a restricted unpickler instead, which accepts only what a module tree of weights needs
# (TorchScript's module classes, kept as plain attribute holders; tensor rebuilding; storages;
# OrderedDict) and refuses every other global before anything is called. We prefer it to checking
# the file's sha256 against OpenAI's published hashes and then calling torch.jit.load: it reads
# every OpenAI ViT and any re-saved archive without a list of hashes, never runs the archive's code,
# and does not depend on torch.jit, which PyTorch has deprecated.

STORAGE_DTYPES = {"HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
                  "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                  "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                  "BoolStorage": torch.bool}


class ScriptObject:
    """Stands for any class of a TorchScript archive: keeps the attributes it is given, runs nothing."""

    def __setstate__(self, state):
        self.attributes = state


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """The tensor of `torch._utils._rebuild_tensor_v2`: a view into a flat storage; checked bounds."""
    return storage.as_strided(size, stride, offset)


class WeightsUnpickler(pickle.Unpickler):
    """Reads an archive's data.pkl, taking each storage from the zip; any other global is refused."""

    def __init__(self, archive: zipfile.ZipFile, root: str):
        super().__init__(io.BytesIO(archive.read(f"{root}/data.pkl")))
        self.archive, self.root, self.storages = archive, root, {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            return ScriptObject
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise pickle.UnpicklingError(f"refused to load '{module}.{name}' (only tensors are read from CLIP weights)")

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid  # ('storage', dtype, '0', 'cpu', numel)
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        if key not in self.storages:
            data = bytearray(self.archive.read(f"{self.root}/data/{key}"))
            flat = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            if flat.numel() != numel:
                raise pickle.UnpicklingError(f"storage {key} holds {flat.numel()} values, expected {numel}")
            self.storages[key] = flat
        return self.storages[key]


def read_torchscript_weights(path: str) -> dict[str, torch.Tensor]:
    """The state dict (parameters and buffers, dotted names) of a TorchScript archive, running none of it."""
    with zipfile.ZipFile(path) as archive:
        roots = [name[:-len("/data.pkl")] for name in archive.namelist() if name.count("/") == 1
                 and name.endswith("/data.pkl")]
        if len(roots) != 1:
            raise ValueError("no data.pkl at the top of the archive")
        byteorder = f"{roots[0]}/byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() != sys.byteorder.encode():
            raise ValueError(f"its tensors are stored {archive.read(byteorder).decode()}-endian")
        tree = WeightsUnpickler(archive, roots[0]).load()
    state_dict, pending, seen = {}, [("", tree)], set()
    while pending:  # walk the module tree: tensors are the weights, other objects are submodules
        prefix, node = pending.pop()
        if id(node) in seen or not isinstance(getattr(node, "attributes", None), dict):
            continue
        seen.add(id(node))
        for name, value in node.attributes.items():
            if isinstance(value, torch.Tensor):
                state_dict[prefix + name] = value
            elif isinstance(value, ScriptObject):
                pending.append((f"{prefix}{name}.", value))
    return state_dict


def is_torchscript_archive(path: str) -> bool:
    """A zip with constants.pkl: TorchScript (a torch.save file is a zip without it)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


GIVE_CLIP_WEIGHTS = (f"Give OpenAI's ViT-B-16.pt ({clip.WEIGHTS_URL}) or a state dict saved with "
                     f"torch.save(model.state_dict()).")


def read_clip_weights(path: str) -> dict[str, torch.Tensor]:
    """CLIP's state dict from OpenAI's TorchScript archive (e.g. ViT-B-16.pt) or a plain state-dict file.

    CheckpointError, naming the file and what to do, for a missing file and for one that is not CLIP
    weights (damaged, another kind of file, or one that would run code when read)."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"CLIP weights not found at {path}. Download OpenAI's ViT-B/16 (about 350 MB) from {clip.WEIGHTS_URL} "
            f"(sha256 {clip.WEIGHTS_SHA256}) and put it at {clip.DEFAULT_WEIGHTS} (where OpenAI's own code keeps "
            f"it), or give its path. `python -c \"import clip; clip.download()\"`, run in this project's folder, "
            f"downloads and checks it.")
    archive = is_torchscript_archive(path)
    try:  # torch.load with weights_only=True refuses a pickle that would run code
        state_dict = read_torchscript_weights(path) if archive else torch.load(path, map_location="cpu",
                                                                                weights_only=True)
    except Exception as error:  # the archive's reader says what it refused; torch's text is put in our words
        reason = first_line(error) if archive else load_failure(path, error)
        raise CheckpointError(f"{path} is not CLIP weights ({reason}). {GIVE_CLIP_WEIGHTS}") from error
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path} is not CLIP weights (it holds a {type(state_dict).__name__}, not a state "
                              f"dict). {GIVE_CLIP_WEIGHTS}")
    return state_dict
