#!/usr/bin/env bash
# Shared body of run_cir_loss.sh (--lora) and run_cir_full.sh (--full): one Hydra multirun of trainer.py over the
# chosen strategies, then the sweep's status (scripts/sweep.py).
set -uo pipefail

mode="$1"; shift
name=$([ "$mode" = --lora ] && echo run_cir_loss.sh || echo run_cir_full.sh)
usage() {
    cat <<USAGE
Usage: ./$name STRATEGY|all [--config NAME] [HYDRA_OVERRIDE ...]

Trains the Circle-Loss strategy STRATEGY ($([ "$mode" = --lora ] && echo "LoRA r 32 / alpha 64 on both towers" || echo "full fine-tuning")),
or all five, as one Hydra multirun (trainer.py -m loss.strategy=...):
  baseline          N-ITC (+ MVS, SimCLR, C-ITC), no Circle Loss
  auxiliary         + in-modal Circle Loss on image and text features (weight 0.1)
  intrinsic         NC-ITC: circle-reweighted N-ITC logits
  circle_only       cross-modal Circle Loss instead of N-ITC
  auxiliary_cross   N-ITC + cross-modal Circle Loss (weight 0.1): the original project's selected method

--config NAME  top-level config (default cir_msiglip: VN3K_VI, 256x256, identity sampler 6x4, batch 24,
               accumulation 3, fp16, 60 epochs, AdamW 1e-4, m 0.25, gamma 128). Use --config demo to try it
               on the embedded dataset and tiny model.
Any further argument is a Hydra override, e.g. trainer.max_epochs=1 img_size_str="'(384,128)'" seed=0,1,2 (a seed
sweep too); hydra/launcher=slurm runs each job as a SLURM job with one GPU (config/hydra/launcher/slurm.yaml),
hydra/launcher=local every job at once on this machine. The sweep folder is multirun/$name/<date_time> unless
hydra.sweep.dir=FOLDER names it; a job whose folder holds results.json is skipped, so the same command with the
same hydra.sweep.dir (or: uv run python -m scripts.sweep resume FOLDER) runs only the jobs that did not finish.
parity=seed switches the original project's behaviour back on (Circle gamma 64, epochs selected on test, ...),
parity=seed_published also its published recipe (gamma 128, 256x256); docs/seed_differences.md lists both.

Examples:
  ./$name auxiliary_cross
  ./$name all --config demo trainer.max_epochs=1
  ./$name all seed=2300,2307,2400 hydra/launcher=slurm hydra.launcher.partition=gpu
  ./$name auxiliary_cross parity=seed_published
USAGE
}

[ $# -ge 1 ] || { usage; exit 2; }
case "$1" in -h|--help) usage; exit 0;; esac
strategy="$1"; shift
config=cir_msiglip
if [ "${1:-}" = --config ]; then config="${2:?--config needs a name}"; shift 2; fi

strategies=(baseline auxiliary intrinsic circle_only auxiliary_cross)
# The published recipe's Circle weight; only auxiliary and auxiliary_cross read it. Each strategy sets the rest.
common=(loss.circle_loss_weight=0.1)
if [ "$strategy" = all ]; then
    chosen=$(IFS=,; echo "${strategies[*]}")
elif [[ " ${strategies[*]} " == *" $strategy "* ]]; then
    chosen="$strategy"
else
    echo "Unknown strategy '$strategy'; valid: ${strategies[*]} all" >&2; exit 2
fi
if [ "$mode" = --lora ]; then
    tuning=(lora=cir)
else
    tuning=(backbone.freeze.vision=false backbone.freeze.text=false)
fi
sweep_dir=""
for argument in "$@"; do
    case "$argument" in hydra.sweep.dir=*) sweep_dir="${argument#hydra.sweep.dir=}";; esac
done
launch=()
if [ -z "$sweep_dir" ]; then
    sweep_dir="multirun/${name%.sh}/$(date +%Y-%m-%d_%H-%M-%S)"
    launch=("hydra.sweep.dir=$sweep_dir")
fi

echo "=== $name: strategies $chosen, config $config, sweep folder $sweep_dir"
uv run trainer.py -cn "$config" -m "loss.strategy=$chosen" "${common[@]}" "${tuning[@]}" "${launch[@]}" "$@"
uv run python -m scripts.sweep status "$sweep_dir"
