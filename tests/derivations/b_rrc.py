import math
from collections import Counter

import numpy as np
import torch
from torchvision.transforms import RandomResizedCrop as RRC1
from torchvision.transforms.v2 import RandomResizedCrop as RRC2


def p_valid(H, W, scale, ratio, n=2_000_000, seed=123):
    """Monte-Carlo (numpy, float64) probability that ONE attempt is accepted, same formula as torchvision."""
    rng = np.random.default_rng(seed)
    a = H * W * rng.uniform(scale[0], scale[1], n)
    lr = np.log(np.array(ratio, dtype=np.float32)).astype(np.float64)
    r = np.exp(rng.uniform(lr[0], lr[1], n))
    w = np.rint(np.sqrt(a * r))
    h = np.rint(np.sqrt(a / r))  # np.rint = round-half-even like Python round
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    return ok.mean()


def exact_p_valid(H, W, scale, ratio, grid=4000):
    """Deterministic 2-D midpoint integration over (area fraction u, log-ratio)."""
    lr = np.log(np.array(ratio, dtype=np.float32)).astype(np.float64)
    u = scale[0] + (np.arange(grid) + 0.5) / grid * (scale[1] - scale[0])
    lg = lr[0] + (np.arange(grid) + 0.5) / grid * (lr[1] - lr[0])
    A = H * W * u[:, None]
    r = np.exp(lg)[None, :]
    w = np.rint(np.sqrt(A * r))
    h = np.rint(np.sqrt(A / r))
    return ((w <= W) & (h <= H) & (w > 0) & (h > 0)).mean()


def draws(H, W, scale, ratio, n=300):
    img = torch.zeros(3, H, W)
    torch.manual_seed(0)
    v1 = [RRC1.get_params(img, list(scale), list(ratio)) for _ in range(n)]
    t = RRC2((H, W), scale=scale, ratio=ratio, antialias=True)
    torch.manual_seed(0)
    v2 = [tuple(t.make_params([img]).values()) for _ in range(n)]
    assert v1 == [tuple(x) for x in v2], "v1/v2 differ"
    # fallback detection: replicate the algorithm with the same seed and count 10-failure draws
    torch.manual_seed(0)
    fb = 0
    area = H * W
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(n):
        for _a in range(10):
            ta = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
            ar = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
            w = int(round(math.sqrt(ta * ar)))
            h = int(round(math.sqrt(ta / ar)))
            if 0 < w <= W and 0 < h <= H:
                torch.randint(0, H - h + 1, (1,))
                torch.randint(0, W - w + 1, (1,))
                break
        else:
            fb += 1
    return v1, fb


cases = [
    ("384x128 scale(0.9,1) default ratio", 384, 128, (0.9, 1.0), (3 / 4, 4 / 3)),
    ("384x128 scale(0.9,1) relative ratio", 384, 128, (0.9, 1.0), (3 / 4 * 128 / 384, 4 / 3 * 128 / 384)),
    ("300x100 scale(0.2,1) default ratio", 300, 100, (0.2, 1.0), (3 / 4, 4 / 3)),
    ("300x100 scale(0.2,1) relative ratio", 300, 100, (0.2, 1.0), (3 / 4 * 100 / 300, 4 / 3 * 100 / 300)),
]
for name, H, W, sc, ra in cases:
    pe = exact_p_valid(H, W, sc, ra)
    pm = p_valid(H, W, sc, ra)
    v, fb = draws(H, W, sc, ra)
    distinct = len(set(v))
    hw = set((x[2], x[3]) for x in v)
    ratios = [x[3] / x[2] for x in v]
    fbw = [x for x in v if False]
    print(
        f"{name}: p_accept/attempt grid={pe:.6f} mc={pm:.6f}; P(fallback/draw)=(1-p)^10={(1 - pe) ** 10:.6g};"
        f" 300 draws seed0: fallbacks={fb}, distinct windows={distinct}, distinct (h,w)={len(hw)},"
        f" w/h range=[{min(ratios):.5f}, {max(ratios):.5f}], h range=[{min(x[2] for x in v)},{max(x[2] for x in v)}],"
        f" w range=[{min(x[3] for x in v)},{max(x[3] for x in v)}]"
    )
    if distinct <= 3:
        print("   windows:", set(v))

for name, H, W, sc, ra in cases:
    v, fb = draws(H, W, sc, ra)
    c = Counter(v)
    print(name, "most common:", c.most_common(2))
