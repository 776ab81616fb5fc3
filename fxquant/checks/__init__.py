"""Checks of what users hand to prepare/export: each raises an fxquant error (or warns) naming the fix."""
