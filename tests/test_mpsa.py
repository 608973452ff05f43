"""Tests of mpsa.py: MPSA's attention and the decoder's D end to end against POT's plans composed with
torch's own layers, the softmax baseline against torch.nn.MultiheadAttention, shapes, identities and
the release's structure."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close
from mpsa import MATCHINGS, MPSADecoder, MultiPromptAttention, sinkhorn_matching, softmax_mask_logits


def inputs(B, K, N, M, C, seed=0):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(B, K, N, C, generator=g)
    memory = F.normalize(torch.randn(B, M, C, generator=g), dim=-1)
    return queries, memory


@pytest.mark.parametrize("matching", MATCHINGS)
@pytest.mark.parametrize("B, K, N, h, w", [(1, 1, 1, 4, 4), (2, 3, 4, 3, 5), (3, 5, 2, 7, 2)])
def test_shapes_and_eval_determinism(matching, B, K, N, h, w):
    torch.manual_seed(0)
    C = 32
    decoder = MPSADecoder(dim=C, ffn_dim=4 * C, matching=matching, num_heads=4).eval()
    queries, memory = inputs(B, K, N, h * w, C)
    D, masks = decoder(queries, memory)
    assert D.shape == (B, K, h * w)
    assert len(masks) == 3 and all(a.shape == (B, K, h * w) for a in masks)
    assert torch.isfinite(D).all()
    D2, _ = decoder(queries, memory)
    assert torch.equal(D, D2)


def test_dropout_active_in_training():
    torch.manual_seed(0)
    decoder = MPSADecoder(dim=32, ffn_dim=128).train()
    queries, memory = inputs(2, 3, 4, 12, 32)
    assert not torch.equal(decoder(queries, memory)[0], decoder(queries, memory)[0])


def test_one_prompt_plan_is_uniform():
    """N = 1: the plan is 1/M, so the mask is the cosine similarity and the output proj(mean of values)."""
    torch.manual_seed(0)
    B, K, M, C = 2, 3, 10, 16
    attn = MultiPromptAttention(C, matching="sinkhorn").eval()
    queries, memory = inputs(B, K, 1, M, C)
    out, mask = attn(queries, memory)
    q = F.normalize(queries @ attn.q_proj.weight.T + attn.q_proj.bias, dim=-1)  # (B, K, 1, C)
    k = F.normalize(memory @ attn.k_proj.weight.T + attn.k_proj.bias, dim=-1)  # (B, M, C)
    cosine = (q[:, :, None, 0, :] * k[:, None, :, :]).sum(-1)  # (B, K, M)
    assert_close(mask, cosine, atol=1e-5, rtol=1e-4)
    values = memory @ attn.v_proj.weight.T + attn.v_proj.bias  # (B, M, C)
    expected = values.mean(dim=1) @ attn.out_proj.weight.T + attn.out_proj.bias  # (B, C)
    assert_close(out[:, :, 0], expected[:, None].expand(B, K, C), atol=1e-5, rtol=1e-4)


def pot_attention(x, memory, q_proj, k_proj, v_proj=None, out_proj=None, eps=0.05):
    """One MPSA from POT's plans, (image, class) by (image, class): x (B, K, N, C), memory (B, M, C) ->
    mask A (B, K, M) = sum_n M N T_mn sim_mn and, given v_proj and out_proj, the output (B, K, N, C)
    out_n = W_o sum_m T_mn W_v v_m, T the plan of cost 1 - sim with marginals 1/M and 1/N."""
    ot = pytest.importorskip("ot")
    q = F.normalize(q_proj(x), dim=-1)  # (B, K, N, C)
    k = F.normalize(k_proj(memory), dim=-1)  # (B, M, C)
    B, K, N, C = x.shape
    M = memory.shape[1]
    mu, nu = torch.full((M,), 1 / M, dtype=x.dtype), torch.full((N,), 1 / N, dtype=x.dtype)
    mask, attended = torch.empty(B, K, M, dtype=x.dtype), torch.empty(B, K, N, C, dtype=x.dtype)
    for b in range(B):
        for c in range(K):
            sim = k[b] @ q[b, c].T  # (M, N)
            # POT stops once its marginals are right to 1e-13: converged well past the tests' tolerances
            plan = ot.sinkhorn(mu, nu, 1 - sim, eps, method="sinkhorn_log", numItermax=10_000, stopThr=1e-13)
            mask[b, c] = (M * N * plan * sim).sum(-1)
            if v_proj is not None:
                attended[b, c] = plan.T @ v_proj(memory[b])  # (N, C): each query's weights sum to 1/N
    return mask, (out_proj(attended) if out_proj is not None else None)


def test_attention_against_pot_plans():
    """N > 1: MPSA's mask and output against POT's plan applied to the values (the plan itself is the
    attention weight, mass 1/N per query; eval mode, so no dropout)."""
    torch.manual_seed(0)
    B, K, N, M, C = 2, 3, 4, 9, 16
    attn = MultiPromptAttention(C, matching="sinkhorn", n_iters=1000, tol=0).double().eval()
    queries, memory = (x.double() for x in inputs(B, K, N, M, C))
    out, mask = attn(queries, memory)
    expected_mask, expected_out = pot_attention(queries, memory, attn.q_proj, attn.k_proj, attn.v_proj,
                                                attn.out_proj)
    assert_close(mask, expected_mask, rtol=1e-11, what="mask vs POT")
    assert_close(out, expected_out, rtol=1e-11, what="output vs POT's plan applied to the values")


def torch_layer_holding(layer, heads: int, ffn_dim: int, dtype=torch.float32) -> torch.nn.TransformerDecoderLayer:
    """torch's nn.TransformerDecoderLayer (post-norm, eval) holding our layer's cross-attention
    projections, FFN and norms 2-3; its own self-attention and norm1 keep their initial weights."""
    dim = layer.norm2.normalized_shape[0]
    reference = torch.nn.TransformerDecoderLayer(dim, heads, dim_feedforward=ffn_dim, batch_first=True,
                                                 dtype=dtype).eval()
    attn = layer.cross_attn
    with torch.no_grad():
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        reference.multihead_attn.in_proj_weight.copy_(torch.cat([p.weight for p in projections]))
        reference.multihead_attn.in_proj_bias.copy_(torch.cat([p.bias for p in projections]))
        reference.multihead_attn.out_proj.load_state_dict(attn.out_proj.state_dict())
        for name in ("linear1", "linear2", "norm2", "norm3"):
            getattr(reference, name).load_state_dict(getattr(layer, name).state_dict())
    return reference


def test_decoder_against_torch_layers_and_pot():
    """D end to end against an independent composition: torch's nn.TransformerDecoderLayer holding our
    weights (its cross-attention's in_proj and out_proj, linear1, activation, linear2, norm2, norm3),
    POT's plans for the attention, no self-attention, post-norm; then
    D = A_3 * sigmoid(A_1)^(1/2) * sigmoid(A_2)^(1/2) (the release's `decode_seg.py`)."""
    torch.manual_seed(0)
    B, K, N, M, C, FFN = 2, 2, 3, 8, 16, 32
    decoder = MPSADecoder(dim=C, ffn_dim=FFN, n_iters=1000, tol=0).double().eval()
    with torch.no_grad():  # layers unlike each other and norms with non-trivial affines
        for p in decoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    queries, memory = (x.double() for x in inputs(B, K, N, M, C))
    D, masks = decoder(queries, memory)

    expected_masks, x = [], queries
    for layer in decoder.layers[:-1]:
        reference = torch_layer_holding(layer, heads=1, ffn_dim=FFN, dtype=torch.float64)
        w_q, w_k, w_v = reference.multihead_attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = reference.multihead_attn.in_proj_bias.chunk(3)
        mask, attended = pot_attention(x, memory, lambda t: F.linear(t, w_q, b_q),
                                       lambda t: F.linear(t, w_k, b_k), lambda t: F.linear(t, w_v, b_v),
                                       reference.multihead_attn.out_proj)
        expected_masks.append(mask)
        with torch.no_grad():
            x = reference.norm2(x + attended)
            x = reference.norm3(x + reference.linear2(reference.activation(reference.linear1(x))))
    last = decoder.layers[-1].cross_attn
    expected_masks.append(pot_attention(x, memory, last.q_proj, last.k_proj)[0])
    a1, a2, a3 = expected_masks
    expected = a3 * torch.sigmoid(a1).sqrt() * torch.sigmoid(a2).sqrt()
    for i, (mask, expected_mask) in enumerate(zip(masks, expected_masks)):
        assert_close(mask, expected_mask, rtol=1e-11, what=f"A_{i + 1} vs the composition")
    assert_close(D, expected, rtol=1e-11, what="D vs the composition")


def test_each_mask_comes_from_the_queries_entering_its_layer():
    """A layer's FFN changes the queries it passes on, so every later mask, and never its own mask."""
    torch.manual_seed(0)
    decoder = MPSADecoder(dim=16, ffn_dim=64).eval()
    queries, memory = inputs(2, 3, 4, 9, 16)
    _, masks = decoder(queries, memory)
    for changed in (0, 1):
        with torch.no_grad():
            decoder.layers[changed].linear2.bias.add_(torch.randn(16))  # not uniform: norm3 would remove it
        _, new_masks = decoder(queries, memory)
        for layer, (old, new) in enumerate(zip(masks, new_masks)):
            moved = (new - old).abs().max().item()
            if layer <= changed:
                assert moved == 0, f"A_{layer + 1} moved by {moved:.3e} when layer {changed + 1}'s FFN changed"
            else:
                assert moved > 1e-3, f"A_{layer + 1} did not follow layer {changed + 1}'s output ({moved:.3e})"
        masks = new_masks


@pytest.mark.parametrize("matching", MATCHINGS)
def test_every_parameter_gets_a_gradient_and_last_layer_is_q_k_only(matching):
    torch.manual_seed(0)
    decoder = MPSADecoder(dim=16, ffn_dim=64, matching=matching, num_heads=2)
    queries, memory = inputs(2, 3, 4, 9, 16)
    D, _ = decoder(queries, memory)
    D.square().sum().backward()
    for name, p in decoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    last = {name for name, _ in decoder.layers[2].named_parameters()}
    assert last == {f"cross_attn.{proj}.{kind}" for proj in ("q_proj", "k_proj") for kind in ("weight", "bias")}


@pytest.mark.parametrize("matching", MATCHINGS)
def test_layers_start_as_copies_of_one_layer(matching):
    """The release deep-copies one layer into every place: layer 2 equals layer 1, and layer 3's
    q and k equal layer 1's, at initialisation; the copies are separate parameters."""
    torch.manual_seed(0)
    decoder = MPSADecoder(dim=16, ffn_dim=64, matching=matching, num_heads=2)
    first = {name: value.clone() for name, value in decoder.layers[0].state_dict().items()}
    for layer in decoder.layers[1:]:
        for name, value in layer.state_dict().items():
            diff = (value - first[name]).abs().max().item()
            assert diff == 0, f"{name}: largest difference {diff:.3e} from the first layer's"
    with torch.no_grad():
        decoder.layers[1].cross_attn.q_proj.weight.add_(1.0)
        decoder.layers[2].cross_attn.k_proj.weight.add_(1.0)
    assert torch.equal(decoder.layers[0].cross_attn.q_proj.weight, first["cross_attn.q_proj.weight"])
    assert torch.equal(decoder.layers[0].cross_attn.k_proj.weight, first["cross_attn.k_proj.weight"])


def test_parameter_count_at_vit_b16_width():
    """Layers 1-2 have the parameters of torch's nn.TransformerDecoderLayer(512, 8, 2048) less its
    self-attention and norm1 (never called), layer 3 those of two nn.Linear(512, 512); both matchings."""
    with torch.device("meta"):
        reference = torch.nn.TransformerDecoderLayer(512, 8, dim_feedforward=2048)
        unused = [reference.self_attn, reference.norm1]
        full = sum(p.numel() for p in reference.parameters()) - sum(p.numel() for m in unused for p in m.parameters())
        q_and_k = 2 * sum(p.numel() for p in torch.nn.Linear(512, 512).parameters())
        for matching in MATCHINGS:
            decoder = MPSADecoder(dim=512, ffn_dim=2048, matching=matching)
            counts = [sum(p.numel() for p in layer.parameters()) for layer in decoder.layers]
            assert counts == [full, full, q_and_k], (matching, counts, [full, full, q_and_k])


def test_softmax_and_sinkhorn_share_everything_but_the_matching():
    torch.manual_seed(0)
    sinkhorn = MPSADecoder(dim=32, ffn_dim=128, matching="sinkhorn", num_heads=4).eval()
    softmax = MPSADecoder(dim=32, ffn_dim=128, matching="softmax", num_heads=4).eval()
    assert {n: p.shape for n, p in sinkhorn.named_parameters()} == \
           {n: p.shape for n, p in softmax.named_parameters()}
    softmax.load_state_dict(sinkhorn.state_dict())
    queries, memory = inputs(2, 3, 4, 12, 32)
    D_sinkhorn, _ = sinkhorn(queries, memory)
    D_softmax, _ = softmax(queries, memory)
    assert not torch.allclose(D_sinkhorn, D_softmax)
    # Flipping only the matching attribute of each attention turns one decoder into the other.
    for layer in sinkhorn.layers:
        layer.cross_attn.matching = "softmax"
    assert torch.equal(sinkhorn(queries, memory)[0], D_softmax)


def test_softmax_matching_against_multihead_attention():
    """Output vs torch.nn.MultiheadAttention with the same weights; mask vs per-head logits by hand."""
    torch.manual_seed(0)
    B, K, N, M, C, H = 2, 3, 4, 10, 32, 4
    attn = MultiPromptAttention(C, matching="softmax", num_heads=H).eval()
    reference = torch.nn.MultiheadAttention(C, H, batch_first=True).eval()
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        reference.in_proj_bias.copy_(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
        reference.out_proj.weight.copy_(attn.out_proj.weight)
        reference.out_proj.bias.copy_(attn.out_proj.bias)
    queries, memory = inputs(B, K, N, M, C)
    out, mask = attn(queries, memory)
    expected, _ = reference(queries.flatten(1, 2), memory, memory)  # (B, K*N, C)
    assert_close(out, expected.unflatten(1, (K, N)), atol=1e-5, rtol=1e-4)
    q = attn.q_proj(queries).unflatten(-1, (H, C // H))  # (B, K, N, H, C/H)
    k = attn.k_proj(memory).unflatten(-1, (H, C // H))  # (B, M, H, C/H)
    logits = torch.einsum("bknhd,bmhd->bknhm", q, k) / math.sqrt(C // H)  # per head, pre-softmax
    assert_close(mask, logits.mean(dim=3).sum(dim=2), atol=1e-5, rtol=1e-4)
    assert_close(softmax_mask_logits(attn.q_proj(queries), attn.k_proj(memory), H), mask, atol=1e-5, rtol=1e-4,
                 what="softmax_mask_logits vs the attention's mask")


def test_invalid_matching_is_rejected():
    with pytest.raises(ValueError):
        MPSADecoder(dim=16, matching="cosine")


def test_layer_is_post_norm_without_self_attention():
    """Against torch's nn.TransformerDecoderLayer (post-norm) with the same weights: its self-attention
    block is made to pass its input through (output projection zeroed, and layer-normalised queries
    that norm1 leaves as they are), so what remains must be our layer (softmax matching, eval)."""
    torch.manual_seed(0)
    C, H = 16, 4
    layer = MPSADecoder(dim=C, ffn_dim=64, matching="softmax", num_heads=H).layers[0].eval()
    with torch.no_grad():  # non-trivial norm affines, so that a swapped or missing norm shows
        for norm in (layer.norm2, layer.norm3):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    reference = torch_layer_holding(layer, heads=H, ffn_dim=64)
    with torch.no_grad():
        reference.self_attn.out_proj.weight.zero_()
        reference.self_attn.out_proj.bias.zero_()
    queries, memory = inputs(2, 3, 4, 9, C)
    queries = F.layer_norm(queries, (C,), eps=0.0)  # mean 0, variance 1: norm1 passes them through
    expected = reference(queries.flatten(1, 2), memory)  # (B, K*N, C)
    assert_close(layer(queries, memory)[0], expected.unflatten(1, (3, 4)), atol=1e-4, rtol=1e-4)


def test_implicit_gradient_matches_unrolled_gradient_at_convergence():
    # With the plans converged (many iterations, no early stop), differentiating the fixed point
    # (implicit_grad) must give the unrolled loop's gradient for every parameter of the decoder.
    torch.manual_seed(0)
    C = 16
    grads = {}
    for implicit in (False, True):
        torch.manual_seed(0)
        decoder = MPSADecoder(dim=C, ffn_dim=2 * C, dropout=0.0, n_iters=300, tol=0.0,
                              implicit_grad=implicit).double()
        queries, memory = inputs(2, 2, 3, 12, C)
        D, _ = decoder(queries.double(), memory.double())
        D.pow(2).sum().backward()
        grads[implicit] = torch.cat([p.grad.flatten() for p in decoder.parameters()])
    assert_close(grads[True], grads[False], atol=1e-8, rtol=1e-6)


def test_sinkhorn_matching_in_float32_under_bf16_autocast():
    # The cosine similarities are divided by eps = 0.05 inside Sinkhorn's exponential: computed in
    # bf16 they would move the plan by about 1%; in fp32 autocast must change nothing measurable.
    q, k = torch.randn(2, 3, 4, 32), torch.randn(2, 50, 32)
    expected_mask, expected_plan = sinkhorn_matching(q, k)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mask, plan = sinkhorn_matching(q, k)
    assert mask.dtype == plan.dtype == torch.float32
    assert_close(mask, expected_mask, atol=1e-6, rtol=0)
    assert_close(plan, expected_plan, atol=1e-8, rtol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("matching", MATCHINGS)
def test_decoder_on_cuda_matches_cpu(matching):
    torch.manual_seed(0)
    decoder = MPSADecoder(dim=32, ffn_dim=128, matching=matching, num_heads=4).eval()
    queries, memory = inputs(2, 3, 4, 64, 32)
    expected, _ = decoder(queries, memory)
    D, masks = decoder.cuda()(queries.cuda(), memory.cuda())
    assert_close(D.cpu(), expected, atol=1e-4, rtol=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        D_bf16, _ = decoder(queries.cuda(), memory.cuda())
    assert torch.isfinite(D_bf16).all()
    assert matching == "softmax" or D_bf16.dtype == torch.float32  # MPSA's masks stay fp32
