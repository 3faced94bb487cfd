"""Which parameters the inner step moves: the set S of SPEC.md, by variant.

`conv` and `fc` are found by module type, so they are right on any timm or
transformers model; `head` reads the classifier from timm's pretrained_cfg;
anything else is a comma-separated list of glob patterns over parameter names.
"""
from __future__ import annotations

import difflib
import fnmatch
from collections import OrderedDict

import torch.nn as nn
from timm.layers import CondConv2d

from .errors import MLTPConfigError

# variants with a fixed meaning; any other string is read as glob patterns
VARIANTS = ("none", "full", "conv", "fc", "fo", "head")

# heads that models without timm's pretrained_cfg use (transformers, torchvision, plain modules)
_HEAD_NAMES = ("classifier", "score", "head", "fc", "lm_head", "last_linear")


def _is_conv(module: nn.Module) -> bool:
    # CondConv2d keeps its expert kernels flattened in one 2-d weight and is no torch subclass;
    # MixedConv2d and friends are containers of real Conv2d and are found through their children
    if isinstance(module, (nn.modules.conv._ConvNd, CondConv2d)):
        return True
    # convolutions of other libraries that reimplement the module: named so, with a kernel of >= 3 dims
    return type(module).__name__.endswith(("Conv1d", "Conv2d", "Conv3d")) and any(
        p.dim() >= 3 for p in module.parameters(recurse=False))


def _is_fc(module: nn.Module) -> bool:
    if isinstance(module, (nn.Linear, nn.Bilinear)):
        return True
    # transformers' Conv1D (GPT-2) is a linear layer with a transposed weight
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def _own_parameters(model: nn.Module, predicate) -> list[str]:
    names = []
    for module_name, module in model.named_modules():
        if predicate(module):
            prefix = module_name + "." if module_name else ""
            names += [prefix + n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        elif isinstance(module, nn.MultiheadAttention) and predicate is _is_fc:
            # its packed q/k/v projection is a linear map stored on the attention module itself
            prefix = module_name + "." if module_name else ""
            names += [prefix + n for n in ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight",
                                           "v_proj_weight") if getattr(module, n, None) is not None
                      and getattr(module, n).requires_grad]
    return names


def _timm_classifiers(model: nn.Module) -> list[str]:
    """Classifier module names from timm's pretrained_cfg, also when timm sits inside a wrapper."""
    found = []
    for module_name, module in model.named_modules():
        cfg = getattr(module, "pretrained_cfg", None)
        if isinstance(cfg, dict) and cfg.get("classifier"):
            classifier = cfg["classifier"]
            classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
            prefix = module_name + "." if module_name else ""
            found += [prefix + c for c in classifier]
    return found


def _match(names: list[str], pattern: str) -> list[str]:
    # "layer4" selects the module subtree as "layer4.*" does
    return [n for n in names if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, pattern + ".*")]


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None)
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    return f"{type(model).__name__} ({arch})" if arch else type(model).__name__


def select_parameters(model: nn.Module, variant: str) -> list[str]:
    """Names of the trainable parameters in S for `variant` (SPEC.md, Variants), in model order."""
    if not isinstance(variant, str) or not variant.strip():
        raise MLTPConfigError(f"variant must be a non-empty string, got {variant!r}; "
                              f"use one of {', '.join(VARIANTS)} or glob patterns such as 'layer4.*,fc.*'")
    variant = variant.strip()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise MLTPConfigError(f"{_model_name(model)} has no trainable parameters (all requires_grad=False)")
    if variant == "none":
        return []
    if variant in ("full", "fo"):
        return trainable
    if variant == "conv":
        selected, tried = _own_parameters(model, _is_conv), "convolution modules (torch _ConvNd subclasses, timm CondConv2d)"
    elif variant == "fc":
        selected, tried = _own_parameters(model, _is_fc), "linear modules (nn.Linear subclasses, nn.Bilinear, transformers Conv1D)"
    elif variant == "head":
        heads = _timm_classifiers(model) or [h for h in _HEAD_NAMES if isinstance(getattr(model, h, None), nn.Module)][:1]
        selected = [n for h in heads for n in _match(trainable, h)]
        tried = f"classifier modules {heads or list(_HEAD_NAMES)} (from pretrained_cfg['classifier'] where timm has it)"
    else:
        patterns = [p.strip() for p in variant.split(",") if p.strip()]
        selected = []
        for pattern in patterns:
            matched = _match(trainable, pattern)
            if not matched:
                hint = difflib.get_close_matches(pattern, VARIANTS, n=1)
                hint = f"; did you mean variant '{hint[0]}'?" if hint and not any(c in pattern for c in "*?[") else ""
                raise MLTPConfigError(
                    f"variant pattern {pattern!r} matches no trainable parameter of {_model_name(model)}{hint} "
                    f"A variant is one of {', '.join(VARIANTS)} or comma-separated glob patterns over parameter "
                    f"names, e.g. 'layer4.*,fc.*'; this model's parameters start with: "
                    f"{', '.join(list(OrderedDict.fromkeys(n.split('.')[0] for n in trainable))[:12])}")
            selected += matched
        selected_set = set(selected)
        return [n for n in trainable if n in selected_set]
    if not selected:
        raise MLTPConfigError(f"variant {variant!r} selects no trainable parameter of {_model_name(model)}: "
                              f"looked for {tried}. Choose another variant or give parameter-name patterns.")
    return selected


def summarize_selection(model: nn.Module, names: list[str], max_modules: int = 6) -> str:
    """One line for the user: how many tensors and parameters S holds, shown as module-name patterns."""
    params = dict(model.named_parameters())
    numel = sum(params[n].numel() for n in names)
    total = sum(p.numel() for p in params.values() if p.requires_grad)
    modules = list(OrderedDict.fromkeys(n.rsplit(".", 1)[0] if "." in n else n for n in names))
    shown = ", ".join(m + ".*" for m in modules[:max_modules])
    more = f", ... (+{len(modules) - max_modules} modules)" if len(modules) > max_modules else ""
    return (f"{len(names)} tensors, {numel:,} of {total:,} trainable parameters ({100 * numel / max(total, 1):.1f}%)"
            + (f": {shown}{more}" if names else ""))
