#!/usr/bin/env python3
"""Writes selective-scan parity fixtures (the format of xtask/runner/src/fixtures.rs),
independently of the Rust code: the forward is a NumPy transcription of mamba_ssm's `selective_scan_ref`
(materialised deltaA / deltaB_u, a Python loop over L), and every gradient comes from
reverse-mode autodiff (HIPS `autograd`) of that forward, not from a hand-derived backward.

    pip install numpy autograd safetensors
    python3 scripts/make_scan_fixtures.py tests/fixtures/scan

One file per case, all float32: inputs u, delta, A, B, C, dout (+ D, delta_bias), expected
y, du, ddelta, dA, dB, dC (+ dD, ddelta_bias), metadata delta_softplus = "true"/"false".
"""
import sys
from pathlib import Path

import autograd.numpy as anp
import numpy as np
from autograd import grad
from safetensors.numpy import save_file


def softplus(x):
    # mamba's rule: x itself above 20, log1p(exp(x)) otherwise.
    return anp.where(x > 20.0, x, anp.log1p(anp.exp(anp.minimum(x, 20.0))))


def selective_scan_ref(u, delta, A, B, C, D, delta_bias, delta_softplus):
    """u, delta: (b, d, l); A: (d, n); B, C: (b, g, n, l); D, delta_bias: (d,) or None."""
    batch, dim, length = u.shape
    groups = B.shape[1]
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None]
    if delta_softplus:
        delta = softplus(delta)
    # "b g n l -> b (g h) n l": channel d uses group d // (dim // groups)
    B = anp.repeat(B, dim // groups, axis=1)
    C = anp.repeat(C, dim // groups, axis=1)
    delta_a = anp.exp(anp.einsum("bdl,dn->bdln", delta, A))
    delta_b_u = anp.einsum("bdl,bdnl,bdl->bdln", delta, B, u)
    x = anp.zeros((batch, dim, A.shape[1]))
    ys = []
    for i in range(length):
        x = delta_a[:, :, i] * x + delta_b_u[:, :, i]
        ys.append(anp.einsum("bdn,bdn->bd", x, C[:, :, :, i]))
    y = anp.stack(ys, axis=2)
    if D is not None:
        y = y + u * D[None, :, None]
    return y


def make_case(name, batch, dim, length, d_state, groups, seed, with_d=True, with_bias=True,
              softplus_on=True, delta_range=(-3.0, 1.0), a_log_range=(-1.0, 1.5)):
    rng = np.random.default_rng(seed)
    f = lambda *shape, lo=-1.0, hi=1.0: rng.uniform(lo, hi, size=shape).astype(np.float32)
    inputs = {
        "u": f(batch, dim, length),
        "delta": f(batch, dim, length, lo=delta_range[0], hi=delta_range[1]),
        "A": -np.exp(f(dim, d_state, lo=a_log_range[0], hi=a_log_range[1])),
        "B": f(batch, groups, d_state, length),
        "C": f(batch, groups, d_state, length),
        "dout": f(batch, dim, length),
    }
    if with_d:
        inputs["D"] = f(dim, lo=0.5, hi=1.5)
    if with_bias:
        inputs["delta_bias"] = f(dim, lo=-1.0, hi=0.0)
    as64 = {k: v.astype(np.float64) for k, v in inputs.items()}
    names = ["u", "delta", "A", "B", "C"] + (["D"] if with_d else []) + (["delta_bias"] if with_bias else [])

    def loss(*args):
        kw = dict(zip(names, args))
        y = selective_scan_ref(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw.get("D"),
                               kw.get("delta_bias"), softplus_on)
        return anp.sum(y * as64["dout"])

    args = [as64[n] for n in names]
    y = selective_scan_ref(*args[:5], as64.get("D"), as64.get("delta_bias"), softplus_on)
    out = dict(inputs)
    out["y"] = y
    grad_names = {"u": "du", "delta": "ddelta", "A": "dA", "B": "dB", "C": "dC", "D": "dD",
                  "delta_bias": "ddelta_bias"}
    for i, n in enumerate(names):
        out[grad_names[n]] = grad(loss, i)(*args)
    out = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in out.items()}
    return name, out, {"delta_softplus": "true" if softplus_on else "false"}


CASES = [
    dict(name="autograd_vmamba_like", batch=1, dim=8, length=600, d_state=1, groups=4, seed=1),
    dict(name="autograd_n4_g2_odd", batch=2, dim=6, length=97, d_state=4, groups=2, seed=2),
    dict(name="autograd_single_step", batch=2, dim=4, length=1, d_state=3, groups=1, seed=3),
    dict(name="autograd_raw_delta", batch=1, dim=4, length=530, d_state=2, groups=2, seed=4,
         with_d=False, with_bias=False, softplus_on=False, delta_range=(0.01, 1.0)),
]

if __name__ == "__main__":
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/scan")
    out_dir.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        name, tensors, meta = make_case(**case)
        save_file(tensors, str(out_dir / f"{name}.safetensors"), metadata=meta)
        print(f"wrote {out_dir / name}.safetensors ({', '.join(sorted(tensors))})")
