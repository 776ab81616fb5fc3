"""Validation of what users hand to prepare, load_encodings and export_onnx: each raises an fxquant error (or
warns) naming the fix. (A rule's ``checks`` are something else: the conditions under which a rule applies.)"""
