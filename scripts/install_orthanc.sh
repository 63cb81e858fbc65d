#!/usr/bin/env bash
# The PACS tests' archive: Orthanc and its DICOMweb plugin from Debian's packages (tested with
# Debian 12's orthanc 1.10.1 and orthanc-dicomweb 1.7). Installs them when missing (apt, as
# root); otherwise says how, and the tests that need them skip.
set -euo pipefail
PACKAGES=(orthanc orthanc-dicomweb)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "Orthanc missing (${missing[*]}): run 'sudo apt-get install -y ${missing[*]}'" \
       "(or this script as root); the PACS tests skip without it" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "Orthanc missing (${missing[*]}) and no apt-get here; the PACS tests skip without it" >&2
  exit 0
fi
echo "installing ${missing[*]} (apt)"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
# Debian starts it as a service where systemd runs; the tests start their own on free ports.
if command -v systemctl >/dev/null && systemctl is-active --quiet orthanc 2>/dev/null; then
  systemctl stop orthanc || true
fi
