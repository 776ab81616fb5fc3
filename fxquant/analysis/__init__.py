"""Measure and choose: per-layer sensitivity and its report, mixed precision by measurement, tune (ORT-timed)."""
