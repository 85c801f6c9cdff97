#!/usr/bin/env bash
# Generates the man pages and shell completions the packages ship, from the
# built binaries, into OUT (default: packaging/build, ignored by git). cargo-deb's asset
# lists point there.
#
#   packaging/gen-assets.sh [--out DIR] [--sink-bin DIR] [--agent-bin DIR]
#
# `qlog man --dir` and `qlog completions SHELL` (hidden subcommands) give qlog's own
# pages and completions. qlogd and qlog-agent have no such subcommands, so their
# pages come from help2man over --help (plus packaging/man/*.h2m), and their
# completions are generic: bash's _longopt and zsh's _gnu_generic parse
# --help at completion time, and the fish file is generated here from --help.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
out=$here/build
sink_bin=$root/target/release
agent_bin=$root/target/release-agent
while [ $# -gt 0 ]; do
    case $1 in
        --out) out=$2; shift 2 ;;
        --sink-bin) sink_bin=$2; shift 2 ;;
        --agent-bin) agent_bin=$2; shift 2 ;;
        *) echo "gen-assets.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

qlogd=$sink_bin/qlogd
qlog=$sink_bin/qlog
agent=$agent_bin/qlog-agent
for bin in "$qlogd" "$qlog" "$agent"; do
    [ -x "$bin" ] || { echo "gen-assets.sh: $bin is missing: build it first" >&2; exit 1; }
done
command -v help2man >/dev/null ||
    { echo "gen-assets.sh: help2man is missing (apt-get install help2man)" >&2; exit 1; }

rm -rf "$out/man" "$out/completions"
mkdir -p "$out/man" "$out/completions/bash" "$out/completions/zsh" "$out/completions/fish"

# help2man BIN SECTION: a man page from --help, with the .h2m include file.
from_help() {
    local bin=$1 section=$2 name
    name=$(basename "$bin")
    help2man --no-info --section="$section" --include="$here/man/$name.h2m" \
        --output="$out/man/$name.$section" "$bin"
}

# fish_from_help BIN: one `complete` line per long option in --help.
fish_from_help() {
    local bin=$1 name
    name=$(basename "$bin")
    echo "# fish completions for $name, generated from its --help by packaging/gen-assets.sh"
    "$bin" --help | awk -v cmd="$name" '
        # "  -o, --option <VALUE>" then the description on the next line.
        pending != "" {
            desc = $0; sub(/^[ \t]+/, "", desc); gsub(/\047/, "", desc)
            printf "complete -c %s -l %s%s -d \047%s\047\n", cmd, pending, value, desc
            pending = ""
        }
        /^ +(-[A-Za-z], )?--[a-z0-9-]+/ {
            line = $0; sub(/^ +(-[A-Za-z], )?--/, "", line)
            split(line, parts, /[ =]/); pending = parts[1]
            value = (line ~ /</) ? " -r" : ""
        }'
}

# qlog: its own generators when it has them, help2man otherwise. Its pages (qlog.1 and
# one per subcommand, qlog-tail.1 and so on) get a directory of their own, so that the
# qlog-sink package can take them all with one glob and no other package's page.
mkdir -p "$out/man/qlog"
if "$qlog" man --dir "$out/man/qlog" 2>/dev/null; then
    echo "gen-assets.sh: $(ls "$out/man/qlog" | wc -l) qlog pages from 'qlog man --dir'"
else
    echo "gen-assets.sh: 'qlog man --dir' is not there; qlog.1 from help2man"
    from_help "$qlog" 1
    mv "$out/man/qlog.1" "$out/man/qlog/"
fi
if "$qlog" completions bash >"$out/completions/bash/qlog" 2>/dev/null; then
    "$qlog" completions zsh >"$out/completions/zsh/_qlog"
    "$qlog" completions fish >"$out/completions/fish/qlog.fish"
    echo "gen-assets.sh: qlog completions from 'qlog completions'"
else
    echo "gen-assets.sh: 'qlog completions' is not there; generic qlog completions"
    printf '# bash completion for qlog: long options from --help\ncomplete -F _longopt qlog\n' \
        >"$out/completions/bash/qlog"
    printf '#compdef qlog\n_gnu_generic\n' >"$out/completions/zsh/_qlog"
    fish_from_help "$qlog" >"$out/completions/fish/qlog.fish"
fi

# qlogd and qlog-agent.
from_help "$qlogd" 8
from_help "$agent" 1
for bin in "$qlogd" "$agent"; do
    name=$(basename "$bin")
    printf '# bash completion for %s: long options from --help\ncomplete -F _longopt %s\n' \
        "$name" "$name" >"$out/completions/bash/$name"
    printf '#compdef %s\n_gnu_generic\n' "$name" >"$out/completions/zsh/_$name"
    fish_from_help "$bin" >"$out/completions/fish/$name.fish"
done

# Debian wants man pages compressed, reproducibly.
gzip -9nf "$out"/man/*.[18] "$out"/man/qlog/*.1
echo "gen-assets.sh: wrote $(find "$out" -type f | wc -l) files under $out"
