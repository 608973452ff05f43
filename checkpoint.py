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

`build_model_from_checkpoint` turns that back into an OTSeg: it rebuilds the CLIP from the weights file
(OpenAI's `ViT-B-16.pt`, or 'random-tiny' for trials without downloads), checks that it is the one the
checkpoint was trained with, and loads the trained weights. The second half of the file reads the
authors' released MMSegmentation checkpoints into this format (see docs/release.md).

This is the plumbing of the programs (train.py, evaluate.py): a file a user gave that does not fit
(unreadable, another model, another CLIP, another dataset) ends the program with one line
`error: ...` that names it and says what to do.
"""
import hashlib
import os
import re
import sys

import torch
from torch import nn

import clip
import data
from common import print0
from model import OTSeg, trainable_parameters

FORMAT = "otseg-reference/1"  # written into every checkpoint of this project


def build_clip(weights: str, prompt_tokens: int, image_size: int, device: torch.device) -> clip.CLIP:
    """OpenAI's CLIP from `weights` (or 'random-tiny') with deep VPT, positions resized to the crop."""
    if weights == "random-tiny":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same random CLIP in every run, so its checkpoints evaluate
            state_dict = clip.CLIP(**clip.TINY).state_dict()
        return clip.build_model(state_dict, prompt_tokens, image_size).to(device)
    try:
        return clip.load(weights, prompt_tokens=prompt_tokens, image_size=image_size, device=device)
    except (FileNotFoundError, ValueError) as error:  # clip.load's messages name the file and what to do
        sys.exit("error: --clip-weights: " + " ".join(str(error).split()))


def describe_clip(clip_model: clip.CLIP, weights: str) -> dict:
    """Sizes of the CLIP, its prompt tokens and a fingerprint of its frozen weights."""
    state_dict = clip_model.state_dict()
    conv = state_dict["visual.conv1.weight"].float().cpu().contiguous()
    return dict(clip.architecture(state_dict), prompt_tokens=clip_model.visual.prompt_tokens,
                weights=weights, fingerprint=hashlib.sha256(conv.numpy().tobytes()).hexdigest()[:16])


def check_same_clip(saved: dict, built: dict, what: str, strict: bool = False) -> None:
    """Exit with one clear message if `what` was trained on another CLIP or number of prompt tokens.

    Other frozen weights of the same sizes are a warning, or with `strict` (resuming) an error.
    """
    keys = [k for k in saved if k not in ("image_resolution", "weights", "fingerprint")]
    wrong = [f"{k} {saved[k]} (this CLIP: {built.get(k)})" for k in keys if saved[k] != built.get(k)]
    if wrong:
        sys.exit(f"error: {what} was trained with another CLIP: " + ", ".join(wrong)
                 + f". It was trained with --clip-weights {saved['weights']}.")
    if saved["fingerprint"] != built["fingerprint"]:
        message = (f"{what} was trained with CLIP weights {saved['weights']}, whose frozen weights differ "
                   f"from those of {built['weights']}")
        if strict:
            sys.exit(f"error: {message}")
        print0(f"warning: {message}: its numbers will not be reproduced")


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights OTSeg trains (VPT prompts and head), on the CPU: all a checkpoint needs."""
    return {name: p.detach().cpu().clone() for name, p in trainable_parameters(model)}


def load_trainable(model: nn.Module, state_dict: dict, what: str) -> None:
    """Load the trained weights, exiting with the list of differences if they do not fit."""
    params = dict(trainable_parameters(model))
    missing = sorted(set(params) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(params))
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(params[k].shape)}"
             for k in set(params) & set(state_dict) if state_dict[k].shape != params[k].shape]
    if missing or unexpected or wrong:
        sys.exit(f"error: the weights in {what} do not fit this model: missing {missing[:5]}, "
                 f"unexpected {unexpected[:5]}, other shapes {wrong[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state_dict[name])


def atomic_save(obj: dict, path: str) -> None:
    """torch.save to a temporary file and rename it: a crash never leaves half a checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:  # a failed save (full disk, interrupt) leaves no temporary file behind either
        if os.path.exists(tmp):
            os.remove(tmp)


def read_checkpoint(path: str) -> dict:
    """A checkpoint of this project, or the release's MMSegmentation file (converted by the caller)."""
    if os.path.isdir(path):
        sys.exit(f"error: {path} is a folder; give the checkpoint file in it (e.g. {os.path.join(path, 'ckpt.pt')})")
    if not os.path.isfile(path):
        sys.exit(f"error: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch file, or a pickle holding more than tensors and containers
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if reason.startswith("Weights only load failed"):  # torch's refusal; its advice would be to run the code
            reason = "it holds more than tensors and plain containers, and reading it could run code"
        sys.exit(f"error: cannot read {path} as a checkpoint ({reason}): give a checkpoint of train.py "
                 f"or a released OTSeg .pth")
    if not isinstance(ckpt, dict):
        sys.exit(f"error: {path} holds a {type(ckpt).__name__}, not a checkpoint: give a checkpoint of "
                 f"train.py or a released OTSeg .pth")
    return ckpt


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
        sys.exit(f"error: not an OTSeg release checkpoint of this CLIP: unknown keys {unknown[:5]}, "
                 f"missing {missing[:5]}, other shapes {wrong[:5]}")
    return converted


def convert_release_checkpoint(ckpt: dict, source: str, setting: str, clip_weights: str,
                               device: torch.device) -> dict:
    """A checkpoint of this project's format from the release's file (trained on `source`)."""
    state_dict = ckpt["state_dict"]
    if "backbone.prompt_embeddings" not in state_dict:
        sys.exit("error: the release checkpoint has no visual prompts (backbone.prompt_embeddings)")
    prompt_tokens = state_dict["backbone.prompt_embeddings"].shape[1]
    preset = data.get_preset(source)
    classes = ckpt.get("meta", {}).get("CLASSES")  # MMSegmentation writes its dataset's class names there
    if classes is not None and len(classes) != len(preset["classes"]):
        sys.exit(f"error: the release checkpoint was trained on a dataset of {len(classes)} classes, not on "
                 f"{source} ({len(preset['classes'])}): give its dataset as --source")
    clip_model = build_clip(clip_weights, prompt_tokens, preset["crop_size"], device)
    description = describe_clip(clip_model, clip_weights)
    if "backbone.conv1.weight" in state_dict:  # the release saves the frozen weights too: compare
        conv = state_dict["backbone.conv1.weight"].float().contiguous()
        description["fingerprint"] = hashlib.sha256(conv.numpy().tobytes()).hexdigest()[:16]
    model = OTSeg(clip_model, preset["templates"])
    trainable = dict(trainable_parameters(model))
    converted = convert_release_state_dict(state_dict, trainable)
    return dict(format=FORMAT, model=converted, clip=description, templates=list(preset["templates"]),
                matching="sinkhorn", dataset=source, setting=setting, classes=list(preset["classes"]),
                unseen=list(preset["unseen"]), crop_size=preset["crop_size"],
                window={k: list(v) for k, v in data.window_of(preset).items()},
                step=ckpt.get("meta", {}).get("iter"), args=None, schedule=None)
