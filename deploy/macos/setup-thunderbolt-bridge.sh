#!/usr/bin/env bash
# Give this Mac a fixed address on the Thunderbolt Bridge and check the link to a peer.
# usage: sudo deploy/macos/setup-thunderbolt-bridge.sh N [PEER_N]
#   N: this Mac's number in the cluster (1..8) -> address 10.77.0.N/24
set -euo pipefail
n=${1:?usage: setup-thunderbolt-bridge.sh N [PEER_N]}
peer=${2:-}
service="Thunderbolt Bridge"
networksetup -listallnetworkservices | grep -qx "$service" || {
  echo "no '$service' network service: connect a Thunderbolt cable, then System Settings > Network"; exit 1; }
networksetup -setmanual "$service" "10.77.0.$n" 255.255.255.0
echo "this Mac: 10.77.0.$n on $service"
# Thunderbolt links carry no router: keep the default route on Wi-Fi/Ethernet.
networksetup -setadditionalroutes "$service" >/dev/null 2>&1 || true
fw=/usr/libexec/ApplicationFirewall/socketfilterfw
if [ "$($fw --getglobalstate | grep -c enabled)" -gt 0 ]; then
  py=$(python3 -c 'import sys; print(sys.executable)')
  $fw --add "$py" >/dev/null && $fw --unblockapp "$py" >/dev/null
  echo "firewall: allowed incoming connections for $py (gRPC port 50551, mDNS)"
fi
if [ -n "$peer" ]; then
  if ping -c 3 -t 3 "10.77.0.$peer" >/dev/null; then
    echo "link to 10.77.0.$peer: up ($(ping -c 5 -q 10.77.0.$peer | tail -1))"
  else
    echo "link to 10.77.0.$peer: no answer (is the peer set up, is the cable in a Thunderbolt port?)"; exit 1
  fi
fi
echo "run workers with: mtpdist worker --mdns-interface 10.77.0.$n --token-file ~/.config/mtpdist/token"
