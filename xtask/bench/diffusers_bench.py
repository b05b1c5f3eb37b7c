"""The PyTorch/diffusers side of the side-by-side benchmarks (issue: performance).

Builds the real Kandinsky 2.2 networks from their configs with random weights and times the
same workloads as the Rust benches. Prints one JSON object per workload and a table last.

    python diffusers_bench.py --device cuda --dtype fp16 --unet 64,96,128 --movq 512,768 \
        --prior --text --attn 64,96 --json out.jsonl
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
from common import REAL_MOVQ, REAL_PRIOR_22, REAL_UNET_22  # noqa: E402

DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def timeit(fn, device, warmup=3, iters=10):
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def peak_reset(device):
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak(device):
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--unet", default="")
    ap.add_argument("--movq", default="")
    ap.add_argument("--prior", action="store_true")
    ap.add_argument("--text", action="store_true")
    ap.add_argument("--attn", default="", help="latent sizes whose attention levels to time")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    dev, dt = a.device, DT[a.dtype]
    torch.manual_seed(0)
    rows = []

    def emit(name, secs, extra=None):
        r = {"impl": "diffusers", "workload": name, "device": dev, "dtype": a.dtype,
             "ms": secs * 1e3, "peak_mib": peak(dev), **(extra or {})}
        rows.append(r)
        print(json.dumps(r), flush=True)

    from diffusers import PriorTransformer, UNet2DConditionModel, VQModel

    if a.unet:
        unet = UNet2DConditionModel.from_config(REAL_UNET_22).to(dev, dt).eval()
        for s in [int(x) for x in a.unet.split(",")]:
            x = torch.randn(2, 4, s, s, device=dev, dtype=dt)
            emb = torch.randn(2, 1280, device=dev, dtype=dt)
            t = torch.tensor([500, 500], device=dev)
            peak_reset(dev)
            with torch.no_grad():
                ms = timeit(lambda: unet(x, t, encoder_hidden_states=None,
                                         added_cond_kwargs={"image_embeds": emb}), dev, iters=a.iters)
            emit(f"unet_step_{s * 8}px_b2", ms)
        del unet
    if a.movq:
        movq = VQModel.from_config(REAL_MOVQ).to(dev, dt).eval()
        for px in [int(x) for x in a.movq.split(",")]:
            z = torch.randn(1, 4, px // 8, px // 8, device=dev, dtype=dt)
            peak_reset(dev)
            with torch.no_grad():
                ms = timeit(lambda: movq.decode(z, force_not_quantize=True), dev, iters=a.iters)
            emit(f"movq_decode_{px}px", ms)
        del movq
    if a.prior:
        prior = PriorTransformer.from_config(REAL_PRIOR_22).to(dev, dt).eval()
        x = torch.randn(2, 1280, device=dev, dtype=dt)
        pe = torch.randn(2, 1280, device=dev, dtype=dt)
        hs = torch.randn(2, 77, 1280, device=dev, dtype=dt)
        mask = torch.ones(2, 77, dtype=torch.bool, device=dev)
        peak_reset(dev)
        with torch.no_grad():
            ms = timeit(lambda: prior(x, 500, proj_embedding=pe, encoder_hidden_states=hs,
                                      attention_mask=mask), dev, iters=a.iters)
        emit("prior_step_b2", ms)
        del prior
    if a.text:
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection
        cfg = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                             num_hidden_layers=32, projection_dim=1280, hidden_act="gelu",
                             max_position_embeddings=77, vocab_size=49408)
        te = CLIPTextModelWithProjection(cfg).to(dev, dt).eval()
        ids = torch.randint(0, 49407, (2, 77), device=dev)
        peak_reset(dev)
        with torch.no_grad():
            ms = timeit(lambda: te(ids), dev, iters=a.iters)
        emit("clip_text_b2", ms)
        del te
    if a.attn:
        import torch.nn.functional as F
        for s in [int(x) for x in a.attn.split(",")]:
            # Attention levels of the UNet at latent size s: s/2, s/4, s/8 with 12/18/24 heads.
            for level, heads in [(s // 2, 12), (s // 4, 18), (s // 8, 24)]:
                n = level * level
                q = torch.randn(2, heads, n, 64, device=dev, dtype=dt)
                k = torch.randn(2, heads, n + 32, 64, device=dev, dtype=dt)
                v = torch.randn_like(k)
                ms = timeit(lambda: F.scaled_dot_product_attention(q, k, v), dev, iters=a.iters)
                flops = 4 * 2 * heads * n * (n + 32) * 64
                emit(f"attn_{level}x{level}_h{heads}", ms, {"tflops": flops / ms / 1e12})
    if a.json:
        Path(a.json).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    print(f"{'workload':28} {'ms':>9} {'peak MiB':>9}")
    for r in rows:
        print(f"{r['workload']:28} {r['ms']:9.2f} {r['peak_mib']:9.0f}")


if __name__ == "__main__":
    main()
