"""The random parity cases of the fused kernel (tests/test_triton_kernel.py), also read by the device check's
compile plan (kernels/aot_check.py --plan): one place says which launches the kernel tests make.

``KD_KERNEL_CASE_SET=gpu`` picks ``gpu_case_seeds()``: on a GPU every distinct launch specialisation costs a
compile (about 0.5 s on sm_90), and the 240 default cases need hundreds of them.
"""
from __future__ import annotations

import os
import random

import torch

SHAPES = [(1, 1), (1, 2), (3, 1), (3, 2), (1, 7), (4, 5), (2, 33), (5, 64), (3, 100), (6, 130), (2, 300), (9, 17)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Launch configurations, scaled to K so that the interpreter runs a few blocks per row, not dozens:
# heuristic default, several K blocks, several rows per program, split-K (+ several rows).
CONFIGS = ["default", "blocks", "rows", "split", "split_rows"]


def config_for(name: str, k: int) -> dict:
    p = 1 << max(0, k - 1).bit_length()          # next power of two >= K
    return {"default": {},
            "blocks": {"block_k": max(1, p // 4), "bwd_block_k": max(1, p // 2)},
            "rows": {"rows": 4, "bwd_rows": 2, "block_k": max(1, p // 2)},
            "split": {"splits": 3, "block_k": max(1, p // 4), "bwd_block_k": max(1, p // 4), "bwd_rows": 4},
            "split_rows": {"rows": 2, "splits": 2, "block_k": max(1, p // 4)}}[name]


def make_case(seed: int, device: str = "cpu") -> dict:
    rng = random.Random(seed)
    n, k = rng.choice(SHAPES)
    dtype = rng.choice(DTYPES)
    g = torch.Generator().manual_seed(seed)
    scale = rng.choice([0.5, 3.0, 8.0])
    if rng.random() < 0.25:   # integer logits: many ties
        s = torch.randint(-2, 3, (n, k), generator=g).float()
        t = torch.randint(-2, 3, (n, k), generator=g).float()
    else:
        s = torch.randn(n, k, generator=g) * scale
        t = torch.randn(n, k, generator=g) * scale + rng.choice([0.0, 5.0])
    y = torch.randint(0, k, (n,), generator=g)
    for i in range(n):        # some rows already have label == argmax (no swap)
        r = rng.random()
        if r < 0.2:
            y[i] = int(t[i].argmax())
        elif r < 0.3:
            y[i] = int(s[i].argmax())
        elif r < 0.4:
            y[i] = -100
    strided = rng.random() < 0.4
    if strided:               # rows with a stride != K: views into wider buffers
        pad = rng.choice([1, 3, 8])
        bs = torch.randn(n, k + pad, generator=g)
        bt = torch.randn(n, k + pad, generator=g)
        bs[:, pad // 2:pad // 2 + k] = s
        bt[:, pad // 2:pad // 2 + k] = t
        s, t = bs.to(dtype)[:, pad // 2:pad // 2 + k], bt.to(dtype)[:, pad // 2:pad // 2 + k]
    else:
        s, t = s.to(dtype), t.to(dtype)
    family = None
    case = dict(s=s.to(device), t=t.to(device), y=y.to(device), tau=rng.choice([1.0, 2.0, 4.0]),
                adjust=rng.random() < 0.75, detach=rng.random() < 0.5,
                reduction=rng.choice(["mean", "sum", "none"]),
                weights=[rng.uniform(-1, 1) for _ in range(7)], family=(family := rng.choice(CONFIGS)))
    return {**case, "config": config_for(family, k)}


def gpu_case_seeds() -> list[int]:
    """The first seed of each (launch family, dtype, label adjustment, detached targets): 5 x 3 x 2 x 2 = 60
    cases that reach every launch configuration family, every dtype and every kernel flag."""
    wanted = len(CONFIGS) * len(DTYPES) * 2 * 2
    first: dict[tuple, int] = {}
    seed = 0
    while len(first) < wanted:
        c = make_case(seed)
        first.setdefault((c["family"], c["s"].dtype, c["adjust"], c["detach"]), seed)
        seed += 1
    return sorted(first.values())


def case_seeds() -> list[int]:
    """``KD_KERNEL_CASE_SET=gpu``: ``gpu_case_seeds()``; else seeds 0 .. ``KD_KERNEL_CASES`` - 1 (default 240)."""
    if os.environ.get("KD_KERNEL_CASE_SET") == "gpu":
        return gpu_case_seeds()
    return list(range(int(os.environ.get("KD_KERNEL_CASES", "240"))))
