# Sourced by the launch scripts: the number of GPUs on this machine (1 when there is none).
gpu_count() {
    local count=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    [[ "$count" -ge 1 ]] || count=1
    echo "$count"
}
