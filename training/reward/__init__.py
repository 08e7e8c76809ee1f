"""Reward models (issue 7): ``base`` (plug-in signature, registry, checkpoints, score_all), one module per kind
(plausibility, comparative, posture, diagnosis, consistency), ``corrupt`` (the reward-hacking guard's
negatives), ``folder`` (``cxrgen score DIR``). Nothing is imported here, so ``import training.reward`` is free."""
