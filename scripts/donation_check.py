"""The donated step's write inside vs outside torch.compile, and its CUDA graph (TinyStories shape,
batch 128, bf16, one GPU): tokens/s over 40 steps, peak memory above the resident state, losses.
Run at this commit; the feature was measured, not kept (docs/experiments.md)."""
import sys, time, torch
sys.path.insert(0, ".")
from fnlm.config import ModelConfig
from fnlm.model import init_params
from fnlm.optim import adamw
from fnlm.train import make_train_step, write_into, cuda_graphed
from fnlm.tree import tree_map
cfg = ModelConfig(vocab_size=10000, context_length=256, d_model=512, num_layers=4, num_heads=16, d_ff=1344)
dev = torch.device("cuda")
opt = adamw(1e-3, 0.9, 0.95, 1e-8, 0.1, max_grad_norm=1.0)
g = torch.Generator().manual_seed(0)
batches = [tuple(torch.randint(0, cfg.vocab_size, (128, 256), generator=g).to(dev) for _ in range(2)) for _ in range(8)]
base = init_params(cfg, seed=0, device=dev)
def variant(name):
    kw = dict(autocast_dtype=torch.bfloat16, device_type="cuda")
    if name == "pure":
        return make_train_step(cfg, opt, compile=True, **kw)
    if name == "outside":
        return make_train_step(cfg, opt, compile=True, donate=True, **kw)
    if name == "outside+graph":
        return cuda_graphed(make_train_step(cfg, opt, compile=True, donate=True, **kw), dev)
    pure = make_train_step(cfg, opt, **kw)
    def inside(p, s, x, y):
        np_, ns, m = pure(p, s, x, y)
        return *write_into((p, s), (np_, ns)), m
    return torch.compile(inside)
for name in ["pure", "outside", "inside", "outside+graph"]:
    step = variant(name)
    p, s = tree_map(torch.clone, base), opt.init(base)
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); resident = torch.cuda.memory_allocated()
    t = time.perf_counter()
    losses = []
    for i in range(3):
        p, s, m = step(p, s, *batches[i % 8]); losses.append(m.loss)
    torch.cuda.synchronize(); warm = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(3, 43):
        p, s, m = step(p, s, *batches[i % 8]); losses.append(m.loss)
    torch.cuda.synchronize(); sec = time.perf_counter() - t
    print(f"{name:14s} tok/s {40*128*256/sec:12,.0f} warm {warm:5.1f}s peak-resident {(torch.cuda.max_memory_allocated()-resident)/2**30:5.2f} GiB loss3 {losses[2].item():.5f} loss43 {losses[-1].item():.5f}", flush=True)
    del p, s, step
    torch._dynamo.reset()
