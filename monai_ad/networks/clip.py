"""Frozen open_clip models for the CLIP detectors (WinCLIP, language-enhanced CLIP reconstruction).

Weights never download: an open_clip model is built from its *architecture name* (an open_clip model config
such as ``ViT-B-16-plus-240``) with ``pretrained=None`` semantics, and its weights come from a
local file the user names (``checkpoint=<path>``: ``.safetensors``, or a torch file read with
``torch.load(weights_only=True)``; an open_clip state dict, optionally under ``"state_dict"`` and/or with a
``module.`` prefix). Without a file, ``allow_random_weights=True`` is the explicit opt-in for a seeded random
initialisation (tests and smoke runs); it is never a silent fallback. ``TINY_MODEL`` names a tiny ViT
configuration (width 64, 4 layers, patch 16, 96 px; text width 64, 4 layers) that only exists for such runs.

Only plain open_clip ``CLIP`` models with a ViT image tower and open_clip's own text transformer are
accepted (timm / Hugging Face towers would fetch their own weights or tokenizers). The tokenizer is
open_clip's ``SimpleTokenizer``, whose BPE vocabulary ships inside the package.

``FrozenCLIP`` exposes what the detectors need: grey ``[0, 1]`` slices → 3 channels with CLIP's
normalisation; ViT tokens of chosen layers; tokens moved into the joint image–text space by ``ln_post`` then
``@ proj`` (as AnoVL, monai_ad/detectors/winclip/README.md); WinCLIP window embeddings; text embeddings from token
ids or from token *embeddings* (learned prompts), at chosen text layers. It runs the towers block by block and reuses the
ViT's own embedding and pooling steps (``VisionTransformer._embeds`` / ``_pool`` of the pinned open_clip 3.3.0).
"""

from __future__ import annotations

import copy
import functools
import logging
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from monai_ad.components.autocast import Autocast
from monai_ad.errors import InputError

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TINY_MODEL = "tiny-random"
TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 96, "layers": 4, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 4},
}


def clip_config(model_name: str) -> dict:
    """The open_clip architecture config of ``model_name`` (a deep copy), checked to be buildable offline."""
    if model_name == TINY_MODEL:
        return copy.deepcopy(TINY_CONFIG)
    import open_clip

    if model_name.startswith(("hf-hub:", "local-dir:")):
        raise InputError(f"CLIP model {model_name!r}: give an open_clip architecture name and a checkpoint file")
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise InputError(f"unknown open_clip model {model_name!r} (e.g. ViT-B-16-plus-240, ViT-B-16, ViT-L-14)")
    config = copy.deepcopy(config)
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    unsupported = [
        reason
        for reason, bad in (
            ("a custom text tower", config.get("custom_text")),
            ("a timm image tower", vision.get("timm_model_name")),
            ("a ResNet image tower", isinstance(vision.get("layers"), (list, tuple))),
            ("attentional pooling", vision.get("attentional_pool")),
            ("a Hugging Face text tower or tokenizer", text.get("hf_model_name") or text.get("hf_tokenizer_name")),
            ("a text class token", text.get("embed_cls")),
            ("non-argmax text pooling", text.get("pool_type", "argmax") != "argmax"),
        )
        if bad
    ]
    if unsupported:
        raise InputError(f"CLIP model {model_name!r} has {', '.join(unsupported)}: only ViT CLIP models are supported")
    return config


def load_clip_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """An open_clip state dict from a local file (safetensors, or torch with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("CLIP checkpoint not found", path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a weights file, or holds objects weights_only refuses
        raise InputError(f"not a readable CLIP checkpoint ({type(exc).__name__})", path) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError("not an open_clip state dict (expected a mapping of tensor names to tensors)", path)
    return {k.removeprefix("module."): v for k, v in state.items()}


def build_clip(
    model_name: str,
    checkpoint: str | os.PathLike | None = None,
    allow_random_weights: bool = False,
    seed: int = 0,
) -> nn.Module:
    """An ``open_clip.CLIP`` of architecture ``model_name`` with the weights of ``checkpoint`` (nothing is
    downloaded). Without a checkpoint, ``allow_random_weights`` gives a random model seeded by ``seed``
    (identical every time it is rebuilt, so a saved detector reloads to the same scores)."""
    from open_clip.model import CLIP

    config = clip_config(model_name)
    checkpoint = None if checkpoint in (None, "") else os.fspath(checkpoint)
    if checkpoint is None and not allow_random_weights:
        raise InputError(
            f"CLIP model {model_name} needs its weights: pass clip_checkpoint=<local open_clip .safetensors/.bin/.pt "
            "file> (no weights are downloaded); allow_random_weights=True only for smoke tests"
        )
    state = load_clip_state(checkpoint) if checkpoint else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = CLIP(**config)
    if state is not None:
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # tensor shapes of another architecture
            reason = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))[:200]
            raise InputError(f"checkpoint does not fit CLIP {model_name}: {reason}", checkpoint) from None
        if missing:
            raise InputError(
                f"checkpoint does not fit CLIP {model_name}: {len(missing)} tensors missing, e.g. {missing[0]}",
                checkpoint,
            )
        if unexpected:
            logger.info("CLIP checkpoint %s: ignoring %d unexpected tensors", checkpoint, len(unexpected))
    else:
        logger.warning("CLIP %s uses RANDOM weights (allow_random_weights=True): scores are not meaningful", model_name)
    return model.eval().requires_grad_(False)


def evenly_spaced_layers(depth: int, count: int = 4) -> list[int]:
    """``count`` block indices (0-based) spread over ``depth`` blocks, ending at the last: 12 → [2, 5, 8, 11]
    (layers 3/6/9/12, as AnoVL)."""
    return sorted({max(0, round(depth * (i + 1) / count) - 1) for i in range(count)})


@functools.lru_cache(maxsize=1)
def clip_tokenizer():
    """open_clip's BPE tokenizer (its vocabulary ships inside the package; nothing is fetched)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


class FrozenCLIP(Autocast, nn.Module):
    """A frozen open_clip ViT CLIP (see the module docstring). Stays in eval mode when a parent trains.

    Image input: grey slices ``[B, 1, H, W]`` in ``[0, 1]``; they are resized to the model's input size
    (``input_size``) when ``H`` differs, repeated to 3 channels and normalised with CLIP's mean/std.
    """

    def __init__(
        self,
        model_name: str,
        checkpoint: str | os.PathLike | None = None,
        allow_random_weights: bool = False,
        amp: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        self.model_name = model_name
        self.model = build_clip(model_name, checkpoint, allow_random_weights, seed)
        visual = self.model.visual
        self.input_size = int(visual.image_size[0])
        self.patch_size = int(visual.patch_size[0])
        self.grid = (int(visual.grid_size[0]), int(visual.grid_size[1]))
        self.num_patches = self.grid[0] * self.grid[1]
        self.embed_dim = int(visual.output_dim)
        self.vision_depth = len(visual.transformer.resblocks)
        self.text_width = int(self.model.token_embedding.weight.shape[1])
        self.text_depth = len(self.model.transformer.resblocks)
        self.amp = bool(amp)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenCLIP":
        return super().train(False)


    # ------------------------------------------------------------------ image tower
    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Grey ``[B, 1, H, W]`` in [0, 1] → the model's normalised RGB input ``[B, 3, S, S]``."""
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > self.input_size)  # fmt: skip
        return (x.expand(-1, 3, -1, -1) - self.mean) / self.std

    def embed_image(self, x: torch.Tensor) -> torch.Tensor:
        """Grey slices → the ViT's input sequence ``[B, 1 + N, width]`` (CLS first, positions added, ln_pre)."""
        return self.model.visual._embeds(self.prepare(x))

    def run_blocks(
        self, tokens: torch.Tensor, layers: Sequence[int] = (), attn_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the vision blocks on ``tokens``; returns the last block's output and those of ``layers``."""
        wanted = set(layers)
        taps = {}
        for i, block in enumerate(self.model.visual.transformer.resblocks):
            tokens = block(tokens, attn_mask=attn_mask)
            if i in wanted:
                taps[i] = tokens
        return tokens, [taps[i] for i in layers]

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """The image embedding of a token sequence (CLS first): the model's own pooling, then ``proj``."""
        pooled, _ = self.model.visual._pool(tokens)
        return pooled @ self.model.visual.proj

    def to_joint(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``[..., width]`` → the joint image–text space: ``ln_post`` then ``@ proj``."""
        return self.model.visual.ln_post(tokens) @ self.model.visual.proj

    def window_index(self, size: int) -> torch.Tensor:
        """``[W, size²]`` patch indices (row-major on the grid) of every ``size×size`` window, stride 1."""
        gh, gw = self.grid
        if not 1 <= size <= min(gh, gw):
            raise InputError(f"window size {size} does not fit the CLIP patch grid {gh}×{gw}")
        rows = torch.arange(gh - size + 1)
        cols = torch.arange(gw - size + 1)
        offsets = (torch.arange(size)[:, None] * gw + torch.arange(size)[None, :]).flatten()
        starts = (rows[:, None] * gw + cols[None, :]).flatten()
        return starts[:, None] + offsets[None, :]

    def window_embeddings(self, embedded: torch.Tensor, windows: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """WinCLIP window embeddings ``[B, W, embed_dim]``: the pooled output of the ViT run on CLS + only that
        window's tokens (each with its own position embedding, taken from ``embedded = embed_image(x)``).

        The tokens are *gathered* into short sequences of ``1 + size²`` rather than masking a full pass: a
        transformer block mixes tokens only through attention, so a full pass whose attention mask lets the
        window's tokens and CLS see only each other gives exactly these numbers at ``(1 + N)²`` cost per
        window instead of ``(1 + size²)²``. ``chunk`` sequences run at once."""
        b, _, width = embedded.shape
        windows = windows.to(embedded.device)
        index = torch.cat([torch.zeros_like(windows[:, :1]), windows + 1], 1)  # CLS, then the window's tokens
        sequences = embedded[:, index].reshape(b * len(windows), index.shape[1], width)
        out = [self.pool(self.run_blocks(sequences[i : i + chunk])[0]) for i in range(0, len(sequences), chunk)]
        return torch.cat(out).reshape(b, len(windows), -1)

    # ------------------------------------------------------------------ text tower
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids ``[T, context_length]`` (SOT … EOT, zero padded)."""
        return clip_tokenizer()(list(texts), context_length=self.model.context_length)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """The model's text embedding ``[T, embed_dim]`` of token ids (not normalised), as ``encode_text``
        computes it, on only as many positions as the longest prompt needs (see ``text_features``)."""
        ids = ids.to(self.mean.device)
        eot = ids.argmax(-1)  # the end-of-text id is the largest
        return self.text_features(self.token_embeddings(ids[:, : int(eot.max()) + 1]), eot, [self.text_depth - 1])[0]

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """The text tower's input embeddings ``[T, L, text_width]`` of token ids."""
        return self.model.token_embedding(ids.to(self.mean.device))

    def text_features(
        self, embeddings: torch.Tensor, eot: int | torch.Tensor, layers: Sequence[int]
    ) -> list[torch.Tensor]:
        """Text features in the joint space, ``[T, embed_dim]`` per layer of ``layers``, from input token
        *embeddings* ``[T, L, text_width]`` whose end-of-text token sits at position ``eot`` (one int, or one
        per row): that token's output of each layer, through ``ln_final`` and ``text_projection`` (as the
        model's own pooled output at the last layer). Under the causal mask, positions after the end-of-text
        token cannot change it, so only positions up to the last one are computed."""
        model = self.model
        if isinstance(eot, torch.Tensor):
            eot = eot.to(embeddings.device)
            length = int(eot.max()) + 1
            rows = torch.arange(len(eot), device=embeddings.device)
        else:
            length, rows = eot + 1, slice(None)
        x = embeddings[:, :length] + model.positional_embedding[:length]
        mask = None if model.attn_mask is None else model.attn_mask[:length, :length]
        wanted = set(layers)
        taps = {}
        for i, block in enumerate(model.transformer.resblocks):
            x = block(x, attn_mask=mask)
            if i in wanted:
                taps[i] = x[rows, eot]
        projection = model.text_projection
        out = []
        for i in layers:
            h = model.ln_final(taps[i])
            out.append(projection(h) if isinstance(projection, nn.Linear) else h @ projection)
        return out

    def extra_repr(self) -> str:
        return f"model={self.model_name}, input_size={self.input_size}, grid={self.grid}, embed_dim={self.embed_dim}"
