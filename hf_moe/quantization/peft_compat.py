"""Two fixes to peft 0.21's `lora.ParamWrapper` for parameters that already carry a parametrization, such as the
4-bit experts of `quantize_experts` (bitsandbytes' dequantising parametrization). Both are in peft's private code,
so they live here, in one place, and `tests/test_quantization.py` pins them.

1. `_remove_parametrizations` removes only `_LoraParameterProxy` from a parametrization list with more than one entry,
   but a single adapter on 3-D experts registers a `_LoraFactorsProxy`: it was never removed, so every forward
   stacked one more LoRA delta on the weight (peft warns "Could not find any LoRA parametrization").
2. Two nested ParamWrappers on one experts module (gate_up_proj and down_proj): the outer one opens
   `parametrize.cached()`, and the inner one reads its parameter before adding its proxy; that read is cached, so the
   forward used the weight *without* the inner LoRA and its factors got no gradient.
"""

from contextlib import contextmanager

from torch.nn.utils import parametrize

_PATCHED = "_hf_moe_parametrized_parameters_patch"


def patch_peft_for_parametrized_parameters() -> None:
    """Apply both fixes once per process (no-op without peft); they change nothing for unparametrized parameters."""
    try:
        from peft.tuners.lora import layer as lora_layer
    except ImportError:
        return
    wrapper = lora_layer.ParamWrapper
    if getattr(wrapper, _PATCHED, False):
        return
    lora_proxies = tuple(getattr(lora_layer, name) for name in ("_LoraParameterProxy", "_LoraFactorsProxy")
                         if hasattr(lora_layer, name))
    original_remove, original_activate = wrapper._remove_parametrizations, wrapper._activate_lora

    def _remove_parametrizations(self):
        parametrizations = self.get_base_layer().parametrizations[self.parameter_name]
        if len(parametrizations) == 1:
            return original_remove(self)
        for index in reversed(range(len(parametrizations))):  # only this wrapper's LoRA proxy, the newest one
            if isinstance(parametrizations[index], lora_proxies):
                del parametrizations[index]
                return
        return original_remove(self)

    @contextmanager
    def _activate_lora(self, active_adapters):
        with original_activate(self, active_adapters):
            # Drop the value cached before this wrapper's proxy was registered (fix 2).
            parametrize._cache.pop((id(self.get_base_layer()), self.parameter_name), None)
            yield

    wrapper._remove_parametrizations = _remove_parametrizations
    wrapper._activate_lora = _activate_lora
    setattr(wrapper, _PATCHED, True)
