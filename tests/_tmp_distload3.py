import sys, torch
from pathlib import Path
sys.path.insert(0, "tests")

def fn(rank, ckpt, ids):
    from types import SimpleNamespace
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from megatron.core.models.gpt import GPTModel
    from converter.families import Qwen2
    from modeling.megatron.builder import ParallelLayout, language_config, language_layer_spec
    import test_qwen2_family as t
    it = Path(ckpt) / "iter_0000001"
    args = t._load_rank(it / "common.pt")["args"]
    hf = Qwen2.hf_config(args)
    model = GPTModel(config=language_config(SimpleNamespace(llm_config=hf), ParallelLayout(1, 1), torch.float32, cpu=True),
        transformer_layer_spec=language_layer_spec(False), vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings, parallel_output=False,
        share_embeddings_and_output_weights=False, position_embedding_type="rope", rotary_base=args.rotary_base).eval()
    sd, missing, unexpected = dist_checkpointing.load(model.sharded_state_dict(), str(it), strict=StrictHandling.RETURN_ALL)
    print("missing", sorted(missing)[:6], len(missing), "unexpected", unexpected)
    print(model.load_state_dict(sd, strict=False))
    with torch.no_grad():
        return model(input_ids=ids, position_ids=None, attention_mask=None)

if __name__ == "__main__":
    from modeling.megatron.builder import ParallelLayout
    from modeling.megatron.distributed import run_ranks
    from transformers import Qwen2ForCausalLM
    from conftest import cli
    from mappings.table import Rule
    orig = Rule.megatron_name
    Rule.megatron_name = lambda self, layer: (self.megatron[1] if len(self.megatron) > 1 else self.megatron[0]).format(i=layer)
    import shutil; shutil.rmtree("/tmp/dl", ignore_errors=True)
    print(cli("hf-to-megatron", "/tmp/q3/theta", "/tmp/dl", "--tp", "2", "--format", "torch_dist"))
    Rule.megatron_name = orig
    import test_qwen2_family as t
    ids = t._input_ids()
    ref = Qwen2ForCausalLM.from_pretrained("/tmp/q3/theta").eval()
    with torch.no_grad(): r = ref(ids).logits
    out = run_ranks(fn, ParallelLayout(1, 1), "/tmp/dl", ids)
    print("maxdiff", (out[..., :256] - r).abs().max())
