"""Tests of model.py with a tiny random CLIP (against POT and hand computations from CLIP's outputs);
the ViT-B/16 parameter counts on the meta device."""
import copy

import pytest
import torch
import torch.nn.functional as F

from clip import CLIP, TINY, VIT_B_16, tokenize
from conftest import assert_close
from losses import count_masks, otseg_loss
from model import OTSeg, trainable_parameters
from mpsa import MATCHINGS

PROMPTS = {"visual.prompt_embeddings", "visual.deep_prompt_embeddings", "visual.prompt_proj.weight",
           "visual.prompt_proj.bias", "visual.prompt_norm.weight", "visual.prompt_norm.bias"}
TEMPLATES = ["a photo of a {}.", "a part of a {}."]
CLASSES = ["cat", "dog", "sky"]


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return CLIP(**TINY, prompt_tokens=4)


def make_model(tiny_clip, templates=TEMPLATES, matching="sinkhorn", **kwargs):
    torch.manual_seed(1)
    return OTSeg(tiny_clip, templates, matching=matching, **kwargs)


def images(B, H, W, seed=0):
    return torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("matching", MATCHINGS)
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


def pass_text_through(model, use_global):
    """Relationship descriptor weights [0, I] (q0 = t) or [I, 0] (q0 = g * t), bias 0."""
    C = model.relationship_descriptor.out_features
    blocks = [torch.eye(C), torch.zeros(C, C)] if use_global else [torch.zeros(C, C), torch.eye(C)]
    with torch.no_grad():
        model.relationship_descriptor.weight.copy_(torch.cat(blocks, dim=1))
        model.relationship_descriptor.bias.zero_()


def cosines(model, x, classes, use_global):
    """cos(v_m, q0_kn) from CLIP's own outputs, for the descriptor of pass_text_through: (B, K, h, w, N)."""
    g, dense = model.clip.encode_dense(x)  # (B, C), (B, C, h, w)
    text = model.text_embeddings(classes)  # (K, N, C)
    q0 = F.normalize(g, dim=-1)[:, None, None] * text if use_global else text.expand(len(x), *text.shape)
    return F.cosine_similarity(dense[:, None, :, :, :, None],  # (B, 1, C, h, w, 1)
                               q0.permute(0, 1, 3, 2)[:, :, :, None, None, :], dim=2)  # (B, K, C, 1, 1, N)


def to_input_size(low, size):
    """(B, K, h, w) -> (B, K, H, W), bilinear, align_corners=False (the release's upsampling)."""
    return F.interpolate(low, size=size, mode="bilinear", align_corners=False)


@pytest.mark.parametrize("use_global", [False, True])
@torch.no_grad()
def test_score_map_against_cosines_and_pot(tiny_clip, use_global):
    """The score path from CLIP's outputs: with one prompt the cosine itself (either matching), with
    several the sum of cosines (softmax) or sum_n M N T_mn cos_mn with POT's plan T (MPS)."""
    ot = pytest.importorskip("ot")
    x = images(2, 48, 64)
    models = {(matching, n): make_model(tiny_clip, templates=TEMPLATES[:n], matching=matching).eval()
              for matching in MATCHINGS for n in (1, len(TEMPLATES))}
    for model in models.values():
        pass_text_through(model, use_global)
    cos = cosines(models["sinkhorn", 2], x, CLASSES, use_global)  # (B, K, h, w, N)
    for matching in MATCHINGS:
        assert_close(models[matching, 1](x, CLASSES)["score"], to_input_size(cos[..., 0], (48, 64)),
                     atol=1e-5, rtol=1e-4, what=f"{matching}, one prompt: the cosine")
    assert_close(models["softmax", 2](x, CLASSES)["score"], to_input_size(cos.sum(-1), (48, 64)),
                 atol=1e-5, rtol=1e-4, what="softmax, two prompts: the sum of cosines")
    B, K, h, w, N = cos.shape
    sim = cos.flatten(2, 3).double()  # (B, K, M, N)
    expected = torch.empty(B, K, h * w, dtype=torch.float64)
    for b in range(B):
        for k in range(K):
            plan = ot.sinkhorn(torch.full((h * w,), 1 / (h * w), dtype=torch.float64),
                               torch.full((N,), 1 / N, dtype=torch.float64), 1 - sim[b, k], 0.05,
                               method="sinkhorn_log", numItermax=100_000, stopThr=1e-15)
            expected[b, k] = (h * w * N * plan * sim[b, k]).sum(-1)
    score = models["sinkhorn", 2](x, CLASSES)["score"]
    assert_close(score, to_input_size(expected.float().unflatten(-1, (h, w)), (48, 64)), atol=1e-4, rtol=1e-4,
                 what="MPS score vs POT's plans")
    assert not torch.allclose(score, to_input_size(cos.sum(-1), (48, 64)), atol=1e-3)  # MPS is not the sum


def test_ensemble_identities():
    torch.manual_seed(0)
    decoder, score = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    assert_close(OTSeg.ensemble(decoder, score, lam=1.0), torch.sigmoid(decoder), atol=1e-5, rtol=1e-4)
    assert_close(OTSeg.ensemble(decoder, score, lam=0.0), torch.sigmoid(score), atol=1e-5, rtol=1e-4)
    assert_close(OTSeg.ensemble(decoder, score), torch.sigmoid((decoder + score) / 2), atol=1e-5, rtol=1e-4)
    seen = torch.tensor([True, False, True])
    calibrated = OTSeg.ensemble(decoder, score, seen=seen)
    plain = OTSeg.ensemble(decoder, score)
    assert_close(plain - calibrated, torch.tensor([0.1, 0.0, 0.1]).view(1, 3, 1, 1).expand_as(plain),
                 atol=1e-5, rtol=1e-4, what="calibration of the seen classes")


def test_text_embeddings_order_normalisation_and_no_graph(tiny_clip):
    model = make_model(tiny_clip)
    text = model.text_embeddings(CLASSES)  # called with gradients enabled
    assert text.shape == (3, 2, 64)
    assert not text.requires_grad and text.grad_fn is None
    assert_close(text.norm(dim=-1), torch.ones(3, 2), atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        expected = F.normalize(tiny_clip.encode_text(tokenize("a part of a sky.")), dim=-1)[0]
    assert_close(text[2, 1], expected, atol=1e-5, rtol=1e-4)  # class-major: [k, n] = template n, name k


def test_text_embeddings_cached_in_memory(tiny_clip, monkeypatch):
    model = make_model(tiny_clip)
    first = model.text_embeddings(CLASSES)

    def refuse(*args, **kwargs):
        raise AssertionError("text tower called although the embeddings are cached")

    monkeypatch.setattr(tiny_clip, "encode_text", refuse)
    assert torch.equal(model.text_embeddings(CLASSES), first)
    monkeypatch.undo()
    # other names: another entry, the same rows
    assert_close(model.text_embeddings(CLASSES[:2]), first[:2], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("matching", MATCHINGS)
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
    """Counted from torch's own modules: the head is nn.Linear(1024, 512) (relationship descriptor), two
    nn.TransformerDecoderLayer(512, 8, 2048) less their unused self-attention and norm1, and the last
    layer's two nn.Linear(512, 512); deep VPT is 12 x T tokens of 768, nn.Linear(768, 768) and
    nn.LayerNorm(768). That gives 7,354,880 in the head, 8,039,168 in all with 10 prompt tokens and
    8,868,608 with 100 (the models are built on the meta device: no memory)."""
    def count(*modules):
        return sum(p.numel() for m in modules for p in m.parameters())
    with torch.device("meta"):
        layer = torch.nn.TransformerDecoderLayer(512, 8, dim_feedforward=2048)
        head = count(torch.nn.Linear(1024, 512)) + 2 * (count(layer) - count(layer.self_attn, layer.norm1)) \
            + 2 * count(torch.nn.Linear(512, 512))
        vpt_shared = count(torch.nn.Linear(768, 768), torch.nn.LayerNorm(768))
        for tokens in (10, 100):
            model = OTSeg(CLIP(**VIT_B_16, prompt_tokens=tokens), TEMPLATES)
            ours_head = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("clip."))
            assert ours_head == head, (ours_head, head)
            total = sum(p.numel() for _, p in trainable_parameters(model))
            assert total == head + 12 * tokens * 768 + vpt_shared, (tokens, total)


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


def test_implicit_gradient_through_otseg_matches_unrolled(tiny_clip):
    """At convergence (many iterations, no early stop) differentiating the fixed point gives the
    unrolled iterations' gradient for every trainable parameter, VPT prompts included (float64)."""
    x = images(1, 32, 48).double()
    labels = torch.randint(0, 3, (1, 32, 48), generator=torch.Generator().manual_seed(1))
    grads = {}
    for implicit in (False, True):
        model = make_model(copy.deepcopy(tiny_clip), n_iters=300, tol=0.0, implicit_grad=implicit).double().eval()
        losses = otseg_loss(model(x, CLASSES), labels, count_masks(labels, 3))
        losses["total"].backward()
        grads[implicit] = torch.cat([p.grad.flatten() for _, p in trainable_parameters(model)])
    assert grads[False].abs().max() > 0
    assert_close(grads[True], grads[False], atol=1e-8, rtol=1e-6)
