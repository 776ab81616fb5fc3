"""torchvision models with random weights and randomized BatchNorm statistics (no weights download offline).

Randomized running statistics and affine parameters make BatchNorm folding matter, as it does for trained
models, so these exercise the whole pipeline honestly. Parameters that torchvision initializes so that a
branch contributes (almost) nothing get trained-like values too: ViT's zero-initialized head would make every
output zero, and ConvNeXt's layer scales (1e-6) would hide each residual block's quantization error.

Two initializations are degenerate in a way no trained network is, and would make the quantized model measure
the initialization instead of the compiler:
- ViT's class token starts at zero: the token the head reads is then its position embedding (std 0.02) among
  patch tokens of std ~1, so one per-tensor quantizer leaves it a couple of steps and the encoder's LayerNorms
  blow that error up (quantizing only the first residual add cost 24 dB at the output). It gets N(0, 1), the
  scale of the patch embeddings it is concatenated with.
- Inception v3's legacy initialization (truncated normal, std 0.1, which torchvision's own FutureWarning
  retires) grows activations ~5x per layer (1e9 at the last block) and the branches joined by one concat
  (one shared scale) 15x apart. Its convolutions get the variance-preserving Kaiming initialization the
  other torchvision CNNs use.
"""

from __future__ import annotations

import torch
import torchvision


def random_torchvision(name: str, seed: int = 0, **kwargs: object) -> torch.nn.Module:
    """``torchvision.models.<name>(**kwargs)`` with BN running_mean ~ U(-0.5, 0.5), running_var ~ U(0.5, 2),
    weight ~ U(0.5, 1.5), bias ~ U(-0.3, 0.3); all-zero weights ~ N(0, 0.02); layer scales ~ U(0.05, 0.15);
    ViT's class token ~ N(0, 1); Inception v3's convolutions Kaiming-normal; in eval mode."""
    torch.manual_seed(seed)
    if name == "inception_v3":
        kwargs = {"init_weights": False, **kwargs}  # re-initialized below; skips the legacy scipy init
    model = getattr(torchvision.models, name)(**kwargs)
    with torch.no_grad():
        if name == "inception_v3":
            for m in model.modules():
                if isinstance(m, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
        for pname, p in model.named_parameters():
            if pname == "class_token":
                p.normal_(0.0, 1.0)
            elif pname.endswith("layer_scale"):
                p.uniform_(0.05, 0.15)
            elif pname.endswith("weight") and p.dim() > 1 and not p.any():
                p.normal_(0.0, 0.02)
    return model.eval()
