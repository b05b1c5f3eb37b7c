"""The PyTorch/diffusers side of the side-by-side benchmarks (issue: performance).

Builds the real Kandinsky 2.2 networks from their configs with random weights and times the
same workloads as the Rust benches. Prints one JSON object per workload and a table last.

    python diffusers_bench.py --device cuda --dtype fp16 --unet 64,96,128 --movq 512,768 \
        --prior --text --attn 64,96 --json out.jsonl

CPU comparison mode (`cargo xtask bench-compare`): ONE workload per process, f32, so that the
process's peak RSS belongs to that workload; prints one JSON line in the format of the Rust
runner `benches/src/bin/cpu_compare.rs` (same workload names, shapes and inputs):

    python diffusers_bench.py --cpu-workload unet_step_256 --reps 3 --warmup 1 --threads 2
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


def proc_status_mib(field):
    """A field of /proc/self/status in MiB (VmHWM = peak RSS, VmRSS = current)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


CPU_WORKLOADS = ["unet_step_256", "unet_step_512", "movq_decode_256", "movq_decode_512",
                 "prior_step", "prior_loop_25", "clip_text", "attention_32x32",
                 "attention_48x48"]

# The prior's 25 timesteps of one generation (UnCLIP scheduler, 1000 training steps): both
# sides run the same values.
PRIOR_LOOP_TIMESTEPS = [999 - i * 999 // 24 for i in range(25)]


def build_cpu_workload(name):
    """The model (random weights at the real config, PyTorch's default init as the fixture
    generators build them) and a closure running one repetition, f32 on the CPU."""
    if name in ("unet_step_256", "unet_step_512"):
        from diffusers import UNet2DConditionModel
        s = 32 if name == "unet_step_256" else 64
        unet = UNet2DConditionModel(**REAL_UNET_22).eval()
        x = torch.randn(2, 4, s, s)
        emb = torch.randn(2, 1280)
        t = torch.tensor([500, 500])
        return lambda: unet(x, t, encoder_hidden_states=None,
                            added_cond_kwargs={"image_embeds": emb})
    if name in ("movq_decode_256", "movq_decode_512"):
        from diffusers import VQModel
        px = 256 if name == "movq_decode_256" else 512
        movq = VQModel(**REAL_MOVQ).eval()
        z = torch.randn(1, 4, px // 8, px // 8)
        return lambda: movq.decode(z, force_not_quantize=True)
    if name in ("prior_step", "prior_loop_25"):
        from diffusers import PriorTransformer
        prior = PriorTransformer(**REAL_PRIOR_22).eval()
        x = torch.randn(2, 1280)
        pe = torch.randn(2, 1280)
        hs = torch.randn(2, 77, 1280)
        mask = torch.ones(2, 77, dtype=torch.bool)
        step = lambda t: prior(x, t, proj_embedding=pe, encoder_hidden_states=hs,
                               attention_mask=mask)
        if name == "prior_step":
            return lambda: step(500)
        # The prior's share of one generation, as diffusers' prior pipeline runs it: the
        # whole sequence through every layer at every step.
        return lambda: [step(t) for t in PRIOR_LOOP_TIMESTEPS]
    if name == "clip_text":
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection
        cfg_path = (Path(__file__).resolve().parents[2] / "fixtures" / "real-configs"
                    / "kandinsky-2-2-prior__text_encoder.json")
        cfg = CLIPTextConfig.from_dict(json.loads(cfg_path.read_text()))
        te = CLIPTextModelWithProjection(cfg).eval()
        # Same ids as the Rust side: (i * 331) mod 49000.
        ids = torch.tensor([(i * 331) % 49000 for i in range(154)]).reshape(2, 77)
        return lambda: te(ids)
    if name in ("attention_32x32", "attention_48x48"):
        import torch.nn.functional as F
        level = 32 if name == "attention_32x32" else 48
        b, h, n, d = 2, 12, level * level, 64
        q = torch.randn(b, h, n, d)
        ki, vi = torch.randn(b, h, 32, d), torch.randn(b, h, 32, d)
        ks, vs = torch.randn(b, h, n, d), torch.randn(b, h, n, d)
        # diffusers' AttnAddedKVProcessor concatenates the image tokens' keys/values in front
        # of the spatial ones, then calls SDPA: time both, as the Rust entry point does both.
        return lambda: F.scaled_dot_product_attention(
            q, torch.cat([ki, ks], 2), torch.cat([vi, vs], 2), scale=0.125)
    raise SystemExit(f"unknown workload `{name}`; available: {', '.join(CPU_WORKLOADS)}")


def cpu_workload(name, reps, warmup, threads):
    """Run one workload and print one JSON line (the Rust runner's format)."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    rss_start = proc_status_mib("VmRSS:")
    t0 = time.perf_counter()
    with torch.no_grad():
        fn = build_cpu_workload(name)
    build_s = time.perf_counter() - t0
    rss_after_load = proc_status_mib("VmRSS:")
    ms = []
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        for _ in range(max(1, reps)):
            t = time.perf_counter()
            fn()
            ms.append((time.perf_counter() - t) * 1e3)
    ms.sort()
    peak = proc_status_mib("VmHWM:")
    from importlib.metadata import version
    print(json.dumps({
        "impl": "pytorch", "workload": name, "median_ms": ms[len(ms) // 2], "min_ms": ms[0],
        "all_ms": ms, "reps": len(ms), "warmup": warmup,
        "peak_rss_mib": peak, "rss_start_mib": rss_start, "rss_after_load_mib": rss_after_load,
        "build_s": build_s, "threads": torch.get_num_threads(), "dtype": "f32",
        "torch": torch.__version__, "diffusers": version("diffusers"),
        "transformers": version("transformers"),
    }), flush=True)


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
    ap.add_argument("--cpu-workload", default="",
                    help="run ONE CPU f32 workload (cargo xtask bench-compare) and exit")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.cpu_workload:
        cpu_workload(a.cpu_workload, a.reps, a.warmup, a.threads)
        return
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
