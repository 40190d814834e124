import torch, json, struct
from transformers import LlamaConfig, Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
def bits(t): return [struct.unpack('<I', struct.pack('<f', float(x)))[0] for x in t.tolist()]
out = {}
c = LlamaConfig(hidden_size=4096, num_attention_heads=32, head_dim=128, rope_theta=500000.0, max_position_embeddings=131072,
  rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"})
f, a = ROPE_INIT_FUNCTIONS["llama3"](c, "cpu"); out["llama3"] = (bits(f), a)
c = Qwen2Config(hidden_size=3584, num_attention_heads=28, rope_theta=1000000.0, max_position_embeddings=131072,
  rope_scaling={"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"})
f, a = ROPE_INIT_FUNCTIONS["yarn"](c, "cpu"); out["yarn"] = (bits(f), a)
c = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=10000.0, max_position_embeddings=4096, rope_scaling={"type": "linear", "factor": 2.0})
f, a = ROPE_INIT_FUNCTIONS["linear"](c, "cpu"); out["linear"] = (bits(f), a)
c = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=10000.0, max_position_embeddings=4096, rope_scaling={"type": "dynamic", "factor": 2.0})
f, a = ROPE_INIT_FUNCTIONS["dynamic"](c, "cpu", seq_len=6000); out["dynamic6000"] = (bits(f), a)
c = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=10000.0, max_position_embeddings=4096)
emb = LlamaRotaryEmbedding(c); out["default"] = (bits(emb.inv_freq), emb.attention_scaling)
# cos table of yarn at a few positions (f32), with attention scaling
c = Qwen2Config(hidden_size=3584, num_attention_heads=28, rope_theta=1000000.0, max_position_embeddings=131072,
  rope_scaling={"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"})
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding
e = Qwen2RotaryEmbedding(c)
pos = torch.tensor([[0, 1, 17, 4095, 100000]])
cos, sin = e(torch.zeros(1, dtype=torch.float32), pos)
out["yarn_cos"] = bits(cos[0].flatten()); out["yarn_sin"] = bits(sin[0].flatten())
json.dump(out, open("/tmp/hf_rope.json", "w"))
print({k: (len(v[0]) if isinstance(v, tuple) else len(v)) for k, v in out.items()}, out["yarn"][1])
