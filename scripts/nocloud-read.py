#!/usr/bin/python3
"""Read a NoCloud seed with cloud-init's own datasource code (Debian's cloud-init package) and
print what cloud-init got, as JSON.

  nocloud-read.py dir SEED_DIR WORK   # a seed's files in SEED_DIR (as extracted from an ISO)
  nocloud-read.py devices WORK        # cloud-init's own search: devices labelled cidata

`dir` puts SEED_DIR where cloud-init looks for a local seed (WORK/seed/nocloud) and runs
DataSourceNoCloud with the device search off. `devices` runs the device search alone (blkid
for LABEL=cidata, then cloud-init mounts each and reads it): printing the devices found and,
when the kernel can mount them, the data read.
"""
import json
import os
import shutil
import sys

from cloudinit import distros, helpers, util
from cloudinit.sources import DataSourceNoCloud as nc


def datasource(work, label):
    os.makedirs(os.path.join(work, "run"), exist_ok=True)
    paths = helpers.Paths({"cloud_dir": work, "run_dir": os.path.join(work, "run")})
    cfg = {"datasource": {"NoCloud": {"fs_label": label}}}
    distro = distros.fetch("debian")("debian", {}, paths)
    return nc.DataSourceNoCloud(cfg, distro, paths)


def dump(ds):
    ud = ds.userdata_raw
    vd = ds.vendordata_raw
    return {
        "seed": ds.seed,
        "metadata": ds.metadata,
        "userdata_raw": ud.decode() if isinstance(ud, bytes) else ud,
        "vendordata_raw": vd.decode() if isinstance(vd, bytes) else vd,
        "network_config": ds._network_config,
        "instance_id": ds.get_instance_id(),
    }


def main():
    mode = sys.argv[1]
    if mode == "dir":
        seed, work = sys.argv[2], sys.argv[3]
        dest = os.path.join(work, "seed", "nocloud")
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(seed, dest)
        ds = datasource(work, None)
        if not ds._get_data():
            print(json.dumps({"error": "NoCloud found no seed"}))
            return 1
        print(json.dumps(dump(ds), sort_keys=True))
        return 0
    if mode == "devices":
        work = sys.argv[2]
        ds = datasource(work, "cidata")
        devs = ds._get_devices("cidata")
        out = {"devices": devs}
        try:
            if ds._get_data():
                out.update(dump(ds))
        except Exception as e:  # noqa: BLE001 - reported to the test
            out["error"] = repr(e)
        print(json.dumps(out, sort_keys=True))
        return 0
    raise SystemExit("usage: nocloud-read.py dir SEED WORK | devices WORK")


if __name__ == "__main__":
    sys.exit(main())
