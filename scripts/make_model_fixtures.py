#!/usr/bin/env python3
"""Writes VMamba model fixtures from upstream's own PyTorch code (MzeroMiko/VMamba), on CPU.

    pip install torch timm fvcore yacs safetensors
    python3 scripts/make_model_fixtures.py --upstream /path/to/VMamba tests/fixtures/model

Nothing of upstream is copied here: the script imports `classification/models/vmamba.py`,
`classification/models/__init__.py` (build_vssm_model), `classification/config.py` (the yacs
defaults) and `classification/utils/utils.py` (save_checkpoint_ema) from the given checkout.
The only shim: upstream's cross-scan wraps its call in `torch.cuda.device(x.device)`, which
recent torch refuses for a CPU tensor, so that context manager is replaced by a no-op. Without
the CUDA extensions, upstream's own `selective_scan_torch` (an f32 sequential loop) runs.

Per model case `<case>`:
  <case>.json               the VSSM(...) keyword arguments build_vssm_model passed
  <case>.pth                a training checkpoint written by upstream's save_checkpoint_ema
                            (model, optimizer, lr_scheduler, max_accuracy, scaler, epoch and
                            the yacs config), weights randomised (init + noise on every tensor)
  <case>.input.safetensors  `x` [B, 3, H, W], non-square
  <case>.logits.safetensors `logits` [B, num_classes] of model.eval()(x)
The first model case is also written as `<case>.safetensors` (the state dict alone).

Per SS2D case `<case>`: `<case>.safetensors` holding the parameters under upstream names,
`x`, `dout`, `y` = SS2D(x), and `grad.<name>` for x and every parameter of sum(y · dout); the
SS2D keyword arguments are in the metadata entry `kwargs` (JSON).
"""
import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

MODEL_CASES = {
    # Released v2 "s1" layout: v05_noz, ln2d, downsample v3, patch embed v2, d_state 1.
    "vssm_s1_like": dict(
        DEPTHS=[1, 2, 1], EMBED_DIM=8, SSM_D_STATE=1, SSM_RATIO=1.0, SSM_CONV_BIAS=False,
        SSM_FORWARDTYPE="v05_noz", MLP_RATIO=4.0, NORM_LAYER="ln2d", DOWNSAMPLE="v3",
        PATCHEMBED="v2", NUM_CLASSES=10, input=(2, 3, 36, 52),
    ),
    # Released v2 "s2" layout: as s1 with ssm_ratio 2.
    "vssm_s2_like": dict(
        DEPTHS=[1, 1, 1], EMBED_DIM=8, SSM_D_STATE=1, SSM_RATIO=2.0, SSM_CONV_BIAS=False,
        SSM_FORWARDTYPE="v05_noz", MLP_RATIO=4.0, NORM_LAYER="ln2d", DOWNSAMPLE="v3",
        PATCHEMBED="v2", NUM_CLASSES=10, input=(1, 3, 44, 28),
    ),
    # Vanilla-like: v0 (gate), d_state 16, no MLP, conv bias, ln, patch merging (odd maps are
    # padded), patch embed v1.
    "vssm_vanilla_like": dict(
        DEPTHS=[1, 1, 1], EMBED_DIM=8, SSM_D_STATE=16, SSM_RATIO=2.0, SSM_CONV_BIAS=True,
        SSM_FORWARDTYPE="v0", MLP_RATIO=0.0, NORM_LAYER="ln", DOWNSAMPLE="v1",
        PATCHEMBED="v1", NUM_CLASSES=10, input=(2, 3, 36, 52),
    ),
    # Gated (forward_type v3; upstream asserts on "v2", whose "core" backend it no longer accepts) with MLP, ln, conv downsample v2, fixed dt rank.
    "vssm_v2_gate": dict(
        DEPTHS=[2, 1], EMBED_DIM=16, SSM_D_STATE=4, SSM_RATIO=1.5, SSM_CONV_BIAS=True,
        SSM_DT_RANK="3", SSM_FORWARDTYPE="v3", MLP_RATIO=2.0, NORM_LAYER="ln", DOWNSAMPLE="v2",
        PATCHEMBED="v1", NUM_CLASSES=7, input=(1, 3, 24, 40),
    ),
}

SS2D_CASES = {
    "ss2d_v05_noz_channel_first": dict(
        kwargs=dict(d_model=8, d_state=4, ssm_ratio=2.0, forward_type="v05_noz", conv_bias=False,
                    channel_first=True),
        x=(2, 8, 5, 7),
    ),
    "ss2d_v0_gate": dict(
        kwargs=dict(d_model=8, d_state=16, ssm_ratio=2.0, forward_type="v0"),
        x=(1, 6, 4, 8),
    ),
    "ss2d_v3_gate_channel_last": dict(
        kwargs=dict(d_model=12, d_state=3, ssm_ratio=1.0, dt_rank=2, forward_type="v3",
                    conv_bias=True, channel_first=False),
        x=(2, 3, 9, 12),
    ),
}


def import_upstream(root: Path):
    classification = root / "classification"
    sys.path.insert(0, str(classification))
    sys.path.insert(0, str(classification / "models"))
    torch.cuda.device = lambda device: contextlib.nullcontext()  # see the module doc
    import config as upstream_config
    import models as upstream_models
    from models.vmamba import SS2D
    from utils import utils as upstream_utils
    return upstream_config, upstream_models, SS2D, upstream_utils


def randomise(module: torch.nn.Module, generator: torch.Generator):
    """Init plus noise on every tensor, so LN weights, Ds, biases… all differ from their init."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))


def model_case(name, spec, up_config, up_models, up_utils, out: Path, generator, also_safetensors):
    config = up_config._C.clone()
    config.defrost()
    config.OUTPUT = str(out)
    config.MODEL.NUM_CLASSES = spec["NUM_CLASSES"]
    config.MODEL.DROP_PATH_RATE = 0.1
    for key, value in spec.items():
        if key not in ("NUM_CLASSES", "input"):
            setattr(config.MODEL.VSSM, key, value)
    config.freeze()

    captured = {}
    real_vssm = up_models.VSSM

    def recording_vssm(**kwargs):
        captured.update(kwargs)
        return real_vssm(**kwargs)

    up_models.VSSM = recording_vssm
    try:
        model = up_models.build_vssm_model(config)
    finally:
        up_models.VSSM = real_vssm
    randomise(model, generator)
    model.eval()

    x = torch.randn(spec["input"], generator=generator)
    with torch.no_grad():
        logits = model(x)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)

    class Scaler:  # upstream's NativeScalerWithGradNormCount needs CUDA; same state_dict shape
        def state_dict(self):
            return {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                    "growth_interval": 2000, "_growth_tracker": 0}

    up_utils.save_checkpoint_ema(config, 0, model, 0.0, optimizer, scheduler, Scaler(),
                                 logging.getLogger("fixtures"))
    (out / "ckpt_epoch_0.pth").rename(out / f"{name}.pth")
    (out / f"{name}.json").write_text(json.dumps(captured, indent=1, sort_keys=True) + "\n")
    save_file({"x": x.contiguous()}, out / f"{name}.input.safetensors")
    save_file({"logits": logits.contiguous()}, out / f"{name}.logits.safetensors")
    if also_safetensors:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, out / f"{name}.safetensors")
    params = sum(p.numel() for p in model.parameters())
    print(f"{name}: {params} parameters, logits {tuple(logits.shape)}")


def ss2d_case(name, spec, SS2D, out: Path, generator):
    module = SS2D(**spec["kwargs"])
    randomise(module, generator)
    x = torch.randn(spec["x"], generator=generator, requires_grad=True)
    y = module(x)
    dout = torch.randn(y.shape, generator=generator)
    (y * dout).sum().backward()
    tensors = {"x": x.detach(), "dout": dout, "y": y.detach(), "grad.x": x.grad}
    for key, p in module.named_parameters():
        tensors[key] = p.detach()
        tensors[f"grad.{key}"] = p.grad
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, out / f"{name}.safetensors", metadata={"kwargs": json.dumps(spec["kwargs"])})
    print(f"{name}: y {tuple(y.shape)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", type=Path, required=True, help="a checkout of MzeroMiko/VMamba")
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    up_config, up_models, SS2D, up_utils = import_upstream(args.upstream)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(20241129)
    for i, (name, spec) in enumerate(MODEL_CASES.items()):
        model_case(name, spec, up_config, up_models, up_utils, args.out, generator, i == 0)
    for name, spec in SS2D_CASES.items():
        ss2d_case(name, spec, SS2D, args.out, generator)


if __name__ == "__main__":
    main()
