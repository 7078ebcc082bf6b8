import math

import torch
import torch.nn.functional as F

torch.manual_seed(1)
t = F.normalize(torch.randn(4, 8, dtype=torch.float64), dim=1)  # text drawn first
v = F.normalize(torch.randn(4, 8, dtype=torch.float64), dim=1)  # then image
c = t @ v.T
pids = torch.tensor([0, 0, 1, 2])
P = (pids[:, None] == pids[None]).double()
b, alpha = -3.0, 0.4


def run(teacher_grad):
    p = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    s = p.exp()
    logits = s * c + b
    teacher = torch.sigmoid(logits if teacher_grad else logits.detach())
    y = alpha * teacher + (1 - alpha) * P
    loss = F.binary_cross_entropy_with_logits(logits, y, reduction="none").sum(1).mean()
    loss.backward()
    return loss.item(), p.grad.item()


(l0, g0), (l1, g1) = run(False), run(True)
print("c =", c)
print(f"loss (same in both) {l0:.12f} {l1:.12f}")
print(f"dL/dp teacher constant (correct): {g0:.12f}")
print(f"dL/dp grad through teacher (defect): {g1:.12f}")
# closed-form check: dL/dp = (1/B) sum_ij (sigma(logits)-y) * s c  [+ extra - logits * alpha sigma(1-sigma) s c]
s = 10.0
logits = s * c + b
sg = torch.sigmoid(logits)
y = alpha * sg + (1 - alpha) * P
base = ((sg - y) * s * c).sum() / 4
extra = (-logits * alpha * sg * (1 - sg) * s * c).sum() / 4
print(f"closed form: {base.item():.12f}  {(base + extra).item():.12f}")
