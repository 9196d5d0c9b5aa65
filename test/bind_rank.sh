#!/usr/bin/env bash
# Run one torchrun rank bound to its share of the physical cores: SPACH_CPU_LIST (comma-separated, topology
# order, set by the launcher from lscpu) split evenly over LOCAL_WORLD_SIZE ranks.
IFS=, read -r -a cpus <<< "${SPACH_CPU_LIST}"
n=${#cpus[@]}
ranks=${LOCAL_WORLD_SIZE:-1}
rank=${LOCAL_RANK:-0}
per=$(( n / ranks ))
if (( per >= 1 )) && command -v numactl >/dev/null 2>&1; then
    mine=$(IFS=,; echo "${cpus[*]:$(( rank * per )):${per}}")
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${per}}
    exec numactl --physcpubind="${mine}" "$@"
fi
exec "$@"
