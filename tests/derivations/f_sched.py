import math

groups = {  # the original project's tbps_clip_no_decay groups in order; 'default' is the fallback
    "backbone": dict(lr=1e-5, start_lr=1e-6, end_lr=5e-6, betas=(0.9, 0.95), weight_decay=0.0),
    "cross": dict(lr=5e-5, start_lr=5e-6, end_lr=2.5e-5, betas=(0.9, 0.98), weight_decay=0.2),
    "classifier": dict(lr=5e-5, start_lr=5e-6, end_lr=2.5e-5, betas=(0.9, 0.98), weight_decay=0.2),
    "simclr": dict(lr=5e-5, start_lr=5e-6, end_lr=2.5e-5, betas=(0.9, 0.98), weight_decay=0.2),
}
default = dict(lr=1e-5, start_lr=1e-6, end_lr=5e-6, betas=(0.9, 0.95), weight_decay="(not stated in spec)")
names = [
    "backbone.text_model.embeddings.token_embedding.weight",
    "simclr_mlp.0.weight",
    "classifier.fc.weight",
    "mlm_head.cross_attn.in_proj_weight",
    "mlm_head.transformer.layers.0.linear1.weight",
    "mlm_head.ln_post.weight",
    "mlm_head.mlm_head.0.weight",
]
for n in names:
    hits = [g for g in groups if g in n]
    g = hits[0] if hits else "default"
    print(f"{n:55s} -> {g:10s} {groups.get(g, default)}  (all matching names: {hits})")


def lr_at(step, g, total=100, warm=20, mode="cosine"):
    if step < warm:
        return g["start_lr"] + (g["lr"] - g["start_lr"]) * step / warm
    r = (step - warm) / (total - warm)
    if mode == "cosine":
        return g["end_lr"] + (g["lr"] - g["end_lr"]) * 0.5 * (1 + math.cos(math.pi * r))
    return g["lr"] * (1 - r)


for s in (0, 10, 20, 60, 99):
    print(f"step {s:3d}: backbone {lr_at(s, groups['backbone']):.10e}  simclr {lr_at(s, groups['simclr']):.10e}")
for s in (20, 60, 99):
    print(f"linear step {s}: backbone {lr_at(s, groups['backbone'], mode='linear'):.10e}")
# alternative progress denominator (total - warm - 1) for reference
for s in (60, 99):
    r = (s - 20) / 79
    g = groups["backbone"]
    print("alt r=(t-20)/79", s, g["end_lr"] + (g["lr"] - g["end_lr"]) * 0.5 * (1 + math.cos(math.pi * r)))
