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
- greedy generation on a CUDA device decodes over a static KV cache, one CUDA graph replay per
  token (`fast_decode=False`, or `model.fast_decode = False`, gives transformers' own loop; any
  sampling, beam search, logits processor, padded batch or offloaded model uses it anyway);
- the projector LayerNorm eps is read from the config (Megatron trains with 1e-6).
"""

from __future__ import annotations

import inspect
import types

import torch
import torch.nn.functional as F
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
        self.fast_decode = True  # greedy decoding through GreedyDecoder on CUDA (see generate)
        self._decoder = None
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
        fast_decode: bool | None = None,
        **generate_kwargs,
    ):
        """Generate from a prompt with images; returns the new tokens only (inputs are embeddings).

        Greedy search on a CUDA device runs GreedyDecoder (static KV cache, CUDA graph per token): the
        same tokens as transformers' loop, without its per-token Python work. `fast_decode=False` (or
        `self.fast_decode = False`) always takes transformers' loop; `True` also runs GreedyDecoder
        off CUDA (eagerly, without a graph); requests it does not cover fall back by themselves."""
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
        fast = self.fast_decode if fast_decode is None else fast_decode
        if fast and (fast_decode or device.type == "cuda") and not extra:
            plan = greedy_plan(self.language_model, attention_mask, generate_kwargs)
            if plan is not None:
                return self._greedy_decoder(inputs_embeds, plan).generate(inputs_embeds, **plan)
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

    def _greedy_decoder(self, inputs_embeds: torch.Tensor, plan: dict) -> GreedyDecoder:
        """The decoder for this batch size and cache length, kept between calls (its CUDA graph and
        cache are made once; cache lengths are rounded up so that prompts of similar length share)."""
        batch = inputs_embeds.shape[0]
        length = -(-(inputs_embeds.shape[1] + plan["max_new_tokens"]) // 256) * 256
        key = (batch, length, inputs_embeds.device, inputs_embeds.dtype)
        # A CUDA graph reads the weights at the addresses it was captured with: new tensors (a
        # load_state_dict(assign=True), a move) need a new decoder.
        weights = tuple(p.data_ptr() for p in self.language_model.parameters())
        if self._decoder is None or self._decoder.key != key or self._decoder.weights != weights:
            self._decoder = None  # free the old cache and graph first
            self._decoder = GreedyDecoder(self.language_model, key)
            self._decoder.weights = weights
        return self._decoder

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


# -- greedy decoding over a static cache, one CUDA graph replay per token ---------------------------

# Generation settings GreedyDecoder honours; any other field that differs from transformers'
# defaults (a logits processor, sampling, beams, stop strings...) sends generate() to transformers.
GREEDY_FIELDS = {
    "max_new_tokens",
    "max_length",
    "eos_token_id",
    "pad_token_id",
    "bos_token_id",
    "use_cache",
    "do_sample",
    "num_beams",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "typical_p",
    "transformers_version",
    "_from_model_config",
    "cache_implementation",
    "return_dict_in_generate",
}


# Values of generation fields that change nothing in greedy search (transformers' defaults moved
# between None and these across versions).
NEUTRAL_VALUES = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "num_return_sequences": 1,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
}


def is_neutral(field: str, value, default) -> bool:
    return value == default or (not value and not default) or NEUTRAL_VALUES.get(field, ...) == value


def greedy_plan(language_model: nn.Module, attention_mask, generate_kwargs: dict) -> dict | None:
    """max_new_tokens / eos / pad of a request GreedyDecoder computes exactly as transformers' greedy
    search would, or None when it does not cover the request."""
    asked = generate_kwargs
    if set(asked) - {"max_new_tokens", "do_sample", "eos_token_id", "pad_token_id", "use_cache", "num_beams"}:
        return None
    if asked.get("do_sample") or asked.get("num_beams", 1) != 1 or asked.get("use_cache") is False:
        return None
    if not isinstance(asked.get("max_new_tokens"), int) or asked["max_new_tokens"] < 1:
        return None
    config = language_model.generation_config
    defaults = GenerationConfig().to_dict()
    changed = {k for k, v in config.to_dict().items() if not is_neutral(k, v, defaults.get(k))}
    if changed - GREEDY_FIELDS or config.do_sample or (config.num_beams or 1) != 1:
        return None
    if config.cache_implementation not in (None, "static", "dynamic"):
        return None
    if config.return_dict_in_generate:
        return None
    if attention_mask is not None and not bool(attention_mask.all()):  # padded rows: transformers
        return None
    params = list(language_model.parameters())
    if any(p.device != params[0].device for p in params) or any(
        getattr(m, "_hf_hook", None) is not None for m in language_model.modules()
    ):
        return None  # spread over devices or offloaded by accelerate
    eos = generate_kwargs.get("eos_token_id", config.eos_token_id)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = generate_kwargs.get("pad_token_id", config.pad_token_id)
    if pad is None and eos:
        pad = eos[0]  # what transformers does (with a warning)
    return {"max_new_tokens": generate_kwargs["max_new_tokens"], "eos_token_id": eos, "pad_token_id": pad}


def static_cache(language_model: nn.Module, batch: int, length: int, device, dtype):
    """transformers' StaticCache, built with whichever arguments this version takes."""
    from transformers import StaticCache

    accepted = inspect.signature(StaticCache.__init__).parameters
    offered = dict(
        config=language_model.config,
        max_cache_len=length,
        max_batch_size=batch,
        batch_size=batch,
        device=device,
        dtype=dtype,
    )
    return StaticCache(**{k: v for k, v in offered.items() if k in accepted})


class GreedyDecoder:
    """Greedy decoding of a Qwen2ForCausalLM over a static KV cache of fixed length.

    The prefill runs eagerly (transformers builds its mask). Each decode step feeds the last token at
    a position held in a device tensor, with a 4D additive mask computed from that position (which
    transformers takes as it is), takes the argmax on the device and moves the position on: the same
    kernels at the same addresses every step, so on CUDA the step is captured once as a CUDA graph and
    replayed (a few microseconds of launch instead of milliseconds of Python per token). Tokens reach
    the host only at the end (and every 8 steps when an EOS can stop the run).
    """

    def __init__(self, language_model: nn.Module, key: tuple):
        batch, length, device, dtype = key
        self.key, self.lm, self.length = key, language_model, length
        self.cache = static_cache(language_model, batch, length, device, dtype)
        forward = inspect.signature(language_model.forward).parameters
        self.cache_arg = "past_key_values" if "past_key_values" in forward else "cache"
        self.takes_cache_position = "cache_position" in forward  # transformers < 5.2x
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.cache_position = torch.zeros(1, dtype=torch.long, device=device)
        self.key_index = torch.arange(length, device=device)
        self.mask = torch.zeros(batch, 1, 1, length, dtype=dtype, device=device)
        self.masked = torch.finfo(dtype).min
        self.graph = None
        self.use_graph = device.type == "cuda"
        self.capture_error = None  # why decoding runs without a graph on CUDA, if it does

    def _cache_kwargs(self, cache_position: torch.Tensor) -> dict:
        kwargs = {self.cache_arg: self.cache}
        if self.takes_cache_position:
            kwargs["cache_position"] = cache_position
        return kwargs

    def _reset_cache(self) -> None:
        self.cache.reset()  # in place: the captured graph keeps its addresses

    def _prefill(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        batch, prompt = inputs_embeds.shape[:2]
        positions = torch.arange(prompt, device=inputs_embeds.device)
        out = self.lm(
            inputs_embeds=inputs_embeds,
            attention_mask=torch.ones(batch, prompt, dtype=torch.long, device=inputs_embeds.device),
            position_ids=positions.expand(batch, -1),
            use_cache=True,
            logits_to_keep=1,
            **self._cache_kwargs(positions),
        )
        return out.logits[:, -1].argmax(-1, keepdim=True)

    def _step(self) -> None:
        """One decode step on the device buffers; what the CUDA graph holds."""
        keep = self.key_index <= self.cache_position
        self.mask.copy_(torch.where(keep, 0.0, self.masked).to(self.mask.dtype).expand_as(self.mask))
        with (
            rope_without_host_sync(self.lm, active=self.use_graph),  # graphs: rope_is_static held
            grouped_decode_attention(self.lm),
        ):
            out = self.lm(
                input_ids=self.token,
                attention_mask=self.mask,
                position_ids=self.position,
                use_cache=True,
                logits_to_keep=1,
                **self._cache_kwargs(self.cache_position),
            )
        self.token.copy_(out.logits[:, -1].argmax(-1, keepdim=True))
        self.position.add_(1)
        self.cache_position.add_(1)

    def _capture(self, inputs_embeds: torch.Tensor) -> None:
        """Warm the step up on a side stream, capture it, then reset the cache (the warm-up steps
        wrote into it and moved its counters) and prefill again."""
        if not rope_is_static(self.lm, self.length):
            self.use_graph = False  # a RoPE that may rescale inside the cache: stay eager
            self.capture_error = "the rotary embedding may rescale inside the cache"
            return
        stream = torch.cuda.Stream(device=self.token.device)
        stream.wait_stream(torch.cuda.current_stream(self.token.device))
        mode = torch.cuda.get_sync_debug_mode()
        try:
            # A step that reads a device value on the host cannot be captured, and a failed
            # capture leaves CUDA's random generator unusable: look for such reads first.
            torch.cuda.set_sync_debug_mode("error")
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._step()
        except RuntimeError as error:
            self.use_graph = False
            self.capture_error = f"a decode step syncs with the host: {error}"[:500]
        finally:
            torch.cuda.set_sync_debug_mode(mode)
        torch.cuda.current_stream(self.token.device).wait_stream(stream)
        if not self.use_graph:
            self._reset_cache()
            self.token.copy_(self._prefill(inputs_embeds))
            return
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._step()
        except RuntimeError as error:  # something in this transformers version syncs with the host
            self.use_graph = False
            self.capture_error = f"capture failed: {error}"[:500]
            torch.cuda.synchronize(self.token.device)
        else:
            self.graph = graph
            self.rope_buffers = [b for b in self.lm.model.rotary_emb.buffers()]  # keep the captured ones
        self._reset_cache()
        self.token.copy_(self._prefill(inputs_embeds))

    @torch.no_grad()
    def generate(self, inputs_embeds: torch.Tensor, max_new_tokens: int, eos_token_id: list, pad_token_id):
        batch, prompt = inputs_embeds.shape[:2]
        self._reset_cache()
        first = self._prefill(inputs_embeds)
        out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=first.device)
        out[:, :1] = first
        self.token.copy_(first)
        if max_new_tokens > 1 and self.use_graph and self.graph is None:
            self._capture(inputs_embeds)
        eos = torch.tensor(eos_token_id, dtype=torch.long, device=first.device)
        done = torch.isin(first[:, 0], eos) if len(eos_token_id) else None
        self.position.fill_(prompt)
        self.cache_position.fill_(prompt)
        steps = 1
        for i in range(1, max_new_tokens):
            if done is not None and i % 8 == 0 and bool(done.all()):
                break
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
            token = self.token[:, 0]
            if done is not None:  # finished rows emit padding, as in transformers
                token = torch.where(done, pad_token_id, token)
                done = done | torch.isin(token, eos)
            out[:, i] = token
            steps = i + 1
        out = out[:, :steps]
        if done is not None and bool(done.all()):  # stop where the last row finished
            finished = torch.isin(out, eos).long().argmax(-1).max()
            out = out[:, : int(finished) + 1]
        return out


def rope_is_static(language_model: nn.Module, length: int) -> bool:
    """Whether the LLM's rotary frequencies stay fixed over positions [0, length): the plain RoPE, or
    a dynamic one whose rescaling starts past its original context (Qwen2's 32768 > length)."""
    rotary = language_model.model.rotary_emb
    rope_type = str(getattr(rotary, "rope_type", "default"))
    if rope_type == "default":
        return True
    if "dynamic" not in rope_type or not hasattr(type(rotary).forward, "__wrapped__"):
        return False
    original = getattr(rotary, "original_max_seq_len", 0)
    return length <= original and getattr(rotary, "max_seq_len_cached", original) <= original


class rope_without_host_sync:
    """Inside a decode step: the rotary embedding's forward without transformers' dynamic-RoPE
    check, which reads max(position) on the host (a sync a CUDA graph cannot hold). Used only where
    rope_is_static says the check would change nothing."""

    def __init__(self, language_model: nn.Module, active: bool):
        self.rotary = language_model.model.rotary_emb
        self.active = active

    def __enter__(self):
        # The undecorated forward (under torch.no_grad and dynamic_rope_update in transformers);
        # decoding already runs without gradients.
        if self.active:
            self.rotary.forward = types.MethodType(inspect.unwrap(type(self.rotary).forward), self.rotary)
        return self

    def __exit__(self, *exc):
        self.rotary.__dict__.pop("forward", None)
        return False


GROUPED_DECODE = "nvlm_grouped_decode_sdpa"


def grouped_decode_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA for a one-token decode step over grouped KV heads without expanding the cache: the query
    heads that share a KV head become rows of one query block ([B, H, 1, D] -> [B, G, H/G, D]), which
    is the same softmax(q k^T) v per query head. transformers' SDPA path instead copies K and V to
    all H heads when it is given a mask (as with a static cache): 2 x the cache, every layer, every
    token."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    batch, heads, q_len, dim = query.shape
    groups = key.shape[1]
    if q_len != 1 or module.training or heads % groups:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    rows = query.reshape(batch, groups, heads // groups, dim)
    mask = None if attention_mask is None else attention_mask[:, :, :, : key.shape[-2]]
    out = F.scaled_dot_product_attention(rows, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


class grouped_decode_attention:
    """Inside a decode step of an SDPA model: grouped_decode_sdpa as its attention function."""

    def __init__(self, language_model: nn.Module):
        self.config = language_model.config
        self.previous = self.config._attn_implementation
        self.active = self.previous == "sdpa" and register_grouped_decode()

    def __enter__(self):
        if self.active:
            self.config._attn_implementation = GROUPED_DECODE
        return self

    def __exit__(self, *exc):
        if self.active:
            self.config._attn_implementation = self.previous
        return False


def register_grouped_decode() -> bool:
    try:
        from transformers import AttentionInterface
    except ImportError:  # an older transformers: its own SDPA path
        return False
    AttentionInterface.register(GROUPED_DECODE, grouped_decode_sdpa)
    return True
