"""deploy/kubernetes/ as the kubelet runs it, simulated on this machine: the real receiver, started
with the Deployment's container args, under its security context, with only its outbox volume
writable.

A private mount namespace (``unshare --mount``) stands in for the container: the outbox volume is
a mount of its own, ``/`` is remounted read-only (``readOnlyRootFilesystem``: ``/var/tmp`` is not
writable), each ``emptyDir`` (``/tmp``) is a fresh tmpfs of its ``sizeLimit`` (where the test's
own interpreter lives under one, e.g. a venv in /tmp, that directory is put back on top,
read-only: a container's code is elsewhere), ``/dev/shm`` is a fresh tmpfs (a pod has its own), and
``setpriv`` drops to ``runAsUser``, the primary group (``runAsGroup``, else 0 as Kubernetes
does), ``fsGroup`` as the supplementary group, no capabilities (``drop: [ALL]``) and
``no_new_privs`` (``allowPrivilegeEscalation: false``). The mounts go away with the process.

The container paths (the config volume, the outbox volume) live under a scratch directory in
/var/tmp (pytest's tmp_path is not traversable for another uid): ``/var/lib/sms-receiver``
becomes ``<scratch>/var/lib/sms-receiver``, in the args, the env and the storage URL alike. The
outbox directory is what a PersistentVolume looks like after the kubelet applied ``fsGroup``:
owned by root, group ``fsGroup``, mode 2775.

The receiver's config is the ConfigMap's, with ``${VAR}``s from the example Secret (the
Deployment's ``envFrom``); only the listen address, Clickatell's URL (the fake) and the
groups/routes of the other tests are replaced.

The replicated overlay (deploy/kubernetes-replicated/) is rendered as kustomize does (checked
against ``kubectl kustomize`` where kubectl is installed), and two of its pods run the same way,
with nothing writable at all, on the test's PostgreSQL. The replicated compose file's receivers
are checked through the receiver's own config loader.

Needs root, ``unshare`` and ``setpriv`` (util-linux): skipped without them, except in CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml

from receiver.config import Config, parse_config
from receiver.config.model import split_listen
from receiver.models import AlertStatus, NewMessage, SmsText
from receiver.store.sqlite import SQLiteStore
from tests.conftest import Fake, eventually
from tests.helpers import BASE, fixture
from tests.tools import ROOT, free_port, need, until_ready

K8S = ROOT / "deploy" / "kubernetes"
CONTAINER = "sms-receiver"
# What the image (deploy/Dockerfile) adds to the container's environment: its ENV and the home
# directory of its user (the outbox volume).
IMAGE_ENV = {"PYTHONUNBUFFERED": "1"}
IMAGE_HOME = "/var/lib/sms-receiver"
# What an SQLite outbox is: the file, its WAL and shared-memory index, the lock of its owner.
OUTBOX_FILES = {"outbox.db", "outbox.db-wal", "outbox.db-shm", "outbox.db.lock"}


def load(name: str) -> dict[str, Any]:
    (doc,) = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return doc


def under(path: str, mount: str) -> bool:
    return PurePosixPath(path).is_relative_to(mount)


@dataclass(frozen=True)
class Manifest:
    """What the Deployment (and its ConfigMap and Secret) say about how the receiver runs."""

    pod: dict[str, Any]  # spec.template.spec
    container: dict[str, Any]
    volumes: dict[str, dict[str, Any]]  # by name
    mounts: dict[str, dict[str, Any]]  # the container's volumeMounts, by volume name
    config: dict[str, Any]  # the ConfigMap's config file, parsed
    secret: dict[str, str]  # the example Secret's stringData

    @classmethod
    def read(cls, rendered: dict[str, dict[str, Any]] | None = None) -> Manifest:
        """From deploy/kubernetes/'s files, or from a rendered kustomization (by kind)."""
        deployment = rendered["Deployment"] if rendered else load("deployment.yaml")
        pod = deployment["spec"]["template"]["spec"]
        (container,) = [c for c in pod["containers"] if c["name"] == CONTAINER]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        config_volume = volumes[cls._config_volume(mounts, volumes)]["configMap"]
        configmap = rendered["ConfigMap"] if rendered else load("configmap.yaml")
        assert configmap["metadata"]["name"] == config_volume["name"]
        key = PurePosixPath(cls._arg(container, "--config")).name
        config = yaml.safe_load(configmap["data"][key])
        secret = load("secret.example.yaml")["stringData"]
        return cls(pod, container, volumes, mounts, config, secret)

    @staticmethod
    def _config_volume(mounts: dict[str, Any], volumes: dict[str, Any]) -> str:
        (name,) = [n for n in mounts if "configMap" in volumes[n]]
        return name

    @staticmethod
    def _arg(container: dict[str, Any], flag: str) -> str:
        args = container["args"]
        return args[args.index(flag) + 1]

    def security(self, key: str, default: Any = None) -> Any:
        """A securityContext setting: the container's, else the pod's."""
        for context in (self.container.get("securityContext", {}), self.pod.get("securityContext", {})):
            if key in context:
                return context[key]
        return default

    @property
    def uid(self) -> int:
        return int(self.security("runAsUser"))

    @property
    def gid(self) -> int:
        return int(self.security("runAsGroup", 0))  # Kubernetes: 0 unless runAsGroup says

    @property
    def groups(self) -> list[int]:
        context = self.pod.get("securityContext", {})
        extra = [context["fsGroup"]] if "fsGroup" in context else []
        return sorted({int(g) for g in extra + list(context.get("supplementalGroups", []))})

    @property
    def config_path(self) -> str:
        return self._arg(self.container, "--config")

    @property
    def config_mount(self) -> str:
        return self.mounts[self._config_volume(self.mounts, self.volumes)]["mountPath"]

    @property
    def writable_mounts(self) -> list[dict[str, Any]]:
        return [m for m in self.mounts.values() if not m.get("readOnly")]

    def kind(self, mount: dict[str, Any]) -> str:
        """The kind of volume a mount is (``persistentVolumeClaim``, ``emptyDir``, ...)."""
        (kind,) = set(self.volumes[mount["name"]]) - {"name"}
        return kind

    @property
    def data_mount(self) -> str:
        """The outbox's volume: the writable mount that outlives the pod."""
        (mount,) = [mt for mt in self.writable_mounts if self.kind(mt) == "persistentVolumeClaim"]
        return mount["mountPath"]

    @property
    def has_data(self) -> bool:
        return any(self.kind(mt) == "persistentVolumeClaim" for mt in self.writable_mounts)

    @property
    def empty_dirs(self) -> dict[str, str]:
        """The emptyDir mounts: mountPath → tmpfs size (from sizeLimit, 16m if none)."""
        out = {}
        for mt in self.writable_mounts:
            if self.kind(mt) == "emptyDir":
                limit = str(self.volumes[mt["name"]]["emptyDir"].get("sizeLimit", "16Mi"))
                out[mt["mountPath"]] = limit.removesuffix("i").lower()
        return out

    @property
    def storage_path(self) -> str:
        url = self.config["storage"]
        assert url.startswith("sqlite:///"), url
        return url.removeprefix("sqlite://").split("?")[0]

    @property
    def env(self) -> dict[str, str]:
        """The container's environment: the image's, the Secret's (``envFrom``), its ``env``."""
        out = {**IMAGE_ENV, "HOME": IMAGE_HOME}
        for source in self.container.get("envFrom", []):
            assert "secretRef" in source, source  # the example Secret is the only source
            out.update(self.secret)
        out.update({e["name"]: str(e["value"]) for e in self.container.get("env", [])})
        return out


MANIFEST = Manifest.read()


def test_the_manifest_runs_the_receiver_locked_down():
    """What the simulation below relies on, and what it would hide if it changed."""
    m = MANIFEST
    assert m.pod["securityContext"]["runAsNonRoot"] is True
    assert m.uid != 0
    assert m.security("readOnlyRootFilesystem") is True
    assert m.security("allowPrivilegeEscalation") is False
    assert m.container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert m.container["args"][0] == "run"
    # two writable volumes: the outbox's persistent volume, and a small in-memory /tmp for
    # libraries that want one (the receiver itself needs none: tested below, it stays empty)
    assert sorted((mt["mountPath"], m.kind(mt)) for mt in m.writable_mounts) == sorted(
        [(m.data_mount, "persistentVolumeClaim"), ("/tmp", "emptyDir")])
    assert m.volumes[m.mounts["tmp"]["name"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Mi"}
    assert not [v for v in m.volumes.values() if "hostPath" in v]
    # the config the args name is the ConfigMap's, and the outbox is on the writable volume
    assert under(m.config_path, m.config_mount)
    assert under(m.storage_path, m.data_mount), (
        f"storage {m.storage_path} is not on the writable volume {m.data_mount}")
    # the volume's group is fsGroup, the only way a non-root uid may write it
    assert m.groups, "no fsGroup: a fresh PersistentVolume is root's, and the uid cannot write it"


# ---------------------------------------------------------------------------------------------
# The container, simulated

# Runs as root in the new mount namespace, then execs setpriv (its arguments follow the data
# directory, "" for a pod without one; the emptyDirs, "PATH=SIZE ..."; the directories to keep
# visible under them, "DIR=STASH ..."): the volume becomes a mount of its own, which stays
# writable when / turns read-only; each emptyDir a fresh tmpfs.
NAMESPACE = r"""
set -eu
data=$1; empties=$2; keeps=$3; shift 3
for k in $keeps; do
  mount --bind "${k%%=*}" "${k#*=}"; mount -o remount,bind,ro "${k#*=}"
done
[ -z "$data" ] || mount --bind "$data" "$data"
mount -o remount,bind,ro /
mount -t tmpfs -o nosuid,nodev,mode=1777,size=64m shm /dev/shm
for e in $empties; do
  mount -t tmpfs -o "nosuid,nodev,mode=1777,size=${e#*=}" emptydir "${e%%=*}"
done
for k in $keeps; do
  mkdir -p "${k%%=*}"; mount --bind "${k#*=}" "${k%%=*}"; mount -o remount,bind,ro "${k%%=*}"
done
cd /
exec "$@"
"""

PROBE = r"""
import errno, json, os, sys, tempfile
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
out = {"uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()), "cwd": os.getcwd(),
       "cap_eff": int(status["CapEff"], 16), "cap_bnd": int(status["CapBnd"], 16),
       "no_new_privs": int(status["NoNewPrivs"]), "writable": {}}
for d in sys.argv[1:]:
    try:
        fd, name = tempfile.mkstemp(dir=d)
    except OSError as exc:
        out["writable"][d] = errno.errorcode[exc.errno]
    else:
        os.close(fd)
        os.unlink(name)
        out["writable"][d] = "yes"
import receiver.cli, aiohttp  # this uid can read the code and the venv
print(json.dumps(out))
"""


class Pod:
    """The container's view of the machine, under ``scratch``; see the module docstring."""

    def __init__(self, m: Manifest, scratch: Path, unshare: str, setpriv: str) -> None:
        self.m, self.scratch = m, scratch
        self.unshare, self.setpriv = unshare, setpriv
        self.data = self.host(m.data_mount) if m.has_data else None  # None: no outbox volume
        self.config = self.host(m.config_path)
        self.proc: subprocess.Popen[bytes] | None = None

    def host(self, path: str) -> Path:
        """Where a container path under one of its volumes is on this machine."""
        assert any(under(path, mount["mountPath"]) for mount in self.m.mounts.values()), path
        return self.scratch / path.lstrip("/")

    def _relocated(self, value: str) -> str:
        mounts = [mount["mountPath"] for mount in self.m.mounts.values()
                  if mount["mountPath"] not in self.m.empty_dirs]  # those are the pod's own tmpfs
        return str(self.host(value)) if any(under(value, p) for p in mounts) else value

    def prepare(self, config: dict[str, Any], secrets: dict[str, str] | None = None) -> None:
        """The volumes as the kubelet hands them over: the ConfigMap's file and the Secrets'
        (``secrets``: content by container path) read-only for all, the outbox volume, if any,
        root's with the group ``fsGroup`` (mode 2775)."""
        files = {self.config: yaml.safe_dump(config),
                 **{self.host(path): content for path, content in (secrets or {}).items()}}
        for file, content in files.items():
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(content)
            file.chmod(0o644)
        if self.data is not None:
            self.data.mkdir(parents=True)
            self.fs_group()
        for d in {d for f in [*files, *filter(None, [self.data])] for d in f.parents} | {self.scratch}:
            if d.is_relative_to(self.scratch):
                d.chmod(0o755)

    def fs_group(self) -> None:
        """What the kubelet does to a volume for ``fsGroup``: group-owned, group-writable,
        setgid directories."""
        (group, *_) = self.m.groups
        for path in [self.data, *self.data.rglob("*")]:
            os.chown(path, 0 if path == self.data else -1, group)
            mode = stat.S_IMODE(path.stat().st_mode) | 0o060
            path.chmod(mode | 0o2010 if path.is_dir() else mode)

    def env(self) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                **{k: self._relocated(v) for k, v in self.m.env.items()}}

    def keeps(self) -> dict[str, Path]:
        """The test interpreter's directories under an emptyDir's mountPath (a venv in /tmp, say),
        and where each is set aside while the tmpfs is mounted."""
        needed = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).resolve().parent, ROOT}
        out = {}
        for i, d in enumerate(sorted(needed)):
            if any(d.is_relative_to(e) for e in self.m.empty_dirs):
                assert " " not in str(d), d
                stash = self.scratch / ".keep" / str(i)
                stash.mkdir(parents=True, exist_ok=True)
                out[str(d)] = stash
        return out

    def command(self, argv: list[str]) -> list[str]:
        groups = ",".join(map(str, self.m.groups))
        empties = " ".join(f"{path}={size}" for path, size in self.m.empty_dirs.items())
        keeps = " ".join(f"{d}={stash}" for d, stash in self.keeps().items())
        return [self.unshare, "--mount", "--propagation", "private", "--",
                "sh", "-c", NAMESPACE, "pod", str(self.data or ""), empties, keeps,
                self.setpriv, f"--reuid={self.m.uid}", f"--regid={self.m.gid}",
                f"--groups={groups}" if groups else "--clear-groups",
                "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs", "--", *argv]

    def receiver_argv(self) -> list[str]:
        """The image's entrypoint (``sms-receiver``) with the Deployment's args."""
        return [sys.executable, "-m", "receiver", *map(self._relocated, self.m.container["args"])]

    def run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(argv), env=self.env(), capture_output=True, text=True,
                              timeout=30, start_new_session=True, check=False)

    def spawn(self, log: Path) -> subprocess.Popen[bytes]:
        # unshare, sh and setpriv each exec the next: this pid is the receiver's
        with log.open("ab") as out:
            self.proc = subprocess.Popen(self.command(self.receiver_argv()), env=self.env(),
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return self.proc

    def stop(self) -> int | None:
        """SIGTERM to its process group, SIGKILL after 10 s; its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        return self.proc.returncode


@contextlib.contextmanager
def simulated(m: Manifest) -> Iterator[Pod]:
    unshare, setpriv = need("unshare"), need("setpriv")
    tried = subprocess.run([unshare, "--mount", "--propagation", "private", "true"],
                           capture_output=True, text=True, timeout=30, check=False)
    if os.geteuid() != 0 or tried.returncode != 0:
        why = f"needs root allowed to unshare --mount (euid {os.geteuid()}: {tried.stderr.strip()})"
        if os.environ.get("CI"):
            pytest.fail(f"tests/test_deploy.py {why}; CI runs as root")
        pytest.skip(why)
    scratch = Path(tempfile.mkdtemp(prefix="sms-receiver-pod-", dir="/var/tmp"))
    p = Pod(m, scratch, unshare, setpriv)
    try:
        yield p
    finally:
        p.stop()
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture
def pod() -> Iterator[Pod]:
    with simulated(MANIFEST) as p:
        yield p


def pod_config(pod: Pod, fake: Fake, port: int) -> dict[str, Any]:
    """The ConfigMap's config, sending to the fake and paging the groups of the other tests."""
    cfg = dict(pod.m.config)
    cfg["listen"] = f"127.0.0.1:{port}"
    if isinstance(cfg["storage"], str):  # SQLite, on the volume; a database is the test's to give
        cfg["storage"] = f"sqlite://{pod.host(pod.m.storage_path)}"
    cfg["clickatell"] = {**cfg["clickatell"], "base_url": fake.url, "timeout": "2s"}
    cfg.update({k: BASE[k] for k in ("groups", "routes", "default_groups", "paging")})
    return cfg


async def started(pod: Pod, http: aiohttp.ClientSession, url: str, log: Path) -> subprocess.Popen[bytes]:
    proc = pod.spawn(log)
    await until_ready(http, url, proc=proc, log=log,
                      path=pod.m.container["readinessProbe"]["httpGet"]["path"])
    return proc


def written_to_tmp(pod: Pod, pid: int) -> list[str]:
    """What the process wrote to its emptyDir /tmp (but the directories the test put back)."""
    kept = {PurePosixPath(d).relative_to("/tmp").parts[0] for d in pod.keeps() if under(d, "/tmp")}
    return sorted(set(os.listdir(f"/proc/{pid}/root/tmp")) - kept)


def records(log: Path) -> list[dict[str, Any]]:
    """The receiver's log (``log_format: json`` in the ConfigMap), one record a line."""
    return [json.loads(line) for line in log.read_text(errors="replace").splitlines()
            if line.startswith("{")]


def test_the_simulated_container_can_write_its_volume_and_nothing_else(pod: Pod, fake: Fake):
    pod.prepare(pod_config(pod, fake, free_port()))
    places = {"/tmp": "/tmp", "/var/tmp": "/var/tmp", "/": "/", "config": str(pod.config.parent),
              "data": str(pod.data), "/dev/shm": "/dev/shm"}
    done = pod.run([sys.executable, "-c", PROBE, *places.values()])
    assert done.returncode == 0, (
        f"as uid {MANIFEST.uid} (the checkout and {sys.prefix} must be readable by all):\n{done.stderr}")
    seen = json.loads(done.stdout)
    assert (seen["uid"], seen["gid"], seen["groups"]) == (MANIFEST.uid, MANIFEST.gid, MANIFEST.groups)
    assert (seen["cap_eff"], seen["cap_bnd"], seen["no_new_privs"]) == (0, 0, 1)
    writable = {name: seen["writable"][path] for name, path in places.items()}
    assert writable == {"/tmp": "yes", "/var/tmp": "EROFS", "/": "EROFS", "config": "EROFS",
                        "data": "yes", "/dev/shm": "yes"}
    assert list(pod.data.iterdir()) == []


async def test_the_receiver_starts_and_pages_with_only_its_volume_writable(
        pod: Pod, fake: Fake, http: aiohttp.ClientSession, tmp_path: Path):
    port = free_port()
    url, log = f"http://127.0.0.1:{port}", tmp_path / "receiver.log"
    pod.prepare(pod_config(pod, fake, port))
    proc = await started(pod, http, url, log)
    async with http.get(f"{url}{MANIFEST.container['livenessProbe']['httpGet']['path']}") as r:
        assert r.status == 200

    token = MANIFEST.secret["WEBHOOK_TOKEN"]  # the ConfigMap's webhook_auth, expanded
    async with http.post(f"{url}/webhook/alertmanager", data=fixture("alertmanager-0.25-firing.json"),
                         headers={"Authorization": f"Bearer {token}",
                                  "Content-Type": "application/json"}) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["status"] == "accepted"

    async def paged() -> bool:
        return bool(await fake.messages(http))

    await eventually(paged, timeout=10)
    (sms,) = await fake.messages(http)  # group "web": one member
    assert sms["to"] == "14155550123"
    assert "HighLatency" in sms["content"]

    # what it wrote: its outbox, on the volume (the root is read-only; /dev/shm is the pod's own)
    assert {p.name for p in pod.data.iterdir()} <= OUTBOX_FILES
    assert {"outbox.db", "outbox.db.lock"} <= {p.name for p in pod.data.iterdir()}
    assert os.listdir(f"/proc/{proc.pid}/root/dev/shm") == []
    assert written_to_tmp(pod, proc.pid) == []  # the emptyDir /tmp is spare: it needs none
    assert {p.relative_to(pod.scratch) for p in pod.scratch.rglob("*") if p.is_file()
            and not p.is_relative_to(pod.data)} == {pod.config.relative_to(pod.scratch)}
    assert not [r for r in records(log) if r["level"] in ("error", "critical")], log.read_text()

    assert pod.stop() == 0  # SIGTERM: a clean shutdown, its last checkpoint included
    assert {p.name for p in pod.data.iterdir()} <= OUTBOX_FILES


def finished_message(i: int) -> NewMessage:
    """A message that is finished as soon as it is stored (its delivery suppressed)."""
    return NewMessage(id=f"{i:016x}00", group_id="web", level="critical", status=AlertStatus.FIRING,
                      sms=SmsText("old page", "GSM-7", 1), recipients=("+14155550123",),
                      source="alertmanager", alert_count=1, suppressed=True)


async def test_the_receiver_prunes_past_retention_with_only_its_volume_writable(
        pod: Pod, fake: Fake, http: aiohttp.ClientSession, tmp_path: Path):
    """A retention pass deletes up to 10,000 messages in one transaction: SQLite spills its
    statement journal to a temporary file, which must have somewhere to go."""
    port = free_port()
    url, log = f"http://127.0.0.1:{port}", tmp_path / "receiver.log"
    pod.prepare(pod_config(pod, fake, port))
    store = SQLiteStore(str(pod.host(MANIFEST.storage_path)))  # a week's pages, long past retention
    await store.open()
    try:
        await store.accept([finished_message(i) for i in range(2000)], 1000.0)
    finally:
        await store.close()
    pod.fs_group()  # what the kubelet does to the volume at every mount

    proc = await started(pod, http, url, log)  # and it prunes at once

    async def pruned() -> bool:
        assert proc.poll() is None, f"the receiver exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        return any(r["msg"].startswith("pruned ") for r in records(log))

    await eventually(pruned, timeout=20)
    admin = {"Authorization": f"Bearer {MANIFEST.secret['ADMIN_TOKEN']}"}
    async with http.get(f"{url}/api/v1/messages", headers=admin) as r:
        assert r.status == 200
        assert (await r.json())["messages"] == []
    async with http.get(f"{url}/-/ready") as r:
        assert r.status == 200
    assert {p.name for p in pod.data.iterdir()} <= OUTBOX_FILES
    assert pod.stop() == 0


# ---------------------------------------------------------------------------------------------
# Several replicas on PostgreSQL: deploy/kubernetes-replicated/ (a kustomize overlay of
# deploy/kubernetes/; kustomize refuses an overlay inside its base's directory) and
# deploy/compose/docker-compose.replicated.yml. Nothing here runs a container: the manifests are
# rendered as kustomize does and the receivers' configs are read by the receiver's own loader.

REPLICATED = ROOT / "deploy" / "kubernetes-replicated"
COMPOSE = ROOT / "deploy" / "compose"
# The pod's lists that merge item by item (Kubernetes' patchMergeKey; a Service's ports, say,
# merge by another key: add it here if an overlay ever patches them); any other list is
# replaced whole by a patch.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name",
              "volumeMounts": "mountPath", "env": "name", "topologySpreadConstraints": "topologyKey"}


def merge(base: Any, patch: Any, key: str = "") -> Any:
    """A strategic merge patch, as much of one as these manifests use: maps merge, ``null``
    deletes a key, lists in MERGE_KEYS merge by their key (``$patch: delete`` removes an item,
    which must be there: a patch that no longer matches the base fails here, where kustomize
    would let it pass), other lists and scalars are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = merge(base[k], v, k) if k in base else v
        return out
    merge_key = MERGE_KEYS.get(key)
    if isinstance(base, list) and isinstance(patch, list) and merge_key:
        out, added = list(base), []
        for item in patch:
            found = [i for i, b in enumerate(out) if b.get(merge_key) == item[merge_key]]
            if item.get("$patch") == "delete":
                assert found, f"{key}: the patch deletes {merge_key}={item[merge_key]!r}, which the base lacks"
                del out[found[0]]
            elif found:
                out[found[0]] = merge(out[found[0]], item, key)
            else:
                added.append(item)
        return added + out  # kustomize's order: what a patch adds comes first
    return patch


def kustomize(directory: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """What ``kubectl kustomize DIRECTORY`` renders, by (kind, name), for the part of kustomize
    these kustomizations use: resources (files, or directories with a kustomization) and patch
    files (strategic merge; ``$patch: delete`` at the top removes the resource)."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    # bases and patchesStrategicMerge: kustomize v2's names (Debian's kubectl 1.20) for the same
    known = {"resources", "patches", "bases", "patchesStrategicMerge"}
    assert set(spec) <= known, f"{directory}: the simulation knows only {sorted(known)}"
    patches = spec.get("patches", []) + [{"path": f} for f in spec.get("patchesStrategicMerge", [])]
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in spec.get("resources", []) + spec.get("bases", []):
        path = directory / entry
        docs = (list(kustomize(path).values()) if path.is_dir()
                else [d for d in yaml.safe_load_all(path.read_text()) if d])
        for doc in docs:
            ident = (doc["kind"], doc["metadata"]["name"])
            assert ident not in out, f"{ident} twice"
            out[ident] = doc
    for entry in patches:
        assert set(entry) == {"path"}, f"{entry}: the simulation knows only patch files, without target"
        (patch,) = [d for d in yaml.safe_load_all((directory / entry["path"]).read_text()) if d]
        ident = (patch["kind"], patch["metadata"]["name"])
        assert ident in out, f"{entry['path']} patches {ident}, which the resources lack"
        if patch.get("$patch") == "delete":
            del out[ident]
        else:
            out[ident] = merge(out[ident], patch)
    return out


def by_kind(rendered: dict[tuple[str, str], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = [kind for kind, _ in rendered]
    assert len(kinds) == len(set(kinds)), f"one resource of each kind expected: {sorted(rendered)}"
    return {kind: doc for (kind, _), doc in rendered.items()}


def canonical(node: Any, key: str = "") -> Any:
    """``node`` with merge-keyed lists in a fixed order: their order means nothing."""
    if isinstance(node, dict):
        return {k: canonical(v, k) for k, v in node.items()}
    if isinstance(node, list):
        items = [canonical(v, key) for v in node]
        merge_key = MERGE_KEYS.get(key)
        return sorted(items, key=lambda i: str(i[merge_key])) if merge_key else items
    return node


RENDERED = kustomize(REPLICATED)
REPLICA = Manifest.read(by_kind(RENDERED))
POSTGRES_SECRET = yaml.safe_load((REPLICATED / "secret-postgres.example.yaml").read_text())


def test_kubectl_kustomize_renders_the_base_and_the_replicated_overlay_as_simulated():
    """The simulation above, checked against the real kustomize (kubectl: .ci/run installs
    Debian's kubernetes-client)."""
    kubectl = need("kubectl", "kubernetes-client")
    for directory in (K8S, REPLICATED):
        r = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True,
                           timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        real = {(d["kind"], d["metadata"]["name"]): canonical(d) for d in yaml.safe_load_all(r.stdout) if d}
        assert real == {k: canonical(v) for k, v in kustomize(directory).items()}, directory


def test_the_replicated_overlay_runs_several_replicas_with_nothing_of_their_own():
    m = REPLICA
    assert RENDERED[("Deployment", "sms-receiver")]["spec"]["replicas"] >= 2
    # Recreate would stop every replica at once on each rollout
    assert RENDERED[("Deployment", "sms-receiver")]["spec"]["strategy"]["type"] == "RollingUpdate"
    # no outbox on a volume: no claim, no writable volume, nothing mounted at the image's home
    assert "PersistentVolumeClaim" not in {kind for kind, _ in RENDERED}
    assert not [v for v in m.volumes.values() if {"persistentVolumeClaim", "hostPath"} & set(v)]
    assert [mt["mountPath"] for mt in m.writable_mounts] == list(m.empty_dirs) == ["/tmp"]
    assert not [mount for mount in m.mounts.values() if under(IMAGE_HOME, mount["mountPath"])]
    # as locked down as the base
    assert m.security("readOnlyRootFilesystem") is True
    assert m.security("allowPrivilegeEscalation") is False
    assert m.pod["securityContext"]["runAsNonRoot"] is True
    assert m.container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # a drain takes one replica at a time, never the last
    pdb = RENDERED[("PodDisruptionBudget", "sms-receiver")]["spec"]
    assert pdb["minAvailable"] == 1 and "maxUnavailable" not in pdb
    # everything else of the base is there, unchanged
    base = kustomize(K8S)
    assert set(RENDERED) == set(base) - {("PersistentVolumeClaim", "sms-receiver-outbox")}
    for ident in set(RENDERED) - {("Deployment", "sms-receiver"), ("ConfigMap", "sms-receiver"),
                                  ("PodDisruptionBudget", "sms-receiver")}:
        assert RENDERED[ident] == base[ident], ident


def test_the_replicated_config_is_postgresql_with_the_password_from_a_secret(tmp_path: Path):
    raw = REPLICA.config
    storage = raw["storage"]
    # the password is in no ConfigMap: not in the URL, not beside it
    assert set(storage) == {"url", "password_file"}, storage
    url = urlsplit(storage["url"])
    assert url.scheme == "postgresql" and url.password is None, storage["url"]
    assert "PGPASSWORD" not in RENDERED[("ConfigMap", "sms-receiver")]["data"][PurePosixPath(REPLICA.config_path).name]
    # password_file is the key of the example Secret, mounted whole (no items) read-only
    file = PurePosixPath(storage["password_file"])
    (mount,) = [mt for mt in REPLICA.mounts.values() if mt["mountPath"] == str(file.parent)]
    assert mount.get("readOnly") is True
    secret = REPLICA.volumes[mount["name"]]["secret"]
    assert secret["secretName"] == POSTGRES_SECRET["metadata"]["name"] and "items" not in secret
    assert file.name in POSTGRES_SECRET["stringData"]
    # the rest is the base's config: one ConfigMap's worth of settings, kept apart only by storage
    assert {k: v for k, v in raw.items() if k not in ("storage", "dispatch")} == \
        {k: v for k, v in MANIFEST.config.items() if k not in ("storage", "dispatch")}

    # and the receiver's own loader takes it, with the Secrets' values where the pod has them
    password = tmp_path / file.name
    password.write_text(POSTGRES_SECRET["stringData"][file.name] + "\n")
    cfg = parse_config(yaml.safe_dump({**raw, "storage": {**storage, "password_file": str(password)}}),
                       env=REPLICA.env, base_dir=tmp_path)
    assert cfg.storage.kind == "postgresql"
    assert cfg.storage.password == POSTGRES_SECRET["stringData"][file.name]
    # a claim whose sends are still going is never taken over by the other replica
    assert cfg.dispatch.lease > cfg.clickatell.timeout


def compose(name: str) -> dict[str, Any]:
    return yaml.safe_load((COMPOSE / name).read_text())


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """A compose service's bind mounts, container path → the file on this machine."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):  # a named volume otherwise
            out[target] = COMPOSE / source
    return out


def image_cmd() -> list[str]:
    (line,) = [x for x in (ROOT / "deploy" / "Dockerfile").read_text().splitlines() if x.startswith("CMD ")]
    return json.loads(line.removeprefix("CMD "))


def compose_receiver_config(service: dict[str, Any]) -> Config:
    """The receiver's config as the service's container reads it: the file mounted where the
    image's CMD looks, its password_file the one mounted there, its environment the service's."""
    mounts = bind_mounts(service)
    args = service.get("command") or image_cmd()
    config = mounts[args[args.index("--config") + 1]]
    raw = with_files_at(yaml.safe_load(config.read_text()), mounts)
    return parse_config(yaml.safe_dump(raw), env=service.get("environment", {}), base_dir=config.parent)


def with_files_at(node: Any, files: dict[str, Path]) -> Any:
    """A config with every ``*_file`` (an absolute path in the container) pointing at where that
    file is on this machine (``files``: container path → file); one not there is an error."""
    if isinstance(node, list):
        return [with_files_at(v, files) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if isinstance(key, str) and key.endswith("_file"):
            assert value in files, f"{key}: {value} is not mounted"
            out[key] = str(files[value])
        else:
            out[key] = with_files_at(value, files)
    return out


def test_the_replicated_compose_file_runs_two_receivers_on_postgres():
    services = compose("docker-compose.replicated.yml")["services"]
    single = compose("docker-compose.yml")["services"]
    receivers = {n: s for n, s in services.items() if s.get("build") == single["sms-receiver"]["build"]
                 and "command" not in s}  # the fake Clickatell is the same image with a command
    assert len(receivers) >= 2, sorted(services)

    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:")
    assert "pg_isready" in postgres["healthcheck"]["test"]
    env = postgres["environment"]
    server_password = bind_mounts(postgres)[env["POSTGRES_PASSWORD_FILE"]].read_text().strip()

    for name, service in receivers.items():
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy", name
        assert not [t for t in bind_mounts(service) if under(t, IMAGE_HOME)], name
        assert not [v for v in service.get("volumes", []) if v.split(":")[1] == IMAGE_HOME], name
        cfg = compose_receiver_config(service)
        assert cfg.storage.kind == "postgresql", name
        url = urlsplit(cfg.storage.url)
        assert url.password is None, name  # it comes from the file
        assert (url.hostname, url.username, url.path) == ("postgres", env["POSTGRES_USER"], f"/{env['POSTGRES_DB']}")
        assert cfg.storage.password == server_password, name

    # Alertmanager sends each notification to every receiver, with a token they accept
    alertmanager = services["alertmanager"]
    am_mounts = bind_mounts(alertmanager)
    (flag,) = [a for a in alertmanager["command"] if a.startswith("--config.file=")]
    am = yaml.safe_load(am_mounts[flag.partition("=")[2]].read_text())
    (sms,) = [r for r in am["receivers"] if r.get("webhook_configs")]
    hooks = sms["webhook_configs"]
    ports = {n: split_listen(compose_receiver_config(s).listen)[1] for n, s in receivers.items()}
    assert sorted(h["url"] for h in hooks) == sorted(
        f"http://{n}:{port}/webhook/alertmanager" for n, port in ports.items())
    for hook in hooks:
        token = am_mounts[hook["http_config"]["authorization"]["credentials_file"]].read_text().strip()
        for name, service in receivers.items():
            tokens = compose_receiver_config(service).webhook_auth.bearer_tokens
            assert token in [getattr(t, "get_secret_value", lambda t=t: t)() for t in tokens], name
    # the fake's delivery reports reach a receiver (any one: the outbox is shared)
    callback = services["fake-clickatell"]["command"]
    assert urlsplit(callback[callback.index("--status-callback") + 1]).hostname in receivers


def test_amtool_checks_the_replicated_alertmanager_config():
    amtool = need("amtool")
    r = subprocess.run([amtool, "check-config", str(COMPOSE / "alertmanager.replicated.yml")],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture
def replica_pods() -> Iterator[list[Pod]]:
    with simulated(REPLICA) as a, simulated(REPLICA) as b:
        yield [a, b]


async def test_two_replicated_pods_page_once_with_nothing_writable(
        replica_pods: list[Pod], fake: Fake, http: aiohttp.ClientSession, tmp_path: Path, pg_url: str):
    """The overlay's pods as the kubelet would run them (no volume but the ConfigMap's and the
    Secret's, the root read-only: nothing writable at all) on one database, the test's: an
    Alertmanager HA pair's notification, sent to both, pages once."""
    storage = REPLICA.config["storage"]
    password = POSTGRES_SECRET["stringData"][PurePosixPath(storage["password_file"]).name]
    urls, logs = [], []
    for i, p in enumerate(replica_pods):
        port = free_port()
        cfg = {**pod_config(p, fake, port),
               "storage": {**storage, "url": pg_url, "password_file": str(p.host(storage["password_file"]))}}
        p.prepare(cfg, {storage["password_file"]: password})
        urls.append(f"http://127.0.0.1:{port}")
        logs.append(tmp_path / f"receiver-{i}.log")
    for p, url, log in zip(replica_pods, urls, logs):
        await started(p, http, url, log)

    token = REPLICA.secret["WEBHOOK_TOKEN"]
    body = fixture("alertmanager-0.25-firing.json")

    async def post(url: str) -> str:
        async with http.post(f"{url}/webhook/alertmanager", data=body,
                             headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"}) as r:
            assert r.status == 200, await r.text()
            return (await r.json())["status"]

    assert sorted(await asyncio.gather(*map(post, urls))) == ["accepted", "duplicate"]

    admin = {"Authorization": f"Bearer {REPLICA.secret['ADMIN_TOKEN']}"}

    async def sent() -> bool:  # either replica sees the shared outbox
        async with http.get(f"{urls[1]}/api/v1/messages", headers=admin) as r:
            return [m["state"] for m in (await r.json())["messages"]] == ["sent"]

    await eventually(sent, timeout=15)
    (sms,) = await fake.messages(http)
    assert sms["to"] == "14155550123"

    for p, log in zip(replica_pods, logs):
        # nothing written but what the kubelet put there
        assert {f.relative_to(p.scratch) for f in p.scratch.rglob("*") if f.is_file()} == {
            p.config.relative_to(p.scratch), p.host(storage["password_file"]).relative_to(p.scratch)}
        assert p.proc is not None and os.listdir(f"/proc/{p.proc.pid}/root/dev/shm") == []
        assert written_to_tmp(p, p.proc.pid) == []
        assert not [r for r in records(log) if r["level"] in ("error", "critical")], log.read_text()
        assert p.stop() == 0


# ---------------------------------------------------------------------------------------------
# Every deploy file as its tool sees it: kubernetes-validate on what kustomize renders, the
# image's Dockerfile and entrypoint, the compose files, the systemd unit, and every receiver
# config under deploy/ through `check-config` with the secrets its deployment gives it.

CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}  # the Prometheus operator's: no schema to check


@pytest.mark.parametrize("directory", [K8S, REPLICATED], ids=["base", "replicated"])
def test_kustomize_output_passes_kubernetes_validate(directory: Path, tmp_path: Path):
    kubectl = need("kubectl", "kubernetes-client")
    validate = shutil.which("kubernetes-validate", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if not validate:
        if os.environ.get("CI"):
            pytest.fail("kubernetes-validate is required in CI (pip install -e '.[test]')")
        pytest.skip("kubernetes-validate is not installed (pip install -e '.[test]')")
    r = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(r.stdout)
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    v = subprocess.run([validate, "--strict", str(rendered)], capture_output=True, text=True, timeout=120, check=False)
    out = v.stdout + v.stderr
    assert v.returncode == 0, out
    for doc in docs:
        name = f"{doc['kind'].lower()}/{doc['metadata']['name']}"
        if doc["kind"] in CRD_KINDS:
            assert f"Couldn't find schema for kind {doc['kind']}" in out, out
        else:
            assert f"passed for resource {name}" in out, out


def test_the_image_bakes_no_config():
    """Run with only a key, an image with the example config would page its numbers."""
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    lines = [ln.strip() for ln in dockerfile.splitlines() if ln.strip() and not ln.startswith("#")]
    copies = [ln.split()[1:] for ln in lines if ln.startswith("COPY ")]
    for args in copies:
        sources = [a for a in args[:-1] if not a.startswith("--")]
        assert not [a for a in sources if a.endswith((".yaml", ".yml"))], f"a config baked in: {args}"
        if not any(a.startswith("--from=") for a in args):
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: no such file in the build context"
    assert "/etc/sms-receiver" in dockerfile.split("VOLUME", 1)[1].splitlines()[0], "config dir is a volume"
    (entry,) = [ln for ln in lines if ln.startswith("ENTRYPOINT ")]
    (script,) = json.loads(entry.removeprefix("ENTRYPOINT "))
    assert [a for a in copies if a[-1] == f"/usr/local/bin/{script}"] == [["deploy/docker-entrypoint.sh", f"/usr/local/bin/{script}"]]
    assert f"chmod 755 /usr/local/bin/{script}" in dockerfile


def entrypoint(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The image's entrypoint script, with a stand-in ``sms-receiver`` that prints its args."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "sms-receiver"
    stub.write_text('#!/bin/sh\necho "sms-receiver $*"\n')
    stub.chmod(0o755)
    return subprocess.run(["sh", str(ROOT / "deploy" / "docker-entrypoint.sh"), *args], capture_output=True,
                          text=True, timeout=30, check=False, env={"PATH": f"{bin_dir}:/usr/bin:/bin"})


def test_the_image_refuses_to_run_without_a_mounted_config_and_says_how(tmp_path: Path):
    cmd = image_cmd()  # the image's CMD: run --config /etc/sms-receiver/config.yaml, not there
    config = cmd[cmd.index("--config") + 1]
    assert not Path(config).exists()
    r = entrypoint(cmd, tmp_path)
    assert r.returncode == 78 and r.stdout == "", r.stdout + r.stderr
    assert f"no config file at {config}" in r.stderr
    assert f'-v "$PWD/config.yaml:{config}:ro"' in r.stderr  # how to mount one
    assert "sms-receiver check-config" in r.stderr

    mine = tmp_path / "mine.yaml"
    mine.write_text("{}\n")
    for args in (["run", "--config", str(mine)], ["run", f"--config={mine}", "--log-format", "json"]):
        r = entrypoint(args, tmp_path)
        assert (r.returncode, r.stdout) == (0, "sms-receiver " + " ".join(args) + "\n"), r.stderr
    # other commands (the fake Clickatell of the compose demo, check-config) pass straight through
    r = entrypoint(["fake-clickatell", "--listen", "0.0.0.0:9098"], tmp_path)
    assert r.stdout == "sms-receiver fake-clickatell --listen 0.0.0.0:9098\n"


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.replicated.yml"])
def test_compose_file_is_valid_and_only_receivers_use_the_receivers_healthcheck(name: str, tmp_path: Path):
    """The image's HEALTHCHECK probes the receiver's 9097: a service running something else from
    the image (the fake Clickatell) has its own probe, or it shows unhealthy."""
    doc = compose(name)
    assert set(doc) <= {"services", "volumes", "networks", "secrets", "configs"} | {k for k in doc if k.startswith("x-")}
    named_volumes = set(doc.get("volumes") or {})
    for service_name, service in doc["services"].items():
        assert "image" in service or "build" in service, service_name
        for volume in service.get("volumes", []):
            source, target, *mode = volume.split(":")
            assert target.startswith("/"), (service_name, volume)
            if source.startswith("."):
                assert (COMPOSE / source).exists(), f"{service_name}: {source} does not exist"
            else:
                assert source in named_volumes, f"{service_name}: volume {source} is not declared"
        if service.get("build") and (service.get("command") or image_cmd())[0] != "run":
            check = service.get("healthcheck")
            assert check, f"{service_name} inherits the receiver's HEALTHCHECK on 9097"
            assert check.get("disable") or "9097" not in json.dumps(check["test"]), service_name
            ports = re.findall(r"--listen\s+\S+:(\d+)", " ".join(service["command"]))
            assert check.get("disable") or ports and f":{ports[0]}/" in json.dumps(check["test"]), service_name
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode == 0:
        r = subprocess.run([docker, "compose", "-f", str(COMPOSE / name), "config", "--quiet"],
                           capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, r.stderr


UNIT = ROOT / "deploy" / "systemd" / "sms-receiver.service"


def test_systemd_unit_verifies_with_the_documented_install():
    """``systemd-analyze verify`` with the venv the unit's comment installs (/opt/sms-receiver)
    present: in a private mount namespace, /opt is a tmpfs holding it, nothing else changes."""
    analyze = need("systemd-analyze", "systemd")
    text = UNIT.read_text()
    execs = re.findall(r"^Exec\w+=(\S+)", text, re.M)
    install = "/opt/sms-receiver/bin/sms-receiver"
    assert [e for e in execs if "sms-receiver" in e] == [install, install]
    assert "python3 -m venv /opt/sms-receiver" in text and "/opt/sms-receiver/bin/pip install" in text
    unshare = shutil.which("unshare")
    if os.geteuid() == 0 and unshare:
        script = (f"set -eu; mount -t tmpfs opt /opt; mkdir -p {Path(install).parent};"
                  f" printf '#!/bin/sh\\n' > {install}; chmod 755 {install}; exec \"$@\"")
        argv = [unshare, "--mount", "--propagation", "private", "--", "sh", "-c", script, "verify",
                analyze, "verify", str(UNIT)]
    else:
        if os.environ.get("CI"):
            pytest.fail("the systemd unit test needs root and unshare in CI")
        argv = [analyze, "verify", str(UNIT)]  # only the missing install may be reported
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    out = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    if argv[0] == analyze:
        assert all(f"Command {install} is not executable" in ln for ln in out), out
    else:
        assert (r.returncode, out) == (0, []), out


def deploy_configs(tmp_path: Path) -> list[tuple[str, Path, dict[str, str]]]:
    """Every receiver config under deploy/ as its deployment gives it to the receiver: the file
    (its ``*_file``s where those files are), and the environment."""
    out = []
    for name, manifest, rendered in (("kubernetes", MANIFEST, kustomize(K8S)),
                                     ("kubernetes-replicated", REPLICA, RENDERED)):
        files: dict[str, Path] = {}
        for mount in manifest.mounts.values():  # the Secrets mounted as files, their example values
            secret = manifest.volumes[mount["name"]].get("secret")
            if secret:
                (example,) = [d for f in manifest_dirs(name) for d in yaml.safe_load_all(f.read_text())
                              if d and d.get("kind") == "Secret" and d["metadata"]["name"] == secret["secretName"]]
                for key, value in example["stringData"].items():
                    host = tmp_path / name / "secrets" / key
                    host.parent.mkdir(parents=True, exist_ok=True)
                    host.write_text(value + "\n")
                    files[f"{mount['mountPath']}/{key}"] = host
        config = tmp_path / name / "config.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump(with_files_at(manifest.config, files)))
        assert ("ConfigMap", "sms-receiver") in rendered
        out.append((name, config, manifest.env))
    for file in ("docker-compose.yml", "docker-compose.replicated.yml"):
        for service_name, service in compose(file)["services"].items():
            mounts = bind_mounts(service)
            args = service.get("command") or image_cmd()
            if not service.get("build") or args[0] != "run":  # not the receiver's image, or not it
                continue
            source = mounts[args[args.index("--config") + 1]]
            config = tmp_path / f"{file}-{service_name}.yaml"
            config.write_text(yaml.safe_dump(with_files_at(yaml.safe_load(source.read_text()), mounts)))
            out.append((f"{file} {service_name}", config, dict(service.get("environment", {}))))
    return out


def manifest_dirs(name: str) -> list[Path]:
    return sorted((ROOT / "deploy" / name).glob("*.yaml")) + sorted(K8S.glob("*.yaml"))


def test_every_deploy_config_passes_check_config_with_its_secrets(tmp_path: Path):
    """Closed by default: each config under deploy/ carries webhook, admin and callback
    credentials (from its Secret or a mounted file), and passes ``check-config`` given only what
    its deployment gives it (an unset ``${VAR}`` is an error)."""
    configs = deploy_configs(tmp_path)
    assert len(configs) == 5, [c[0] for c in configs]  # k8s base, overlay; compose 1 + 2 replicas
    for name, config, env in configs:
        raw = yaml.safe_load(config.read_text())
        for section in ("webhook_auth", "admin_auth"):
            assert set(raw.get(section) or {}) & {"bearer_tokens", "bearer_tokens_file", "basic_auth"}, (name, section)
        assert set(raw.get("callbacks") or {}) & {"secret", "secret_file"}, name
        assert not raw.get("allow_unauthenticated"), name
        r = subprocess.run([sys.executable, "-m", "receiver", "check-config", str(config)], capture_output=True,
                           text=True, timeout=60, check=False, cwd=tmp_path,
                           env={"PATH": os.environ.get("PATH", ""), **env})
        assert r.returncode == 0, f"{name}: {r.stdout}{r.stderr}"
        # and without its secrets it is refused, naming what is missing
        if any("${" in v for v in json.dumps(raw).split('"')):
            r = subprocess.run([sys.executable, "-m", "receiver", "check-config", str(config)], capture_output=True,
                               text=True, timeout=60, check=False, cwd=tmp_path, env={"PATH": os.environ.get("PATH", "")})
            assert r.returncode != 0 and "is not set" in r.stdout + r.stderr, f"{name}: {r.stdout}{r.stderr}"
