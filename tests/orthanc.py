"""A real Orthanc (Debian's ``orthanc`` and ``orthanc-dicomweb``) for tests and benches: a
plain process on 127.0.0.1 with authentication on, the DICOMweb plugin loaded, its storage in
a temp folder. ``crash_on(method, path)`` makes it die (SIGKILL) while it serves the next
matching request: a Lua filter holds that request and signals a watcher thread."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import requests

BINARY = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
USER, PASSWORD = "covidray", "orthanc-test-pw"
INSTALL_HINT = "Orthanc is not installed: run scripts/install_orthanc.sh (as root) or make test"

_LUA = """
seen = 0
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  local f = io.open("{trip}", "r")
  if f then
    local want_method = f:read("*l"); local want_path = f:read("*l")
    local nth = tonumber(f:read("*l")); f:close()
    if method == want_method and string.find(uri, want_path, 1, true) then
      seen = seen + 1
    end
    if method == want_method and string.find(uri, want_path, 1, true) and seen >= nth then
      seen = 0
      os.remove("{trip}")
      local g = io.open("{tripped}", "w"); g:write("x"); g:close()
      local t = os.time(); while os.time() - t < 10 do end
    end
  end
  return true
end
"""


def installed() -> bool:
    """Whether Orthanc and its DICOMweb plugin are here. In CI (``CI`` set) their absence is an
    error, not a skip: ``make test`` installs them (scripts/install_orthanc.sh)."""
    if os.path.exists(BINARY) and os.path.exists(PLUGIN):
        return True
    if os.environ.get("CI"):
        raise RuntimeError(
            "Orthanc is not installed although CI is set: see scripts/install_orthanc.sh"
        )
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """``start()``, ``stop()``, ``url`` (``dicomweb+http://127.0.0.1:PORT/dicom-web``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.trip, self.tripped = root / "trip", root / "tripped"
        (root / "filter.lua").write_text(_LUA.format(trip=self.trip, tripped=self.tripped))
        config = {
            "Name": "covidray-test",
            "StorageDirectory": str(root / "db"),
            "IndexDirectory": str(root / "db"),
            "HttpPort": self.port,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "Plugins": [PLUGIN],
            "LuaScripts": [str(root / "filter.lua")],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StableAge": 1,
        }
        (root / "orthanc.json").write_text(json.dumps(config))
        self.proc: subprocess.Popen | None = None
        self._watcher: threading.Thread | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"dicomweb+{self.http}/dicom-web"

    def start(self, timeout_s: float = 30.0) -> Orthanc:
        log = open(self.root / "orthanc.log", "ab")  # noqa: SIM115 (the process keeps it)
        self.proc = subprocess.Popen(
            [BINARY, str(self.root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}")
            try:
                r = requests.get(f"{self.http}/system", auth=(USER, PASSWORD), timeout=1)
                if r.ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("Orthanc did not start")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def crash_on(self, method: str, path_part: str, nth: int = 1) -> None:
        """Die (SIGKILL) while serving the ``nth`` ``method`` request from now whose path
        holds ``path_part``; :meth:`crashed` says when it did."""
        self.tripped.unlink(missing_ok=True)
        self.trip.write_text(f"{method}\n{path_part}\n{nth}\n")
        proc = self.proc

        def watch() -> None:
            while proc is not None and proc.poll() is None:
                if self.tripped.exists():
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return
                time.sleep(0.01)

        self._watcher = threading.Thread(target=watch, daemon=True)
        self._watcher.start()

    def crashed(self) -> bool:
        return self.tripped.exists() and (self.proc is None or self.proc.poll() is not None)

    def restart(self) -> None:
        self.trip.unlink(missing_ok=True)
        self.tripped.unlink(missing_ok=True)
        self.stop()
        self.start()

    def client(self):
        """A dicomweb-client for the test's own uploads and reads."""
        from dicomweb_client.api import DICOMwebClient

        s = requests.Session()
        s.auth = (USER, PASSWORD)
        return DICOMwebClient(f"{self.http}/dicom-web", session=s)
