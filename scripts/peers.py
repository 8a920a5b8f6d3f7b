#!/usr/bin/env python3
"""Times the peers of `cargo xtask bench` on this machine's CPU, the same way the bench times
ours (median of repeats after a warm-up, `torch.set_num_threads` = the cores the bench uses):

- mamba.py's pure-PyTorch parallel scan (PyPI `mambapy`, `mambapy.pscan.pscan`, inside the
  lines of its `MambaBlock.selective_scan`: `exp(Δ·A)`, `Δ·B·u`, pscan, `· C`, `+ D·u`) on the
  bench's CPU scan shapes C1 and C2 (`(Bt, D, L, N, G)`; `B`/`C` shared by the `D/G` channels of
  a group), softplus on `delta + delta_bias` first as in our bench; forward (`y`), and
  forward + backward from `y` with `dy = 1` (the gradient of `sum(y)`, without timing a sum)
  with every input tracked;
- upstream VMamba's own PyTorch model (`classification/models/vmamba.py` of a MzeroMiko/VMamba
  checkout, `vmamba_tiny_s1l8`, upstream's initialisation) at 224²: inference (eval,
  `no_grad`) at batch 1 and 8, and one training step (train mode, cross-entropy, backward,
  AdamW step) at batch 8. Without the CUDA extensions upstream runs its own
  `selective_scan_torch` (an f32 sequential loop over L).

    pip install torch mambapy timm fvcore einops
    python3 scripts/peers.py --upstream /path/to/VMamba [--threads 2] [--out target/bench/peers.json]

The one shim on upstream (as in make_model_fixtures.py): its cross-scan wraps the call in
`torch.cuda.device(x.device)`, which recent torch refuses for a CPU tensor; that context
manager is replaced by a no-op.
"""
import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"C1": (1, 384, 3136, 1, 4), "C2": (8, 384, 3136, 1, 4)}


def median_ms(f, repeats):
    f()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def mambapy_scan(repeats):
    from mambapy.pscan import pscan

    out = {}
    for name, (bt, d, l, n, g) in SHAPES.items():
        gen = torch.Generator().manual_seed(7)
        r = lambda *s, lo=-1.0, hi=1.0: torch.rand(*s, generator=gen) * (hi - lo) + lo
        leaves = dict(
            u=r(bt, l, d), delta=r(bt, l, d, lo=-3.0, hi=1.0), a_log=r(d, n, lo=-1.0, hi=1.5),
            b=r(bt, l, g, n), c=r(bt, l, g, n), dd=r(d), bias=r(d),
        )

        def run(x):
            delta = F.softplus(x["delta"] + x["bias"])  # (Bt, L, D)
            a = -torch.exp(x["a_log"])  # (D, N)
            # B, C per channel: each group's row repeated over its D/G channels.
            b = x["b"].repeat_interleave(d // g, dim=2)  # (Bt, L, D, N)
            c = x["c"].repeat_interleave(d // g, dim=2)
            delta_a = torch.exp(delta.unsqueeze(-1) * a)
            bx = delta.unsqueeze(-1) * b * x["u"].unsqueeze(-1)
            hs = pscan(delta_a, bx)
            return (hs * c).sum(-1) + x["dd"] * x["u"]

        with torch.no_grad():
            forward = median_ms(lambda: run(leaves), repeats)
        tracked = {k: v.clone().requires_grad_() for k, v in leaves.items()}

        def both():
            for v in tracked.values():
                v.grad = None
            y = run(tracked)
            y.backward(torch.ones_like(y))

        out[name] = dict(forward_ms=forward, forward_backward_ms=median_ms(both, repeats))
        print(f"mamba.py pscan {name}: forward {forward:.2f} ms, forward+backward "
              f"{out[name]['forward_backward_ms']:.2f} ms", flush=True)
    return out


def upstream_model(upstream, repeats, train_repeats, skip_train=False):
    sys.path.insert(0, str(Path(upstream) / "classification"))
    torch.cuda.device = lambda device: contextlib.nullcontext()  # see the module doc
    from models.vmamba import vmamba_tiny_s1l8

    torch.manual_seed(0)
    model = vmamba_tiny_s1l8()
    out = {}
    model.eval()
    for batch in (1, 8):
        x = torch.randn(batch, 3, 224, 224)
        with torch.no_grad():
            ms = median_ms(lambda: model(x), repeats)
        out[f"inference_batch{batch}_ms"] = ms
        print(f"upstream vmamba_tiny_s1l8 inference, batch {batch}: {ms:.1f} ms "
              f"({batch / ms * 1e3:.2f} images/s)", flush=True)
    if skip_train:
        return out
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    x, labels = torch.randn(8, 3, 224, 224), torch.randint(0, 1000, (8,))

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), labels).backward()
        opt.step()

    # Upstream's CPU scan is a Python loop over L with autograd: one step takes minutes here,
    # so the step is timed once after one warm-up step unless --train-repeats asks for more.
    ms = median_ms(step, train_repeats)
    out["train_step_batch8_ms"] = ms
    print(f"upstream vmamba_tiny_s1l8 training step, batch 8: {ms:.0f} ms "
          f"({8 / ms * 1e3:.2f} images/s)", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", help="a MzeroMiko/VMamba checkout (skip the model if absent)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--train-repeats", type=int, default=1)
    ap.add_argument("--skip-train", action="store_true", help="upstream: inference only")
    ap.add_argument("--out", default="target/bench/peers.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = dict(threads=args.threads, torch=torch.__version__, mambapy=mambapy_scan(args.repeats))
    if args.upstream:
        result["upstream_vmamba"] = upstream_model(
            args.upstream, args.repeats, args.train_repeats, args.skip_train
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
