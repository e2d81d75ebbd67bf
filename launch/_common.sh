# Sourced by the launch scripts.

# The number of GPUs on this machine (1 when there is none).
gpu_count() {
    local count=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    [[ "$count" -ge 1 ]] || count=1
    echo "$count"
}

# Print the calling script's header comment and exit, when asked for help or given no CONFIG.
usage_unless_config() {
    local script=$1
    shift
    if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
        awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$script" >&2
        exit 2
    fi
}
