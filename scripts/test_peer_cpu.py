#!/usr/bin/env python3
"""peer_qlora.py's real code on a tiny random Mistral, on the CPU (no GPU needed).

    PYTHONPATH=<site with bitsandbytes, trl, liger-kernel> python3 scripts/test_peer_cpu.py [-v]

Needs torch, transformers, peft and bitsandbytes (>= 0.48: NF4 on the CPU); trl and
liger-kernel for the second test. Skipped when they are missing. It runs
`peer_qlora.py --device cpu` as a subprocess on a 2-layer Mistral it writes itself
and checks what the GPU run depends on:
- the autocast recipe (with transformers' loss: TRL's fused head is a Triton kernel)
  and the plain recipe train q/k/v/o and then all seven projections on one loaded
  model: the loss falls in every case, the second target set reuses the model after
  PEFT's unload(), plain reuses it after autocast and upcasts it (kbit_prepared),
  LoRA weights are bf16 under autocast and fp32 under plain, and the trainable
  parameter counts are exactly LoRA r16's;
- the liger recipe and the autocast recipe with TRL's fused LM head are set up as on
  the GPU: Liger's patch is applied before a reload and counted in the model
  (2 x layers + 1 RMSNorms, one SwiGLU MLP per layer, RoPE and the fused
  cross-entropy forward), TRL's head is installed; their steps run Triton kernels,
  which need a GPU, so on the CPU each case is recorded as an error naming the
  Triton driver and the script goes on (on a GPU machine they must train).
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
NEEDED = ("torch", "transformers", "peft", "bitsandbytes")
HAVE = all(importlib.util.find_spec(m) for m in NEEDED)
LAYERS, HIDDEN, INTER, HEADS, KV, HEAD_DIM = 2, 64, 128, 4, 2, 16


def lora_params(rank, names):
    """LoRA A and B sizes for the tiny model's projections."""
    q_out, kv_out = HEADS * HEAD_DIM, KV * HEAD_DIM
    shapes = {
        "q_proj": (HIDDEN, q_out),
        "k_proj": (HIDDEN, kv_out),
        "v_proj": (HIDDEN, kv_out),
        "o_proj": (q_out, HIDDEN),
        "gate_proj": (HIDDEN, INTER),
        "up_proj": (HIDDEN, INTER),
        "down_proj": (INTER, HIDDEN),
    }
    return LAYERS * sum(rank * (i + o) for i, o in (shapes[n] for n in names))


@unittest.skipUnless(HAVE, f"needs {', '.join(NEEDED)} importable")
class PeerQloraOnCpu(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        import torch
        from transformers import MistralConfig, MistralForCausalLM

        cls.tmp = tempfile.mkdtemp(prefix="peer-cpu-")
        cls.model = os.path.join(cls.tmp, "tiny")
        torch.manual_seed(0)
        cfg = MistralConfig(
            vocab_size=512,
            hidden_size=HIDDEN,
            intermediate_size=INTER,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV,
            head_dim=HEAD_DIM,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
        MistralForCausalLM(cfg).to(torch.bfloat16).save_pretrained(cls.model)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp)

    def run_peer(self, *argv):
        out = os.path.join(self.tmp, "out.jsonl")
        p = subprocess.run(
            [sys.executable, os.path.join(HERE, "peer_qlora.py"), "--device", "cpu", "--model", self.model,
             "--cases", "2x16", "--targets", "qkvo", "all", "--warmup", "1", "--steps", "2", "--json-out", out, *argv],
            capture_output=True,
            text=True,
            timeout=900,
        )
        with open(out) as f:
            recs = [json.loads(x) for x in f]
        return p, recs

    def test_autocast_and_plain_train_on_one_loaded_model(self):
        p, recs = self.run_peer("--recipes", "plain,autocast", "--autocast-loss", "logits")
        self.assertEqual(p.returncode, 0, p.stderr[-3000:])
        got = [(r["peer"], r["target_set"], r["model_load"]) for r in recs]
        self.assertEqual(
            got,
            [("hf-autocast", "qkvo", "fresh"), ("hf-autocast", "all", "reused"), ("hf-plain", "qkvo", "reused"), ("hf-plain", "all", "reused")],
        )
        for r in recs:
            self.assertEqual(r["status"], "ok", r)
            self.assertTrue(r["loss_falls"], r["losses"])
            self.assertEqual(len(r["losses"]), 3)
            names = r["targets"].split(",")
            self.assertEqual(r["trainable_params"], lora_params(16, names), r["target_set"])
            self.assertEqual(r["order_note"], "recipes run in the order autocast,plain (given plain,autocast)")
        by = {(r["peer"], r["target_set"]): r for r in recs}
        self.assertEqual(by[("hf-autocast", "qkvo")]["lora_dtype"], "bfloat16")
        self.assertEqual(by[("hf-autocast", "qkvo")]["autocast"], "bf16")
        self.assertFalse(by[("hf-autocast", "qkvo")]["kbit_prepared"])
        self.assertEqual(by[("hf-plain", "qkvo")]["lora_dtype"], "float32")
        self.assertEqual(by[("hf-plain", "qkvo")]["autocast"], "none")
        self.assertTrue(by[("hf-plain", "qkvo")]["kbit_prepared"])
        # the same initial LoRA weights and batch: the first loss of a target set is
        # the same in every recipe up to the precision they run in
        a, b = by[("hf-autocast", "all")]["losses"][0], by[("hf-plain", "all")]["losses"][0]
        self.assertAlmostEqual(a, b, delta=0.05)

    @unittest.skipUnless(importlib.util.find_spec("trl") and importlib.util.find_spec("liger_kernel"), "needs trl and liger-kernel")
    def test_liger_and_trl_fused_head_are_set_up(self):
        import torch

        p, recs = self.run_peer("--recipes", "liger,autocast")
        got = [(r["peer"], r["target_set"], r.get("model_load")) for r in recs]
        self.assertEqual(
            got,
            [("hf-autocast", "qkvo", "fresh"), ("hf-autocast", "all", "reused"), ("hf-liger", "qkvo", "reloaded"), ("hf-liger", "all", "reused")],
        )
        gpu = torch.cuda.is_available()
        for r in recs:
            # set-up went through: the record has the model's numbers
            self.assertEqual(r["trainable_params"], lora_params(16, r["targets"].split(",")))
            if gpu:
                self.assertEqual(r["status"], "ok", r)
            else:
                self.assertEqual(r["status"], "error")
                self.assertIn("driver", r["error"])  # Triton found no GPU
        liger = [r for r in recs if r["recipe"] == "liger"]
        for r in liger:
            self.assertEqual(
                r["liger_patched"],
                {"LigerRMSNorm": 2 * LAYERS + 1, "LigerSwiGLUMLP": LAYERS, "rope": True, "fused_linear_cross_entropy": True},
            )
        self.assertIn("apply_liger_kernel_to_mistral", liger[0]["model_load_note"])
        trl = [r for r in recs if r["recipe"] == "autocast"]
        self.assertTrue(all("trl add_fused_lm_head" in r["loss_impl"] for r in trl))
        if not gpu:
            # the step reached TRL's chunked log-prob kernel, so the fused head was in place
            self.assertIn("trl/kernels/chunked_logprob.py", p.stderr)
            self.assertIn("liger_kernel/ops/", p.stderr)


if __name__ == "__main__":
    unittest.main()
