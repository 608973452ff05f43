"""checkpoint.py: the authors' released checkpoints convert to every parameter of OTSeg, each from the
release's entry of the same meaning: at full size from the names and shapes of the real released VOC
checkpoint (tests/data/release_voc_parameters.txt), and end to end from a small file laid out as MMCV
writes it (in Python and with `evaluate.py --convert`); every bad checkpoint or CLIP file ends in one
line `error: ...` with nothing written. CPU, small random CLIP, generated data.
"""
import json
import os
import re
from collections import OrderedDict

import pytest
import torch
from torch import nn

import checkpoint as checkpoints  # the module; `checkpoint` is the fixture below
import clip
import data
from conftest import expect_error, run_main
from tools import datasets
import evaluate
from model import OTSeg, trainable_parameters

CPU = torch.device("cpu")
PROMPT_TOKENS = 4


@pytest.fixture(scope="module")
def checkpoint(make_tiny_checkpoint):
    """A random-tiny model with weights no initialisation gives, VOC inductive, every template."""
    return make_tiny_checkpoint(prompt_tokens=PROMPT_TOKENS, num_templates=len(data.TEMPLATES["N6"]), random_head=True)


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return datasets.make_fake_dataset("voc", str(tmp_path_factory.mktemp("data")), num_train=1, num_val=2,
                                        size=(40, 52))


# ----------------------------------------------------------------------------------------------
# A release checkpoint as MMCV's save_checkpoint writes it, the release's modules built from torch parts
# ----------------------------------------------------------------------------------------------

def release_head(dim: int, num_loss_classes: int) -> nn.Module:
    """The release's decode head (`decode_seg.py` ATMSingleHeadSeg) as torch modules: one stage whose
    decoder is nn.TransformerDecoder over a TransformerDecoderLayer whose cross-attention is replaced by
    AttentionOT (q, k, v, proj), the relationship descriptor q_proj, and the loss module `SegLossPlus`
    whose criterion (`criterion.py`) registers the buffer `empty_weight`."""
    layer = nn.TransformerDecoderLayer(d_model=dim, nhead=8, dim_feedforward=4 * dim)
    del layer.multihead_attn
    layer.multihead_attn = nn.Module()
    for name in ("q", "k", "v", "proj"):
        setattr(layer.multihead_attn, name, nn.Linear(dim, dim))
    head = nn.Module()
    head.decoder_1 = nn.TransformerDecoder(layer, num_layers=3)
    head.q_proj = nn.Linear(2 * dim, dim)
    head.loss_decode = nn.Module()
    head.loss_decode.criterion = nn.Module()
    empty_weight = torch.ones(num_loss_classes + 1)
    empty_weight[-1] = 0.1  # the no-object weight of its DETR-style criterion
    head.loss_decode.criterion.register_buffer("empty_weight", empty_weight)
    return head


def release_checkpoint(model: OTSeg, crop: int) -> dict:
    """What the release saves when trained on `model`'s CLIP: MMCV's {'meta', 'state_dict', 'optimizer'},
    every parameter and persistent buffer of its modules under 'backbone.', 'text_encoder.' and
    'decode_head.'. The trained weights are random (none is copied from `model`: the converter alone
    decides where each goes); the names are the real release's (test_the_fake_release_has_...)."""
    torch.manual_seed(2)
    frozen = {k: v for k, v in model.clip.state_dict().items() if not k.startswith("visual.prompt")}
    width, patch = frozen["visual.conv1.weight"].shape[0], frozen["visual.conv1.weight"].shape[-1]
    layers = sum(k.endswith("ln_1.weight") for k in frozen if k.startswith("visual."))
    dim = model.relationship_descriptor.out_features
    # img_encoder.py VPTCLIPVisionTransformer: OpenAI's visual weights, positions for the crop, VPT's prompts
    backbone = {k[len("visual."):]: v.clone() for k, v in frozen.items() if k.startswith("visual.")}
    backbone["positional_embedding"] = torch.randn((crop // patch) ** 2 + 1, width)
    vpt = nn.Module()
    vpt.prompt_embeddings = nn.Parameter(torch.zeros(1, PROMPT_TOKENS, width))
    vpt.deep_prompt_embeddings = nn.Parameter(torch.zeros(layers - 1, PROMPT_TOKENS, width))
    vpt.prompt_proj = nn.Linear(width, width)
    vpt.prompt_norm = nn.LayerNorm(width, eps=1e-6)
    # text_encoder.py CLIPTextEncoder: OpenAI's text weights (no logit_scale)
    text_encoder = {k: v.clone() for k, v in frozen.items() if not k.startswith("visual.") and k != "logit_scale"}
    head = release_head(dim, num_loss_classes=15)  # an inductive VOC run: 15 seen classes
    trained = list(vpt.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(trained, lr=2e-4, weight_decay=0.01)
    sum(p.sum() for p in trained).backward()
    optimizer.step()  # Adam's moments exist after the first step
    with torch.no_grad():
        for p in trained:  # every trained weight far from any initialisation, as after training
            p.normal_()
    backbone.update(vpt.state_dict())
    state_dict = OrderedDict()
    for prefix, part in (("backbone.", backbone), ("text_encoder.", text_encoder), ("decode_head.", head.state_dict())):
        state_dict.update((prefix + k, v) for k, v in part.items())
    meta = dict(env_info="sys.platform: linux", config="model = dict(type='OTSeg', ...)", seed=0,
                exp_name="vpt_seg_zero_vit-b_512x512_20k_12_10.py", mmcv_version="1.6.0",
                time="Tue Mar  5 10:00:00 2024", CLASSES=tuple(data.VOC_CLASSES),
                PALETTE=[[128, 0, 0]] * 20, epoch=1, iter=20000)
    return {"meta": meta, "state_dict": state_dict, "optimizer": optimizer.state_dict()}


# ----------------------------------------------------------------------------------------------
# The real release's parameters: names and shapes listed from its own model code (tests/data)
# ----------------------------------------------------------------------------------------------

def release_sources() -> dict[str, str]:
    """Our trainable parameter -> the release's entry of the same meaning, written out by hand from the
    release's module names (AttentionOT's q, k, v, proj; TransformerDecoderLayer's linear and norm layers;
    ATMSingleHeadSeg's q_proj; VPT's prompts): our cross-attention's last layer uses only q and k."""
    expected = {"clip.visual.prompt_embeddings": "backbone.prompt_embeddings",
                "clip.visual.deep_prompt_embeddings": "backbone.deep_prompt_embeddings"}
    for p in ("weight", "bias"):
        expected.update({f"clip.visual.prompt_proj.{p}": f"backbone.prompt_proj.{p}",
                         f"clip.visual.prompt_norm.{p}": f"backbone.prompt_norm.{p}",
                         f"relationship_descriptor.{p}": f"decode_head.q_proj.{p}"})
        for i in range(3):
            layer, theirs = f"decoder.layers.{i}.", f"decode_head.decoder_1.layers.{i}."
            pairs = [("q_proj", "q"), ("k_proj", "k")] + ([("v_proj", "v"), ("out_proj", "proj")] if i < 2 else [])
            expected.update({f"{layer}cross_attn.{a}.{p}": f"{theirs}multihead_attn.{b}.{p}" for a, b in pairs})
            if i < 2:
                expected.update({f"{layer}{n}.{p}": f"{theirs}{n}.{p}" for n in ("linear1", "linear2", "norm2", "norm3")})
    return expected


RELEASE_VOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "release_voc_parameters.txt")


def release_voc_parameters() -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, 'trained' | 'frozen' | 'buffer') of every entry of the released VOC checkpoint."""
    rows = []
    with open(RELEASE_VOC) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                name, shape, kind = line.split()
                rows.append((name, tuple(int(size) for size in shape.split("x")), kind))
    return rows


def test_the_releases_voc_parameters_convert_to_every_parameter_of_ours():
    """A state dict with the released VOC checkpoint's names and shapes (random values) converts to every
    trainable parameter of OTSeg on ViT-B/16 with 10 prompt tokens, each with its shape, each taken from
    the release's entry of the same meaning (read off the release's names, not off our mapping)."""
    rows = release_voc_parameters()
    assert len(rows) == 376 and sum(kind == "trained" for _, _, kind in rows) == 74
    g = torch.Generator().manual_seed(0)
    state_dict = {name: torch.randn(shape, generator=g) if kind == "trained"
                  else torch.zeros(()).expand(shape)  # the frozen CLIP is dropped: no memory for it
                  for name, shape, kind in rows}
    preset = data.get_preset("voc")
    with torch.device("meta"):  # ViT-B/16's sizes without its memory
        vit = clip.CLIP(**dict(clip.VIT_B_16, image_resolution=preset["crop_size"]), prompt_tokens=10)
        ours = dict(trainable_parameters(OTSeg(vit, preset["templates"])))
    converted = checkpoints.convert_release_state_dict(state_dict, ours)
    assert sorted(converted) == sorted(ours)
    wrong = {n: (tuple(v.shape), tuple(ours[n].shape)) for n, v in converted.items() if v.shape != ours[n].shape}
    assert not wrong, wrong
    trained = {name: state_dict[name] for name, _, kind in rows if kind == "trained"}
    source = {}  # our name -> the release's entry holding the same numbers
    for name, value in converted.items():
        hits = [k for k, t in trained.items() if t.shape == value.shape and torch.equal(t, value)]
        assert len(hits) == 1, (name, hits)
        source[name] = hits[0]
    expected = release_sources()
    assert source == expected, {k: (source.get(k), expected.get(k)) for k in set(source) | set(expected)
                                if source.get(k) != expected.get(k)}
    # every other trained entry is one the release builds and never reads (docs/release.md, items 9-10):
    # each layer's self-attention and its norm, and the last layer's all but q and k
    unread = {n for n in trained if re.search(r"layers\.\d\.(self_attn|norm1)\.", n) or
              (".layers.2." in n and not re.search(r"multihead_attn\.[qk]\.", n))}
    assert set(trained) - set(source.values()) == unread


def test_the_releases_frozen_clip_is_our_clip_at_its_crop():
    """The frozen entries of the released VOC checkpoint are OpenAI's ViT-B/16 under the release's prefixes
    (`backbone.` for the image tower, `text_encoder.` for the text tower): the same names and shapes as our
    CLIP's parameters, the positional table at the 512-pixel crop (32 * 32 + 1 rows). Only the logit scale,
    which segmentation does not use, is not saved."""
    rows = release_voc_parameters()
    frozen = {name: shape for name, shape, kind in rows if kind == "frozen"}
    with torch.device("meta"):
        vit = clip.CLIP(**dict(clip.VIT_B_16, image_resolution=data.get_preset("voc")["crop_size"]))
    ours = {("backbone." + n[len("visual."):] if n.startswith("visual.") else "text_encoder." + n): tuple(p.shape)
            for n, p in vit.named_parameters() if n != "logit_scale"}
    assert frozen == ours, {n: (frozen.get(n), ours.get(n)) for n in set(frozen) | set(ours)
                            if frozen.get(n) != ours.get(n)}


def collapse_blocks(names) -> set[str]:
    """Names with the transformer block numbers of CLIP's towers replaced by '*' (their count is CLIP's size)."""
    return {re.sub(r"transformer\.resblocks\.\d+\.", "transformer.resblocks.*.", n) for n in names}


def test_the_fake_release_has_the_real_releases_names(checkpoint):
    """The small fake release below (the end-to-end tests) holds exactly the real release's names, up to
    the number of CLIP blocks, and its head has the real head's shapes relative to the width."""
    fake = release_checkpoint(checkpoint[1], 512)["state_dict"]
    rows = release_voc_parameters()
    assert collapse_blocks(fake) == collapse_blocks(name for name, _, _ in rows)
    assert fake["backbone.positional_embedding"].shape[0] == 32 * 32 + 1  # 512 px, patch 16, as the release's
    real_width = dict((n, s) for n, s, _ in rows)["decode_head.q_proj.bias"][0]
    fake_width = fake["decode_head.q_proj.bias"].shape[0]
    for name, shape, _ in rows:
        if name.startswith("decode_head.decoder_1.") or name.startswith("decode_head.q_proj."):
            assert tuple(s * fake_width // real_width for s in shape) == tuple(fake[name].shape), name


def test_release_checkpoint_file_converts_and_loads(checkpoint, tmp_path):
    _, model = checkpoint
    release = release_checkpoint(model, 512)
    torch.save(release, tmp_path / "release.pth")
    read = checkpoints.read_checkpoint(str(tmp_path / "release.pth"))  # weights_only: MMCV's file is plain data
    ckpt = checkpoints.convert_release_checkpoint(read, "voc", "inductive", "random-tiny", CPU)
    assert ckpt["clip"]["prompt_tokens"] == PROMPT_TOKENS and ckpt["step"] == 20000 and ckpt["crop_size"] == 512
    loaded = dict(trainable_parameters(checkpoints.build_model_from_checkpoint(ckpt, None, CPU)))
    sources = release_sources()
    assert sorted(loaded) == sorted(sources)
    for name, p in loaded.items():
        assert torch.equal(p, release["state_dict"][sources[name]]), name


def test_convert_from_the_command_line_evaluates_as_the_original(checkpoint, voc_root, tmp_path):
    _, model = checkpoint
    torch.save(release_checkpoint(model, 512), tmp_path / "release.pth")
    release = ["--source", "voc", "--setting", "inductive", "--clip-weights", "random-tiny"]
    common = ["--data-root", voc_root, "--crop-size", 64, "--limit", 1, "--device", "cpu", "--workers", 0]
    run_main(evaluate, "--checkpoint", tmp_path / "release.pth", *release, "--convert", tmp_path / "converted.pt",
             *common, "--output-json", tmp_path / "release.json")
    run_main(evaluate, "--checkpoint", tmp_path / "converted.pt", *common, "--output-json", tmp_path / "converted.json")
    original, converted = (json.load(open(tmp_path / f"{n}.json"))["results"] for n in ("release", "converted"))
    for name in ("OTSeg", "OTSeg+"):
        assert converted[name]["confusion"] == original[name]["confusion"], name
    saved = torch.load(tmp_path / "converted.pt", weights_only=True)
    assert saved["dataset"] == "voc" and saved["setting"] == "inductive"
    release = torch.load(tmp_path / "release.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(saved["model"][n], release[k]) for n, k in release_sources().items())


# ----------------------------------------------------------------------------------------------
# Bad checkpoints and CLIP files: one line, nothing written
# ----------------------------------------------------------------------------------------------

def test_release_checkpoint_with_an_unknown_key_or_of_another_dataset(checkpoint, voc_root, tmp_path):
    ckpt = release_checkpoint(checkpoint[1], 512)
    ckpt["state_dict"]["decode_head.conv_seg.weight"] = torch.ones(1)  # a head OTSeg does not have
    (tmp_path / "in").mkdir()
    torch.save(ckpt, tmp_path / "in" / "unknown.pth")
    out = ["--data-root", voc_root, "--device", "cpu", "--output-json", tmp_path / "out.json",
           "--convert", tmp_path / "out.pt", "--clip-weights", "random-tiny", "--setting", "inductive"]
    expect_error(evaluate, "unknown keys ['decode_head.conv_seg.weight']",
                 "--checkpoint", tmp_path / "in" / "unknown.pth", "--source", "voc", *out, unchanged=tmp_path)
    del ckpt["state_dict"]["decode_head.conv_seg.weight"]
    ckpt["meta"]["CLASSES"] = tuple(data.COCO_CLASSES)  # trained on COCO-Stuff, given as VOC
    torch.save(ckpt, tmp_path / "in" / "coco.pth")
    expect_error(evaluate, "171 classes, not on voc (20): give its dataset as --source",
                 "--checkpoint", tmp_path / "in" / "coco.pth", "--source", "voc", *out, unchanged=tmp_path)
    expect_error(evaluate, "needs --source", "--checkpoint", tmp_path / "in" / "coco.pth", "--data-root", voc_root,
                 "--setting", "inductive", unchanged=tmp_path)


def test_unreadable_or_foreign_checkpoints(checkpoint, voc_root, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "text.pt").write_text("not a checkpoint")
    torch.save(torch.ones(3), tmp_path / "in" / "tensor.pt")
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "in" / "other_model.pt")
    out = ["--data-root", voc_root, "--device", "cpu", "--output-json", tmp_path / "out.json"]
    expect_error(evaluate, "cannot read", "--checkpoint", tmp_path / "in" / "text.pt", *out, unchanged=tmp_path)
    expect_error(evaluate, "holds a Tensor", "--checkpoint", tmp_path / "in" / "tensor.pt", *out, unchanged=tmp_path)
    expect_error(evaluate, "neither a checkpoint of this project", "--checkpoint", tmp_path / "in" / "other_model.pt",
                 *out, unchanged=tmp_path)
    expect_error(evaluate, "no checkpoint at", "--checkpoint", tmp_path / "in" / "missing.pt", *out, unchanged=tmp_path)


def test_checkpoint_of_another_backbone_or_dataset(checkpoint, voc_root, tmp_path):
    path, _ = checkpoint
    (tmp_path / "in").mkdir()
    torch.save(clip.CLIP(**dict(clip.TINY, vision_layers=3)).state_dict(), tmp_path / "in" / "deep.pt")
    out = ["--data-root", voc_root, "--device", "cpu", "--output-json", tmp_path / "out.json"]
    expect_error(evaluate, "vision_layers 2 (this CLIP: 3)", "--checkpoint", path, "--clip-weights",
                 tmp_path / "in" / "deep.pt", *out, unchanged=tmp_path)
    expect_error(evaluate, "was trained with --source voc", "--checkpoint", path, "--source", "coco", *out,
                 unchanged=tmp_path)
    expect_error(evaluate, "was trained with --setting inductive", "--checkpoint", path, "--setting", "fully", *out,
                 unchanged=tmp_path)


def test_corrupt_clip_weights_or_a_torch_file_that_is_not_clip(checkpoint, voc_root, tmp_path):
    path, _ = checkpoint
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "random.pt").write_bytes(os.urandom(4096))
    torch.save({"weight": torch.ones(3)}, tmp_path / "in" / "not_clip.pt")
    out = ["--data-root", voc_root, "--device", "cpu", "--output-json", tmp_path / "out.json"]
    for name in ("random.pt", "not_clip.pt", "missing.pt"):  # the message names the flag and the file
        expect_error(evaluate, ("error: --clip-weights: ", str(tmp_path / "in" / name)), "--checkpoint", path,
                     "--clip-weights", tmp_path / "in" / name, *out, unchanged=tmp_path)
