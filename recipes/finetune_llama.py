"""The seed's entry point: `torchrun --nproc_per_node=8 ... finetune_llama.py --model_name_or_path ...` runs
as written from this folder (shardkit must be installed: `pip install -e .`)."""

import sys

from shardkit.train import main

if __name__ == "__main__":
    sys.exit(main())
