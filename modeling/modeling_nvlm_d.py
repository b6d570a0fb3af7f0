"""NVLM-D (decoder-only): InternViT -> pixel shuffle -> MLP projector -> Qwen2, in Hugging Face form.

Copied verbatim next to converted weights as remote code: imports only torch, transformers and
its sibling files. Parameter names and shapes are those of the published `nvidia/NVLM-D-72B`
release, and `forward`, `chat` and `generate` keep its signatures, so code written for the
release runs unchanged. Differences from the release, all deliberate:
- attention goes through `scaled_dot_product_attention` by default in both towers;
  `attn_implementation="eager"` gives the plain formulas;
- `generate()` works on transformers 4.56+ and 5.x, and nothing assumes CUDA: inputs go where
  each module computes (its weights, or accelerate's hook when they are offloaded);
- `batch_chat()` answers several questions in one padded batch;
- the projector LayerNorm eps is read from the config (Megatron trains with 1e-6).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationConfig, Qwen2ForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from .configuration_nvlm_d import NVLM_D_Config
from .modeling_intern_vit import InternVisionModel
from .processing_nvlm_d import (
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    build_prompt,
    split_response,
)


def pixel_shuffle(x: torch.Tensor, scale_factor: float = 0.5, version: str = "v2") -> torch.Tensor:
    """[N, W, H, C] -> [N, W*s, H*s, C/s^2]: merge each 2x2 neighbourhood of patches into one token.

    v2 swaps the axes back after the shuffle; v1 (kept for old checkpoints) leaves the grid transposed.
    """
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).reshape(
        n, int(h * scale_factor), int(w * scale_factor), int(c / scale_factor**2)
    )
    if version != "v1":
        x = x.permute(0, 2, 1, 3)
    return x.contiguous()


def execution_device(model: nn.Module, name: str) -> torch.device:
    """Where submodule `name` of `model` computes: its weights' device, or under accelerate's
    offloading (weights on "meta", brought in by a hook at each call) the device of its hook, or
    of the nearest ancestor's."""
    module, device = model, None
    for part in ["", *name.split(".")]:
        module = getattr(module, part) if part else module
        hook = getattr(module, "_hf_hook", None)
        for each in getattr(hook, "hooks", (hook,)):  # accelerate's SequentialHook holds several
            if getattr(each, "execution_device", None) is not None:
                device = each.execution_device
    return next(module.parameters()).device if device is None else torch.device(device)


class NVLM_D_Model(PreTrainedModel):
    config_class = NVLM_D_Config
    main_input_name = "pixel_values"
    base_model_prefix = ""
    _no_split_modules = ["InternVisionEncoderLayer", "Qwen2DecoderLayer"]
    _supports_sdpa = True

    def __init__(
        self,
        config: NVLM_D_Config,
        vision_model: nn.Module | None = None,
        language_model: nn.Module | None = None,
        use_flash_attn: bool | None = None,  # accepted for the release's signature; see attn_implementation
    ):
        super().__init__(config)
        self.select_layer = config.select_layer
        self.template = config.template
        self.downsample_ratio = config.downsample_ratio
        self.ps_version = config.ps_version
        self.num_image_token = config.num_image_token
        if vision_model is None:
            vision_model = InternVisionModel(config.vision_config)
        if language_model is None:
            language_model = Qwen2ForCausalLM(config.llm_config)
        self.vision_model = vision_model
        self.language_model = language_model

        vit_width = config.vision_config.hidden_size * int(1 / config.downsample_ratio) ** 2
        llm = config.llm_config
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(vit_width, eps=config.projector_layer_norm_eps),
            nn.Linear(vit_width, llm.intermediate_size, bias=False),
            nn.GELU(),  # exact (erf) GELU
            nn.Linear(llm.intermediate_size, llm.hidden_size, bias=False),
        )
        self.img_context_token_id = config.img_context_token_id
        self.system_message = "Answer the questions."
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.llm_config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # -- image features -------------------------------------------------------------------------

    def pixel_shuffle(self, x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
        return pixel_shuffle(x, scale_factor, self.ps_version)

    def vision_features(self, pixel_values: torch.Tensor, output_hidden_states: bool = False):
        """ViT output of the selected layer without the class token: [tiles, patches, C].

        With `output_hidden_states`, also every layer's output (embeddings first)."""
        need_all = output_hidden_states or self.select_layer != -1
        out = self.vision_model(pixel_values=pixel_values, output_hidden_states=need_all, return_dict=True)
        selected = out.last_hidden_state if self.select_layer == -1 else out.hidden_states[self.select_layer]
        return selected[:, 1:, :], out.hidden_states

    def project(self, vit_embeds: torch.Tensor) -> torch.Tensor:
        """[tiles, patches, C] -> pixel shuffle -> mlp1 -> [tiles, patches/4, llm hidden]."""
        side = int(vit_embeds.shape[1] ** 0.5)
        x = vit_embeds.reshape(vit_embeds.shape[0], side, side, -1)
        x = self.pixel_shuffle(x, scale_factor=self.downsample_ratio)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        return self.mlp1(x)

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.project(self.vision_features(pixel_values)[0])

    # -- embedding the prompt -------------------------------------------------------------------

    def _input_device(self) -> torch.device:
        return execution_device(self, "language_model." + self._embedding_name())

    def _embedding_name(self) -> str:
        embedding = self.language_model.get_input_embeddings()
        return next(n for n, m in self.language_model.named_modules() if m is embedding)

    def embed_inputs(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        image_flags: torch.Tensor | None = None,
        visual_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the image features written over the <|vision_pad|> positions."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        if pixel_values is None and visual_features is None:
            return embeds
        if self.img_context_token_id is None:
            raise ValueError(
                "img_context_token_id is not set: give it in the config or call chat() with a tokenizer"
            )
        # Count before the vision tower runs: a bad prompt fails fast, and the host sync (reading the
        # count) falls while the device is idle instead of stalling the launch queue behind the ViT.
        selected = input_ids == self.img_context_token_id
        found = int(selected.sum())
        if visual_features is not None:  # precomputed ViT features, as in the release
            expected = visual_features.shape[:-1].numel()
        else:
            tiles = pixel_values.shape[0] if image_flags is None else int((image_flags == 1).sum())
            expected = tiles * self.num_image_token
        self._check_placeholders(found, expected)
        if visual_features is not None:
            vit_embeds = self.mlp1(visual_features.to(execution_device(self, "mlp1.0")))
        else:
            vit_embeds = self.extract_feature(pixel_values)
        if image_flags is not None:
            vit_embeds = vit_embeds[image_flags.reshape(-1) == 1]
        vit_embeds = vit_embeds.reshape(-1, embeds.shape[-1]).to(embeds.device, embeds.dtype)
        self._check_placeholders(found, vit_embeds.shape[0])  # shapes only (tiles of another size)
        return embeds.masked_scatter(selected.unsqueeze(-1).to(embeds.device), vit_embeds)

    def _check_placeholders(self, found: int, embeddings: int) -> None:
        if found != embeddings:
            raise ValueError(
                f"the prompt has {found} image placeholder tokens but the images give {embeddings} "
                f"embeddings ({self.num_image_token} per tile)"
            )

    # -- forward / generate -----------------------------------------------------------------------

    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        image_flags: torch.LongTensor | None = None,
        past_key_values=None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        return_dict = self.config.return_dict if return_dict is None else return_dict
        inputs_embeds = self.embed_inputs(input_ids, pixel_values, image_flags)
        if past_key_values is not None:  # the release's name for the KV cache
            kwargs["past_key_values"] = past_key_values
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        if not return_dict:
            return outputs.to_tuple()
        return outputs

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        visual_features: torch.FloatTensor | None = None,
        generation_config: GenerationConfig | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **generate_kwargs,
    ):
        """Generate from a prompt with images; returns the new tokens only (inputs are embeddings)."""
        device = self._input_device()
        input_ids = input_ids.to(device)
        if pixel_values is not None:
            pixel_values = pixel_values.to(execution_device(self, "vision_model.embeddings.patch_embedding"))
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
        inputs_embeds = self.embed_inputs(input_ids, pixel_values, visual_features=visual_features)
        extra = {
            k: v
            for k, v in dict(
                generation_config=generation_config,
                output_hidden_states=output_hidden_states,
                return_dict_in_generate=return_dict,
            ).items()
            if v is not None
        }
        if generation_config is None:  # a GenerationConfig carries its own use_cache
            generate_kwargs.setdefault("use_cache", True)
        # transformers computes the logits of the last position only (logits_to_keep=1) at prefill.
        # The prompt is the embeddings; the empty ids are those transformers would make, on their
        # device (transformers 4.x puts them on the first weight's, "meta" when accelerate offloads).
        return self.language_model.generate(
            input_ids=input_ids[:, :0],
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            **extra,
            **generate_kwargs,
        )

    # -- chat -------------------------------------------------------------------------------------

    def _generate_text(self, tokenizer, queries, pixel_values, generation_config, visual_features=None):
        eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        kwargs = {**dict(generation_config or {}), "eos_token_id": eos_token_id}
        kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        inputs = tokenizer(queries, return_tensors="pt", padding=len(queries) > 1)
        output = self.generate(
            pixel_values=pixel_values,
            visual_features=visual_features,
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            **kwargs,
        )
        return [split_response(text) for text in tokenizer.batch_decode(output, skip_special_tokens=True)]

    def chat(
        self,
        tokenizer,
        pixel_values,
        question,
        generation_config,
        history=None,
        return_history=False,
        num_patches_list=None,
        IMG_START_TOKEN=IMG_START_TOKEN,
        IMG_END_TOKEN=IMG_END_TOKEN,
        IMG_CONTEXT_TOKEN=IMG_CONTEXT_TOKEN,
        verbose=False,
        visual_features=None,
    ):
        """One turn of the published chat format; `generation_config` is a dict of generate() kwargs."""
        if num_patches_list is None:
            num_patches_list = [pixel_values.shape[0]] if pixel_values is not None else []
        if pixel_values is not None and len(pixel_values) != sum(num_patches_list):
            raise ValueError(
                f"pixel_values has {len(pixel_values)} tiles, num_patches_list sums to "
                f"{sum(num_patches_list)}"
            )
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        history = [] if history is None else history
        query = build_prompt(
            question,
            num_patches_list,
            self.num_image_token,
            history=history,
            system_message=self.system_message,
            context_token=IMG_CONTEXT_TOKEN,
        )
        (response,) = self._generate_text(
            tokenizer, [query], pixel_values, generation_config, visual_features
        )
        if verbose:
            print(query.replace(IMG_CONTEXT_TOKEN, ""), response)
        history = history + [(question, response)]
        return (response, history) if return_history else response

    def batch_chat(
        self,
        tokenizer,
        pixel_values,
        questions,
        generation_config,
        num_patches_list=None,
        IMG_CONTEXT_TOKEN=IMG_CONTEXT_TOKEN,
        verbose=False,
    ):
        """Several single-turn questions in one left-padded batch; question i goes with
        num_patches_list[i] tiles of `pixel_values` (0 for a text-only question)."""
        if num_patches_list is None:
            num_patches_list = [0] * len(questions) if pixel_values is None else [pixel_values.shape[0]]
        if len(num_patches_list) != len(questions):
            raise ValueError(
                f"{len(questions)} questions but {len(num_patches_list)} entries in num_patches_list"
            )
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        queries = [
            build_prompt(
                q,
                [n] if n else [],
                self.num_image_token,
                system_message=self.system_message,
                context_token=IMG_CONTEXT_TOKEN,
            )
            for q, n in zip(questions, num_patches_list)
        ]
        padding_side = tokenizer.padding_side
        tokenizer.padding_side = "left"  # generation continues from the right end of every row
        try:
            responses = self._generate_text(tokenizer, queries, pixel_values, generation_config)
        finally:
            tokenizer.padding_side = padding_side
        if verbose:
            for q, r in zip(questions, responses):
                print(q, r)
        return responses
