# Shared helpers for the launch scripts (sourced, not run). Each script cds to the repo root first, so
# train.py, the config and relative paths after `--` are all read from there, on every node.
# shellcheck shell=bash

die() {
    echo "${0##*/}: error: $*" >&2
    exit 2
}

# need_value OPTION "$@": an option that takes a value must have one.
need_value() {
    [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"
}

need_positive_int() {  # NAME VALUE
    [[ "$2" =~ ^[0-9]+$ && "$2" -ge 1 ]] || die "$1 must be a positive integer, got '$2'"
}

need_port() {  # NAME VALUE
    [[ "$2" =~ ^[0-9]+$ && "$2" -ge 1 && "$2" -le 65535 ]] || die "$1 must be a port number (1-65535), got '$2'"
}

need_config() {  # PATH, relative to the repo root (the cwd by now)
    [[ -n "$1" ]] || die "no config: pass --config PATH (or set CONFIG)"
    [[ -f "$1" ]] || die "config file not found: $1 (relative paths are taken from the repo root, $PWD)"
    [[ -r "$1" ]] || die "config file not readable: $1"
}

# train.py gets the config from --config; a second --deepspeed after `--` would silently win.
need_no_deepspeed_arg() {
    local a
    for a in "$@"; do
        [[ "$a" != --deepspeed && "$a" != --deepspeed=* ]] ||
            die "pass the config with --config, not --deepspeed after '--'"
    done
}

# run_or_print CMD...: with DRY_RUN=1, print the command (shell-quoted, one line) and exit 0; else exec it.
run_or_print() {
    [[ "${DRY_RUN:-0}" =~ ^[01]$ ]] || die "DRY_RUN must be 0 or 1, got '$DRY_RUN'"
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        local line
        printf -v line '%q ' "$@"
        echo "${line% }"
        echo "(dry run: would run the line above in $PWD)" >&2
        exit 0
    fi
    exec "$@"
}
