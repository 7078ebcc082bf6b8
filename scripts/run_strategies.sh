#!/usr/bin/env bash
# Shared body of run_cir_loss.sh (--lora) and run_cir_full.sh (--full).
set -uo pipefail

mode="$1"; shift
name=$([ "$mode" = --lora ] && echo run_cir_loss.sh || echo run_cir_full.sh)
usage() {
    cat <<USAGE
Usage: ./$name STRATEGY|all [--config NAME] [HYDRA_OVERRIDE ...]

Trains the Circle-Loss strategy STRATEGY ($([ "$mode" = --lora ] && echo "LoRA r 32 / alpha 64 on both towers" || echo "full fine-tuning")),
or all five one after the other:
  baseline          N-ITC (+ MVS, SimCLR, C-ITC), no Circle Loss
  auxiliary         + in-modal Circle Loss on image and text features (weight 0.1)
  intrinsic         NC-ITC: circle-reweighted N-ITC logits
  circle_only       cross-modal Circle Loss instead of N-ITC
  auxiliary_cross   N-ITC + cross-modal Circle Loss (weight 0.1): the original project's selected method

--config NAME  top-level config (default cir_msiglip: VN3K_VI, 256x256, identity sampler 6x4, batch 24,
               accumulation 3, fp16, 60 epochs, AdamW 1e-4, m 0.25, gamma 128). Use --config demo to try it
               on the embedded dataset and tiny model.
Any further argument is a Hydra override, e.g. trainer.max_epochs=1 img_size_str="'(384,128)'";
parity=seed switches the original project's behaviour back on (Circle gamma 64, epochs selected on test, ...),
parity=seed_published also its published recipe (gamma 128, 256x256); docs/seed_differences.md lists both.

Examples:
  ./$name auxiliary_cross
  ./$name all --config demo trainer.max_epochs=1
  ./$name auxiliary_cross parity=seed_published
USAGE
}

[ $# -ge 1 ] || { usage; exit 2; }
case "$1" in -h|--help) usage; exit 0;; esac
strategy="$1"; shift
config=cir_msiglip
if [ "${1:-}" = --config ]; then config="${2:?--config needs a name}"; shift 2; fi

declare -A overrides=(
    [baseline]="loss.strategy=baseline loss.CIR=false loss.circle_loss_weight=0.0"
    [auxiliary]="loss.strategy=auxiliary loss.CIR=true loss.circle_loss_weight=0.1"
    [intrinsic]="loss.strategy=intrinsic loss.CIR=false loss.circle_loss_weight=0.0"
    [circle_only]="loss.strategy=circle_only loss.NITC=false loss.CIR=false loss.circle_loss_weight=0.0"
    [auxiliary_cross]="loss.strategy=auxiliary_cross loss.CIR=true loss.circle_loss_weight=0.1"
)
order=(baseline auxiliary intrinsic circle_only auxiliary_cross)
if [ "$strategy" = all ]; then
    strategies=("${order[@]}")
elif [ -n "${overrides[$strategy]:-}" ]; then
    strategies=("$strategy")
else
    echo "Unknown strategy '$strategy'; valid: ${order[*]} all" >&2; exit 2
fi
tuning=$([ "$mode" = --lora ] && echo "lora=cir" || echo "backbone.freeze.vision=false backbone.freeze.text=false")

failed=()
for s in "${strategies[@]}"; do
    echo "=== $s ($name, config $config)"
    # shellcheck disable=SC2086  # the override strings are word lists on purpose
    if ! uv run trainer.py -cn "$config" ${overrides[$s]} $tuning "$@"; then
        failed+=("$s")
    fi
done
echo "=== ${#strategies[@]} run(s), ${#failed[@]} failed${failed:+: ${failed[*]}}"
[ ${#failed[@]} -eq 0 ]
