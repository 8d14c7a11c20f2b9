"""GPU training throughput and MFU of the real-size architecture, with random weights.

Builds NoteLLM-2 at the `qwen2-0.5b-clip-b16` preset's shapes from published configs (Qwen2.5-0.5B
decoder: 24 layers, width 896, 14 heads / 2 KV heads, FFN 4864, vocabulary 151,936; CLIP
ViT-B/16 vision tower at 224 px, frozen; 6-layer Q-Former with 16 queries) — nothing is
downloaded — and times bf16 autocast training steps on synthetic notes of `--tokens` tokens.

MFU = achieved FLOP/s ÷ the GPU's dense bf16 peak, with FLOPs counted as 6·N·tokens for the
trained parts (LLM, connector, head) and 2·N·patches for the frozen vision tower's forward pass.
Run on a GPU machine: `python tests/benchmarks/bench_gpu_train.py [--pairs 16] [--steps 20]`.
Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


def build(tokens: int):
    import torch
    from transformers import (
        AutoModel,
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        CLIPVisionModel,
        Qwen2Config,
    )

    from model import ModelConfig, NoteLLM2
    from model.tokenizer import train_tiny_tokenizer

    cfg = ModelConfig(image_size=224, max_tokens=tokens)  # Q-Former 6 layers, 16 queries
    tok = train_tiny_tokenizer(["a note about a bunny at the lake"] * 8, vocab_size=500)
    llm = AutoModel.from_config(Qwen2Config(
        vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32_768,
        rope_theta=1_000_000.0, tie_word_embeddings=True, pad_token_id=tok.pad_token_id))
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=768, intermediate_size=3072,
                                              num_hidden_layers=12, num_attention_heads=12,
                                              image_size=224, patch_size=16))
    processor = CLIPImageProcessorPil(size={"shortest_edge": 224},
                                      crop_size={"height": 224, "width": 224})
    torch.manual_seed(0)
    return NoteLLM2(cfg, llm, vision, tok, processor)


def deepspeed_step(model, batch, args, device: str = "cuda"):
    """One training step as the train component runs it: its ``Objective`` module inside a
    DeepSpeed engine built from the config that ``TrainConfig`` generates."""
    import torch

    from components.common.config import TrainConfig
    from components.train.ds_config import deepspeed_config
    from components.train.worker import (
        _import_deepspeed,
        engine_module,
        ensure_process_group,
        single_process_env,
    )

    on_gpu = device.startswith("cuda")
    ds = _import_deepspeed(on_gpu)
    t = TrainConfig(zero_stage=args.zero, offload=args.offload,
                    precision="bf16" if on_gpu else "fp32")
    with single_process_env():
        ensure_process_group(on_gpu)
        config = deepspeed_config(t, micro_batch=args.pairs, world=1, device=device)
        module = engine_module(model, ds, config["zero_optimization"]["stage"])
        params = [p for p in model.parameters() if p.requires_grad]  # log_scale was replaced
        engine, *_ = ds.initialize(model=module, optimizer=torch.optim.AdamW(
            params, lr=1e-5, fused=on_gpu and not args.offload),
                                   config=config, dist_init_required=False)
    print(f"DeepSpeed config: ZeRO {config['zero_optimization']['stage']}, "
          f"offload={args.offload}, bf16={config['bf16']['enabled']}")
    keys = torch.arange(2 * args.pairs, device=device)  # one per note: no duplicates

    def step():
        loss = engine(keys=keys, gather=False, **batch)["loss"]
        engine.backward(loss)
        engine.step()

    return step


def main() -> None:
    import torch

    from model.loss import notellm2_loss

    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=16, help="pairs per step (2x notes)")
    ap.add_argument("--tokens", type=int, default=140)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak; 0 = by name")
    ap.add_argument("--engine", choices=("torch", "deepspeed"), default="torch",
                    help="torch: AdamW under bf16 autocast; deepspeed: the training step's own "
                         "engine and config (bf16 weights, fp32 master copy)")
    ap.add_argument("--zero", type=int, default=2, help="train.zero_stage for --engine deepspeed")
    ap.add_argument("--offload", action="store_true", help="train.offload for --engine deepspeed")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: skipped (run this on a GPU machine)")
        return
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 0.0)
    model = build(args.tokens).cuda().train()
    n = 2 * args.pairs
    ids = torch.randint(5, len(model.tokenizer) - 1, (n, args.tokens), device="cuda")
    q = model.config.num_query_tokens
    ids[:, 1:1 + q] = model.img_id  # the image slots
    ids[:, 1 + q] = model.img_emb_id
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "pixel_values": torch.randn(n, 3, 224, 224, device="cuda")}
    if args.engine == "deepspeed":
        step, label = deepspeed_step(model, batch, args), "DeepSpeed"
    else:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        label = "torch autocast"

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(**batch)
            loss = notellm2_loss(out, model.log_scale, 9.0, 1.0, gather=False)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    trained = sum(p.numel() for n_, p in model.named_parameters()
                  if p.requires_grad and not n_.startswith("vision."))
    frozen = sum(p.numel() for p in model.vision.parameters())
    patches = (224 // 16) ** 2 + 1
    flops = 6 * trained * n * args.tokens + 2 * frozen * n * patches
    achieved = flops / dt / 1e12
    print(f"{name} [{label}]: {args.pairs / dt:,.1f} pairs/s, {n * args.tokens / dt:,.0f} tokens/s, "
          f"{dt * 1e3:.1f} ms/step, {achieved:.1f} TFLOP/s"
          + (f", MFU {achieved / peak:.1%} of {peak:.0f} TFLOP/s bf16" if peak else "")
          + f"; peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB; "
          f"trained {trained / 1e6:.0f}M + frozen vision {frozen / 1e6:.0f}M parameters")


if __name__ == "__main__":
    main()
