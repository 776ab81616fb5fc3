"""ONNX Runtime (CPU): rewrites for its kernels, fusion and latency reports, CPU targets, regions tune floats."""
