"""memmap+offsets vs Arrow IPC (memory-mapped): open time and RSS at N rows of variable-length codes (issue 16).

Not part of ds_train (pyarrow is not a dependency): run it in a venv with numpy, pyarrow and psutil:
  python benchmarks/column_formats.py 1000000 build; python benchmarks/column_formats.py 1000000 np|arrow
Data goes to /tmp/corpus/fmt/N (delete it after)."""
import json
import os
import sys
import time
import numpy as np
import pyarrow as pa
import psutil

def rss():
    m = psutil.Process().memory_full_info()
    return {"rss_mib": m.rss / 2**20, "anon_mib": (m.rss - m.shared) / 2**20}

def build(n, d):
    rng = np.random.default_rng(0)
    frames = rng.integers(25, 75, n)  # 1-3 s at 25 fps, 8 codebooks
    toks = rng.integers(40, 120, n)
    off_c = np.concatenate([[0], np.cumsum(frames)])
    off_t = np.concatenate([[0], np.cumsum(toks)])
    codes = rng.integers(0, 1024, (8, off_c[-1]), dtype=np.int16)
    ids = rng.integers(0, 50000, off_t[-1], dtype=np.int32)
    np.save(f"{d}/codes.npy", codes)
    np.save(f"{d}/ids.npy", ids)
    np.save(f"{d}/index.npy", np.stack([off_t[:-1], toks, off_c[:-1], frames], 1).astype(np.int64))
    # Arrow: one row per sample, list<int32> ids, list<int16> codes flattened (K*T), lengths as columns
    tbl = pa.table({"ids": pa.ListArray.from_arrays(pa.array(off_t.astype(np.int32)), pa.array(ids)),
                    "codes": pa.ListArray.from_arrays(pa.array((off_c * 8).astype(np.int32)), pa.array(codes.T.ravel())),
                    "n_tokens": pa.array(toks), "n_frames": pa.array(frames)})
    with pa.OSFile(f"{d}/data.arrow", "wb") as f, pa.ipc.new_file(f, tbl.schema) as w:
        w.write_table(tbl, max_chunksize=4096)

def open_np(d):
    idx = np.load(f"{d}/index.npy", mmap_mode="r")
    codes = np.load(f"{d}/codes.npy", mmap_mode="r")
    ids = np.load(f"{d}/ids.npy", mmap_mode="r")
    lengths = idx[:, 1] + idx[:, 3]  # what the sampler needs, materialised
    return idx, codes, ids, lengths

def get_np(h, i):
    idx, codes, ids, _ = h
    t0, nt, c0, nc = idx[i]
    return np.array(ids[t0:t0 + nt]), np.array(codes[:, c0:c0 + nc])

def open_arrow(d):
    tbl = pa.ipc.open_file(pa.memory_map(f"{d}/data.arrow")).read_all()
    lengths = tbl.column("n_tokens").to_numpy() + tbl.column("n_frames").to_numpy()
    return tbl, lengths

def get_arrow(h, i):
    tbl = h[0]
    return tbl.column("ids")[i].values.to_numpy(), tbl.column("codes")[i].values.to_numpy().reshape(-1, 8).T

n, kind = int(sys.argv[1]), sys.argv[2]
d = f"/tmp/corpus/fmt/{n}"
if kind == "build":
    os.makedirs(d, exist_ok=True)
    build(n, d)
    sys.exit()
os.system(f"cat {d}/* > /dev/null")  # warm page cache: measure open, not the disk
before = rss()
t = time.perf_counter()
h = open_np(d) if kind == "np" else open_arrow(d)
open_s = time.perf_counter() - t
after_open = rss()
rng = np.random.default_rng(1)
t = time.perf_counter()
for i in rng.integers(0, n, 1000):
    (get_np if kind == "np" else get_arrow)(h, int(i))
get_ms = (time.perf_counter() - t)
print(json.dumps({"n": n, "kind": kind, "open_s": round(open_s, 4), "get_1000_s": round(get_ms, 4),
                  "anon_mib_added_by_open": round(after_open["anon_mib"] - before["anon_mib"], 1),
                  "rss_mib_added": round(rss()["rss_mib"] - before["rss_mib"], 1)}))
