# Sourced by CI's check scripts (test_container.sh, test_slurm.sh, test_two_hosts.sh) after they set
# CHECK_NAME: stage lines with their seconds, one FAILED line, and the Python to run.
script_start=$SECONDS
stage_start=$SECONDS

fail() { echo "$CHECK_NAME: FAILED: $*" >&2; exit 1; }
stage() { echo "== $* ($((SECONDS - script_start)) s so far)"; stage_start=$SECONDS; }
passed() { echo "ok: $* ($((SECONDS - stage_start)) s)"; stage_start=$SECONDS; }

# PYTHON (default python) as an absolute path, for processes that run elsewhere than this shell's
# working directory (a SLURM job, a network namespace); symlinks kept, since a venv's python is a
# symlink whose target lacks the venv's packages.
resolve_python() {
    local path
    PYTHON=${PYTHON:-python}
    path=$(command -v "$PYTHON") || fail "PYTHON=$PYTHON: not found"
    [[ $path == /* ]] || path="$(cd "$(dirname "$path")" && pwd)/$(basename "$path")"
    PYTHON=$path
}
