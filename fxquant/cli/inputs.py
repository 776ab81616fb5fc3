"""What the CLI reads: a model (torchvision name or ``file.py:factory``) and calibration data.

Calibration data is an ImageFolder directory (standard ImageNet transforms), a ``.pt``/``.npy`` tensor file
(N samples along the first axis), a ``file.py:function`` returning a tensor or a list of batches, or the
literal ``random`` (explicit opt-in: ranges from random data do not fit real inputs).
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import os
import sys
from collections.abc import Callable

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision import datasets, transforms
from tqdm.auto import tqdm

from fxquant.backends import BACKENDS
from fxquant.cli.torchvision_models import random_torchvision
from fxquant.errors import FxQuantError


class CLIError(FxQuantError, ValueError):
    """A bad command-line input; the message says what is wrong and what to do."""


_KEPT_DTYPES = (torch.float32, torch.int64, torch.int32)  # .npy dtypes passed as they are; others become float32
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def add_model_and_data_args(parser: argparse.ArgumentParser) -> None:
    """The arguments ``quantize`` and ``report`` share."""
    parser.add_argument("model", metavar="MODEL",
                        help="a torchvision classification architecture (e.g. resnet18; random weights, randomized "
                             "BatchNorm statistics: no download) or path/to/file.py:factory, a function returning "
                             "an nn.Module (the file is executed as Python code, once, to get it: only name files "
                             "you trust)")
    parser.add_argument("--backend", choices=tuple(BACKENDS), default="tensorrt",
                        help="deployment runtime whose quantizer placement to use (default: tensorrt)")
    parser.add_argument("--calib", required=True, metavar="DATA",
                        help="calibration data: an ImageFolder directory (resize, center crop, ImageNet "
                             "normalization), a .pt/.npy tensor file with samples along axis 0, "
                             "path/to/file.py:function returning a tensor or a list of batches (the file is executed, "
                             "once, also when MODEL names it), or 'random' "
                             "(explicit opt-in; needs --input-shape for non-torchvision models)")
    parser.add_argument("--num-batches", type=_positive, default=8, metavar="N",
                        help="calibration batches to use (default: 8)")
    parser.add_argument("--batch-size", type=_positive, default=8, metavar="B", help="batch size (default: 8)")
    parser.add_argument("--image-size", type=_positive, default=224, metavar="PX",
                        help="center-crop size for ImageFolder data (default: 224)")
    parser.add_argument("--input-shape", type=_shape, default=None, metavar="C,H,W",
                        help="shape of one sample for --calib random (default: 3,224,224)")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                        help="keep layers float: glob on module names or class names (repeatable), e.g. "
                             "--exclude 'fc' --exclude 'layer4.*'")
    parser.add_argument("--seed", type=int, default=0, help="seed for random weights and random data (default: 0)")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape like 3,224,224, got {text!r}") from None
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"expected positive dimensions like 3,224,224, got {text!r}")
    return shape


# ---- models -------------------------------------------------------------------------------------------
def _load_callable(spec: str, what: str) -> Callable:
    path, _, name = spec.rpartition(":")
    if not os.path.isfile(path):
        raise CLIError(f"{what} file {path!r} does not exist")
    module = _import_file(path)
    fn = getattr(module, name, None)
    if not callable(fn):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise CLIError(f"{path} has no function {name!r}; it defines: {', '.join(found[:12]) or 'nothing callable'}")
    return fn


def _import_file(path: str) -> object:
    """Import (execute) the file once per process: ``--calib file.py:fn`` naming the model's file reuses it."""
    module_name = f"_fxquant_user_{abs(hash(os.path.abspath(path)))}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    loader = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(loader)
    sys.modules[module_name] = module
    try:
        loader.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[module_name]
        if not isinstance(exc, Exception):
            raise
        raise CLIError(f"importing {path} failed: {type(exc).__name__}: {' '.join(str(exc).split())}") from exc
    return module


def call_user(fn: Callable, spec: str, what: str) -> object:
    """``fn()`` from the user's file; its failure becomes one CLIError line naming the function."""
    try:
        return fn()
    except Exception as exc:
        raise CLIError(f"the {what} function {spec} failed: {type(exc).__name__}: {' '.join(str(exc).split())}") \
            from exc


def is_file_spec(text: str) -> bool:
    path, sep, name = text.rpartition(":")
    return bool(sep and name and path.endswith(".py"))


def load_model(spec: str, seed: int = 0) -> tuple[nn.Module, str]:
    """The model named by ``spec`` in eval mode, and a short name for it."""
    if is_file_spec(spec):
        model = call_user(_load_callable(spec, "model"), spec, "model factory")
        if not isinstance(model, nn.Module):
            raise CLIError(f"{spec} returned a {type(model).__name__}, not an nn.Module")
        return model.eval(), spec.rpartition(":")[2]
    names = torchvision.models.list_models(module=torchvision.models)
    if spec not in names:
        close = difflib.get_close_matches(spec, names, n=4)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise CLIError(f"unknown model {spec!r}: {hint}give a torchvision classification architecture "
                       f"(e.g. resnet18, mobilenet_v2) or path/to/file.py:factory")
    return random_torchvision(spec, seed=seed), spec


# ---- calibration data -----------------------------------------------------------------------------------
def _batches_of(data: object, batch_size: int, num_batches: int, source: str) -> list[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        if data.dim() < 2:
            raise CLIError(f"{source} holds a tensor of shape {tuple(data.shape)}; expected samples along axis 0, "
                           "e.g. (N, 3, 224, 224)")
        return [data[i:i + batch_size] for i in range(0, len(data), batch_size)][:num_batches]
    if isinstance(data, (list, tuple)) and data and all(isinstance(b, torch.Tensor) for b in data):
        return list(data)[:num_batches]
    raise CLIError(f"{source} must give a tensor (samples along axis 0) or a list of tensors (batches), "
                   f"got {type(data).__name__}")


def _image_folder(path: str, batch_size: int, num_batches: int, image_size: int) -> list[torch.Tensor]:
    transform = transforms.Compose([transforms.Resize(round(image_size * 256 / 224)),
                                    transforms.CenterCrop(image_size), transforms.ToTensor(),
                                    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    try:
        dataset = datasets.ImageFolder(path, transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise CLIError(f"{path} is not an ImageFolder directory (one subfolder per class holding images): "
                       f"{' '.join(str(exc).split())}") from exc
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    total = min(num_batches, len(loader))
    batches = []
    for images, _ in tqdm(loader, total=total, desc="fxquant load images", unit="batch"):
        batches.append(images)
        if len(batches) == num_batches:
            break
    return batches


def load_calibration(args: argparse.Namespace, default_shape: tuple[int, ...] | None) -> tuple[list[torch.Tensor], str]:
    """The calibration batches for ``args.calib`` and a description of them."""
    spec, bs, nb = args.calib, args.batch_size, args.num_batches
    if spec == "random":
        shape = args.input_shape or default_shape
        if shape is None:
            raise CLIError("--calib random needs --input-shape C,H,W for a model from a file")
        gen = torch.Generator().manual_seed(args.seed)
        batches = [torch.randn(bs, *shape, generator=gen) for _ in range(nb)]
        return batches, f"random normal data {tuple(shape)} (explicit opt-in; real data gives real ranges)"
    if is_file_spec(spec):
        batches = _batches_of(call_user(_load_callable(spec, "calibration"), spec, "calibration"), bs, nb, spec)
    elif os.path.isdir(spec):
        batches = _image_folder(spec, bs, nb, args.image_size)
    elif os.path.isfile(spec) and spec.endswith((".pt", ".pth")):
        try:
            data = torch.load(spec, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CLIError(f"cannot read {spec} with torch.load: {' '.join(str(exc).split())[:200]}") from exc
        batches = _batches_of(data, bs, nb, spec)
    elif os.path.isfile(spec) and spec.endswith(".npy"):
        try:
            array = np.load(spec, allow_pickle=False)
        except Exception as exc:
            raise CLIError(f"cannot read {spec} with numpy.load: {exc}") from exc
        tensor = torch.from_numpy(np.ascontiguousarray(array))  # integer token ids stay integer
        batches = _batches_of(tensor if tensor.dtype in _KEPT_DTYPES else tensor.float(), bs, nb, spec)
    elif os.path.exists(spec):
        raise CLIError(f"--calib {spec}: expected a directory, a .pt/.npy file, file.py:function or 'random'")
    else:
        raise CLIError(f"--calib {spec}: no such file or directory (use 'random' to calibrate on random data)")
    if not batches:
        raise CLIError(f"--calib {spec} holds no samples")
    samples = sum(len(b) for b in batches)
    return batches, f"{spec}: {len(batches)} batch(es), {samples} sample(s) of shape {tuple(batches[0].shape[1:])}"


def load_model_and_data(args: argparse.Namespace, clock) -> tuple[nn.Module, str, list[torch.Tensor], str]:
    """Seed, then load ``args.model`` and its calibration batches, timing both on ``clock`` (a Stopwatch).
    Torchvision names default to 3x224x224 random data; file factories need the data to say its shape."""
    torch.manual_seed(args.seed)
    with clock("load model"):
        model, name = load_model(args.model, args.seed)
    with clock("load data"):
        batches, data_note = load_calibration(args, None if is_file_spec(args.model) else (3, 224, 224))
    return model, name, batches, data_note
