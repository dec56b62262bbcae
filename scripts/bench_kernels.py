"""The GPU-only kernels against their peers, one device, no training: Triton causal attention
(fnlm.flash_attention, several tilings) vs PyTorch's SDPA, and the fused LM head + cross-entropy
(fnlm.fused_ce) vs the plain path (fnlm.nn.cross_entropy of bf16 logits), eager and compiled.

    python3 scripts/bench_kernels.py          # on a CUDA machine; writes $OUT/explore.json

Attention: forward and forward+backward milliseconds (triton.testing.do_bench) at issue 12's
(B, H, T, D) shapes, TFLOP/s counting the causal half (backward as 2.5 forwards), and each
kernel's largest error against the float32 definition on two batch entries. Tilings are
(BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel; "masked" runs every block through the
causal/sequence masks (the kernels before the EVEN path). Fused CE: milliseconds of
grad_and_value, extra peak memory, warm-up, and the relative gradient error against plain eager.
"""
import sys, time, json, os
sys.path.insert(0, '.')
import torch, triton
import torch.nn.functional as F
from fnlm import flash_attention as fa
from fnlm.fused_ce import linear_cross_entropy
from fnlm import nn as fnn
out = {}
dev = "cuda"
def do_bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=40)
orig_tuning = {k: dict(v) for k, v in fa.TUNING.items()}
orig_even = fa._even
CONFIGS = {
  "A_default": ({"forward": {64: (128, 64, 4, 3), 128: (128, 64, 8, 3)}, "backward_kv": {64: (32, 128, 4, 5), 128: (32, 64, 4, 3)}, "backward_q": {64: (128, 32, 4, 5), 128: (64, 32, 4, 3)}}, True),
  "old_64x64_masked": ({"forward": {64: (64, 64, 4, 3), 128: (64, 64, 4, 3)}, "backward_kv": {64: (64, 64, 4, 3), 128: (64, 64, 4, 3)}, "backward_q": {64: (64, 64, 4, 3), 128: (64, 64, 4, 3)}}, False),
  "B_8warps": ({"forward": {64: (128, 64, 8, 3), 128: (128, 64, 8, 3)}, "backward_kv": {64: (64, 128, 8, 3), 128: (32, 64, 4, 3)}, "backward_q": {64: (128, 64, 8, 3), 128: (64, 32, 4, 3)}}, True),
  "C_fwd128": ({"forward": {64: (128, 128, 8, 3), 128: (128, 64, 8, 3)}, "backward_kv": {64: (32, 128, 4, 3), 128: (32, 64, 4, 3)}, "backward_q": {64: (128, 32, 4, 3), 128: (64, 32, 4, 3)}}, True),
  "D_64even": ({"forward": {64: (64, 64, 4, 4), 128: (64, 64, 4, 3)}, "backward_kv": {64: (64, 64, 4, 3), 128: (64, 64, 4, 3)}, "backward_q": {64: (64, 64, 4, 3), 128: (64, 64, 4, 3)}}, True),
  "E_kv64": ({"forward": {64: (128, 64, 4, 3), 128: (128, 64, 8, 3)}, "backward_kv": {64: (64, 128, 8, 4), 128: (32, 64, 4, 3)}, "backward_q": {64: (128, 64, 8, 4), 128: (64, 32, 4, 3)}}, True),
}
for shape in [(32, 12, 1024, 64), (128, 16, 256, 32), (64, 12, 512, 64)]:
    B, H, T, D = shape
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v, do = (torch.randn(B, T, H, D, device=dev, generator=g, dtype=torch.bfloat16).transpose(1, 2) for _ in range(4))
    do = do.contiguous()
    res = {}
    flops = 4 * B * H * T * T * D / 2  # causal forward
    for name, attend in [("sdpa", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))] + [(n, None) for n in CONFIGS]:
        try:
            if attend is None:
                tun, even = CONFIGS[name]
                fa.TUNING.clear(); fa.TUNING.update(tun)
                fa._even = orig_even if even else (lambda *a: False)
                attend = fa.causal_attention
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            fwd = do_bench(lambda: attend(qq, kk, vv))
            def fb():
                o = attend(qq, kk, vv); torch.autograd.grad(o, (qq, kk, vv), do)
            fwdbwd = do_bench(fb)
            res[name] = dict(fwd_ms=fwd, fwdbwd_ms=fwdbwd, fwd_tflops=flops / fwd / 1e9, fwdbwd_tflops=3.5 * flops / fwdbwd / 1e9)
        except Exception as e:
            res[name] = repr(e)[:300]
        print(shape, name, res[name], flush=True)
    # accuracy vs float32 definition on 2 batch entries
    fa.TUNING.clear(); fa.TUNING.update(orig_tuning); fa._even = orig_even
    sub = [t[:2].detach() for t in (q, k, v, do)]
    q32, k32, v32 = (t.float().requires_grad_() for t in sub[:3])
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    o32 = fnn.scaled_dot_product_attention(q32, k32, v32, causal)
    g32 = torch.autograd.grad(o32, (q32, k32, v32), sub[3].float())
    acc = {}
    for name, attend in [("sdpa", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)), ("triton", fa.causal_attention)]:
        qq, kk, vv = (t.requires_grad_() for t in (x.clone() for x in sub[:3]))
        o = attend(qq, kk, vv)
        gg = torch.autograd.grad(o, (qq, kk, vv), sub[3])
        acc[name] = dict(out=(o.float() - o32).abs().max().item(), **{f"d{n}": (a.float() - b).abs().max().item() for n, a, b in zip("qkv", gg, g32)})
    print(shape, "max abs error vs float32", acc, flush=True)
    out[str(shape)] = dict(speed=res, error_vs_float32=acc)

# fused CE vs plain, eager and compiled, at the LM-head shapes
for (N, D, V) in [(32768, 768, 50257), (32768, 768, 32000), (32768, 512, 10000)]:
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(N, D, device=dev, generator=g)
    w = torch.randn(V, D, device=dev, generator=g) * 0.02
    y = torch.randint(0, V, (N,), device=dev, generator=g)
    def plain(w, x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = x @ w.T
        return fnn.cross_entropy(logits, y)
    def fused(w, x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return linear_cross_entropy(w, x, y)
    r = {}
    ref = None
    for name, fn in [("plain", plain), ("fused", fused)]:
        for mode in ("eager", "compiled"):
            try:
                f = torch.func.grad_and_value(fn, argnums=(0, 1))
                if mode == "compiled":
                    f = torch.compile(f)
                t0 = time.time(); (gw, gx), l = f(w, x); torch.cuda.synchronize(); warm = time.time() - t0
                torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
                ms = do_bench(lambda: f(w, x))
                peak = (torch.cuda.max_memory_allocated() - base) / 2**30
                if ref is None:
                    ref = (l, gw, gx)
                err = dict(loss=(l - ref[0]).abs().item(), gw=((gw - ref[1]).abs().max() / ref[1].abs().max()).item(), gx=((gx - ref[2]).abs().max() / ref[2].abs().max()).item())
                r[f"{name} {mode}"] = dict(ms=ms, peak_extra_gib=peak, warmup_s=warm, loss=l.item(), rel_err_vs_plain_eager=err)
            except Exception as e:
                r[f"{name} {mode}"] = repr(e)[:400]
            print((N, D, V), name, mode, r[f"{name} {mode}"], flush=True)
    out[str((N, D, V))] = r
os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "explore.json"), "w"), indent=1)
