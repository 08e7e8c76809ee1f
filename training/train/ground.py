"""Token grounding (``cxrgen train --ground KIND=W``): a finding's words attend where the finding is.

TokenCompose (Wang et al., CVPR 2024) finetunes Stable Diffusion with two terms on the U-Net's cross-attention
maps of an object's words against the object's segmentation mask: a token term, (1 - the share of the word's
attention that falls inside the mask)^2, and a pixel term, binary cross-entropy between the attention map and
the mask. Here the masks are the simulator's finding masks (``cxrgen simulate --finding-masks``): where a mass,
nodule or granuloma lies on each training film. The generator draws a mass as a lobe of patchy opacity, not a
round ball (README, "A finer latent grid"); tying the word "mass" to the ball's cells is this module's answer.

The maps are read by an attention processor on the U-Net's cross-attention layers that recomputes the
attention probabilities of the grounded words (the same query, key, scale and softmax as the layer's own
processor, which still computes the output) only while ``Grounding.positions`` is set, so sampling during
training and the saved model are untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The words that name each kind in reports, as word beginnings: "mass", "masses"; "nodule", "nodules",
# "nodular"; "granuloma", "granulomas", "granulomatous". A film is grounded for a kind only where its mask of
# that kind is not empty, so a negated mention ("no mass") on a film without one is never supervised.
KIND_WORDS: dict[str, tuple[str, ...]] = {
    "mass": ("mass",),
    "nodule": ("nodul",),
    "calcified_granuloma": ("granulom",),
}
PIXEL_WEIGHT = 0.05  # the pixel term's weight beside the token term (TokenCompose: 5e-5 against 1e-3)
EPS = 1e-6


def word_positions(tokenizer, prompts: list[str], kinds: tuple[str, ...]) -> torch.Tensor:
    """(B, K, L) float: 1 at the token positions of words naming each kind, in the padded sequence the text
    encoder reads (L = the tokenizer's model_max_length). A word split into several BPE pieces marks all of
    them; words are told apart by the pieces' end-of-word suffix."""
    length = tokenizer.model_max_length
    out = torch.zeros(len(prompts), len(kinds), length)
    for b, prompt in enumerate(prompts):
        if not prompt:
            continue
        pieces = tokenizer.tokenize(prompt)[: length - 2]  # after the start token, before the end token
        word, start = "", 0
        for i, piece in enumerate(pieces):
            if not word:
                start = i
            end = piece.endswith("</w>")
            word += piece[: -len("</w>")] if end else piece
            if end or i == len(pieces) - 1:
                for k, kind in enumerate(kinds):
                    if word.lower().startswith(KIND_WORDS[kind]):
                        out[b, k, 1 + start: 2 + i] = 1.0
                word = ""
    return out


class Grounding:
    """The maps the grounded words' attention made in one U-Net forward pass, per cross-attention layer."""

    def __init__(self):
        self.positions: torch.Tensor | None = None  # (B, K, L) while a grounded pass runs
        self.maps: list[torch.Tensor] = []  # (B, K, HW) per layer: attention summed over the kind's tokens

    def start(self, positions: torch.Tensor) -> None:
        self.positions, self.maps = positions, []

    def stop(self) -> list[torch.Tensor]:
        maps, self.positions, self.maps = self.maps, None, []
        return maps


class GroundingProcessor:
    """Wraps a cross-attention layer's processor: the output is the wrapped processor's; while ``grounding``
    has positions, the attention probabilities of the grounded words are recomputed and kept."""

    def __init__(self, inner, grounding: Grounding):
        self.inner, self.grounding = inner, grounding

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        g = self.grounding
        if g.positions is not None and encoder_hidden_states is not None and hidden_states.ndim == 3:
            ehs = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
            q = attn.head_to_batch_dim(attn.to_q(hidden_states))
            k = attn.head_to_batch_dim(attn.to_k(ehs))
            probs = attn.get_attention_scores(q, k, None)  # (B * heads, HW, L)
            b = hidden_states.shape[0]
            probs = probs.view(b, attn.heads, probs.shape[1], probs.shape[2]).mean(1)  # (B, HW, L)
            g.maps.append(torch.einsum("bql,bkl->bkq", probs, g.positions.to(probs)))
        return self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                          attention_mask=attention_mask, **kwargs)


def install(unet, grounding: Grounding) -> dict:
    """Wrap the processor of every cross-attention layer of ``unet``; returns the processors it replaced
    (``uninstall`` puts them back)."""
    before = dict(unet.attn_processors)
    modules = dict(unet.named_modules())
    new = {}
    for name, proc in before.items():
        layer = modules[name.rsplit(".processor", 1)[0]]
        new[name] = GroundingProcessor(proc, grounding) if getattr(layer, "is_cross_attention", False) else proc
    if not any(isinstance(p, GroundingProcessor) for p in new.values()):
        raise ValueError("--ground reads the U-Net's cross-attention maps, and this U-Net has no cross-attention")
    unet.set_attn_processor(new)
    return before


def uninstall(unet, before: dict) -> None:
    unet.set_attn_processor(before)


def grounding_loss(maps: list[torch.Tensor], masks: torch.Tensor, weights: torch.Tensor,
                   positions: torch.Tensor) -> tuple[torch.Tensor | None, float | None]:
    """TokenCompose's token and pixel terms, averaged over the layers and over the (film, kind) pairs that have
    both a mask and the kind's words in the prompt, each pair weighted by its kind's W.

    ``maps``: per layer (B, K, HW), ``masks``: (B, K, h, w) on the latent grid, ``weights``: (K,),
    ``positions``: (B, K, L). Returns (loss, the mean share of the words' attention inside the mask), or
    (None, None) when no pair in the batch is grounded.
    """
    valid = (masks.flatten(2).amax(2) > 0) & (positions.amax(2) > 0)  # (B, K)
    if not valid.any() or not maps:
        return None, None
    w = weights.to(masks.device)[None].expand_as(valid)[valid]
    total, inside = 0.0, 0.0
    for a in maps:
        side = int(round(a.shape[-1] ** 0.5))
        m = F.adaptive_max_pool2d(masks.float(), (side, side)).flatten(2)  # (B, K, HW): cells a finding touches
        a, m = a[valid].float(), m.to(a.device)[valid]
        share = (a * m).sum(1) / (a.sum(1) + EPS)  # of the words' attention, the part on the finding
        token = (1.0 - share) ** 2
        pixel = F.binary_cross_entropy(a.clamp(EPS, 1 - EPS), m, reduction="none").mean(1)
        total = total + (w * (token + PIXEL_WEIGHT * pixel)).sum() / valid.sum()
        inside = inside + share.mean().item()
    return total / len(maps), inside / len(maps)
