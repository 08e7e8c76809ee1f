"""The optimiser every alignment method steps through, on Hugging Face accelerate (issue 8).

``Optimiser.backward(loss)`` and ``Optimiser.step()`` replace ``loss.backward(); clip; opt.step();
opt.zero_grad()`` in each method's round, so mixed precision (``--mixed-precision bf16 | fp16``, loss
scaling included) and several processes (``accelerate launch``) hold for all of them. Only the LoRA
adapters and ACE tokens train and they sit outside any DDP wrapper (the pipeline keeps calling the plain
U-Net), so with several processes their gradients are averaged here before clipping: each process
samples its own prompts and seeds (``rank`` enters the round's seeds) and all keep the same weights.
"""

from __future__ import annotations

import contextlib

import torch


class Optimiser:
    def __init__(self, params: dict[str, torch.nn.Parameter], lr: float, max_grad_norm: float,
                 mixed_precision: str = "no", cpu: bool = False):
        from accelerate import Accelerator

        self.accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu)
        self.params = list(params.values())
        self.max_grad_norm = max_grad_norm
        self.optimizer = self.accelerator.prepare(torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0))

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def autocast(self):
        return self.accelerator.autocast() if self.accelerator.mixed_precision != "no" else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def step(self) -> float:
        """Average gradients over processes, clip, step, zero; returns the gradient norm before clipping."""
        if self.accelerator.num_processes > 1:
            for p in self.params:
                if p.grad is not None:
                    p.grad = self.accelerator.reduce(p.grad, reduction="mean")
        norm = self.accelerator.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm) if norm is not None else float("nan")

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()
