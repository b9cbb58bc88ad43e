"""scripts/gpu_check.sh's report: WORK/stages.jsonl + each stage's output -> OUT/gpu_check.json, gpu_check.md, .log.

    python scripts/gpu_check_report.py WORK OUT MODE SECONDS BUDGET_S

For each bench-train stage it computes `ds-train plan` for the same config (the stage's key=value overrides, its
world size and positions) and compares it with the measured peak: device memory (torch.cuda.max_memory_allocated)
on a GPU, the ranks' peak RSS on CPU (where plan counts host memory as the device). Plan error % = (plan - measured)
/ measured. Exit 1 when a stage did not pass or a plan could not be computed.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

COLUMNS = ["stage", "config", "tokens/s", "MFU %", "peak mem GiB", "plan GiB", "plan error %", "seconds", "status"]
LOG_TAIL_LINES = 300


def plan_for(stage: dict, bench: dict) -> dict:
    """`ds-train plan` of the stage's config at its measured world size and positions, as a dict."""
    from ds_train.cli import SYNTHETIC_DATA
    from ds_train.config import load_config
    from ds_train.ds_config import deepspeed_config
    from ds_train.plan import device_capacity, plan_memory
    from ds_train.preflight import load_model_config

    flags = stage["bench_flags"].split()
    per_sample = int(flags[flags.index("--synthetic") + 1])  # a fixed length: "N", not "MIN:MAX"
    cfg = load_config(None, [*SYNTHETIC_DATA, *stage["overrides"]])
    world = bench["world_size"]
    cuda = not bench["device"].startswith("cpu")
    positions = cfg.train.micro_batch_size * per_sample
    capacity, _ = device_capacity(None, world)
    p = plan_memory(cfg, load_model_config(cfg.model.path), deepspeed_config(cfg, world, cuda), world, positions,
                    capacity, "cuda" if cuda else "cpu")
    return {"total_gib": round(p.total_gib, 3), "positions": positions, "world": world,
            "components_gib": {k: round(v, 3) for k, v in p.components.items()},
            "host_components_gib": {k: round(v, 3) for k, v in p.host_components.items()}}


def measured_gib(summary: dict) -> tuple[float, str]:
    """(the largest rank's peak, what it measures)."""
    if summary.get("peak_device_mem_gib"):
        return max(summary["peak_device_mem_gib"]), "device memory, torch.cuda.max_memory_allocated"
    return max(summary["peak_rss_gib"]), "host RSS (CPU: plan counts host memory as the device)"


def bench_rows(stage: dict, work: Path, problems: list) -> list[dict]:
    path = Path(stage["output_dir"]) / "bench_train.json"
    if not path.is_file():
        return [{"stage": stage["stage"], "config": stage["config"], "status": stage["status"],
                 "seconds": stage["seconds"]}]
    bench = json.loads(path.read_text())
    stage["bench"] = bench
    try:
        stage["plan"] = plan_for(stage, bench)
    except Exception as e:  # noqa: BLE001 - recorded in the report, the other rows still count
        stage["plan_error"] = f"{type(e).__name__}: {e}"
        stage["plan_traceback"] = traceback.format_exc()
        problems.append(f"{stage['stage']}: ds-train plan failed: {stage['plan_error']}")
    rows = []
    for key, label in (("ours", stage["stage"]), ("hf", f"{stage['stage']} (hf)")):
        if key not in bench:
            continue
        s = bench[key]
        mem, what = measured_gib(s)
        row = {"stage": label, "config": stage["config"] + (", transformers.Trainer" if key == "hf" else ""),
               "tokens_per_s": s["tokens_per_s"], "mfu": s["mfu"], "peak_mem_gib": mem, "peak_mem_measure": what,
               "step_time_s": s["step_time_s"], "seconds": stage["seconds"], "status": stage["status"]}
        # The HF run follows ours in the same process: its peak includes ours, so plan is compared with ours only.
        if key == "ours" and "plan" in stage:
            plan = stage["plan"]["total_gib"]
            row.update(plan_gib=plan, plan_error_pct=100.0 * (plan - mem) / mem)
        rows.append(row)
    if "ours_over_hf_tokens_per_s" in bench:
        stage["ours_over_hf_tokens_per_s"] = bench["ours_over_hf_tokens_per_s"]
    return rows


def other_row(stage: dict, work: Path) -> dict:
    name = stage["stage"]
    if name == "generate" and stage["status"] == "ok":
        stage["clips"] = [json.loads(p.read_text()) for p in sorted(Path(stage["output_dir"]).glob("*.json"))]
    if name == "install" and "log" in stage:
        stage["versions"] = [line for line in (work / stage["log"]).read_text(errors="replace").splitlines()
                             if line.startswith(("torch ", "gpu: "))]
    if name == "demo" and stage["status"] == "ok":
        text = (work / stage["log"]).read_text(errors="replace")
        stage["summary"] = text[text.rfind("=== ds_train demo finished"):].strip().splitlines()
    return {"stage": name, "config": stage["config"], "seconds": stage["seconds"], "status": stage["status"]}


def cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def markdown(report: dict) -> str:
    lines = [f"gpu_check ({report['mode']}) {report['date_utc']}: {report['device']}; {report['seconds']} s of the "
             f"{report['budget_s']} s budget; {'all stages passed' if report['all_ok'] else 'PROBLEMS: see below'}",
             *report["versions"], "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * 2 + "---:|" * 6 + "---|"]
    for r in report["table"]:
        mfu = None if r.get("mfu") is None else 100 * r["mfu"]
        lines.append("| " + " | ".join([
            r["stage"], r["config"], cell(r, "tokens_per_s", "{:.1f}"), "-" if mfu is None else f"{mfu:.2f}",
            cell(r, "peak_mem_gib", "{:.2f}"), cell(r, "plan_gib", "{:.2f}"), cell(r, "plan_error_pct", "{:+.1f}"),
            str(r["seconds"]), r["status"]]) + " |")
    measures = sorted({r["peak_mem_measure"] for r in report["table"] if "peak_mem_measure" in r})
    lines += ["", f"peak mem: the largest rank's {'; '.join(measures) or '-'}. plan error % = (plan - measured) / "
              "measured. The (hf) row ran after ours in the same processes, so its peak includes ours."]
    lines += [f"- {p}" for p in report["problems"]]
    return "\n".join(lines) + "\n"


def _device_name() -> str:
    try:
        import torch
    except ImportError:  # the install stage failed
        return "unknown (no torch)"
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def main(work: str, out: str, mode: str, seconds: str, budget: str) -> int:
    work_dir, out_dir = Path(work), Path(out)
    stages = [json.loads(line) for line in (work_dir / "stages.jsonl").read_text().splitlines() if line.strip()]
    problems, table = [], []
    for stage in stages:
        if stage["status"] != "ok":
            problems.append(f"{stage['stage']}: {stage['status']}" + (f" (log: {stage['log']})" if "log" in stage
                                                                      else ""))
        if stage["kind"] == "bench":
            table += bench_rows(stage, work_dir, problems)
        else:
            table.append(other_row(stage, work_dir))
    devices = [s["bench"]["device"] for s in stages if "bench" in s] or [_device_name()]
    report = {"mode": mode, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
              "device": devices[0], "seconds": int(seconds), "budget_s": int(budget),
              "versions": next((s.get("versions", []) for s in stages if s["stage"] == "install"), []),
              "all_ok": not problems, "problems": problems, "table": table, "stages": stages}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / "gpu_check.md").write_text(markdown(report))
    with open(out_dir / "gpu_check.log", "w") as f:
        for stage in stages:
            if "log" in stage:
                lines = (work_dir / stage["log"]).read_text(errors="replace").splitlines()
                f.write(f"===== {stage['stage']}: {stage['status']}, {stage['seconds']} s (last "
                        f"{min(len(lines), LOG_TAIL_LINES)} of {len(lines)} lines)\n")
                f.write("\n".join(lines[-LOG_TAIL_LINES:]) + "\n")
    print(markdown(report), end="")
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
