"""Forward entry points of the Megatron NVLM-D model, for any TP/PP, on every rank at once.

`MegatronRunner.forward(input_ids, pixel_values)` takes the SAME inputs as the Hugging Face class:
token ids in which every image embedding position holds the placeholder id (<|vision_pad|>),
tile tags included as ordinary tokens, and the pixel tensor of the tiles in order. It returns, on
global rank 0, the logits over the true vocabulary and, on request, every ViT layer output, the
projector output and every LLM layer output. This is what the parity suite compares.

Inside it uses the LLaVAModel's own modules (vision model, pixel shuffle, projector, GPT model);
pipeline stages hand their activations on with point-to-point sends. `forward_native` instead
calls `LLaVAModel.forward` with Megatron's own prompt convention (one image token per image,
expanded with tile tags inside the model); it needs PP=1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.multimodal.llava_model import pixel_shuffle


@dataclass
class MegatronOutputs:
    logits: torch.Tensor  # [batch, seq, true vocab], float32, CPU
    layers: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> float32 CPU tensor


class _LayerRecorder:
    """Forward hooks that keep each layer's output, batch-first, on the CPU in float32."""

    def __init__(self, model):
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = []
        if model.vision_model is not None:
            for j, layer in enumerate(model.vision_model.decoder.layers):
                self._hook(layer, f"vision.layers.{j}")
            self._hook(model.vision_projection, "projector")
        for layer in model.language_model.decoder.layers:
            self._hook(layer, f"llm.layers.{layer.layer_number - 1}")

    def _hook(self, module, name):
        def keep(_module, _inputs, output):
            tensor = output[0] if isinstance(output, tuple) else output
            self.outputs[name] = tensor.detach().transpose(0, 1).float().cpu()  # [s, b, h] -> [b, s, h]

        self._handles.append(module.register_forward_hook(keep))

    def remove(self):
        for handle in self._handles:
            handle.remove()


class MegatronRunner:
    def __init__(self, model, *, image_token_id: int, true_vocab: int, device: torch.device):
        self.model = model.eval()
        self.image_token_id = image_token_id
        self.true_vocab = true_vocab
        self.device = device
        self.first = parallel_state.is_pipeline_first_stage()
        self.last = parallel_state.is_pipeline_last_stage()

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, H, W] -> [tiles, tokens per tile, LLM hidden] (class token dropped)."""
        vision = self.model.vision_model
        features = vision(pixel_values.to(self.device, self._dtype))  # [tiles, 1 + patches, C]
        features = pixel_shuffle(features[:, vision.class_token_len :])
        projected = self.model.vision_projection(features.transpose(0, 1).contiguous())
        return projected.transpose(0, 1)

    def embed_inputs(self, input_ids, pixel_values=None, images=None) -> torch.Tensor:
        """The first stage's decoder input [s, b, h]: token embeddings with every placeholder replaced,
        in order, by the image embeddings (also what training feeds the language model). `images`:
        embeddings computed before (`image_embeddings`), instead of `pixel_values`."""
        embeddings = self.model.language_model.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
        if images is None and pixel_values is None:
            return embeddings
        if images is None:
            images = self.image_embeddings(pixel_values)
        mask = (input_ids == self.image_token_id).transpose(0, 1)  # [s, b]
        if int(mask.sum()) != images.shape[0] * images.shape[1]:
            raise ValueError(
                f"{int(mask.sum())} placeholder tokens for {images.shape[0]} tiles "
                f"of {images.shape[1]} tokens"
            )
        # Placeholders are filled in sequence order, batch-major like the HF class: transpose to
        # [b, s, h] for the scatter and back.
        batch_first = embeddings.transpose(0, 1).clone()
        batch_first[mask.transpose(0, 1)] = images.reshape(-1, images.shape[-1]).to(batch_first.dtype)
        return batch_first.transpose(0, 1).contiguous()

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        collect_layers: bool = False,
        images: torch.Tensor | None = None,
    ) -> MegatronOutputs | None:
        """Run every rank; global rank 0 gets the outputs, the others None. `images`: precomputed
        image embeddings (first stage) in place of `pixel_values`."""
        input_ids = input_ids.to(self.device)
        batch, seq = input_ids.shape
        hidden_size = self.model.language_model.config.hidden_size
        recorder = _LayerRecorder(self.model) if collect_layers else None
        try:
            lm = self.model.language_model
            if self.first:
                output = lm(
                    input_ids=None,
                    position_ids=None,
                    attention_mask=None,
                    decoder_input=self.embed_inputs(input_ids, pixel_values, images),
                )
            else:
                received = torch.empty(seq, batch, hidden_size, dtype=self._dtype, device=self.device)
                dist.recv(received, src=parallel_state.get_pipeline_model_parallel_prev_rank())
                lm.set_input_tensor(received)
                output = lm(input_ids=None, position_ids=None, attention_mask=None)
            if not self.last:
                dist.send(output.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
        finally:
            if recorder is not None:
                recorder.remove()
        logits = self._logits_to_rank0(output if self.last else None, batch, seq)
        layers = self._layers_to_rank0(recorder.outputs if recorder else {})
        if dist.get_rank() != 0:
            return None
        return MegatronOutputs(logits=logits, layers=layers)

    def _logits_to_rank0(self, logits, batch, seq):
        """The last stage holds the (TP-gathered) logits; the pipeline of TP rank 0 hands them to
        global rank 0 (the other TP ranks hold the same logits and send nothing)."""
        if parallel_state.get_tensor_model_parallel_rank() != 0:
            return None
        if self.last:
            logits = logits[..., : self.true_vocab].float().contiguous()
        last_rank = parallel_state.get_pipeline_model_parallel_last_rank()
        if last_rank == 0:
            return logits.cpu() if dist.get_rank() == 0 else None
        if dist.get_rank() == last_rank:
            dist.send(logits, dst=0)
        elif dist.get_rank() == 0:
            logits = torch.empty(batch, seq, self.true_vocab, device=self.device)
            dist.recv(logits, src=last_rank)
            return logits.cpu()
        return None

    def _layers_to_rank0(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if dist.get_world_size() == 1:
            return local
        # One copy per pipeline stage is enough: TP ranks hold identical layer outputs.
        mine = local if parallel_state.get_tensor_model_parallel_rank() == 0 else {}
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        merged: dict[str, torch.Tensor] = {}
        for part in gathered or []:
            merged.update(part)
        return merged

    @torch.no_grad()
    def generate_greedy_batch(
        self,
        prompts: list[tuple[torch.Tensor, torch.Tensor | None]],
        steps: int,
        eos_token_id: int | None = None,
    ) -> list[list[int]] | None:
        """Greedy continuations of several prompts ([1, s] ids, pixels or None) in one batch, up to
        and including <eos>. Every rank runs; global rank 0 returns the new tokens of each prompt.

        Rows are right-padded; each row's next token is read at its own last position and written
        just after it. Causal attention never lets a position see the padding after it, so a row
        computes what it would alone. No KV cache: each step recomputes the language model over
        the batch, exactly the forward above; the image embeddings are computed once."""
        count = len(prompts)
        lengths = torch.tensor([ids.shape[1] for ids, _ in prompts])
        pad = eos_token_id if eos_token_id is not None else 0
        ids = torch.full((count, int(lengths.max()) + steps), pad, dtype=prompts[0][0].dtype)
        for row, (prompt, _) in enumerate(prompts):
            ids[row, : prompt.shape[1]] = prompt[0]
        pixels = [p for _, p in prompts if p is not None]
        images = self.image_embeddings(torch.cat(pixels)) if pixels and self.first else None
        new: list[list[int]] = [[] for _ in prompts]
        running = torch.ones(count, dtype=torch.bool)
        for _ in range(steps):
            out = self.forward(ids[:, : int(lengths.max())], images=images)
            best = torch.zeros(count, dtype=torch.long, device=self.device)
            if out is not None:  # rank 0 decides
                best.copy_(out.logits[torch.arange(count), lengths - 1].argmax(-1))
            dist.broadcast(best, src=0)
            best = best.cpu()
            for row in running.nonzero().flatten().tolist():
                ids[row, lengths[row]] = best[row]
                new[row].append(int(best[row]))
                lengths[row] += 1
                running[row] = eos_token_id is None or new[row][-1] != eos_token_id
            if not running.any():
                break
        return new if dist.get_rank() == 0 else None

    @torch.no_grad()
    def forward_native(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor, num_tiles: int
    ) -> torch.Tensor:
        """LLaVAModel.forward on Megatron's prompt convention: ONE image token (image_token_id)
        where the image goes; the model inserts the tile tags and image embeddings. PP=1 only."""
        if parallel_state.get_pipeline_model_parallel_world_size() != 1:
            raise ValueError("forward_native needs pipeline parallel size 1")
        logits, _ = self.model(
            images=pixel_values.to(self.device, self._dtype),
            input_ids=input_ids.to(self.device),
            position_ids=None,
            attention_mask=None,
            num_image_tiles=torch.tensor([num_tiles], dtype=torch.int, device=self.device),
        )
        return logits[..., : self.true_vocab].float().cpu()


def expand_image_tokens(
    native_ids: torch.Tensor,
    image_token_id: int,
    tile_tag_ids: list[list[int]],
    num_tiles: int,
    tokens_per_tile: int,
) -> torch.Tensor:
    """Megatron's prompt -> the ids our entry point (and the HF class) take for the same sequence.

    Megatron marks an image with ONE image token and inserts, per tile, the separately tokenized
    tile tag then the tile's embeddings (LLaVAModel._apply_tile_tagging). Here the image token
    becomes tag ids + `tokens_per_tile` placeholders per tile, in the same order."""
    tags = tile_tag_ids[: num_tiles - 1] + [tile_tag_ids[-1]]
    image = [tok for tag in tags for tok in [*tag, *([image_token_id] * tokens_per_tile)]]
    rows = []
    for row in native_ids.tolist():
        expanded = []
        for tok in row:
            expanded.extend(image if tok == image_token_id else [tok])
        rows.append(expanded)
    return torch.tensor(rows, dtype=native_ids.dtype)
