#!/usr/bin/env bash
# SPACH full run, one card.
# usage: bash test/train_full_1p.sh --data_path=DIR [--model=M] [--batch_size=B] [--device=cuda|npu|cpu] [--flag=value ...]
Network="SPACH"
MODE="full"
RANK_SIZE_DEFAULT="1"
EPOCHS_DEFAULT=""
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
spach_launch "$@"
