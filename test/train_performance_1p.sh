#!/usr/bin/env bash
# SPACH performance run, one card.
# usage: bash test/train_performance_1p.sh --data_path=DIR [--model=M] [--batch_size=B] [--device=cuda|npu|cpu] [--flag=value ...]
Network="SPACH"
MODE="performance"
RANK_SIZE_DEFAULT="1"
EPOCHS_DEFAULT="1"
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
spach_launch "$@"
