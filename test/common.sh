# Shared body of the ModelZoo launcher scripts (sourced, not run).
#
# The caller sets: Network, MODE (full | performance | eval), RANK_SIZE_DEFAULT (1 or auto), EPOCHS_DEFAULT
# (empty: spach's default), then calls `spach_launch "$@"`.
# Options: --data_path=DIR (required), --nproc=N (processes on this node), --resume=CKPT (eval),
#   multi-node (the same command on every node, each with its own --node_rank):
#   --nnodes=N --node_rank=R --master_addr=HOST0 --master_port=PORT (static rendezvous: node R runs the ranks
#   R*nproc .. R*nproc+nproc-1), or --rdzv_endpoint=HOST0:PORT [--rdzv_id=ID] (c10d: ranks in joining order);
#   every other --flag=value (or --flag) goes to `spach train` unchanged (--model=, --batch_size=, --device=, ...).
# Environment: PYTHON (default python3), ASCEND_DEVICE_ID (output id, default 0), NO_NUMACTL=1 disables binding;
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT: defaults for the multi-node flags (the flags win).
# The node that runs rank 0 writes the run's log, the summary and the checkpoints; the other nodes log what their
# own ranks print to train_<id>_node<R>.log and print no summary.

spach_launch() {
    local data_path="" nproc="" model="" batch_size=128 device="" epochs="${EPOCHS_DEFAULT}"
    local resume="" nnodes="${NNODES:-1}" node_rank="${NODE_RANK:-0}" master_addr="${MASTER_ADDR:-}"
    local master_port="${MASTER_PORT:-}" rdzv_endpoint="" rdzv_id=""
    local passthrough=() para key
    for para in "$@"; do
        key="${para%%=*}"
        case "${key}" in
            --data_path|--data-path) data_path="${para#*=}" ;;
            --nproc|--nproc_per_node) nproc="${para#*=}" ;;
            --model) model="${para#*=}" ;;
            --batch_size|--batch-size) batch_size="${para#*=}" ;;
            --device) device="${para#*=}" ;;
            --npu) device="npu" ;;
            --epochs) epochs="${para#*=}" ;;
            --resume|--checkpoint) resume="${para#*=}" ;;
            --nnodes) nnodes="${para#*=}" ;;
            --node_rank|--node-rank) node_rank="${para#*=}" ;;
            --master_addr|--master-addr) master_addr="${para#*=}" ;;
            --master_port|--master-port) master_port="${para#*=}" ;;
            --rdzv_endpoint|--rdzv-endpoint) rdzv_endpoint="${para#*=}" ;;
            --rdzv_id|--rdzv-id) rdzv_id="${para#*=}" ;;
            --world_size|--world-size)
                # the ModelZoo's train_cluster.sh scripts take --world_size=<number of machines>; spach's own
                # --world_size is the number of processes, set by torchrun: neither is meant here
                echo "[Error] ${para}: pass the number of machines as --nnodes=N and the processes per machine as" \
                     "--nproc=N (torchrun sets the world size, nnodes x nproc)"
                return 1 ;;
            *) passthrough+=("${para}") ;;
        esac
    done
    local n
    for n in nnodes node_rank; do
        if ! [[ "${!n}" =~ ^[0-9]+$ ]]; then
            echo "[Error] --${n}=${!n}: must be a whole number"
            return 1
        fi
    done
    if (( nnodes < 1 || node_rank >= nnodes )); then
        echo "[Error] --node_rank=${node_rank} with --nnodes=${nnodes}: node ranks go from 0 to nnodes - 1"
        return 1
    fi
    if [[ -z "${data_path}" ]]; then
        echo "[Error] para \"data_path\" must be configured: --data_path=DIR (DIR/train/<class>/, DIR/val/<class>/)"
        return 1
    fi
    if [[ "${MODE}" == "eval" && -z "${resume}" ]]; then
        echo "[Error] para \"resume\" must be configured: --resume=CKPT (a checkpoint.pth / best.pth)"
        return 1
    fi

    # run from the repository root whether started from it or from test/
    local here test_path_dir
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    test_path_dir="${here}"
    cd "${here}/.." || return 1
    case "${data_path}" in /*) ;; *) [[ -d "${OLDPWD}/${data_path}" ]] && data_path="$(cd "${OLDPWD}/${data_path}" && pwd)" ;; esac
    case "${resume}" in /*|"") ;; *) [[ -f "${OLDPWD}/${resume}" ]] && resume="$(cd "$(dirname "${OLDPWD}/${resume}")" && pwd)/$(basename "${resume}")" ;; esac

    PYTHON="${PYTHON:-python3}"
    if [[ -f "${test_path_dir}/env_npu.sh" && "${device}" == "npu" ]]; then
        source "${test_path_dir}/env_npu.sh"
    fi
    if [[ -z "${device}" ]]; then
        device="$(${PYTHON} -c 'from spach.runtime.device import available_devices; print(available_devices()[0])' 2>/dev/null || echo cpu)"
    fi
    if [[ -z "${nproc}" ]]; then
        if [[ "${RANK_SIZE_DEFAULT}" == "1" || "${device}" == cpu* || "${device}" == mps* ]]; then
            nproc=1
        else  # eight cards, or as many as this node has
            local n_devices
            n_devices="$(${PYTHON} -c "from spach.runtime.device import device_count, available_devices as a
d='${device}'.split(':')[0]; print(device_count(d) if d in a() else 0)" 2>/dev/null || echo 0)"
            nproc=$(( n_devices >= 8 ? 8 : (n_devices > 0 ? n_devices : 1) ))
        fi
    fi
    export RANK_SIZE=$(( nproc * nnodes ))

    local id="${ASCEND_DEVICE_ID:-0}"
    local out_dir="${test_path_dir}/output/${id}"
    mkdir -p "${out_dir}"
    local log="${out_dir}/train_${id}.log"
    [[ "${MODE}" == "eval" ]] && log="${out_dir}/eval_${id}.log"
    # another node's ranks print little (rank 0 logs the run); its own file, so that nodes sharing a file system
    # (or rehearsing on one host) do not write over node 0's log
    (( node_rank > 0 )) && log="${log%.log}_node${node_rank}.log"
    : > "${log}"

    # eval reads the model (and input size) from the checkpoint unless --model= is given
    [[ -z "${model}" && "${MODE}" != "eval" ]] && model="spach_ms_s_patch4_224_conv"
    local args=(--batch-size "${batch_size}" --device "${device}" --data-path "${data_path}")
    [[ -n "${model}" ]] && args+=(--model "${model}")
    [[ -n "${epochs}" ]] && args+=(--epochs "${epochs}")
    if [[ "${MODE}" == "eval" ]]; then
        args+=(--eval --resume "${resume}")
        (( RANK_SIZE > 1 )) && args+=(--dist-eval)
    else
        args+=(--output_dir "${out_dir}")
        (( RANK_SIZE > 1 )) && args+=(--dist-eval)
        # a performance run measures a fresh run; a full run continues an interrupted one
        [[ "${MODE}" == "performance" ]] && args+=(--no-auto-resume)
    fi
    args+=("${passthrough[@]}")

    local launcher=()
    if (( nproc > 1 || nnodes > 1 )); then
        launcher=("${PYTHON}" -m torch.distributed.run --nproc_per_node "${nproc}" --nnodes "${nnodes}" --node_rank "${node_rank}")
        if [[ -n "${rdzv_endpoint}" ]]; then
            launcher+=(--rdzv_backend c10d --rdzv_endpoint "${rdzv_endpoint}")
            [[ -n "${rdzv_id}" ]] && launcher+=(--rdzv_id "${rdzv_id}")
        elif (( nnodes > 1 )); then
            launcher+=(--master_addr "${master_addr:-127.0.0.1}" --master_port "${master_port:-29500}")
        else
            launcher+=(--master_port "${master_port:-$(( 29500 + RANDOM % 2000 ))}")
        fi
        if command -v numactl >/dev/null 2>&1 && [[ "${NO_NUMACTL:-0}" != "1" ]]; then
            # each rank gets its share of the physical cores, in topology order (socket, core), from lscpu
            local cpus
            cpus="$(lscpu -p=CPU,CORE,SOCKET 2>/dev/null | awk -F, '!/^#/ && !seen[$3 "," $2]++ {print $1}' | paste -sd, -)"
            if [[ -n "${cpus}" ]]; then
                export SPACH_CPU_LIST="${cpus}"
                launcher+=(--no-python "${test_path_dir}/bind_rank.sh" "${PYTHON}" -m spach train)
            else
                launcher+=(-m spach train)
            fi
        else
            launcher+=(-m spach train)
        fi
    else
        launcher=("${PYTHON}" -m spach train)
    fi

    echo "[launch] ${launcher[*]} ${args[*]}" | tee -a "${log}"
    local start_time end_time e2e_time rc
    start_time=$(date +%s)
    "${launcher[@]}" "${args[@]}" >> "${log}" 2>&1
    rc=$?
    end_time=$(date +%s)
    e2e_time=$(( end_time - start_time ))

    # the summary comes from rank 0's lines: on the node that ran rank 0 (static rendezvous: node 0; c10d: the
    # node whose log has them, as ranks follow the joining order there)
    local main_node=1
    if (( nnodes > 1 )); then
        if [[ -n "${rdzv_endpoint}" ]]; then
            grep -qE '^(Epoch: \[[0-9]+\]|Accuracy of the network on)' "${log}" || main_node=0
            # nothing from rank 0 anywhere (a failed start): node 0 reports
            (( main_node == 0 && node_rank == 0 && rc != 0 )) && main_node=1
        else
            (( node_rank == 0 )) || main_node=0
        fi
    fi
    if (( main_node == 0 )); then
        echo "[node ${node_rank} of ${nnodes}] this node's ranks ran; rank 0's node prints the result and writes" \
             "the summary. Log: ${log}"
        if (( rc != 0 )); then
            echo "[Error] spach exited with status ${rc}; last lines of ${log}:"
            tail -n 15 "${log}"
            return "${rc}"
        fi
        return 0
    fi

    local BatchSize="${batch_size}" DeviceType CaseName summary
    DeviceType="$(uname -m)"
    echo "------------------ Final result ------------------"
    if [[ "${MODE}" == "eval" ]]; then
        CaseName="${Network}_bs${BatchSize}_${RANK_SIZE}p_eval"
        local acc
        acc="$(spach_parse_accuracy < "${log}")"
        echo "ActualAccuracy = ${acc}"
        echo "E2E Eval Duration sec : ${e2e_time}"
        summary="${out_dir}/${CaseName}.log"
        {
            echo "Network = ${Network}"; echo "RankSize = ${RANK_SIZE}"; echo "BatchSize = ${BatchSize}"
            echo "DeviceType = ${DeviceType}"; echo "CaseName = ${CaseName}"; echo "ActualAccuracy = ${acc}"
            echo "E2EEvalTime = ${e2e_time}"
        } > "${summary}"
    else
        local suffix="acc"; [[ "${MODE}" == "performance" ]] && suffix="perf"
        CaseName="${Network}_bs${BatchSize}_${RANK_SIZE}p_${suffix}"
        # the ModelZoo's summary: ActualFPS (images/s, all processes), TrainingTime (ms per optimizer step:
        # global batch x 1000 / FPS, as their scripts compute it with BatchSize x RankSize; the global batch is
        # the one spach logs, which counts --grad_accum_steps too), ActualLoss (the last logged step's
        # loss; every logged step's loss goes to train_${CaseName}_loss.txt), TrainAccuracy (the best top-1 of
        # the run; full runs only, as theirs), E2ETrainingTime (seconds, launch to exit)
        local fps training_time actual_loss train_accuracy loss_file="${out_dir}/train_${CaseName}_loss.txt"
        fps="$(spach_parse_fps < "${log}")"
        training_time="N/A"
        local global_batch
        global_batch="$(spach_parse_global_batch < "${log}")"
        [[ "${global_batch}" == "N/A" ]] && global_batch=$(( BatchSize * RANK_SIZE ))
        [[ "${fps}" != "N/A" ]] && training_time="$(awk -v g="${global_batch}" -v f="${fps}" \
            'BEGIN { if (f > 0) printf "%.2f\n", g * 1000 / f; else print "N/A" }')"
        spach_parse_step_losses < "${log}" > "${loss_file}"
        actual_loss="$(awk 'END { print (NR ? $0 : "N/A") }' "${loss_file}")"
        train_accuracy="$(spach_parse_max_accuracy < "${log}")"
        echo "Final Performance images/sec : ${fps}"
        [[ "${MODE}" != "performance" ]] && echo "Final Train Accuracy : ${train_accuracy}"
        echo "E2E Training Duration sec : ${e2e_time}"
        summary="${out_dir}/${CaseName}.log"
        {
            echo "Network = ${Network}"; echo "RankSize = ${RANK_SIZE}"; echo "BatchSize = ${BatchSize}"
            echo "DeviceType = ${DeviceType}"; echo "CaseName = ${CaseName}"; echo "ActualFPS = ${fps}"
            echo "TrainingTime = ${training_time}"
            [[ "${MODE}" != "performance" ]] && echo "TrainAccuracy = ${train_accuracy}"
            echo "ActualLoss = ${actual_loss}"; echo "E2ETrainingTime = ${e2e_time}"
        } > "${summary}"
    fi
    echo "Summary: ${summary}   Log: ${log}"
    if (( rc == 75 )); then  # a stop signal: the state is saved (spach's own line names the file)
        echo "[Stopped] spach stopped on a signal (status 75) and saved its state; rerun the same command to continue:"
        grep -E 'stopped (after step|at the end of epoch)' "${log}" | tail -n 1
        return "${rc}"
    fi
    if (( rc != 0 )); then
        echo "[Error] spach exited with status ${rc}; last lines of ${log}:"
        tail -n 15 "${log}"
        return "${rc}"
    fi
    return 0
}

# The log parsers read values by key, never by column position.
# "Epoch: [N]  steps: S ... FPS: X" -> mean of X over epochs
# "global batch G = B per card x ..." -> G (N/A when absent)
spach_parse_global_batch() {
    awk '/^global batch [0-9]+ = / { g = $3 } END { print (g != "" ? g : "N/A") }'
}
spach_parse_fps() {
    awk '/^Epoch: \[[0-9]+\]/ && /FPS: / {
        for (i = 1; i < NF; i++) if ($i == "FPS:") { sum += $(i + 1); n++ }
    } END { if (n) printf "%.2f\n", sum / n; else print "N/A" }'
}
# progress lines "Epoch: [N]  [i/S]  lr: ...  loss: X ..." -> every X, one a line (the loss of each logged step)
spach_parse_step_losses() {
    awk '/^Epoch: \[[0-9]+\]  +\[ *[0-9]+\/[0-9]+\]/ {
        for (i = 1; i < NF; i++) if ($i == "loss:") { print $(i + 1); break }
    }'
}
# "Max accuracy: A%" -> max A
spach_parse_max_accuracy() {
    awk '/Max accuracy: / {
        for (i = 1; i < NF; i++) if ($i == "accuracy:") { v = $(i + 1); sub(/%$/, "", v); v += 0; if (!n || v > max) max = v; n++ }
    } END { if (n) printf "%.2f\n", max; else print "N/A" }'
}
# "Accuracy of the network on the N test images: A%" -> last A
spach_parse_accuracy() {
    awk '/Accuracy of the network on the [0-9]+ test images: / {
        for (i = 1; i < NF; i++) if ($i == "images:") { v = $(i + 1); sub(/%$/, "", v); last = v + 0; n++ }
    } END { if (n) printf "%.2f\n", last; else print "N/A" }'
}
