#!/usr/bin/env bash
# Install `mtpdist worker` as a launchd agent on this Mac.
# usage: deploy/macos/install-worker.sh [CLUSTER] [SHARE]   (the token is read from ~/.config/mtpdist/token)
# SHARE is the fraction of this Mac's RAM the worker offers (default 0.75; e.g. 0.5 on a Mac you also use).
set -euo pipefail
cluster=${1:-default}
share=${2:-0.75}
mtpdist=$(command -v mtpdist) || { echo "mtpdist is not on PATH (activate its venv first)"; exit 1; }
token_file="$HOME/.config/mtpdist/token"
if [ ! -s "$token_file" ]; then
  mkdir -p "$(dirname "$token_file")"
  echo "No cluster token yet. Paste the token shared by your cluster (or press Enter to make one):"
  read -r tok
  [ -n "$tok" ] || tok=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
  umask 077 && printf '%s\n' "$tok" > "$token_file"
  echo "token saved to $token_file: use the same token on every Mac of the cluster"
fi
log_dir="$HOME/Library/Logs/mtpdist"; mkdir -p "$log_dir"
plist="$HOME/Library/LaunchAgents/com.mtpdist.worker.plist"
here=$(cd "$(dirname "$0")" && pwd)
sed -e "s|@MTPDIST@|$mtpdist|" -e "s|@TOKEN_FILE@|$token_file|" -e "s|@CLUSTER@|$cluster|" -e "s|@SHARE@|$share|" \
    -e "s|@LOG_DIR@|$log_dir|" "$here/com.mtpdist.worker.plist" > "$plist"
launchctl bootout "gui/$(id -u)/com.mtpdist.worker" 2>/dev/null || true
launchctl bootstrap "gui/$(id -u)" "$plist"
echo "worker installed; logs in $log_dir/worker.log; check with: mtpdist status --workers 1 --token-file $token_file"
