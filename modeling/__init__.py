"""NVLM-D in Hugging Face form, importable without megatron-core.

    from modeling import NVLM_D_Config, NVLM_D_Model

Importing this package registers the classes with AutoConfig / AutoModel / AutoModelForCausalLM
(and NVLMProcessor with AutoProcessor), and marks them for `save_pretrained` to write `auto_map`
and copy the self-contained remote-code files (configuration_nvlm_d.py, modeling_nvlm_d.py,
modeling_intern_vit.py, processing_nvlm_d.py), so a folder we write loads with
`trust_remote_code=True` where nvlm-port is not installed.
The Megatron-Core builder of the same model lives apart, in `modeling.megatron`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor

from .configuration_nvlm_d import InternVisionConfig, NVLM_D_Config
from .modeling_intern_vit import InternVisionModel
from .modeling_nvlm_d import NVLM_D_Model
from .presets import get_config
from .processing_nvlm_d import CHAT_TEMPLATE, NVLMImageProcessor, NVLMProcessor, build_prompt

AutoConfig.register(NVLM_D_Config.model_type, NVLM_D_Config, exist_ok=True)
AutoModel.register(NVLM_D_Config, NVLM_D_Model, exist_ok=True)
AutoModelForCausalLM.register(NVLM_D_Config, NVLM_D_Model, exist_ok=True)
NVLM_D_Config.register_for_auto_class("AutoConfig")
NVLM_D_Model.register_for_auto_class("AutoModel")
AutoProcessor.register(NVLM_D_Config, NVLMProcessor, exist_ok=True)
NVLMProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "CHAT_TEMPLATE",
    "InternVisionConfig",
    "InternVisionModel",
    "NVLM_D_Config",
    "NVLM_D_Model",
    "NVLMImageProcessor",
    "NVLMProcessor",
    "build_prompt",
    "get_config",
]
