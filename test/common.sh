# Shared body of the ModelZoo launcher scripts (sourced, not run).
#
# The caller sets: Network, MODE (full | performance | eval), RANK_SIZE_DEFAULT (1 or auto), EPOCHS_DEFAULT
# (empty: spach's default), then calls `spach_launch "$@"`.
# Options: --data_path=DIR (required), --nproc=N (processes on this node), --resume=CKPT (eval),
#   multi-node: --nnodes=N --node_rank=R --master_addr=HOST --master_port=PORT (or --rdzv_endpoint=HOST:PORT),
#   every other --flag=value (or --flag) goes to `spach train` unchanged (--model=, --batch_size=, --device=, ...).
# Environment: PYTHON (default python3), ASCEND_DEVICE_ID (output id, default 0), NO_NUMACTL=1 disables binding.

spach_launch() {
    local data_path="" nproc="" model="" batch_size=128 device="" epochs="${EPOCHS_DEFAULT}"
    local resume="" nnodes=1 node_rank=0 master_addr="" master_port="" rdzv_endpoint=""
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
            --node_rank) node_rank="${para#*=}" ;;
            --master_addr) master_addr="${para#*=}" ;;
            --master_port) master_port="${para#*=}" ;;
            --rdzv_endpoint) rdzv_endpoint="${para#*=}" ;;
            *) passthrough+=("${para}") ;;
        esac
    done
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
        # BatchSize x RankSize x 1000 / FPS, as their scripts compute it), ActualLoss (the last logged step's
        # loss; every logged step's loss goes to train_${CaseName}_loss.txt), TrainAccuracy (the best top-1 of
        # the run; full runs only, as theirs), E2ETrainingTime (seconds, launch to exit)
        local fps training_time actual_loss train_accuracy loss_file="${out_dir}/train_${CaseName}_loss.txt"
        fps="$(spach_parse_fps < "${log}")"
        training_time="N/A"
        [[ "${fps}" != "N/A" ]] && training_time="$(awk -v b="${BatchSize}" -v r="${RANK_SIZE}" -v f="${fps}" \
            'BEGIN { if (f > 0) printf "%.2f\n", b * r * 1000 / f; else print "N/A" }')"
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
    if (( rc != 0 )); then
        echo "[Error] spach exited with status ${rc}; last lines of ${log}:"
        tail -n 15 "${log}"
        return "${rc}"
    fi
    return 0
}

# The log parsers read values by key, never by column position.
# "Epoch: [N]  steps: S ... FPS: X" -> mean of X over epochs
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
