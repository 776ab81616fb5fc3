"""Post-training quantization passes beyond calibration (DFQ and AdaRound), switched on from QuantConfig.

- ``equalize`` (cross-layer equalization) and ``bias_absorption`` run in prepare, after BN folding;
- ``bias_correction`` and ``adaround`` need data and run at the end of calibrate (or on their own).

Submodules are imported where used (QuantConfig imports ``options``; keep this package import-light).
"""
