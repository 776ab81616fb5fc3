"""Post-training quantization passes beyond calibration, switched on from QuantConfig.

- ``equalize`` (cross-layer equalization) and ``bias_absorption`` run in prepare, after BN folding;
- SmoothQuant and the outlier-channel split run in calibrate before ranges; ``weight_widths`` (ORT's u8s8
  saturation-aware weight codes) after them; ``bias_correction`` and ``adaround`` at the end of calibrate (or on
  their own).
"""
