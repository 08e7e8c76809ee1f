"""The torch modules that become ONNX graphs: one per pipeline component and one per reward.

Each wrapper takes and returns plain tensors (no dicts, no Python lists), so its ONNX graph has
named inputs and outputs that a runtime with no torch model can feed:

* ``TextEncoderGraph``: token ids -> the text embedding the U-Net attends to, with an aligned
  checkpoint's ACE condition tokens already appended (``training.align.ace``): the tokens for rows
  whose ``conditional`` is 1, zeros for the unconditional branch of classifier-free guidance;
* ``UNetGraph``: (latents, timestep, text embedding) -> predicted noise; exported with diffusers'
  default attention processor (SDPA / xformers kernels do not export cleanly);
* ``VaeDecoderGraph``: latents -> grey images in [0, 1]: the ``1 / scaling_factor``, the decode, the
  pipeline's ``denormalize`` and ``to_grey`` in one graph (always fp32: fp16 VAE decoders overflow);
* ``RewardGraph``: an image (N, 1, S, S) in [-1, 1] plus the reward's condition as a tensor -> the
  score, ``sigmoid(validity) x base`` exactly as ``training.reward.base.Reward.forward``. The
  conditions that start as text or ``Finding`` lists are encoded on the host by the same training
  functions (``encode_findings``, ``label_matrix``, ``text_features``; see ``condition_feeds``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# What each reward kind needs besides the image (the graph's second input, if any).
REWARD_CONDITION = {"plausibility": "findings", "comparative": "findings", "diagnosis": "labels",
                    "posture": None, "consistency": "text"}


class TextEncoderGraph(nn.Module):
    def __init__(self, text_encoder, ace_tokens: torch.Tensor | None = None) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.ace = None if ace_tokens is None else nn.Parameter(ace_tokens.detach().clone(), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, conditional: torch.Tensor | None = None) -> torch.Tensor:
        # diffusers' encode_prompt: last hidden state, no attention mask for CLIP (use_attention_mask unset).
        hidden = self.text_encoder(input_ids, return_dict=False)[0]
        if self.ace is None:
            return hidden
        # ConditionTokens.forward: tokens for the prompt, zeros for the negative / empty prompt.
        extra = self.ace.to(hidden.dtype).unsqueeze(0) * conditional.to(hidden.dtype)[:, None, None]
        return torch.cat([hidden, extra], dim=1)


class UNetGraph(nn.Module):
    def __init__(self, unet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class VaeDecoderGraph(nn.Module):
    def __init__(self, vae) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.vae.decode(latents / self.scaling_factor, return_dict=False)[0]
        x = (x * 0.5 + 0.5).clamp(0, 1)  # VaeImageProcessor.denormalize
        return x if x.shape[1] == 1 else x.mean(1, keepdim=True)  # components.to_grey


class RewardGraph(nn.Module):
    """One reward: ``score = sigmoid(validity_logit) x base`` with the condition as a tensor."""

    def __init__(self, reward) -> None:
        super().__init__()
        if reward.name not in REWARD_CONDITION:
            raise ValueError(f"cannot export reward kind {reward.name!r}; known: {sorted(REWARD_CONDITION)}")
        self.kind = reward.name
        self.net = reward.net.eval()

    def forward(self, image: torch.Tensor, *condition: torch.Tensor) -> torch.Tensor:
        h = self.net.trunk(image.clamp(-1.0, 1.0))  # nets.prepare's clamp (resizing happens on the host)
        validity = torch.sigmoid(self.net.validity_logit(h))
        return validity * self.base(h, *condition)

    def base(self, h: torch.Tensor, *condition: torch.Tensor) -> torch.Tensor:
        net = self.net
        if self.kind == "plausibility":
            return torch.sigmoid(net.head(h, condition[0]) / net.temperature + net.bias)
        if self.kind == "comparative":
            return torch.sigmoid(net.head(h, condition[0]) - net.offset)
        if self.kind == "posture":
            from training.reward.posture import posture_reward

            return posture_reward(net.predict(h), net.inv_scale)
        if self.kind == "diagnosis":
            from training.reward.diagnosis import agreement

            return agreement(torch.sigmoid(net.findings(h)), condition[0])
        # consistency: nets.TextEncoder with its EmbeddingBag(mode="mean") written as a masked mean of a
        # gather, which every ONNX runtime supports; the sums differ from the bag's only in rounding.
        ids, mask = condition
        emb = net.text.bag.weight[ids] * mask.unsqueeze(-1)
        text = net.text.mlp(emb.sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0))
        cos = (net.embed_images(h) * F.normalize(text, dim=1)).sum(1)
        a, b = net.map_ab[0], net.map_ab[1]
        return torch.sigmoid(a * cos + b)


def reward_input_names(kind: str) -> list[str]:
    cond = REWARD_CONDITION[kind]
    return ["image"] + ({"findings": ["findings"], "labels": ["labels"], "text": ["text_ids", "text_mask"],
                         None: []}[cond])


def condition_feeds(kind: str, prompts: Sequence[str], findings: Sequence[Sequence], buckets: int = 0) -> dict:
    """The reward graph's condition inputs as numpy, encoded by the training code's own functions."""
    cond = REWARD_CONDITION[kind]
    if cond == "findings":
        from training.reward.nets import encode_findings

        return {"findings": encode_findings(findings).numpy().astype(np.float32)}
    if cond == "labels":
        from training.reward.diagnosis import label_matrix

        return {"labels": label_matrix(findings).numpy().astype(np.float32)}
    if cond == "text":
        from training.reward.nets import text_features

        ids = [text_features(p, buckets) for p in prompts]
        width = max(len(i) for i in ids)
        text_ids = np.zeros((len(ids), width), dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.float32)
        for r, row in enumerate(ids):
            text_ids[r, :len(row)] = row
            mask[r, :len(row)] = 1.0
        return {"text_ids": text_ids, "text_mask": mask}
    return {}


def example_condition(kind: str, n: int, buckets: int = 0) -> tuple[torch.Tensor, ...]:
    """Tracing inputs for a reward graph's condition (values do not matter, shapes and dtypes do)."""
    feeds = condition_feeds(kind, ["left pleural effusion"] * n, [[] for _ in range(n)], buckets)
    return tuple(torch.from_numpy(feeds[k]) for k in reward_input_names(kind)[1:])
