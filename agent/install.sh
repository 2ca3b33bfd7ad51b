#!/bin/sh
# Hearth host agent installer, served by a Hearth server at /install.sh:
#
#   curl -fsSL https://SERVER/install.sh | sh -s -- ENROLLMENT_TOKEN
#
# It makes a virtualenv, installs hearth-agent into it (keeping a torch that is already
# there; otherwise the CUDA build when an NVIDIA GPU answers, else the CPU build), enrolls
# this machine, and installs a systemd user unit, or prints how to start the agent.
# Settings (environment): HEARTH_AGENT_VENV (default ~/.local/share/hearth-agent/venv),
# HEARTH_PYTHON (default python3, 3.11+), HEARTH_AGENT_NAME (default: hostname),
# HEARTH_SYSTEMD=0 (never touch systemd).
#
# Everything sits in main(), called on the last line: a download cut short runs nothing.
set -eu

HEARTH_SERVER="${HEARTH_SERVER:-@@HEARTH_SERVER@@}"
HEARTH_WHEEL="@@HEARTH_WHEEL@@"
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"

say() { printf 'hearth: %s\n' "$*"; }
die() {
    printf 'hearth: error: %s\n' "$*" >&2
    exit 1
}

# fetch URL DEST: the server's own message on an HTTP error, not just a status code.
fetch() {
    if command -v curl >/dev/null 2>&1; then
        code=$(curl -sS -L -o "$2" -w '%{http_code}' "$1" 2>"$tmp/fetch.err") ||
            die "cannot reach the Hearth server at $HEARTH_SERVER: $(cat "$tmp/fetch.err")"
    else
        code=$("$python" -c '
import shutil, sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=60) as r, open(sys.argv[2], "wb") as f:
        shutil.copyfileobj(r, f)
        print(r.status)
except urllib.error.HTTPError as e:
    open(sys.argv[2], "wb").write(e.read())
    print(e.code)
' "$1" "$2" 2>"$tmp/fetch.err" </dev/null
        ) || die "cannot reach the Hearth server at $HEARTH_SERVER: $(tail -n 1 "$tmp/fetch.err")"
    fi
    [ "$code" = 200 ] || die "$1 answered HTTP $code: $(head -c 500 "$2")"
}

main() {
    token="${1:-}"
    case "$HEARTH_SERVER" in
    @@*) die "download this script from your Hearth server: curl -fsSL https://SERVER/install.sh | sh -s -- TOKEN" ;;
    esac
    venv="${HEARTH_AGENT_VENV:-$HOME/.local/share/hearth-agent/venv}"
    python="${HEARTH_PYTHON:-python3}"
    config="${HEARTH_AGENT_HOME:-${XDG_CONFIG_HOME:-$HOME/.config}/hearth-agent}/config.json"

    if [ -z "$token" ] && [ ! -f "$config" ]; then
        die "no enrollment token given; get one on the host dashboard, then: curl -fsSL $HEARTH_SERVER/install.sh | sh -s -- TOKEN"
    fi

    command -v "$python" >/dev/null 2>&1 ||
        die "$python not found; install Python 3.11 or newer (Debian/Ubuntu: apt install python3 python3-venv) or set HEARTH_PYTHON"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' </dev/null ||
        die "hearth-agent needs Python 3.11 or newer; $python is $("$python" -V 2>&1); set HEARTH_PYTHON to a newer one"

    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    trap 'exit 130' INT TERM

    # The server is asked first, so an unreachable one fails before anything is installed.
    say "downloading $HEARTH_WHEEL from $HEARTH_SERVER"
    fetch "$HEARTH_SERVER/agent/$HEARTH_WHEEL" "$tmp/$HEARTH_WHEEL"

    if [ -x "$venv/bin/python" ]; then
        say "using the virtualenv at $venv"
    else
        say "creating a virtualenv at $venv"
        mkdir -p "$(dirname "$venv")"
        "$python" -m venv "$venv" </dev/null ||
            die "could not create a virtualenv at $venv (Debian/Ubuntu: apt install python3-venv)"
    fi
    py="$venv/bin/python"
    "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' </dev/null ||
        die "the virtualenv at $venv has $("$py" -V 2>&1); hearth-agent needs 3.11+ (remove it or set HEARTH_AGENT_VENV)"

    # stdin is this script when piped from curl: nothing below may read it.
    if torch_version=$("$py" -c 'import torch; print(torch.__version__)' </dev/null 2>/dev/null); then
        say "keeping torch $torch_version already installed in $venv"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L </dev/null >/dev/null 2>&1; then
        say "NVIDIA GPU found: installing torch with CUDA (several GB, this takes a while)"
        "$py" -m pip install -q torch </dev/null || die "installing torch failed (see pip's message above)"
    else
        say "no NVIDIA GPU found: installing the CPU build of torch"
        "$py" -m pip install -q torch --index-url "$TORCH_CPU_INDEX" </dev/null ||
            die "installing torch failed (see pip's message above)"
    fi

    say "installing hearth-agent and its dependencies"
    # pip keeps an installed torch that satisfies the agent's loose torch>=2.1.
    "$py" -m pip install -q --upgrade "$tmp/$HEARTH_WHEEL" </dev/null ||
        die "installing hearth-agent failed (see pip's message above)"
    agent="$venv/bin/hearth-agent"

    if [ -f "$config" ]; then
        say "this machine is already enrolled ($config); keeping that enrollment"
        [ -z "$token" ] || say "to replace it: $agent enroll --force --server $HEARTH_SERVER --token TOKEN"
    else
        set -- enroll --server "$HEARTH_SERVER" --token "$token"
        [ -z "${HEARTH_AGENT_NAME:-}" ] || set -- "$@" --name "$HEARTH_AGENT_NAME"
        "$agent" "$@" </dev/null ||
            die "enrollment failed (the server's answer is above); get a fresh token on the host dashboard and run this again"
    fi

    if [ "${HEARTH_SYSTEMD:-auto}" != 0 ] && command -v systemctl >/dev/null 2>&1 &&
        systemctl --user show-environment >/dev/null 2>&1 </dev/null; then
        unit_dir="${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user"
        fetch "$HEARTH_SERVER/agent/hearth-agent.service" "$tmp/hearth-agent.service"
        mkdir -p "$unit_dir"
        sed "s|@@VENV@@|$venv|g" "$tmp/hearth-agent.service" >"$unit_dir/hearth-agent.service"
        systemctl --user daemon-reload </dev/null
        systemctl --user enable hearth-agent.service </dev/null ||
            die "systemctl --user enable hearth-agent failed"
        # restart, not start: a re-install must replace an agent that is already running.
        systemctl --user restart hearth-agent.service </dev/null ||
            die "the agent did not start; see: journalctl --user -u hearth-agent"
        say "hearth-agent is running as a systemd user service ($unit_dir/hearth-agent.service)"
        say "logs: journalctl --user -u hearth-agent -f    status: $agent status"
        say "to keep it running while you are logged out: loginctl enable-linger $(id -un)"
    else
        say "systemd (user session) is not available here; start the agent with:"
        say "  $agent run"
        say "status: $agent status"
    fi
}

main "$@"
