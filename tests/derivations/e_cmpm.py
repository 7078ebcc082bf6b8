import math

import torch

torch.manual_seed(0)
x = torch.randn(4, 8, dtype=torch.float64) * 3
z = torch.randn(4, 8, dtype=torch.float64) * 2
pids = [0, 0, 1, 2]
eps = 1e-8


def cmpm_loops(x, z, pids):
    """Plain loops: paper definition (Zhang & Lu 2018, eqs. 1-4 and the t2i counterpart)."""
    n = len(pids)

    def one(a, b):  # project rows of a onto normalised rows of b
        bn = [b[j] / math.sqrt(float((b[j] * b[j]).sum())) for j in range(n)]
        total = 0.0
        for i in range(n):
            proj = [float((a[i] * bn[j]).sum()) for j in range(n)]
            mx = max(proj)
            den = sum(math.exp(v - mx) for v in proj)
            p = [math.exp(v - mx) / den for v in proj]
            ysum = sum(1 for k in range(n) if pids[i] == pids[k])
            q = [(1.0 if pids[i] == pids[j] else 0.0) / ysum for j in range(n)]
            total += sum(p[j] * math.log(p[j] / (q[j] + eps)) for j in range(n))
        return total / n

    i2t, t2i = one(x, z), one(z, x)
    return i2t, t2i, i2t + t2i


def cmpm_vec(x, z, pids):
    pid = torch.tensor(pids)
    y = (pid[:, None] == pid[None]).double()
    q = y / y.sum(1, keepdim=True)
    zn, xn = torch.nn.functional.normalize(z, dim=1), torch.nn.functional.normalize(x, dim=1)

    def one(proj):
        p = proj.softmax(1)
        return (p * (proj.log_softmax(1) - torch.log(q + eps))).sum(1).mean().item()

    return one(x @ zn.T), one(z @ xn.T)


a = cmpm_loops(x, z, pids)
print("raw: i2t {:.12f} t2i {:.12f} total {:.12f}".format(*a), "vec", cmpm_vec(x, z, pids))
xn, zn = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(z, dim=1)
b = cmpm_loops(xn, zn, pids)
print("normalised: i2t {:.12f} t2i {:.12f} total {:.12f}".format(*b), "vec", cmpm_vec(xn, zn, pids))
print(f"mean of directions raw {a[2] / 2:.12f} normalised {b[2] / 2:.12f}")
