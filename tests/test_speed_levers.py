"""The speed and memory levers change how a step runs, never what it computes.

- torch.compile of the towers gives the eager path's losses and gradients (tiny model, fp32, dropout off);
- the frozen token embedding gets no gradient and no optimizer state, everything else still trains;
- fused AdamW takes the same steps as the loop implementation;
- frozen linear weights stored in the autocast dtype give bitwise the same step as autocast casting them (autocast
  rounds every linear weight to bf16 itself), and the estimate counts them at 2 bytes with no extra copy;
- the memory estimate counts what the step really holds (static part from the parameter count of the real
  multilingual architecture: 4 bytes of weight, 4 of gradient and 8 of AdamW moments per trainable parameter).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import SiglipConfig, SiglipModel

import model.build
from model.backbone import load_backbone
from model.build import BackboneSettings, build_model, compile_towers, compiles, store_frozen_linears
from model.lora import LoraSettings, apply_lora
from model.memory import GIB, StepShape, estimated_peak_bytes, needs_checkpointing
from model.objective import Objective
from model.strategies import LossSettings, StepContext
from solver.build import build_optimizer


def _batch(batch_size: int = 8, vocab: int = 100, image=(32, 16)) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch_size, 16), generator=generator)
    return {
        "images": torch.randn(batch_size, 3, *image, generator=generator),
        "aug_images": torch.randn(batch_size, 3, *image, generator=generator),
        "caption_input_ids": ids,
        "pids": torch.arange(batch_size // 2).repeat_interleave(2),
    }


def _model(tiny_checkpoint, **backbone):
    objective = Objective(LossSettings(strategy="auxiliary_cross", CIR=True))
    settings = {"path": str(tiny_checkpoint), "image_size": [32, 16], "text_config": {"attention_dropout": 0.0}}
    settings["vision_config"] = {"attention_dropout": 0.0}
    torch.manual_seed(0)
    return build_model({**settings, **backbone}, objective), objective


def _loss_and_grads(model, objective, batch):
    feats = model(batch, aug_view=objective.needs_aug_view)
    loss = torch.stack(list(objective(feats, StepContext(epoch=0.0)).values())).sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.slow  # inductor compiles C++ kernels on the CPU: about a minute on 2 cores
def test_compiled_towers_give_the_eager_losses_and_gradients(tiny_checkpoint):
    model, objective = _model(tiny_checkpoint)
    batch = _batch()
    eager_loss, eager_grads = _loss_and_grads(model, objective, batch)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    assert compile_towers(model.backbone) > 0
    compiled_loss, compiled_grads = _loss_and_grads(model, objective, batch)
    assert model.state_dict().keys() == state.keys()  # checkpoints keep their keys
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        # Relative to each tensor's scale: some gradients are zero in exact arithmetic (a key bias shifts every logit
        # of a query alike) and only rounding noise of ~1e-8 in either path.
        error = (compiled_grads[name] - grad).abs().max().item()
        assert error <= 1e-4 * grad.abs().max().item() + 1e-7, (name, error)


def test_frozen_token_embedding_gets_no_gradient_and_no_optimizer_state(tiny_checkpoint):
    model, objective = _model(tiny_checkpoint, freeze={"token_embedding": True})
    embedding = model.backbone.text_model.embeddings.token_embedding.weight
    optimizer = build_optimizer(
        {"type": "torch.optim.AdamW", "param_groups": {"default": {"lr": 1e-3, "start_lr": 1e-3, "end_lr": 1e-3}}},
        model,
    )
    before = embedding.detach().clone()
    feats = model(_batch(), aug_view=True)
    torch.stack(list(objective(feats, StepContext(epoch=0.0)).values())).sum().backward()
    optimizer.step()
    assert embedding.grad is None and embedding not in optimizer.state
    assert torch.equal(embedding, before)
    position = model.backbone.text_model.embeddings.position_embedding.weight
    assert position.grad is not None and position in optimizer.state  # the rest of the text tower still trains


def test_token_embedding_trains_when_asked(tiny_checkpoint):
    model, _ = _model(tiny_checkpoint, freeze={"token_embedding": False})
    assert model.backbone.text_model.embeddings.token_embedding.weight.requires_grad


def test_fused_adamw_takes_the_loop_implementations_steps():
    torch.manual_seed(0)
    weights = [torch.nn.Linear(6, 4) for _ in range(2)]
    weights[1].load_state_dict(weights[0].state_dict())
    groups = {"default": {"lr": 1e-2, "start_lr": 1e-2, "end_lr": 1e-2, "weight_decay": 0.1}}
    loop = build_optimizer({"type": "torch.optim.AdamW", "param_groups": groups, "fused": False}, weights[0])
    fused = build_optimizer({"type": "torch.optim.AdamW", "param_groups": groups, "fused": True}, weights[1])
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    inputs = torch.randn(5, 6)
    for _ in range(3):
        for layer, optimizer in zip(weights, (loop, fused)):
            layer(inputs).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    torch.testing.assert_close(weights[1].weight, weights[0].weight)


def test_fused_is_off_by_default_on_the_cpu():
    optimizer = build_optimizer(
        {"type": "torch.optim.AdamW", "param_groups": {"default": {"lr": 1.0, "start_lr": 1.0, "end_lr": 1.0}}},
        torch.nn.Linear(2, 2),
    )
    assert optimizer.defaults["fused"] is False


def _lora_model(tiny_checkpoint):
    objective = Objective(LossSettings(strategy="auxiliary_cross", CIR=True))
    settings = {"path": str(tiny_checkpoint), "image_size": [32, 16]}
    settings |= {"text_config": {"attention_dropout": 0.0}, "vision_config": {"attention_dropout": 0.0}}
    torch.manual_seed(0)
    model = build_model(settings, objective, lora_cfg={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0})
    with torch.no_grad():  # PEFT starts B at zero: give the adapters a non-zero update, so their path is exercised
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    return model, objective


def test_frozen_linears_in_bf16_leave_trainable_weights_and_other_layers_alone(tiny_checkpoint):
    model, _ = _lora_model(tiny_checkpoint)
    frozen_linears = [
        m for m in model.modules() if type(m) is torch.nn.Linear and not any(p.requires_grad for p in m.parameters())
    ]
    assert frozen_linears  # LoRA's base q/k/v/out projections and the frozen MLPs
    assert store_frozen_linears(model, torch.bfloat16) == len(frozen_linears)
    for name, param in model.named_parameters():
        linear = any(param is p for m in frozen_linears for p in m.parameters())
        assert param.dtype == (torch.bfloat16 if linear else torch.float32), name
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # adapters, heads, logits
    mha = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert all(m.out_proj.weight.dtype == torch.float32 for m in mha)  # read directly next to fp32 in_proj


def test_frozen_linears_in_bf16_compute_bitwise_what_autocast_computes(tiny_checkpoint):
    model, objective = _lora_model(tiny_checkpoint)
    model.eval()  # no dropout: both runs must take the same path
    half = copy.deepcopy(model)
    store_frozen_linears(half, torch.bfloat16)
    batch = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(model, objective, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half_loss, half_grads = _loss_and_grads(half, objective, batch)
    assert torch.equal(half_loss, loss)
    assert half_grads.keys() == grads.keys() and any("lora_A" in name for name in grads)
    for name, grad in grads.items():
        assert torch.equal(half_grads[name], grad), name


def test_estimate_counts_half_precision_weights_at_two_bytes_without_a_copy():
    backbone = _multilingual_shapes()
    backbone.requires_grad_(False)
    nothing = StepShape(batch_size=0, image_views=4, image_tokens=192, text_tokens=64)
    fp32 = estimated_peak_bytes(backbone, backbone, nothing, optimizer="AdamW", checkpointing=False)
    # fp32 weights (4 bytes) + autocast's bf16 copies (2) of the weights of the layers it casts
    assert fp32 == 4 * sum(p.numel() for p in backbone.parameters()) + 2 * CAST_BY_AUTOCAST
    q_proj = backbone.vision_model.encoder.layers[0].self_attn.q_proj
    q_proj.to(torch.bfloat16)
    half = estimated_peak_bytes(backbone, backbone, nothing, optimizer="AdamW", checkpointing=False)
    assert fp32 - half == 4 * (768 * 768 + 768)  # 6 bytes -> 2 per weight and bias


#: Parameters of the multilingual SigLIP base in the layers autocast casts (linear, convolution, attention products),
#: from its architecture: per encoder layer q, k, v, out (768 x 768 + 768 each) and fc1, fc2 (768 x 3072 + 3072,
#: 3072 x 768 + 768), 24 layers; the vision pooling head's attention (in 3 x (768 x 768 + 768), out 768 x 768 + 768)
#: and MLP (fc1, fc2 as above); the text head (768 x 768 + 768); the patch embedding (768 x 3 x 16 x 16 + 768).
CAST_BY_AUTOCAST = (
    24 * (4 * (768 * 768 + 768) + (768 * 3072 + 3072) + (3072 * 768 + 768))
    + 3 * (768 * 768 + 768)
    + (768 * 768 + 768)
    + (768 * 3072 + 3072)
    + (3072 * 768 + 768)
    + (768 * 768 + 768)
    + (768 * 3 * 16 * 16 + 768)
)


def _multilingual_shapes() -> SiglipModel:
    """The real checkpoint's architecture on the meta device (no memory): vocab 250,000, 12+12 layers of 768."""
    with torch.device("meta"):
        return SiglipModel(SiglipConfig(text_config={"vocab_size": 250000}, vision_config={"image_size": 256}))


def test_memory_estimate_counts_the_real_architectures_static_part():
    backbone = _multilingual_shapes()
    total = sum(p.numel() for p in backbone.parameters())
    assert 370e6 < total < 375e6  # the multilingual SigLIP base: 371.7M parameters
    shape = StepShape(batch_size=24, image_views=4, image_tokens=24 * 8, text_tokens=64)
    without_activations = StepShape(batch_size=0, image_views=4, image_tokens=192, text_tokens=64)
    static = estimated_peak_bytes(backbone, backbone, without_activations, optimizer="AdamW", checkpointing=False)
    # fp32 weights (4) + fp32 gradients (4) + two fp32 AdamW moments (8) + autocast's bf16 copies (2) of cast layers
    assert static == 16 * total + 2 * CAST_BY_AUTOCAST
    backbone.text_model.embeddings.token_embedding.requires_grad_(False)
    frozen = estimated_peak_bytes(backbone, backbone, without_activations, optimizer="AdamW", checkpointing=False)
    assert static - frozen == 12 * 250000 * 768  # 2.1 GiB: the token embedding's gradient and moments
    # Activations: 43 bytes x width per token and layer (the measured constant), 12 layers of width 768 per tower.
    full = estimated_peak_bytes(backbone, backbone, shape, optimizer="AdamW", checkpointing=False)
    assert full - frozen == 43 * 768 * 12 * (24 * 4 * 192 + 24 * 64)
    # Checkpointed: each layer's bf16 input (2 bytes x width), plus the largest layer (vision) recomputed in full.
    ckpt = estimated_peak_bytes(backbone, backbone, shape, optimizer="AdamW", checkpointing=True)
    assert ckpt - frozen == 2 * 768 * 12 * (24 * 4 * 192 + 24 * 64) + 43 * 768 * 24 * 4 * 192


def test_estimate_is_within_ten_percent_of_the_peaks_measured_on_the_gpu():
    """Peaks of bench/results/train_throughput_cuda.md (H200, 384x128, batch 24, bf16-mixed, four image views)."""
    backbone = _multilingual_shapes()
    shape = StepShape(batch_size=24, image_views=4, image_tokens=192, text_tokens=64)
    before = estimated_peak_bytes(backbone, backbone, shape, optimizer="AdamW", checkpointing=False) / GIB
    backbone.text_model.embeddings.token_embedding.requires_grad_(False)
    frozen = estimated_peak_bytes(backbone, backbone, shape, optimizer="AdamW", checkpointing=False) / GIB
    # The first two were measured eager, the 8-bit and checkpointed rows compiled.
    settings = dict(compiled=True, shape=shape)
    eight_bit = estimated_peak_bytes(backbone, backbone, optimizer="AdamW8bit", checkpointing=False, **settings) / GIB
    checkpointed = estimated_peak_bytes(backbone, backbone, optimizer="AdamW", checkpointing=True, **settings) / GIB
    for estimate, measured, margin in (
        (before, 13.23, 0.05),
        (frozen, 11.11, 0.05),
        (eight_bit, 9.08, 0.05),
        (checkpointed, 4.74, 0.05),
    ):
        assert abs(estimate - measured) <= margin * measured, (estimate, measured)


def test_compiled_and_lora_estimates_match_the_peaks_measured_on_the_gpu():
    """bench/results/train_throughput_cuda.md (H200, 384x128, batch 24, bf16-mixed): compiled full fine-tuning with
    a frozen token embedding 10.09 GiB; LoRA r32 with its frozen weights in fp32 8.33 GiB eager, in bf16 7.66 GiB
    eager and 7.42 compiled.
    """
    shape = StepShape(batch_size=24, image_views=4, image_tokens=192, text_tokens=64)
    full = _multilingual_shapes()
    full.text_model.embeddings.token_embedding.requires_grad_(False)
    compiled_full = estimated_peak_bytes(full, full, shape, optimizer="AdamW", checkpointing=False, compiled=True)
    lora = _multilingual_shapes()
    apply_lora(lora, LoraSettings())
    settings = dict(optimizer="AdamW", checkpointing=False)
    fp32_lora = estimated_peak_bytes(lora, lora, shape, **settings)
    store_frozen_linears(lora, torch.bfloat16)
    eager_lora = estimated_peak_bytes(lora, lora, shape, **settings)
    compiled_lora = estimated_peak_bytes(lora, lora, shape, **settings, compiled=True)
    for estimate, measured in ((compiled_full, 10.09), (fp32_lora, 8.33), (eager_lora, 7.66), (compiled_lora, 7.42)):
        assert abs(estimate / GIB - measured) <= 0.05 * measured, (estimate / GIB, measured)


def test_the_seed_recipe_on_a_12_gb_card_checkpoints_only_when_eager_with_adamw():
    backbone = _multilingual_shapes()
    backbone.text_model.embeddings.token_embedding.requires_grad_(False)
    shape = StepShape(batch_size=24, image_views=4, image_tokens=192, text_tokens=64)
    rtx_3060 = 11.76 * GIB  # 12,288 MiB of GDDR6, of which CUDA reports about 11.76 GiB as total_memory
    assert needs_checkpointing(backbone, backbone, shape, optimizer="AdamW", device_bytes=rtx_3060)[0]
    assert not needs_checkpointing(backbone, backbone, shape, optimizer="AdamW8bit", device_bytes=rtx_3060)[0]
    # Compiled towers (the default on CUDA) measured 10.09 GiB: within the 90 % of the card a plan may fill.
    assert not needs_checkpointing(backbone, backbone, shape, optimizer="AdamW", device_bytes=rtx_3060, compiled=True)[
        0
    ]


def test_compile_is_on_by_default_only_for_training_on_a_gpu_inductor_can_compile_for(monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(model.build, "triton_usable", lambda: True)
    assert compiles(None, "fit", cuda)
    assert not compiles(None, "fit", cpu) and not compiles(None, "test", cuda) and not compiles(None, "validate", cuda)
    assert compiles(True, "test", cpu) and not compiles(False, "fit", cuda)  # explicit settings win
    monkeypatch.setattr(model.build, "triton_usable", lambda: False)
    assert not compiles(None, "fit", cuda) and compiles(True, "fit", cuda)


def test_triton_is_usable_only_with_torchs_triton_backend_and_a_c_compiler(monkeypatch):
    import torch.utils._triton

    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    monkeypatch.setattr(model.build.shutil, "which", lambda name: f"/usr/bin/{name}" if name == "gcc" else None)
    assert model.build.triton_usable()
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)  # e.g. a GPU of compute capability 6.x
    assert not model.build.triton_usable()
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    monkeypatch.setattr(model.build.shutil, "which", lambda name: None)  # Triton builds launchers with one
    assert not model.build.triton_usable()
    monkeypatch.setenv("CC", "/opt/cc")
    assert model.build.triton_usable()


def test_checkpointing_is_chosen_only_when_the_card_is_too_small():
    backbone = _multilingual_shapes()
    shape = StepShape(batch_size=24, image_views=4, image_tokens=192, text_tokens=64)
    on_big, reason_big = needs_checkpointing(backbone, backbone, shape, optimizer="AdamW", device_bytes=80 * GIB)
    on_small, reason_small = needs_checkpointing(backbone, backbone, shape, optimizer="AdamW", device_bytes=8 * GIB)
    assert not on_big and "off" in reason_big
    assert on_small and "on" in reason_small and "backbone.gradient_checkpointing=false" in reason_small


def test_load_backbone_keeps_the_token_embedding_trainable_by_itself(tiny_checkpoint):
    # Freezing is the TBPS model's decision (backbone.freeze.token_embedding), not the loader's.
    assert load_backbone(tiny_checkpoint).text_model.embeddings.token_embedding.weight.requires_grad


def test_default_num_workers_feeds_the_gpu_but_leaves_a_core_to_training(monkeypatch):
    from utils import config

    for cores, expected in ((1, 0), (2, 1), (4, 3), (9, 8), (64, 8)):
        monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert config.default_num_workers() == expected


def test_compiling_the_towers_lifts_dynamos_recompile_limit_and_falls_back_to_eager_only_when_asked(tiny_checkpoint):
    import torch._dynamo

    config = torch._dynamo.config
    # dynamo's defaults, restored afterwards by its own patcher (pytest's monkeypatch deletes its settings on undo)
    with config.patch(recompile_limit=8, suppress_errors=False):
        backbone = load_backbone(tiny_checkpoint)
        layers = len(backbone.vision_model.encoder.layers) + len(backbone.text_model.encoder.layers)
        assert compile_towers(backbone) == layers  # lazy: nothing compiles before the first call
        # One code object for every layer; training, validation and testing of two towers already make 8 variants.
        assert config.recompile_limit > 8 and not config.suppress_errors
        compile_towers(load_backbone(tiny_checkpoint), fall_back_to_eager=True)
        assert config.suppress_errors
    assert isinstance(config.recompile_limit, int)  # still readable once the patch is undone


def test_compile_mode_reaches_torch_compile_for_every_layer_and_unknown_modes_are_refused(tiny_checkpoint, monkeypatch):
    modes = []

    def recording_compile(function, *args, **kwargs):
        modes.append(kwargs.get("mode"))
        return function

    monkeypatch.setattr(torch, "compile", recording_compile)
    backbone = load_backbone(tiny_checkpoint)
    layers = compile_towers(backbone, mode="reduce-overhead")
    assert modes == ["reduce-overhead"] * layers
    # torch.compile's own modes (its documented list) are accepted; anything else is named with the valid ones.
    for mode in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        assert not BackboneSettings(path=str(tiny_checkpoint), image_size=[32, 32], compile_mode=mode).problems()
    problems = BackboneSettings(path=str(tiny_checkpoint), image_size=[32, 32], compile_mode="fast").problems()
    assert problems == [
        "backbone.compile_mode='fast' is unknown; valid: "
        "['default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs']."
    ]
