import random

K, P = 4, 2
n = [1, 2, 3, 4, 5, 6, 7, 8, 9, 13]


def best_B(c):
    B = 0
    while sum(min(ci, B + 1) for ci in c) >= P * (B + 1):
        B += 1
    return B


# ---- chunks convention
c = [1 if ni < K else ni // K for ni in n]
B = best_B(c)
print("chunks: c =", c, "sum", sum(c), "B =", B, "sum min(c,B) =", sum(min(ci, B) for ci in c), "P*B =", P * B)


# simulate one epoch with my own implementation
def chunks_epoch(seed):
    rng = random.Random(seed)
    start = 0
    pools = []
    for pid, ni in enumerate(n):
        idx = list(range(start, start + ni))
        start += ni
        rng.shuffle(idx)
        if ni < K:
            ch = [[idx[k % ni] for k in range(K)]]
        else:
            ch = [idx[k * K : (k + 1) * K] for k in range(ni // K)]
        pools.append(ch[:B])
    # greedy: each batch takes P identities with the most remaining chunks (guarantees feasibility)
    out = []
    for _ in range(B):
        order = sorted(range(len(n)), key=lambda i: (-len(pools[i]), rng.random()))[:P]
        assert all(pools[i] for i in order)
        out.append([x for i in order for x in pools[i].pop()])
    assert all(not p for p in pools)
    return out


batches = chunks_epoch(0)
flat = [x for b in batches for x in b]
print(
    "  batches",
    len(batches),
    "yielded",
    len(flat),
    "distinct",
    len(set(flat)),
    "never used",
    58 - len(set(flat)),
    "duplicates",
    len(flat) - len(set(flat)),
)
# ---- all convention
cf = [ni // K for ni in n]
Bf = best_B(cf)
placed = P * Bf * K
left = sum(n) - placed
extra = -(-left // 8)
pad = extra * 8 - left
print(
    "all: full chunks =",
    cf,
    "sum",
    sum(cf),
    "B_full =",
    Bf,
    "placed samples",
    placed,
    "leftovers",
    left,
    "extra batches",
    extra,
    "total batches",
    Bf + extra,
    "pad/duplicates",
    pad,
    "yielded",
    (Bf + extra) * 8,
)
print("  leftovers by identity: remainders", [ni % K for ni in n], "surplus chunks", sum(cf) - P * Bf)
