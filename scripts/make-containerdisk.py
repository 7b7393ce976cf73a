#!/usr/bin/env python3
"""Build a containerDisk as an OCI image layout directory (stdlib; zstd via the zstd CLI).

  make-containerdisk.py --disk FILE --out DIR [--compression gzip|zstd] [--arch amd64]
      [--also-arch ARCH:OTHER_DISK ...] [--env KEY=VAL ...] [--label KEY=VAL ...]
      [--disk-path disk/disk.img] [--extra-layer-file PATH_IN_LAYER:LOCAL_FILE ...]
      [--whiteout-layer] [--tag latest] [--archive FILE.tar]

Layers, base first: the disk layer (`disk/` dir 0555 + the disk at --disk-path, 0440,
uid/gid 107), then one layer per --extra-layer-file, then with --whiteout-layer a layer
deleting the disk (`disk/.wh.<name>`). Without --disk the image has only the extra layers.
With --also-arch, index.json points at an image index with one manifest per architecture.
The output is reproducible: fixed mtimes, sorted Env, compact sorted JSON, gzip MTIME 0.
Push it with `skopeo copy --all oci:DIR:TAG docker://...`; --archive also writes the
layout as a tar usable as `oci-archive:FILE.tar`.
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile

OCI = "application/vnd.oci.image."
LAYER_TYPE = {"gzip": OCI + "layer.v1.tar+gzip", "zstd": OCI + "layer.v1.tar+zstd"}


def jdump(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while buf := f.read(1 << 20):
            h.update(buf)
    return h.hexdigest()


class Layout:
    def __init__(self, out):
        self.out = out
        self.blobs = os.path.join(out, "blobs", "sha256")
        os.makedirs(self.blobs, exist_ok=True)

    def put_bytes(self, media_type, data, **extra):
        hexd = hashlib.sha256(data).hexdigest()
        with open(os.path.join(self.blobs, hexd), "wb") as f:
            f.write(data)
        return dict(mediaType=media_type, digest="sha256:" + hexd, size=len(data), **extra)

    def put_file(self, media_type, path):
        """Move a finished file into blobs/ under its digest."""
        hexd = sha256_file(path)
        size = os.path.getsize(path)
        os.replace(path, os.path.join(self.blobs, hexd))
        return dict(mediaType=media_type, digest="sha256:" + hexd, size=size)

    def layer(self, entries, compression):
        """entries: [(TarInfo, local file or None)]. Returns (descriptor, diff_id)."""
        fd, tar_path = tempfile.mkstemp(dir=self.out, suffix=".tar")
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w",
                                                       format=tarfile.PAX_FORMAT) as tar:
            for info, local in entries:
                if local is None:
                    tar.addfile(info)
                else:
                    with open(local, "rb") as f:
                        tar.addfile(info, f)
        diff_id = "sha256:" + sha256_file(tar_path)
        comp_path = tar_path + "." + compression
        if compression == "gzip":
            with open(tar_path, "rb") as src, open(comp_path, "wb") as dst, \
                    gzip.GzipFile(filename="", mode="wb", fileobj=dst, mtime=0,
                                  compresslevel=6) as gz:
                shutil.copyfileobj(src, gz, 1 << 20)
        else:
            subprocess.run(["zstd", "-q", "-3", "-f", "--no-progress", tar_path, "-o",
                            comp_path], check=True)
        os.unlink(tar_path)
        return self.put_file(LAYER_TYPE[compression], comp_path), diff_id


def tarinfo(name, kind, size=0, mode=0o444):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mode = mode
    info.uid = info.gid = 107
    info.uname = info.gname = ""
    info.mtime = 0
    return info


def build_image(lay, a, arch, disk):
    layers, diff_ids = [], []

    def add(entries):
        desc, diff_id = lay.layer(entries, a.compression)
        layers.append(desc)
        diff_ids.append(diff_id)

    if disk:
        ents, parts = [], a.disk_path.split("/")[:-1]
        for i in range(len(parts)):  # parent directories, e.g. `disk/`
            ents.append((tarinfo("/".join(parts[: i + 1]) + "/", tarfile.DIRTYPE, mode=0o555), None))
        ents.append((tarinfo(a.disk_path, tarfile.REGTYPE, os.path.getsize(disk), 0o440), disk))
        add(ents)
    for spec in a.extra_layer_file:
        inner, local = spec.split(":", 1)
        add([(tarinfo(inner, tarfile.REGTYPE, os.path.getsize(local), 0o444), local)])
    if a.whiteout_layer:
        d, base = os.path.split(a.disk_path)
        add([(tarinfo(f"{d}/.wh.{base}" if d else f".wh.{base}", tarfile.REGTYPE), None)])
    if not layers:
        raise SystemExit("make-containerdisk: no layers (give --disk or --extra-layer-file)")

    cfg = {"architecture": arch, "os": "linux",
           "config": {"Env": sorted(a.env), "Labels": dict(kv.split("=", 1) for kv in a.label)},
           "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    cfg_desc = lay.put_bytes(OCI + "config.v1+json", jdump(cfg))
    manifest = {"schemaVersion": 2, "mediaType": OCI + "manifest.v1+json",
                "config": cfg_desc, "layers": layers}
    return lay.put_bytes(OCI + "manifest.v1+json", jdump(manifest))


def write_archive(src, dest):
    """Tar the layout: oci-layout, index.json, blobs/, blobs/sha256/, sorted blobs."""
    def add(tar, rel, kind):
        info = tarfile.TarInfo(rel)
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        if kind == "dir":
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        else:
            path = os.path.join(src, rel)
            info.size, info.mode = os.path.getsize(path), 0o644
            with open(path, "rb") as f:
                tar.addfile(info, f)

    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        add(tar, "oci-layout", "file")
        add(tar, "index.json", "file")
        add(tar, "blobs/", "dir")
        add(tar, "blobs/sha256/", "dir")
        for name in sorted(os.listdir(os.path.join(src, "blobs", "sha256"))):
            add(tar, "blobs/sha256/" + name, "file")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--disk")
    ap.add_argument("--out", required=True)
    ap.add_argument("--compression", choices=["gzip", "zstd"], default="gzip")
    ap.add_argument("--arch", default="amd64")
    ap.add_argument("--also-arch", action="append", default=[], metavar="ARCH:DISK")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VAL")
    ap.add_argument("--label", action="append", default=[], metavar="KEY=VAL")
    ap.add_argument("--disk-path", default="disk/disk.img")
    ap.add_argument("--extra-layer-file", action="append", default=[], metavar="PATH:FILE")
    ap.add_argument("--whiteout-layer", action="store_true")
    ap.add_argument("--tag", default="latest")
    ap.add_argument("--archive", metavar="FILE.tar")
    a = ap.parse_args()
    for kv in a.env + a.label:
        if "=" not in kv:
            ap.error(f"expected KEY=VAL, got {kv!r}")

    if os.path.exists(a.out):
        shutil.rmtree(a.out)
    lay = Layout(a.out)
    top = build_image(lay, a, a.arch, a.disk)
    if a.also_arch:
        entries = [dict(top, platform={"architecture": a.arch, "os": "linux"})]
        for spec in a.also_arch:
            arch, disk = spec.split(":", 1)
            desc = build_image(lay, a, arch, disk)
            entries.append(dict(desc, platform={"architecture": arch, "os": "linux"}))
        index = {"schemaVersion": 2, "mediaType": OCI + "index.v1+json", "manifests": entries}
        top = lay.put_bytes(OCI + "index.v1+json", jdump(index))
    top["annotations"] = {"org.opencontainers.image.ref.name": a.tag}
    with open(os.path.join(a.out, "index.json"), "wb") as f:
        f.write(jdump({"schemaVersion": 2, "mediaType": OCI + "index.v1+json",
                       "manifests": [top]}))
    with open(os.path.join(a.out, "oci-layout"), "wb") as f:
        f.write(jdump({"imageLayoutVersion": "1.0.0"}))
    if a.archive:
        write_archive(a.out, a.archive)


if __name__ == "__main__":
    main()
