#!/usr/bin/env bash
# SPACH eval run, eight cards (or as many as present; --nproc=N), launched with torchrun.
# usage: bash test/train_eval_8p.sh --data_path=DIR --resume=CKPT [--model=M] [--batch_size=B] [--device=cuda|npu|cpu] [--flag=value ...]
Network="SPACH"
MODE="eval"
RANK_SIZE_DEFAULT="auto"
EPOCHS_DEFAULT=""
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
spach_launch "$@"
