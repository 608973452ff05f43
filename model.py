"""model.py -- OTSeg: from an image and a list of class names to segmentation logits.

Paper Sec. 4 (Fig. 2-3, Eq. 8-17); the details the paper leaves open follow the authors' release
(its `models/decode_heads/decode_seg.py` and `models/backbone/img_encoder.py`; docs/release.md
lists them). One forward pass, with K class names and N prompt templates:

 1. Text (Sec. 4.1): t = normalize(CLIP_text(template_n.format(name_k)))      (K, N, C)
    The text tower is frozen, so t is computed once per list of names and cached in memory.
 2. Image: CLIP's ViT with deep visual prompt tuning (clip.py, `encode_dense`):
    g = normalize(CLS embedding)  (B, C);  v = normalize(pixel embeddings)  (B, M, C)
 3. Relationship descriptor (ZegCLIP's, Sec. 4.1): q0 = Linear_{2C->C}([g * t, t])   (B, K, N, C)
 4. Score-map path, MPS (Eq. 8-10): sim = cos(v_m, q0_kn)  (B, K, M, N);
    S = sum_n M N T* sim with T* = Sinkhorn(1 - sim) per (image, class)              (B, K, M)
 5. Decoder path, MPSA (Eq. 11-15, mpsa.py): queries q0, memory v -> D               (B, K, M)
 6. Both reshaped to the patch grid (B, K, h, w) and upsampled bilinearly to the input size.
 7. Inference (Eq. 17): P = sigmoid(lambda D + (1 - lambda) S); lambda = 1 is OTSeg, 0.5 is OTSeg+.
    Inductive models subtract 0.1 from the seen classes' probabilities (the release's `decode_seg.py`).

In the code, `forward` does step 1 in Python (the tokenizer, the cache) and hands the embeddings to
`segment`, steps 2-6 as tensor code only: the part `train.py --compile` gives to torch.compile, which
with `sync_free=True` (sinkhorn.py) captures it forward and backward as one graph.

Class names are an argument of `forward`, not of the constructor: one trained model segments any list
of names (open vocabulary). What trains: CLIP's prompt parameters (VPT) and the head (relationship
descriptor + decoder); every other CLIP weight is frozen. With ViT-B/16 that is 8,039,168 parameters
with 10 prompt tokens and 8,868,608 with 100 (the paper's 13.8M also counts weights the release builds
and never uses: docs/release.md).

`matching="softmax"` gives the baseline of the paper's Table 5(b): softmax cross-attention in the
decoder, and the cosine similarity summed over prompts instead of MPS in the score path; all else is
identical, so the difference between the two is exactly what optimal transport costs and gives.

Notation: B batch, K classes, N prompts, M pixels (h*w patch tokens), C channels, H x W input size.
Run `python model.py` for a demonstration with a tiny random CLIP.
"""
import torch
import torch.nn.functional as F
from torch import nn

from clip import CLIP, TINY, freeze_except_prompts, tokenize
from mpsa import MATCHINGS, MPSADecoder
from sinkhorn import mps, working_dtype

TEXT_BATCH = 256  # texts per pass of the text tower (COCO-Stuff has K*N = 171*8 = 1368)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def upsample(logits: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(B, K, M) on the patch grid (h, w) -> (B, K, H, W), bilinear, align_corners=False (release)."""
    logits = logits.unflatten(-1, grid)  # (B, K, h, w)
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)  # (B, K, H, W)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs that train: VPT prompt parameters and the head."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------
# OTSeg
# ----------------------------------------------------------------------------------------------

class OTSeg(nn.Module):
    """OTSeg / OTSeg+ on a CLIP with deep visual prompts (see the module docstring).

    Args:
        clip_model: a `clip.CLIP` built with prompt_tokens > 0 (10 for VOC and Context, 100 for
            COCO-Stuff). Its weights are frozen here, all but the prompt parameters.
        templates: the N prompt templates, e.g. "a photo of a {}." (data.TEMPLATES).
        matching: "sinkhorn" (OTSeg) or "softmax" (the Table 5(b) baseline).
        eps, n_iters, tol: Sinkhorn's (sinkhorn.mps), for both MPS and MPSA.
        implicit_grad: differentiate the converged transport plans instead of the unrolled Sinkhorn
            iterations (less training memory; off by default, as the release).
        sync_free: Sinkhorn tests convergence on the device (sinkhorn.py's docstring): the same
            outputs and gradients with no host sync, so that torch.compile captures `segment` whole
            (train.py --compile); off by default.
    """

    def __init__(self, clip_model: CLIP, templates: list[str], matching: str = "sinkhorn",
                 eps: float = 0.05, n_iters: int = 100, tol: float = 1e-6, implicit_grad: bool = False,
                 sync_free: bool = False):
        super().__init__()
        if matching not in MATCHINGS:
            raise ValueError(f"matching must be one of {MATCHINGS}, got {matching!r}")
        self.clip = clip_model
        freeze_except_prompts(clip_model)  # frozen CLIP, text tower included; prompts train
        self.templates = list(templates)
        self.matching = matching
        self.eps, self.n_iters, self.tol = eps, n_iters, tol
        self.implicit_grad, self.sync_free = implicit_grad, sync_free
        dim = clip_model.text_projection.shape[1]  # C: 512 for ViT-B/16, 768 for ViT-L/14
        self.relationship_descriptor = nn.Linear(2 * dim, dim)
        self.decoder = MPSADecoder(dim, num_layers=3, ffn_dim=4 * dim, dropout=0.1, matching=matching,
                                   num_heads=8, eps=eps, n_iters=n_iters, tol=tol,
                                   implicit_grad=implicit_grad, sync_free=sync_free)
        self._text_cache: dict[tuple[str, ...], torch.Tensor] = {}  # not state: rebuilt from the text tower

    # -------------------------------------------------------------------------- text embeddings

    def text_embeddings(self, class_names: list[str]) -> torch.Tensor:
        """(K, N, C): L2-normalised frozen-CLIP embeddings of every template filled with every name.

        Cached in memory per list of names (the text tower is frozen). Never part of the autograd graph.
        """
        key = tuple(class_names)
        device = self.clip.text_projection.device
        if key not in self._text_cache:
            self._text_cache[key] = self._encode_texts(class_names)
        return self._text_cache[key].to(device)  # a no-op unless the model moved since

    @torch.no_grad()
    def _encode_texts(self, class_names: list[str]) -> torch.Tensor:
        texts = [template.format(name) for name in class_names for template in self.templates]  # K*N, class-major
        tokens = tokenize(texts).to(self.clip.text_projection.device)  # (K*N, 77)
        # full precision whatever the caller's autocast: computed once, used for the whole training
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            embeddings = torch.cat([self.clip.encode_text(chunk) for chunk in tokens.split(TEXT_BATCH)])
        embeddings = F.normalize(embeddings.float(), dim=-1)  # (K*N, C)
        return embeddings.unflatten(0, (len(class_names), len(self.templates)))  # (K, N, C)

    # -------------------------------------------------------------------------- forward

    def embed(self, images: torch.Tensor,
              text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Steps 2-3 from the text embeddings t (K, N, C): v (B, M, C), q0 (B, K, N, C), grid (h, w)."""
        global_embedding, dense = self.clip.encode_dense(images)  # (B, C), (B, C, h, w)
        B, C, h, w = dense.shape
        K, N, _ = text.shape
        dtype = working_dtype(dense)  # unit vectors in fp32 under autocast too (fp64 stays)
        g = F.normalize(global_embedding.to(dtype), dim=-1)  # (B, C)
        pixels = F.normalize(dense.flatten(2).transpose(1, 2).to(dtype), dim=-1)  # (B, C, M) -> (B, M, C)

        # Relationship descriptor: the image's global embedding modulates every text embedding.
        text = text.to(g.dtype)
        pairs = torch.cat([g[:, None, None, :] * text, text.expand(B, K, N, C)], dim=-1)  # (B, K, N, 2C)
        queries = self.relationship_descriptor(pairs)  # (B, K, N, C)
        return pixels, queries, (h, w)

    @staticmethod
    def prompt_similarities(pixels: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Eq. 8: cosine similarity of every pixel with every (class, prompt) query, (B, K, M, N).

        In fp32 (fp64 stays) under autocast too, as MPSA's (mpsa.sinkhorn_matching): Sinkhorn divides
        the similarities by eps = 0.05, so bf16's ~3 digits would move the plan by about 1%."""
        dtype = working_dtype(pixels)
        with torch.autocast(device_type=pixels.device.type, enabled=False):
            return torch.einsum("bmc,bknc->bkmn", pixels.to(dtype), F.normalize(queries.to(dtype), dim=-1))

    def segment(self, images: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """Steps 2-6, `forward` from the text embeddings t (K, N, C): dict(decoder=D, score=S), (B, K, H, W).

        Tensors in, tensors out: with sync_free=True nothing in it waits for the host, and it is what
        torch.compile captures as one graph, forward and backward (train.py --compile).
        """
        pixels, queries, (h, w) = self.embed(images, text)

        # Score-map path (Eq. 8-10): cosine similarities refined by the transport plan.
        sim = self.prompt_similarities(pixels, queries)  # (B, K, M, N)
        if self.matching == "sinkhorn":
            score = mps(sim, eps=self.eps, n_iters=self.n_iters, tol=self.tol,
                        implicit_grad=self.implicit_grad, sync_free=self.sync_free)  # (B, K, M)
        else:
            score = sim.sum(dim=-1)  # (B, K, M): the baseline, prompts summed without transport

        # Decoder path (Eq. 11-15): one query per (class, prompt), the pixels as memory.
        decoder, _ = self.decoder(queries, pixels)  # (B, K, M)

        size = tuple(images.shape[-2:])
        return dict(decoder=upsample(decoder, (h, w), size), score=upsample(score, (h, w), size))

    def forward(self, images: torch.Tensor, class_names: list[str]) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W), H and W multiples of the patch size; K class names.

        Returns dict(decoder=D, score=S): logits (B, K, H, W) of the decoder (MPSA) and score-map (MPS)
        paths, upsampled to the input size.
        """
        # Names -> embeddings is Python work (tokenizer, cache); `segment` is tensors only.
        return self.segment(images, self.text_embeddings(class_names))

    def encode(self, images: torch.Tensor,
               class_names: list[str]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Steps 1-3: pixel embeddings v (B, M, C), queries q0 (B, K, N, C) and the patch grid (h, w)."""
        return self.embed(images, self.text_embeddings(class_names))

    # -------------------------------------------------------------------------- inference

    @staticmethod
    def ensemble(decoder: torch.Tensor, score: torch.Tensor, lam: float = 0.5,
                 seen: torch.Tensor | None = None, calibration: float = 0.1) -> torch.Tensor:
        """Eq. 17 on logits: P = sigmoid(lam * D + (1 - lam) * S), (B, K, H, W) probabilities.

        lam = 1: OTSeg (decoder only); lam = 0.5: OTSeg+. `seen` (bool (K,)): inductive calibration,
        `calibration` is subtracted from the seen classes' probabilities (the release's `decode_seg.py`).
        """
        probabilities = torch.sigmoid(lam * decoder + (1 - lam) * score)  # (B, K, H, W)
        if seen is not None:
            shift = calibration * seen.to(probabilities.device, probabilities.dtype)  # (K,)
            probabilities = probabilities - shift[None, :, None, None]
        return probabilities


if __name__ == "__main__":
    torch.manual_seed(0)
    templates = ["a photo of a {}.", "a part of a {}.", "a segment of a {}."]
    classes = ["cat", "dog", "sky", "grass"]
    images = torch.randn(2, 3, 64, 96)  # non-square: a 4 x 6 patch grid
    for matching in MATCHINGS:
        torch.manual_seed(0)
        model = OTSeg(CLIP(**TINY, prompt_tokens=4), templates, matching=matching).eval()
        with torch.no_grad():
            out = model(images, classes)
        probabilities = OTSeg.ensemble(out["decoder"], out["score"], lam=0.5,
                                       seen=torch.tensor([True, True, False, False]))
        n_trainable = sum(p.numel() for _, p in trainable_parameters(model))
        print(f"{matching:8s}: decoder {tuple(out['decoder'].shape)}, score {tuple(out['score'].shape)}, "
              f"prediction {probabilities.argmax(1)[0, ::16, ::16].tolist()} (every 16th pixel of image 0)")
    groups = {}
    for name, p in trainable_parameters(model):
        group = "VPT prompts" if name.startswith("clip.") else name.split(".")[0]
        groups[group] = groups.get(group, 0) + p.numel()
    print(f"trainable: {n_trainable:,} parameters = " + " + ".join(f"{n:,} ({g})" for g, n in groups.items()))
    print(f"text embeddings {tuple(model.text_embeddings(classes).shape)} (K, N, C), cached: "
          f"{list(model._text_cache)}")
