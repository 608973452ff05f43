"""mpsa.py -- Multi-Prompts Sinkhorn Attention (MPSA) and OTSeg's three-layer decoder.

Paper Sec. 4.2 (b), Eq. 11-15. The decoder turns the K*N refined text embeddings (one query per class
and prompt) into mask logits over the M pixel tokens of an image. Its cross-attention replaces the
softmax over pixels of Eq. 11 by the optimal transport plan of Multi-Prompts Sinkhorn (Eq. 13):

    q = normalize(W_q x)      (B, K, N, C)   one query per (class k, prompt n)
    k = normalize(W_k v)      (B, M, C)      one key per pixel token
    sim = q . k               (B, K, M, N)   cosine similarities
    T = Sinkhorn(1 - sim)     per (image, class): M pixels x N prompts, marginals 1/M and 1/N
    A = sum_n M N T sim       (B, K, M)      the layer's mask logits (MPS, Eq. 9 and 14)
    out_n = W_o sum_m T_mn W_v v_m           the plan itself is the attention weight (mass 1/N per query)

Where softmax normalises each query's weights over pixels independently, the plan couples the N
prompts of a class: every prompt receives the same mass and the pixels are shared out among them,
so the prompts attend to different parts of the object (paper Fig. 5). "Multi-head" becomes
"multi-prompt": the attention is single-head and the N prompts play the heads' role.

Decoder (the authors' release, `models/decode_heads/decode_seg.py`): 3 post-norm layers without
self-attention, no positional encoding, no final norm:

    x = norm2(x + dropout(MPSA(x, v)));   x = norm3(x + dropout(FFN(x)))     FFN: C -> 4C, ReLU, -> C
    D = A_3 * sigmoid(A_1)^(1/2) * sigmoid(A_2)^(1/2)

Each A_l is computed from the queries *entering* layer l, so the third layer needs only its query
and key projections; it builds nothing else (the release builds a whole layer whose other
2,627,072 parameters never get a gradient, and self-attention weights it never calls).

The baseline of the paper's Table 5(b), `matching="softmax"`, is the same class with only the
matching changed: 8-head scaled dot-product softmax attention over pixels (no normalisation of q
and k, as ZegCLIP), whose mask logits are the head-averaged pre-softmax logits summed over the N
prompts. Both variants have the same parameters (W_q, W_k, W_v, W_o per layer, norms, FFNs), with
the same names and shapes, so a checkpoint of one loads into the other.

Notation: B batch, K classes, N prompts, M pixels (h*w tokens), C channels.
Run `python mpsa.py` for a demonstration on random inputs.
"""
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from sinkhorn import mps, working_dtype

MATCHINGS = ("sinkhorn", "softmax")


# ----------------------------------------------------------------------------------------------
# The two matchings, as pure functions of projected queries and keys
# ----------------------------------------------------------------------------------------------

def sinkhorn_matching(q: torch.Tensor, k: torch.Tensor, eps: float = 0.05, n_iters: int = 100,
                      tol: float = 1e-6, implicit_grad: bool = False,
                      sync_free: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """MPSA's matching. q (B, K, N, C), k (B, M, C) -> mask logits (B, K, M), plan (B, K, M, N).

    `implicit_grad=True` differentiates the converged plan instead of the unrolled iterations
    (`sinkhorn.sinkhorn_log`): less training memory, not the release's gradient. `sync_free=True`
    tests convergence on the device (`sinkhorn.py`'s docstring): the same result, for torch.compile."""
    # In fp32 (fp64 stays) whatever the autocast: a bf16 cosine keeps ~3 digits, and Sinkhorn divides
    # it by eps = 0.05 inside an exponential (1% error on the plan in bf16, 1e-7 in fp32).
    dtype = working_dtype(q)
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = F.normalize(q.to(dtype), dim=-1)
        k = F.normalize(k.to(dtype), dim=-1)
        sim = torch.einsum("bknc,bmc->bkmn", q, k)  # (B, K, M, N) cosine similarities
    return mps(sim, eps=eps, n_iters=n_iters, tol=tol, return_plan=True, implicit_grad=implicit_grad,
               sync_free=sync_free)  # (B, K, M), (B, K, M, N)


def softmax_mask_logits(q: torch.Tensor, k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Softmax baseline's mask. q (B, K, N, C), k (B, M, C) -> (B, K, M).

    The per-head pre-softmax logits are q_h . k_h / sqrt(C/H); their mean over the H heads is the
    full-width dot product q . k / (H sqrt(C/H)), since the heads split the channels. Summed over
    the N prompts it needs only the prompt-summed query: no (B, H, K*N, M) tensor.
    """
    scale = num_heads * math.sqrt(q.shape[-1] // num_heads)
    return torch.einsum("bkc,bmc->bkm", q.sum(dim=2), k) / scale  # (B, K, M)


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, C) -> (B, H, L, C/H)."""
    return x.unflatten(-1, (num_heads, x.shape[-1] // num_heads)).transpose(1, 2)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, value: torch.Tensor, num_heads: int,
                      attn_dropout: float = 0.0) -> torch.Tensor:
    """Multi-head softmax cross-attention over pixels. q (B, K, N, C), k, value (B, M, C) -> (B, K, N, C)."""
    B, K, N, C = q.shape
    out = F.scaled_dot_product_attention(
        _split_heads(q.flatten(1, 2), num_heads),  # (B, H, K*N, C/H): every (class, prompt) a query
        _split_heads(k, num_heads), _split_heads(value, num_heads),  # (B, H, M, C/H)
        dropout_p=attn_dropout)  # (B, H, K*N, C/H)
    return out.transpose(1, 2).flatten(2).unflatten(1, (K, N))  # (B, K*N, C) -> (B, K, N, C)


# ----------------------------------------------------------------------------------------------
# Building blocks: the attention module and one decoder layer
# ----------------------------------------------------------------------------------------------

class MultiPromptAttention(nn.Module):
    """Cross-attention from the K*N text queries to the M pixel tokens; returns (output, mask logits).

    `mask_only=True` builds only W_q and W_k and returns (None, mask): the decoder's last layer,
    whose output queries nothing would use.
    """

    def __init__(self, dim: int, matching: str = "sinkhorn", num_heads: int = 8,
                 attn_dropout: float = 0.1, eps: float = 0.05, n_iters: int = 100, tol: float = 1e-6,
                 implicit_grad: bool = False, sync_free: bool = False, mask_only: bool = False):
        super().__init__()
        if matching not in MATCHINGS:
            raise ValueError(f"matching must be one of {MATCHINGS}, got {matching!r}")
        if matching == "softmax" and dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.matching = matching
        self.num_heads = num_heads
        self.attn_dropout = attn_dropout  # a probability, on the attention weights (release: attn_drop 0.1)
        self.eps, self.n_iters, self.tol = eps, n_iters, tol
        self.implicit_grad, self.sync_free = implicit_grad, sync_free
        self.mask_only = mask_only
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        if not mask_only:
            self.v_proj = nn.Linear(dim, dim)
            self.out_proj = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor,
                memory: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """queries (B, K, N, C), memory (B, M, C) -> output (B, K, N, C) or None, mask (B, K, M)."""
        q = self.q_proj(queries)  # (B, K, N, C)
        k = self.k_proj(memory)  # (B, M, C)
        if self.matching == "sinkhorn":
            mask, plan = sinkhorn_matching(q, k, self.eps, self.n_iters, self.tol, self.implicit_grad,
                                           self.sync_free)
        else:
            mask = softmax_mask_logits(q, k, self.num_heads)
        if self.mask_only:
            return None, mask
        value = self.v_proj(memory)  # (B, M, C)
        if self.matching == "sinkhorn":
            weights = F.dropout(plan, self.attn_dropout, self.training).to(value.dtype)  # (B, K, M, N)
            out = torch.einsum("bkmn,bmc->bknc", weights, value)  # (B, K, N, C)
        else:
            attn_dropout = self.attn_dropout if self.training else 0.0
            out = softmax_attention(q, k, value, self.num_heads, attn_dropout)  # (B, K, N, C)
        return self.out_proj(out), mask


class MPSADecoderLayer(nn.Module):
    """Post-norm decoder layer without self-attention (the release's `decode_seg.py`).

    Returns (queries out, mask logits).

    Parameter names follow the release's nn.TransformerDecoderLayer subclass: norm1 belonged to the
    self-attention it builds and never calls, so the two norms used are norm2 and norm3.
    """

    def __init__(self, dim: int, ffn_dim: int = 2048, dropout: float = 0.1,
                 matching: str = "sinkhorn", num_heads: int = 8, eps: float = 0.05,
                 n_iters: int = 100, tol: float = 1e-6, implicit_grad: bool = False,
                 sync_free: bool = False, mask_only: bool = False):
        super().__init__()
        self.cross_attn = MultiPromptAttention(dim, matching=matching, num_heads=num_heads,
                                               attn_dropout=dropout, eps=eps, n_iters=n_iters, tol=tol,
                                               implicit_grad=implicit_grad, sync_free=sync_free,
                                               mask_only=mask_only)
        self.mask_only = mask_only
        if not mask_only:
            self.norm2 = nn.LayerNorm(dim)
            self.linear1 = nn.Linear(dim, ffn_dim)
            self.linear2 = nn.Linear(ffn_dim, dim)
            self.norm3 = nn.LayerNorm(dim)
            self.dropout = nn.Dropout(dropout)  # inside the FFN, as nn.TransformerDecoderLayer
            self.dropout2 = nn.Dropout(dropout)  # on the attention branch
            self.dropout3 = nn.Dropout(dropout)  # on the FFN branch

    def forward(self, x: torch.Tensor,
                memory: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """x (B, K, N, C), memory (B, M, C) -> x (B, K, N, C) or None (mask_only), mask (B, K, M)."""
        attended, mask = self.cross_attn(x, memory)
        if self.mask_only:
            return None, mask
        x = self.norm2(x + self.dropout2(attended))
        x = self.norm3(x + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(x))))))
        return x, mask


# ----------------------------------------------------------------------------------------------
# The decoder
# ----------------------------------------------------------------------------------------------

class MPSADecoder(nn.Module):
    """OTSeg's decoder: queries (B, K, N, C), memory (B, M, C) -> D (B, K, M), [A_1, ..., A_L].

    Args:
        dim: channel width C of queries and memory (CLIP's embedding width: 512 for ViT-B/16).
        num_layers: L; layers 1..L-1 are full layers, layer L only computes its mask.
        ffn_dim: hidden width of the FFN (2048 = 4C in the release).
        dropout: probability of every dropout: on the attention weights (each attention's
            `attn_dropout`), on the attention and FFN branches, and inside the FFN.
        matching: "sinkhorn" (MPSA) or "softmax" (the baseline; same parameters).
        num_heads: heads of the softmax matching (MPSA is single-head: the prompts are its heads).
        eps, n_iters, tol: Sinkhorn's, as in `sinkhorn.mps`.
        implicit_grad: differentiate the converged plans instead of the unrolled iterations
            (`sinkhorn.sinkhorn_log`; saves training memory; off, as the release).
        sync_free: Sinkhorn's convergence test stays on the device (`sinkhorn.py`'s docstring): the
            same outputs and gradients, no host sync, for torch.compile; off by default.
    """

    def __init__(self, dim: int = 512, num_layers: int = 3, ffn_dim: int = 2048,
                 dropout: float = 0.1, matching: str = "sinkhorn", num_heads: int = 8,
                 eps: float = 0.05, n_iters: int = 100, tol: float = 1e-6, implicit_grad: bool = False,
                 sync_free: bool = False):
        super().__init__()
        options = dict(ffn_dim=ffn_dim, dropout=dropout, matching=matching, num_heads=num_heads,
                       eps=eps, n_iters=n_iters, tol=tol, implicit_grad=implicit_grad, sync_free=sync_free)
        # Every layer starts as the same layer, as in the release's `decode_seg.py`: it builds one
        # layer and nn.TransformerDecoder deep-copies it into each place, and its head's weight init
        # is never called (PyTorch's default init). The last layer keeps the same q and k.
        first = MPSADecoderLayer(dim, **options)
        last = MPSADecoderLayer(dim, mask_only=True, **options)
        last.cross_attn.q_proj = copy.deepcopy(first.cross_attn.q_proj)
        last.cross_attn.k_proj = copy.deepcopy(first.cross_attn.k_proj)
        self.layers = nn.ModuleList([copy.deepcopy(first) for _ in range(num_layers - 1)] + [last])

    def forward(self, queries: torch.Tensor,
                memory: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """queries (B, K, N, C), memory (B, M, C) -> D (B, K, M), masks [A_1, ..., A_L] each (B, K, M)."""
        masks = []
        x = queries
        for layer in self.layers:
            x, mask = layer(x, memory)  # each mask comes from the queries entering its layer
            masks.append(mask)
        # D = A_L * prod_{l<L} sigmoid(A_l)^(1/2): the earlier masks gate the last one (the release's
        # `decode_seg.py`).
        decoder = masks[-1]
        for mask in masks[:-1]:
            decoder = decoder * torch.sigmoid(mask).sqrt()
        return decoder, masks


if __name__ == "__main__":
    torch.manual_seed(0)
    B, K, N, h, w, C = 2, 3, 4, 6, 5, 32
    M = h * w
    queries = torch.randn(B, K, N, C)
    memory = F.normalize(torch.randn(B, M, C), dim=-1)
    for matching in MATCHINGS:
        decoder = MPSADecoder(dim=C, ffn_dim=4 * C, matching=matching, num_heads=4).eval()
        with torch.no_grad():
            D, masks = decoder(queries, memory)
        n_params = sum(p.numel() for p in decoder.parameters())
        print(f"{matching:8s}: {n_params:,} parameters; D {tuple(D.shape)}, "
              f"masks {[tuple(a.shape) for a in masks]}, D range [{D.min():.3f}, {D.max():.3f}]")
    # What the plan looks like: every prompt of a class receives mass 1/N, pixels share 1/M each.
    q = F.normalize(torch.randn(1, 1, N, C), dim=-1)
    mask, plan = sinkhorn_matching(q, memory[:1])
    print(f"plan of one (image, class): shape {tuple(plan.shape)}, "
          f"column sums {plan.sum(2).flatten().tolist()} (1/N = {1 / N}), "
          f"row sums mean {plan.sum(3).mean():.4f} (1/M = {1 / M:.4f})")
