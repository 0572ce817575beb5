#!/usr/bin/env python3
"""Pushes stand-ins for the images critest pulls into a local registry.

critest (cri-tools' `pkg/validate`) pulls busybox, nginx, httpd, nonewprivs and a few
image-user test images from registry.k8s.io and gcr.io. No registry is reachable from
these machines, so this builds look-alikes from Debian's static busybox, with what the
test cases look for: applets as hard links (a MaskedPaths of /bin/ls must not mask
busybox itself), `pgrep` and `ipcs` (Debian's busybox has neither), nginx's pid file and
"master process" command line, httpd's "httpd -D FOREGROUND" log line, and a setuid
helper that prints its effective uid.

usage: push-images.py REGISTRY BUSYBOX_OCI_ARCHIVE BINDIR   (BINDIR: nnp, pgrep, nginx)
"""
import hashlib
import io
import json
import sys
import tarfile
import urllib.request

REG, ARCHIVE, BINDIR = sys.argv[1], sys.argv[2], sys.argv[3]


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def binary(name):
    with open(f"{BINDIR}/{name}", "rb") as f:
        return f.read()


def base_layer():
    """The busybox root of our test image, applets as hard links, pgrep and ipcs added."""
    with tarfile.open(ARCHIVE) as t:
        index = json.load(t.extractfile("index.json"))
        manifest = json.load(t.extractfile("blobs/sha256/" + index["manifests"][0]["digest"][7:]))
        raw = t.extractfile("blobs/sha256/" + manifest["layers"][0]["digest"][7:]).read()
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(raw)) as src, tarfile.open(
        fileobj=out, mode="w", format=tarfile.GNU_FORMAT
    ) as dst:
        for m in src.getmembers():
            if m.issym() and m.linkname == "busybox":
                m.type, m.linkname = tarfile.LNKTYPE, "bin/busybox"
                dst.addfile(m)
            else:
                dst.addfile(m, src.extractfile(m) if m.isfile() else None)
        for name, data in [("bin/pgrep", binary("pgrep")), ("bin/ipcs", b"#!/bin/sh\ncat /proc/sysvipc/shm\n")]:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(data), 0o755
            dst.addfile(ti, io.BytesIO(data))
    return out.getvalue()


def layer(entries):
    """A layer of (path, mode, data) entries; data None is a directory."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as t:
        for path, mode, data in entries:
            ti = tarfile.TarInfo(path)
            ti.mode = mode
            if data is None:
                ti.type = tarfile.DIRTYPE
                t.addfile(ti)
            else:
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))
    return out.getvalue()


def request(method, url, data=None, content_type=None):
    r = urllib.request.Request(url, data=data, method=method)
    if content_type:
        r.add_header("Content-Type", content_type)
    return urllib.request.urlopen(r, timeout=30)


def blob(repo, data):
    digest = sha(data)
    location = request("POST", f"{REG}/v2/{repo}/blobs/uploads/").headers["Location"]
    if location.startswith("/"):
        location = REG + location
    sep = "&" if "?" in location else "?"
    request("PUT", f"{location}{sep}digest={digest}", data, "application/octet-stream")
    return digest


BASE = base_layer()


def push(repo, tag, extra=None, config=None):
    layers = [BASE] + ([layer(extra)] if extra else [])
    image_config = {
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "Cmd": ["sh"],
        "WorkingDir": "/",
    }
    if config and "Entrypoint" in config:
        del image_config["Cmd"]
    image_config.update(config or {})
    c = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": image_config,
            "rootfs": {"type": "layers", "diff_ids": [sha(x) for x in layers]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": blob(repo, c), "size": len(c)},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": blob(repo, x), "size": len(x)}
                for x in layers
            ],
        }
    ).encode()
    request("PUT", f"{REG}/v2/{repo}/manifests/{tag}", manifest, "application/vnd.oci.image.manifest.v1+json")


def dirs(*paths):
    return [(p, 0o755, None) for p in paths]


www = dirs("www") + [("www/index.html", 0o644, b"<html>It works!</html>\n")]
push("pause", "3.9", config={"Entrypoint": ["/bin/sleep", "infinity"]})
push("e2e-test-images/busybox", "1.29-2")
push(
    "e2e-test-images/nginx",
    "1.14-2",
    www + dirs("var", "var/run", "usr", "usr/sbin") + [("usr/sbin/nginx", 0o755, binary("nginx"))],
    {"Entrypoint": ["/usr/sbin/nginx"]},
)
push(
    "e2e-test-images/httpd",
    "2.4.39-4",
    www,
    {"Entrypoint": ["sh", "-c", "echo \"Command line: 'httpd -D FOREGROUND'\" >&2; exec httpd -f -p 80 -h /www"]},
)
push(
    "e2e-test-images/nonewprivs",
    "1.3",
    dirs("usr", "usr/local", "usr/local/bin") + [("usr/local/bin/nnp", 0o4755, binary("nnp"))],
    {"Entrypoint": ["/usr/local/bin/nnp"]},
)
accounts = dirs("etc") + [
    ("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\ndefault-user:x:1000:1000::/home:/bin/sh\nwww-data:x:33:33::/var/www:/bin/sh\n"),
    ("etc/group", 0o644, b"root:x:0:\ndefault-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\nwww-data:x:33:\nusers:x:100:\n"),
]
cri_tools = "k8s-staging-cri-tools/"
push(cri_tools + "test-image-predefined-group", "latest", accounts, {"User": "1000"})
for name, user in [("uid", "1002"), ("username", "www-data"), ("uid-group", "1003:users"), ("username-group", "www-data:users")]:
    push(cri_tools + "test-image-user-" + name, "latest", accounts, {"User": user})
for repo, tag in [
    ("test-image-latest", "latest"),
    ("test-image-tag", "test"),
    ("test-image-tag", "all"),
    ("test-image-1", "latest"),
    ("test-image-2", "latest"),
    ("test-image-3", "latest"),
    ("test-image-tags", "1"),
    ("test-image-tags", "2"),
    ("test-image-tags", "3"),
]:
    push(cri_tools + repo, tag, [("tag", 0o644, (repo + tag).encode())])
print("images pushed to", REG)
