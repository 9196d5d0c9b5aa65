#!/usr/bin/env bash
# SPACH full run, eight cards (or as many as present; --nproc=N), launched with torchrun.
# usage: bash test/train_full_8p.sh --data_path=DIR [--model=M] [--batch_size=B] [--device=cuda|npu|cpu] [--flag=value ...]
Network="SPACH"
MODE="full"
RANK_SIZE_DEFAULT="auto"
EPOCHS_DEFAULT=""
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
spach_launch "$@"
