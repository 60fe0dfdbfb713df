#!/bin/sh
# The seed's DeepSpeed command line, copied verbatim from SEED.md (a test holds it to that), run from this
# folder, where finetune_llama.py and configs/ are. It trains LLaMA-30B on 8 GPUs; to see what it would
# run, give python -m shardkit.train the same flags with --dry_run True.
cd "$(dirname "$0")" || exit 1
torchrun --nproc_per_node=8 --master_port=22100 finetune_llama.py \
    --model_name_or_path decapoda-research/llama-30b-hf \
    --bf16 True \
    --output_dir test \
    --num_train_epochs 3 \
    --per_device_train_batch_size 8 \
    --gradient_accumulation_steps 2 \
    --evaluation_strategy "no" \
    --save_strategy "steps" \
    --save_steps 100 \
    --save_total_limit 1 \
    --learning_rate 2e-5 \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --deepspeed "configs/deepspeed_config.json" \
    --gradient_checkpointing True \
    --tf32 True
