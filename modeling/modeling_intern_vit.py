"""InternViT-6B as NVLM-D uses it: dummy heads, whole-vector QK-norm, layer scale.

Copied verbatim next to converted weights as remote code: imports only torch, transformers and
the sibling configuration file.

Shapes for the 72B release (C = 3200 real channels, 25 real + 7 dummy heads of 128):
    qkv.weight [3 * 32 * 128, C]   rows in blocks [Q of all heads; K; V], dummy heads last
    q_norm / k_norm weight [32 * 128]
    proj.weight [C, 32 * 128]      the dummy heads' columns are zero
The dummy heads are exactly zero, so they add nothing: their q, k, v are 0, their attention
output is 0, and the QK-norm statistics are taken over the real channels only. So the tower computes
on the real heads alone (22% less QKV, projection and attention work) whenever the dummy heads' V rows
or projection columns are zero; the parameters keep the release layout (state_dict and
save_pretrained are unchanged), and a checkpoint whose dummy heads do contribute gets all 32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.modeling_utils import PreTrainedModel

from .configuration_nvlm_d import InternVisionConfig


class InternRMSNorm(nn.Module):
    """RMSNorm with float32 statistics: `(x * rsqrt(mean(x^2) + eps))` cast back to the input dtype,
    then times the weight (the release's rounding order). `variance` may be given precomputed
    (QK-norm over the real channels)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor, variance: torch.Tensor | None = None) -> torch.Tensor:
        if variance is None:
            # torch's fused kernel: the same float32 formula, one pass over the data on GPUs.
            normed = F.rms_norm(hidden_states, hidden_states.shape[-1:], eps=self.variance_epsilon)
        else:
            # bf16 x float32 promotes to float32 inside the multiply (no separate upcast copy).
            normed = (hidden_states * torch.rsqrt(variance + self.variance_epsilon)).to(hidden_states.dtype)
            # QK-norm may run on the real heads only: their leading channels of the weight.
            return normed * self.weight[: hidden_states.shape[-1]]
        return normed * self.weight


class InternVisionEmbeddings(nn.Module):
    """Conv patchify, prepend the class token, add the learned position embedding."""

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, self.embed_dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.num_patches = (config.image_size // config.patch_size) ** 2
        self.position_embedding = nn.Parameter(torch.zeros(1, self.num_patches + 1, self.embed_dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype))  # [B, C, h, w]
        patches = patches.flatten(2).transpose(1, 2)  # [B, h*w, C], row-major over the grid
        cls = self.class_embedding.to(dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.to(dtype)


class InternAttention(nn.Module):
    """Multi-head self-attention over real + dummy heads, with QK-norm over the whole Q/K vector."""

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size  # real channels
        self.head_dim = config.head_dim
        self.num_heads = config.num_padded_heads  # real + dummy
        self.padded_dim = self.num_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(self.embed_dim, 3 * self.padded_dim, bias=config.qkv_bias)
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:
            self.q_norm = InternRMSNorm(self.padded_dim, eps=config.layer_norm_eps)
            self.k_norm = InternRMSNorm(self.padded_dim, eps=config.layer_norm_eps)
        self.proj = nn.Linear(self.padded_dim, self.embed_dim)
        # Where the dummy heads sit, so that random initialisation can zero them (see _init_weights).
        self.qkv.dummy_heads = ("qkv_rows", self.embed_dim, self.padded_dim)
        self.proj.dummy_heads = ("proj_cols", self.embed_dim, self.padded_dim)
        if self.qk_normalization:
            self.q_norm.dummy_heads = ("norm", self.embed_dim, self.padded_dim)
            self.k_norm.dummy_heads = ("norm", self.embed_dim, self.padded_dim)

    def _qk_norm(self, x: torch.Tensor, norm: InternRMSNorm) -> torch.Tensor:
        # x: [B, N, heads*head_dim], heads = all 32 or the 25 real ones. The mean of squares runs over
        # the real channels only: the sum of squares of the real heads divided by the real width (dummy
        # heads are zero and must not dilute it). Megatron computes the same sum across TP ranks.
        # vector_norm reduces in float32 without the pow/sum temporaries of the written-out formula.
        stat_dtype = torch.promote_types(x.dtype, torch.float32)
        real = x[..., : self.embed_dim]
        sum_sq = torch.linalg.vector_norm(real, dim=-1, keepdim=True, dtype=stat_dtype).square()
        return norm(x, variance=sum_sq / self.embed_dim)

    def computed_heads(self) -> int:
        """How many heads the forward computes: the real ones when the dummy heads provably add
        nothing (their V rows, or their projection columns, are zero), else all of them. Checked
        once per weight version (a host sync), not at every call. All of them, through the modules'
        own calls, whenever a caller has replaced one of those calls on this instance (the parity
        tools' rounding-order variants patch `_qk_norm` and the submodules' forward)."""
        parts = [self.qkv, self.proj] + ([self.q_norm, self.k_norm] if self.qk_normalization else [])
        if "_qk_norm" in vars(self) or any("forward" in vars(m) for m in parts):
            return self.num_heads
        weights = [self.qkv.weight, self.proj.weight] + ([self.qkv.bias] if self.qkv.bias is not None else [])
        key = tuple((w.data_ptr(), w._version) for w in weights)
        if getattr(self, "_computed_heads_key", None) != key:
            self._computed_heads = self._count_computed_heads()
            self._computed_heads_key = key
        return self._computed_heads

    @torch.no_grad()
    def _count_computed_heads(self) -> int:
        real, padded = self.embed_dim, self.padded_dim
        if real == padded or self.qkv.weight.device.type == "meta":
            return self.num_heads
        v_rows = self.qkv.weight[2 * padded + real :]
        v_zero = not v_rows.count_nonzero()
        if v_zero and self.qkv.bias is not None:
            v_zero = not self.qkv.bias[2 * padded + real :].count_nonzero()
        proj_zero = not self.proj.weight[:, real:].count_nonzero()
        return self.config.num_attention_heads if (v_zero or proj_zero) else self.num_heads

    def _project_qkv(self, hidden_states: torch.Tensor, width: int):
        if width == self.padded_dim:
            return self.qkv(hidden_states).split(self.padded_dim, dim=-1)
        # Q, K and V of the real heads are three contiguous row blocks of qkv.weight: no copy.
        weight, bias = self.qkv.weight, self.qkv.bias
        blocks = []
        for i in range(3):
            rows = slice(i * self.padded_dim, i * self.padded_dim + width)
            blocks.append(F.linear(hidden_states, weight[rows], None if bias is None else bias[rows]))
        return blocks

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        B, N, _ = hidden_states.shape
        heads = self.computed_heads()
        width = heads * self.head_dim
        q, k, v = self._project_qkv(hidden_states, width)
        if self.qk_normalization:
            q, k = self._qk_norm(q, self.q_norm), self._qk_norm(k, self.k_norm)
        # [B, N, H*D] -> [B, H, N, D]
        q, k, v = (t.view(B, N, heads, self.head_dim).transpose(1, 2) for t in (q, k, v))

        if self.config._attn_implementation == "eager":
            weights = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
            context = weights @ v
        else:
            context = F.scaled_dot_product_attention(q, k, v, scale=self.scale)

        context = context.transpose(1, 2).reshape(B, N, width)
        if width == self.padded_dim:
            return self.proj(context)
        # The real heads' columns of proj.weight: a strided view the matmul reads in place.
        return F.linear(context, self.proj.weight[:, :width], self.proj.bias)


class InternMLP(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(hidden_states)))  # exact (erf) GELU


class InternVisionEncoderLayer(nn.Module):
    """Pre-norm block; layer scale multiplies each branch output (after its bias) before the add."""

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.norm1 = InternRMSNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = InternAttention(config)
        self.norm2 = InternRMSNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = InternMLP(config)
        self.ls1 = nn.Parameter(config.initializer_factor * torch.ones(config.hidden_size))
        self.ls2 = nn.Parameter(config.initializer_factor * torch.ones(config.hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states)) * self.ls1
        return hidden_states + self.mlp(self.norm2(hidden_states)) * self.ls2


class InternVisionEncoder(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(InternVisionEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden_states: torch.Tensor, output_hidden_states: bool = False) -> BaseModelOutput:
        all_states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states)
            if output_hidden_states:
                all_states = all_states + (hidden_states,)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=all_states)


class InternVisionPreTrainedModel(PreTrainedModel):
    config_class = InternVisionConfig
    main_input_name = "pixel_values"
    _supports_sdpa = True
    _no_split_modules = ["InternVisionEncoderLayer"]
    # InternAttention reads config._attn_implementation at every call, so switching is safe.
    _can_set_attn_implementation_cached_value = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        config = self.config
        std = config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, InternRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, InternVisionEmbeddings):
            nn.init.normal_(module.class_embedding, std=std)
            nn.init.normal_(module.position_embedding, std=std)
        elif isinstance(module, InternVisionEncoderLayer):
            nn.init.constant_(module.ls1, config.initializer_factor)
            nn.init.constant_(module.ls2, config.initializer_factor)
        zero_dummy_heads(module)


def zero_dummy_heads(module: nn.Module) -> None:
    """Zero the dummy-head part of a freshly initialised qkv / proj / q_norm / k_norm.

    Weights loaded from a checkpoint are never edited (a non-zero dummy head there is an error the
    converter reports, not something to hide)."""
    dummy = getattr(module, "dummy_heads", None)
    if dummy is None or getattr(module.weight, "_is_hf_initialized", False):
        return
    kind, real, padded = dummy
    if kind == "qkv_rows":  # [Q; K; V] blocks of `padded` rows, dummy rows last in each
        module.weight.view(3, padded, -1)[:, real:].zero_()
        if module.bias is not None:
            module.bias.view(3, padded)[:, real:].zero_()
    elif kind == "proj_cols":
        module.weight[:, real:].zero_()
    else:  # "norm"
        module.weight[real:].zero_()


class InternVisionModel(InternVisionPreTrainedModel):
    def __init__(self, config: InternVisionConfig):
        super().__init__(config)
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        pixel_embeds: torch.Tensor | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        """`hidden_states` (when asked for) holds the embeddings, then each layer's output."""
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if pixel_embeds is None:
            if pixel_values is None or pixel_values.dim() != 4:
                shape = None if pixel_values is None else tuple(pixel_values.shape)
                raise ValueError(f"pixel_values must be [tiles, channels, height, width], got {shape}")
            pixel_embeds = self.embeddings(pixel_values)
        encoded = self.encoder(pixel_embeds, output_hidden_states=output_hidden_states)
        last = encoded.last_hidden_state
        if not return_dict:
            return tuple(t for t in (last, last[:, 0], encoded.hidden_states) if t is not None)
        return BaseModelOutputWithPooling(
            last_hidden_state=last, pooler_output=last[:, 0], hidden_states=encoded.hidden_states
        )
