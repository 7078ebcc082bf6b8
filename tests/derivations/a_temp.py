import math

import torch

for dt in (torch.float64, torch.float32):
    for pv in (4.0, 4.6052, 4.7215):
        p = torch.tensor(pv, dtype=dt, requires_grad=True)
        t = p.exp()
        t.data.clamp_(max=100.0)  # straight-through: value capped, grad of exp
        t.backward()
        g_st = p.grad.item()
        p2 = torch.tensor(pv, dtype=dt, requires_grad=True)
        t2 = p2.clamp(max=math.log(100)).exp()
        t2.backward()
        print(
            dt,
            pv,
            "ST value",
            t.item(),
            "dt/dp",
            g_st,
            "exp(p)",
            math.exp(pv),
            "| clamp-then-exp value",
            t2.item(),
            "dt/dp",
            p2.grad.item(),
        )
print("--- formula-level straight-through: t = e + (e.clamp(max=100) - e).detach()")
for pv in (4.0, 4.6052, 4.7215):
    p = torch.tensor(pv, dtype=torch.float64, requires_grad=True)
    e = p.exp()
    t = e + (e.clamp(max=100.0) - e).detach()
    t.backward()
    print(pv, t.item(), p.grad.item())
print("--- seed style: logit_scale.exp(); s.data = clamp -> exp backward reuses saved (modified) output")
p = torch.tensor(4.7215, dtype=torch.float64, requires_grad=True)
s = p.exp()
s.data = torch.clamp(s.data, max=100)
(s * 1.0).backward()
print(p.grad.item())
