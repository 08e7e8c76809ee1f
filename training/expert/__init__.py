"""The simulated expert panel (issue 7, section 2): simulated radiologists who rate generated CXRs.

The panel is one of cxrgen's three separate eyes (../shared/DESIGN.md): it has its own networks
(a reader CNN and a realism critic, trained on ``cxrgen simulate --seed 2`` data, ``runs/sim-panel``)
and interpretable anatomy checks, and it never imports the evaluation judge's or the rewards'
networks. Reward models learn only from the ratings the panel writes into the feedback store.

Modules (heavy imports stay inside them, not here):
  config     vocabulary of the panel (criteria, kinds with sides / grades) and the training config
  nets       reader CNN (presence, laterality, severity, pose) and realism critic
  data       simulated split -> tensors and targets; generated folders -> images and records
  corrupt    artefacts for the critic: noise, smears, duplicated structures, blank regions
  anatomy    cheap anatomy features and their real-film bands
  calibrate  tail statistics that turn raw evidence into "how unusual for a real film"
  train      ``cxrgen expert train``: the panel folder (weights, panel.json)
  panel      ``Panel.assess(images, findings) -> list[Assessment]``: evidence per criterion
  raters     rater profiles, ratings and comparisons (deterministic label noise)
  agreement  Fleiss' kappa, agreement with the majority, pairwise agreement
  rate       ``cxrgen expert rate``: a generated folder -> generations, ratings, comparisons in the store
  report     ``cxrgen expert report``: plausibility rates and agreement
  testing    cartoon films with planted findings and fake generated folders, for fast tests
"""
