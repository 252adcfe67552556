# Shared set-up for scripts/test and scripts/demo (sourced, not run).
VENV="${GATEWAY_VENV:-.venv}"

apt_install() {
    [ "$#" -eq 0 ] && return 0
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    echo "installing with apt: $*" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

ensure_venv() {  # ensure_venv [extra]: a venv with the project installed (editable), plus an optional extra
    local extra="${1:-}"
    local stamp="$VENV/.installed${extra:+-$extra}"
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV" || { apt_install python3-venv && python3 -m venv "$VENV"; }
    fi
    local other
    if [ -z "$extra" ]; then  # the project with any extra (scripts/test installs [test]) is the project
        for other in "$VENV"/.installed*; do
            [ -f "$other" ] && [ ! pyproject.toml -nt "$other" ] && return 0
        done
    fi
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
        "$VENV/bin/python" -m pip install -q -e ".${extra:+[$extra]}"
        touch "$stamp"
    fi
}
