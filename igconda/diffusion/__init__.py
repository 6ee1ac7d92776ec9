"""Diffusion maths: the noise schedule, the DDPM training step, strided DDIM counterfactuals.

- :mod:`~igconda.diffusion.schedule`: β_t, ᾱ_t (:class:`NoiseSchedule`);
- :mod:`~igconda.diffusion.training`: the loss, one training step, EMA;
- :mod:`~igconda.diffusion.ddim`: DDIM encoding and (guided) decoding on an explicit grid (which
  (D, s, w) are valid is :mod:`igconda.ddim_grid`'s rule);
- :mod:`~igconda.diffusion.counterfactual`: a slice's healthy counterfactual and its anomaly maps;
- :mod:`~igconda.diffusion.classifier_training`, :mod:`~igconda.diffusion.classifier_guidance`:
  the noisy classifier and the classifier-guided decode of the DPM + classifier-guidance baseline.

Pure PyTorch: nothing here imports Ray or MLflow. Import names from their modules.
"""
