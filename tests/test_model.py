"""Tests of model.py with a tiny random CLIP; the ViT-B/16 parameter counts on the meta device."""
import copy

import pytest
import torch
import torch.nn.functional as F

from clip import CLIP, tokenize
from losses import count_masks, otseg_loss
from model import OTSeg, trainable_parameters

TINY = dict(embed_dim=64, image_resolution=64, vision_layers=2, vision_width=64, vision_patch_size=16,
            context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=2,
            transformer_layers=2)
VIT_B_16 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
                context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                transformer_layers=12)
PROMPTS = {"visual.prompt_embeddings", "visual.deep_prompt_embeddings", "visual.prompt_proj.weight",
           "visual.prompt_proj.bias", "visual.prompt_norm.weight", "visual.prompt_norm.bias"}
TEMPLATES = ["a photo of a {}.", "a part of a {}."]
CLASSES = ["cat", "dog", "sky"]


def assert_close(actual, expected, atol=1e-5, rtol=1e-4):
    diff = (actual - expected).abs().max().item()
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), f"largest difference {diff:.3e}"


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return CLIP(**TINY, prompt_tokens=4)


def make_model(tiny_clip, templates=TEMPLATES, matching="sinkhorn", **kwargs):
    torch.manual_seed(1)
    return OTSeg(tiny_clip, templates, matching=matching, **kwargs)


def images(B, H, W, seed=0):
    return torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("matching", ["sinkhorn", "softmax"])
@pytest.mark.parametrize("B, classes, H, W", [(1, ["cat"], 32, 48), (2, CLASSES, 64, 96), (3, CLASSES[:2], 80, 64)])
def test_shapes_and_eval_determinism(tiny_clip, matching, B, classes, H, W):
    model = make_model(tiny_clip, matching=matching).eval()
    x = images(B, H, W)
    with torch.no_grad():
        out = model(x, classes)
        again = model(x, classes)
    for name in ("decoder", "score"):
        assert out[name].shape == (B, len(classes), H, W)
        assert torch.isfinite(out[name]).all()
        assert torch.equal(out[name], again[name])


def low_res_similarities(model, x, classes):
    """The score path by hand: cosine similarities (B, K, M, N) and the patch grid."""
    text = model.text_embeddings(classes)  # (K, N, C)
    global_embedding, dense = model.clip.encode_dense(x)
    B, C, h, w = dense.shape
    g = F.normalize(global_embedding, dim=-1)
    v = F.normalize(dense.flatten(2).transpose(1, 2), dim=-1)  # (B, M, C)
    pairs = torch.cat([g[:, None, None] * text, text.expand(B, *text.shape)], dim=-1)
    q0 = model.relationship_descriptor(pairs)  # (B, K, N, C)
    sim = torch.einsum("bmc,bknc->bkmn", v, F.normalize(q0, dim=-1))
    return sim, (h, w)


def upsampled(low, grid, size):
    return F.interpolate(low.unflatten(-1, grid), size=size, mode="bilinear", align_corners=False)


def test_one_prompt_score_is_the_cosine_similarity(tiny_clip):
    model = make_model(tiny_clip, templates=["a photo of a {}."]).eval()
    x = images(2, 48, 64)
    with torch.no_grad():
        out = model(x, CLASSES)
        sim, grid = low_res_similarities(model, x, CLASSES)
    assert_close(out["score"], upsampled(sim[..., 0], grid, (48, 64)))


def test_softmax_score_sums_cosines_over_prompts(tiny_clip):
    model = make_model(tiny_clip, matching="softmax").eval()
    x = images(2, 48, 64)
    with torch.no_grad():
        out = model(x, CLASSES)
        sim, grid = low_res_similarities(model, x, CLASSES)
    assert_close(out["score"], upsampled(sim.sum(-1), grid, (48, 64)))


def test_sinkhorn_score_differs_from_plain_sum_with_several_prompts(tiny_clip):
    model = make_model(tiny_clip).eval()
    x = images(1, 48, 64)
    with torch.no_grad():
        out = model(x, CLASSES)
        sim, grid = low_res_similarities(model, x, CLASSES)
    assert not torch.allclose(out["score"], upsampled(sim.sum(-1), grid, (48, 64)), atol=1e-4)


def test_ensemble_identities():
    torch.manual_seed(0)
    decoder, score = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    assert_close(OTSeg.ensemble(decoder, score, lam=1.0), torch.sigmoid(decoder))
    assert_close(OTSeg.ensemble(decoder, score, lam=0.0), torch.sigmoid(score))
    assert_close(OTSeg.ensemble(decoder, score), torch.sigmoid((decoder + score) / 2))
    seen = torch.tensor([True, False, True])
    calibrated = OTSeg.ensemble(decoder, score, seen=seen)
    plain = OTSeg.ensemble(decoder, score)
    assert_close(plain - calibrated, torch.tensor([0.1, 0.0, 0.1]).view(1, 3, 1, 1).expand_as(plain))


def test_text_embeddings_order_normalisation_and_no_graph(tiny_clip):
    model = make_model(tiny_clip)
    text = model.text_embeddings(CLASSES)  # called with gradients enabled
    assert text.shape == (3, 2, 64)
    assert not text.requires_grad and text.grad_fn is None
    assert_close(text.norm(dim=-1), torch.ones(3, 2))
    with torch.no_grad():
        expected = F.normalize(tiny_clip.encode_text(tokenize("a part of a sky.")), dim=-1)[0]
    assert_close(text[2, 1], expected)  # class-major: [k, n] = template n filled with name k


def test_text_embeddings_cached_in_memory_and_on_disk(tiny_clip, tmp_path, monkeypatch):
    model = make_model(tiny_clip, text_cache_dir=str(tmp_path))
    first = model.text_embeddings(CLASSES)
    files = list(tmp_path.iterdir())
    assert len(files) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("text tower called although the embeddings are cached")

    monkeypatch.setattr(tiny_clip, "encode_text", refuse)
    assert torch.equal(model.text_embeddings(CLASSES), first)  # memory
    fresh = make_model(tiny_clip, text_cache_dir=str(tmp_path))
    assert torch.equal(fresh.text_embeddings(CLASSES), first)  # disk
    monkeypatch.undo()
    # other names, other templates, other text weights: other keys
    fresh.text_embeddings(CLASSES[:2])
    make_model(tiny_clip, templates=TEMPLATES[:1], text_cache_dir=str(tmp_path)).text_embeddings(CLASSES)
    torch.manual_seed(5)
    other_clip = CLIP(**TINY, prompt_tokens=4)
    other = OTSeg(other_clip, TEMPLATES, text_cache_dir=str(tmp_path)).text_embeddings(CLASSES)
    assert len(list(tmp_path.iterdir())) == 4
    assert not torch.allclose(other, first)


@pytest.mark.parametrize("matching", ["sinkhorn", "softmax"])
def test_gradients_reach_exactly_the_trainable_parameters(matching):
    torch.manual_seed(0)
    model = OTSeg(CLIP(**TINY, prompt_tokens=4), TEMPLATES, matching=matching).train()
    trainable = {name for name, _ in trainable_parameters(model)}
    prompts = {"clip." + name for name in PROMPTS}
    head = {name for name, _ in model.named_parameters() if name.startswith(("relationship_descriptor.", "decoder."))}
    assert trainable == prompts | head
    x = images(2, 48, 64)
    labels = torch.randint(0, 3, (2, 48, 64))
    labels[0, :10] = 255
    losses = otseg_loss(model(x, CLASSES), labels, count_masks(labels, 3))
    losses["total"].backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {name}"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"


def test_trainable_parameter_counts_at_vit_b16_size():
    """FACTS 3: 8,039,168 with 10 prompt tokens, 8,868,608 with 100 (built on the meta device: no memory)."""
    counts = {}
    for tokens in (10, 100):
        with torch.device("meta"):
            model = OTSeg(CLIP(**VIT_B_16, prompt_tokens=tokens), TEMPLATES)
        counts[tokens] = sum(p.numel() for _, p in trainable_parameters(model))
        head = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("clip."))
        assert head == 7_354_880, head
    assert counts == {10: 8_039_168, 100: 8_868_608}, counts


def test_head_widths_follow_the_backbone():
    vit_l_14 = dict(VIT_B_16, embed_dim=768, vision_width=1024, vision_layers=24, vision_patch_size=14,
                    transformer_width=768, transformer_heads=12)
    with torch.device("meta"):
        model = OTSeg(CLIP(**vit_l_14, prompt_tokens=10), TEMPLATES)
    assert model.relationship_descriptor.weight.shape == (768, 1536)
    assert model.decoder.layers[0].linear1.weight.shape == (3072, 768)
    assert model.decoder.layers[2].cross_attn.q_proj.weight.shape == (768, 768)


def test_clip_is_frozen_but_prompts(tiny_clip):
    make_model(tiny_clip)
    frozen = [n for n, p in tiny_clip.named_parameters() if not p.requires_grad]
    assert "token_embedding.weight" in frozen and "visual.conv1.weight" in frozen
    assert {n for n, p in tiny_clip.named_parameters() if p.requires_grad} == PROMPTS


@pytest.mark.cuda
def test_training_step_on_cuda_under_bf16_autocast(tiny_clip):
    """Forward, losses and backward on the GPU in bf16 autocast; Sinkhorn's outputs stay fp32 and the
    inductive calibration accepts a seen-class mask left on the CPU."""
    model = make_model(copy.deepcopy(tiny_clip)).cuda().train()
    x, labels = images(2, 64, 64).cuda(), torch.randint(0, 3, (2, 64, 64)).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, CLASSES)
        losses = otseg_loss(out, labels, count_masks(labels, 3).clamp(min=1))
    assert out["score"].dtype == out["decoder"].dtype == torch.float32
    losses["total"].backward()
    assert all(torch.isfinite(p.grad).all() for _, p in trainable_parameters(model))
    probabilities = OTSeg.ensemble(out["decoder"], out["score"], seen=torch.tensor([True, False, True]))
    assert probabilities.device.type == "cuda" and torch.isfinite(probabilities).all()
