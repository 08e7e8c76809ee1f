"""Alignment of the generator with expert feedback (issue 8): the stochastic DDIM policy and its
log-probability (``ddim``), the objectives (``objectives``: DDPO's advantages and PPO loss, RLCF,
reward-weighted likelihood, Diffusion-DPO) and adaptive condition embeddings (``ace``). Heavy imports
stay in the submodules."""
