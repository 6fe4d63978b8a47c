"""LoRA on MoE models with peft: attention, fused experts and routers as targets, on full-precision or 4-bit bases.

peft 0.21 adapts a bare `nn.Parameter` (the 3-D experts, a router's weight) through `LoraConfig(target_parameters=...)`,
one low-rank pair per expert. Its matching is easy to get wrong: on a parametrized (e.g. 4-bit) parameter only the
fully qualified name matches, and a name that matches nothing is silently ignored when other targets match. So the
config built here lists every expert tensor and router by its fully qualified name, and `attach_moe_lora` checks that
each one got its adapter.
"""

from pathlib import Path

from torch import nn

from ..moe_layers import find_moe_layers
from .experts import expert_parameters, unwrapped_name
from .peft_compat import patch_peft_for_parametrized_parameters

LORA_TARGETS = ("attention", "experts", "router")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def parse_lora_targets(targets: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """'attention,experts' -> ('attention', 'experts'), checked against LORA_TARGETS."""
    names = tuple(part.strip() for part in targets.split(",")) if isinstance(targets, str) else tuple(targets)
    names = tuple(name for name in names if name)
    unknown = [name for name in names if name not in LORA_TARGETS]
    if unknown or not names:
        raise ValueError(f"`lora_targets`={targets!r} is invalid: give a comma-separated subset of {LORA_TARGETS}")
    return names


def router_weights(model: nn.Module) -> dict[str, nn.Module]:
    """{qualified name of the router weight: router module} for every sparse block (`hf_moe.moe_layers`)."""
    return {f"{unwrapped_name(layer.router_name)}.weight": layer.router for layer in find_moe_layers(model)
            if isinstance(getattr(layer.router, "weight", None), nn.Parameter)}


def moe_lora_targets(model: nn.Module, targets=("attention", "experts")) -> dict[str, list[str]]:
    """`{"target_modules": [...], "target_parameters": [...]}` for `LoraConfig`, every name fully qualified."""
    targets = parse_lora_targets(targets)
    target_modules, target_parameters = [], []
    if "attention" in targets:
        target_modules += [name for name, _ in model.named_modules()
                           if name.rpartition(".")[2] in ATTENTION_PROJECTIONS and "attn" in name]
    if "experts" in targets:
        target_parameters += [name for name, _, _ in expert_parameters(model)]
    if "router" in targets:
        for name, router in router_weights(model).items():
            if isinstance(router, nn.Linear):
                target_modules.append(name.rpartition(".")[0])
            else:
                target_parameters.append(name)
    for target, found in (("attention", target_modules), ("experts", target_parameters)):
        if target in targets and not found:
            raise ValueError(f"`lora_targets` asks for {target!r} but the model has none (is it an MoE model?)")
    if "router" in targets and not router_weights(model):
        raise ValueError("`lora_targets` asks for 'router' but no router was found beside the experts")
    return {"target_modules": target_modules, "target_parameters": target_parameters}


def moe_lora_config(model: nn.Module, r: int = 8, targets=("attention", "experts"), lora_alpha: int | None = None,
                    **lora_kwargs):
    """A peft `LoraConfig` for `model` with the chosen targets (`LORA_TARGETS`), ready for `get_peft_model`.

    `lora_alpha` defaults to `2 * r`. Further keyword arguments go to `LoraConfig`; LoRA on parameters needs
    `lora_dropout=0` (peft's `ParamWrapper`).

    Example:
    ```python
    >>> from peft import get_peft_model
    >>> config = moe_lora_config(model, r=16, targets="attention,experts,router")
    >>> model = get_peft_model(model, config)
    ```
    """
    from peft import LoraConfig

    if r <= 0:
        raise ValueError(f"`r`={r} is invalid: the LoRA rank must be a positive integer")
    lora_kwargs.setdefault("task_type", "CAUSAL_LM")
    return LoraConfig(r=r, lora_alpha=2 * r if lora_alpha is None else lora_alpha, lora_dropout=0.0,
                      **moe_lora_targets(model, targets), **lora_kwargs)


def attach_moe_lora(model: nn.Module, r: int = 8, targets=("attention", "experts"), lora_alpha: int | None = None,
                    **lora_kwargs):
    """`get_peft_model(model, moe_lora_config(...))`, checking that every requested tensor received an adapter."""
    from peft import get_peft_model

    patch_peft_for_parametrized_parameters()
    config = moe_lora_config(model, r, targets, lora_alpha, **lora_kwargs)
    peft_model = get_peft_model(model, config)
    missing = sorted(set(config.target_parameters) - set(adapted_parameters(peft_model)))
    if missing:
        raise RuntimeError(f"peft attached no LoRA adapter to {len(missing)} requested tensors: {missing}")
    return peft_model


def adapted_parameters(peft_model: nn.Module) -> list[str]:
    """Qualified names (as in the base model) of the parameters adapted through peft's `ParamWrapper`."""
    names = []
    for name, module in peft_model.named_modules():
        if type(module).__name__ == "ParamWrapper":
            names.append(f"{unwrapped_name(name)}.{module.parameter_name}")
    return names


def merge_lora(base_path: str | Path, adapter_path: str | Path, output_dir: str | Path, overwrite: bool = False
               ) -> Path:
    """Merge a LoRA adapter (trained on a full-precision or 4-bit base) into the full-precision base with
    `merge_and_unload` and save a plain hf_moe folder (weights, remote code, tokenizer), atomically."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..checkpoints.atomic import atomic_output_dir

    patch_peft_for_parametrized_parameters()
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_path)).merge_and_unload()
    with atomic_output_dir(output_dir, overwrite=overwrite) as folder:
        merged.save_pretrained(folder)
        tokenizer_source = adapter_path if (Path(adapter_path) / "tokenizer_config.json").exists() else base_path
        if (Path(tokenizer_source) / "tokenizer_config.json").exists():
            AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(folder)
    return Path(output_dir)
