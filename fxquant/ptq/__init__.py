"""Post-training quantization passes beyond calibration, switched on from QuantConfig.

- ``equalize`` (cross-layer equalization) and ``bias_absorption`` run in prepare, after BN folding;
- calibrate runs the steps of ``fxquant.pipeline.calibrate.STEPS``, each with the contract of ``ptq.step``:
  SmoothQuant and the outlier-channel split before the ranges; ``weight_widths`` (ORT's u8s8 saturation-aware
  weight codes), ``adaround`` and ``bias_correction`` after them (the last two also on their own:
  ``fxquant.adaround``, ``fxquant.correct_bias``).
"""
