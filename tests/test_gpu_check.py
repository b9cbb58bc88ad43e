"""scripts/gpu_check.sh --dry-run: the GPU check's own stages (demo, generate, make-arch, bench-train on ZeRO-2 with
the HF baseline, ZeRO-3 and ZeRO-3 offload) on CPU with the tiny model, 2 ranks, so the script the first GPU runs
(installs aside) is exercised on every CI run. Nothing is mocked; the GPU-only parts (the offline install from .whl/,
4096 positions on the real architecture, device memory) are what --dry-run leaves out."""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest

from conftest import REPO

STAGES = ["install", "demo", "generate", "make_arch", "bench_zero2", "bench_zero3", "bench_zero3_offload"]
BENCH = {"bench_zero2": ("zero2.json", 2), "bench_zero3": ("zero3.json", 3), "bench_zero3_offload":
         ("zero3_offload.json", 3)}
TABLE_ROWS = ["install", "demo", "generate", "make_arch", "bench_zero2", "bench_zero2 (hf)", "bench_zero3",
              "bench_zero3_offload"]
# make-arch configs/arch/higgs-v2-3b.json --layers 2 --hidden 64 --intermediate 128 --heads 2 --kv-heads 1: the real
# 128256-token vocabulary and 8 x 1026 audio classes at width 64; LoRA r=16 on the default targets.
ARCH_PARAMS, ARCH_LORA = 17_623_616, 32_768
SYNTHETIC = 64  # positions per sample in the dry run (--synthetic 64), 1 sample per micro-batch and rank


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_stage_and_writes_json_and_table(tiny_model, tmp_path):
    out, work = tmp_path / "report", tmp_path / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(["bash", str(REPO / "scripts/gpu_check.sh"), "--dry-run", "--out", str(out), "--work",
                           str(work), "--tiny-model", str(tiny_model)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    report = json.loads((out / "gpu_check.json").read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    assert [s["stage"] for s in report["stages"]] == STAGES
    for name, s in stages.items():
        assert s["status"] == "ok", f"{name}: {s['status']}\n{(work / s['log']).read_text()[-4000:]}"
    assert report["all_ok"] and report["problems"] == [], report["problems"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert report["mode"] == "dry-run" and report["device"].startswith("cpu")

    # The demo trained its 2 steps through run.sh, evaluated, spoke a sample and merged; its summary is kept.
    demo = stages["demo"]
    assert any(line.startswith("  train: ") and "(step 2)" in line for line in demo["summary"])
    assert (work / "demo/out/adapter/adapter_model.safetensors").is_file()
    # generate spoke the text with that adapter: at most the 8 frames asked for, and a WAV.
    [clip] = stages["generate"]["clips"]
    assert clip["text"] == "the voice check" and 0 <= clip["frames"] <= 8
    assert clip["stopped_by"] in ("eos", "length_cap") and (work / "generate/000.wav").is_file()

    rows = {r["stage"]: r for r in report["table"]}
    assert list(rows) == TABLE_ROWS
    for name, (ds_json, zero_stage) in BENCH.items():
        bench, ours = stages[name]["bench"], stages[name]["bench"]["ours"]
        # Every stage's arguments reached bench-train: config, random init of the make-arch model, 2 ranks,
        # 1 warmup + 1 timed step of one 64-position sample per rank.
        assert bench["deepspeed_config"] == f"ds_configs/{ds_json}" and bench["zero_stage"] == zero_stage
        assert bench["init"] == "random" and bench["model"] == str(work / "arch")
        assert bench["world_size"] == 2 and bench["warmup_steps"] == 1 and bench["timed_steps"] == 1
        assert ours["tokens"] == 2 * SYNTHETIC and ours["samples"] == 2
        assert ours["params_total"] == ARCH_PARAMS and ours["params_trainable"] == ARCH_LORA
        assert abs(ours["loss_last"] - math.log(128256) - math.log(1026)) < 0.6  # a uniform guess over both heads
        # The table row is the stage's numbers, against ds-train plan at the same positions and ranks.
        row, plan = rows[name], stages[name]["plan"]
        assert plan["positions"] == SYNTHETIC and plan["world"] == 2
        assert row["tokens_per_s"] == ours["tokens_per_s"] and row["mfu"] == ours["mfu"]
        assert row["peak_mem_gib"] == max(ours["peak_rss_gib"]) and row["plan_gib"] == plan["total_gib"]
        assert row["plan_error_pct"] == pytest.approx(100 * (plan["total_gib"] - row["peak_mem_gib"])
                                                      / row["peak_mem_gib"])
    hf = stages["bench_zero2"]["bench"]["hf"]
    assert hf["tokens"] == 2 * SYNTHETIC and rows["bench_zero2 (hf)"]["tokens_per_s"] == hf["tokens_per_s"]
    assert "plan_gib" not in rows["bench_zero2 (hf)"]  # its peak includes ours (same processes)

    # The markdown table: one line per row, numbers where the row has them.
    lines = (out / "gpu_check.md").read_text().splitlines()
    header = lines.index("| stage | config | tokens/s | MFU % | peak mem GiB | plan GiB | plan error % | seconds | "
                         "status |")
    cells = {}
    for line in lines[header + 2:header + 2 + len(TABLE_ROWS)]:
        c = [x.strip() for x in line.strip("|").split("|")]
        cells[c[0]] = c
    assert list(cells) == TABLE_ROWS
    for name, c in cells.items():
        assert c[8] == "ok" and int(c[7]) == stages[name.split(" ")[0]]["seconds"]
        numeric = {"bench_zero2 (hf)": [2, 3, 4]}.get(name, [2, 3, 4, 5, 6] if name in BENCH else [])
        for i in range(2, 7):
            if i in numeric:
                float(c[i])  # a number, not "-"
            else:
                assert c[i] == "-", (name, c)
        if name in BENCH:
            assert float(c[2]) == pytest.approx(rows[name]["tokens_per_s"], abs=0.05)
            assert float(c[5]) == pytest.approx(rows[name]["plan_gib"], abs=0.005)
    log = (out / "gpu_check.log").read_text()
    assert all(f"===== {name}: ok" in log for name in STAGES)
