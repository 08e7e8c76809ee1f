"""Adaptive condition embeddings (ACE, CXRL: Han et al. 2024): learnable tokens appended to the text embedding.

``ConditionTokens`` holds ``n`` vectors of the text encoder's width, trained jointly with the U-Net
during alignment. They are appended to the conditional prompt embedding only; the unconditional branch of
classifier-free guidance gets zeros of the same length, so guidance pushes along what the tokens add.
They are saved as ``ace.safetensors`` in the checkpoint folder, and ``attach`` wraps a pipeline's
``encode_prompt`` so that every consumer (``cxrgen generate``, the service, evaluation) uses them
without knowing they exist; ``training.model.checkpoint.load_pipeline`` attaches them when the file is
there.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

FILE = "ace.safetensors"


class ConditionTokens(nn.Module):
    def __init__(self, n_tokens: int, dim: int, init_std: float = 0.02) -> None:
        super().__init__()
        if n_tokens < 1 or dim < 1:
            raise ValueError(f"n_tokens and dim must be >= 1, got {n_tokens}, {dim}")
        self.tokens = nn.Parameter(torch.randn(n_tokens, dim) * init_std)

    def forward(self, prompt_embeds: torch.Tensor, conditional: bool = True) -> torch.Tensor:
        """(B, L, D) -> (B, L + n, D): the tokens appended (zeros for the unconditional branch)."""
        extra = self.tokens if conditional else torch.zeros_like(self.tokens)
        extra = extra.to(prompt_embeds.dtype).unsqueeze(0).expand(prompt_embeds.shape[0], -1, -1)
        return torch.cat([prompt_embeds, extra], dim=1)

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(folder) / FILE
        save_file({"tokens": self.tokens.detach().float().cpu().contiguous()}, str(path))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "ConditionTokens":
        from safetensors.torch import load_file

        t = load_file(str(Path(folder) / FILE))["tokens"]
        mod = cls(t.shape[0], t.shape[1])
        with torch.no_grad():
            mod.tokens.copy_(t)
        return mod


def attach(pipe, tokens: ConditionTokens) -> None:
    """Make ``pipe`` append ``tokens`` to every prompt embedding it computes (idempotent: re-attaching
    replaces the tokens)."""
    original = getattr(pipe, "_cxrgen_encode_prompt", None) or pipe.encode_prompt
    pipe._cxrgen_encode_prompt = original
    pipe.ace = tokens.to(pipe.device)

    def encode_prompt(*args, **kwargs):
        cond, uncond = original(*args, **kwargs)
        cond = pipe.ace(cond, conditional=True)
        if uncond is not None:
            uncond = pipe.ace(uncond, conditional=False)
        return cond, uncond

    pipe.encode_prompt = encode_prompt


def attach_if_present(pipe, folder: str | Path) -> bool:
    """Attach the checkpoint's ACE tokens when it has them; returns whether it did."""
    if not (Path(folder) / FILE).is_file():
        return False
    attach(pipe, ConditionTokens.load(folder).to(dtype=pipe.text_encoder.dtype))
    return True
