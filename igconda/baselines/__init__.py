"""The paper's baselines (§3.3), each producing (N, H, W) anomaly maps for ``igconda.metrics``.

* :mod:`igconda.baselines.thresholding`: 41 % SUVmax thresholding and the raw-intensity control
  (numpy only);
* :mod:`igconda.baselines.resnet_classifier`: the ResNet-18 slice classifier, its training and
  checkpoint, and :mod:`igconda.baselines.classifier_cam`: its HiResCAM maps, the ``hirescam``
  method (imports torch);
* :mod:`igconda.baselines.supervised`: the supervised upper bound, a UNet trained on the lesion
  masks (imports torch and MONAI);
* :mod:`igconda.baselines.fitting`: the epoch loop the two trained baselines share;
* :mod:`igconda.baselines.fanogan`: f-AnoGAN networks and its residual map, trained by
  :mod:`igconda.baselines.fanogan_training` (torch, MONAI);
* :mod:`igconda.baselines.dpm_classifier_guidance`: unconditional DPM + noisy-classifier
  guidance (Wolleb et al. 2022), the ``dpm_cg`` anomaly method (imports torch);
* :mod:`igconda.baselines.settings`: the config's ``baselines`` section (torch-free);
* :mod:`igconda.baselines.trainers`: one worker's trainer of each trained baseline, built from
  a study config (:mod:`~igconda.baselines.trainer_base`: the interface,
  :mod:`~igconda.baselines.trainer_methods`: the trainers); :mod:`igconda.baselines.scoring`:
  a trained baseline loaded and scored.

Import the submodules directly; this package imports nothing so that the numpy-only baselines
stay free of torch.
"""
