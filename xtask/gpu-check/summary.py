"""Summary of a gpu-check run: python3 summary.py RESULTS_DIR.

Reads steps.tsv, the benches' JSON (scan.json, model_parity.json, model.json) and the classify
logs that run.sh wrote, and writes RESULTS_DIR/summary.md and summary.json with the numbers
issue "GPU" asks for next to its targets. Standard library only.
"""

import json
import re
import sys
from pathlib import Path


def load(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def main(results):
    results = Path(results)
    steps = []
    lines = (results / "steps.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    for line in lines[1:]:
        steps.append(dict(zip(header, line.split("\t"))))
    summary = {"steps": steps}
    md = ["# gpu-check", "", "| step | status | seconds | limit s |", "|---|---|---|---|"]
    md += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['limit_s']} |" for s in steps]

    def scan_table(scan):
        lines = ["| shape | implementation | pass | ms | GB/s | % of copy | × floor |"]
        lines.append("|---|---|---|---|---|---|---|")
        rows = []
        for r in scan.get("records", []):
            device = r["implementation"].split("-")[0]
            copy = scan.get("devices", {}).get(device, {}).get("copy_gbps")
            share = 100.0 * r["gbps"] / copy if copy else float("nan")
            rows.append({**r, "percent_of_copy": share})
            lines.append(
                f"| {r['shape']} | {r['implementation']} | {r['pass']} | {r['median_ms']:.3f} | "
                f"{r['gbps']:.1f} | {share:.1f} % | {r['median_ms'] / r['floor_ms']:.2f} |"
            )
        return lines, rows

    scan = load(results / "scan.json")
    if scan:
        md += ["", "## Scan (cubecl kernels)", ""]
        for device, floor in scan.get("devices", {}).items():
            md.append(
                f"- {device}: fastest copy {floor['copy_gbps']:.1f} GB/s ({floor['copy_kernel']}); "
                f"exp {floor['exps_per_s'] / 1e9:.0f} G/s; copies tried: "
                + "; ".join(f"{name} {gbps:.1f}" for name, gbps in floor["copies"])
            )
        md.append("")
        lines, rows = scan_table(scan)
        md += lines
        md.append("")
        md.append("Targets: G2 both passes >= 60 % of copy, G4 >= 30 %.")
        summary["scan"] = {"devices": scan.get("devices"), "records": rows}

    splits = load(results / "splits" / "scan.json")
    if splits:
        md += ["", "## Scan kernel splits (UNITSxITEMSxSTATESxCHANNELS; which default to keep)", ""]
        lines, rows = scan_table(splits)
        md += lines
        summary["splits"] = {"devices": splits.get("devices"), "records": rows}

    classify = {}
    for name in ("classify-cold", "classify-warm"):
        step = next((s for s in steps if s["step"] == name), None)
        log = results / f"{name}.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        m = re.search(r"time: ([0-9.]+) ms per image .*first call incl\. setup ([0-9.]+) ms", text)
        classify[name] = {
            "status": step["status"] if step else "not run",
            "process_seconds": float(step["seconds"]) if step else None,
            "first_forward_ms": float(m.group(2)) if m else None,
            "ms_per_image": float(m.group(1)) if m else None,
        }
    summary["classify"] = classify
    md += ["", "## classify --backend cuda (T s1l8, 224², batch 1)", ""]
    md += ["| run | status | process s | first forward ms | then ms/image |", "|---|---|---|---|---|"]
    for name, c in classify.items():
        md.append(
            f"| {name} | {c['status']} | {c['process_seconds']} | {c['first_forward_ms']} | "
            f"{c['ms_per_image']} |"
        )
    md.append("")
    md.append("Targets: cold <= 30 s, warm <= 5 s.")

    for title, path, key in (
        ("Model logits (default: exact f32 matmuls)", results / "model_parity.json", "model_parity"),
        ("Model logits with VMAMBA_CUDA_TF32=1", results / "tf32" / "model_parity.json", "model_parity_tf32"),
    ):
        parity = load(path)
        if not parity:
            continue
        summary[key] = parity
        md += ["", f"## {title}", "", "| model | backend | vs upstream | vs NdArray | first forward ms |",
               "|---|---|---|---|---|"]
        md += [
            f"| {r['model']} | {r['backend']} | {r['error_vs_upstream']:.2e} | "
            f"{r['error_vs_ndarray']:.2e} | {r['first_forward_ms']:.0f} |"
            for r in parity
        ]
        md.append("")
        md.append("Target: within 1e-5 of NdArray by default.")

    model = load(results / "model.json")
    if model:
        summary["model"] = model
        md += ["", "## Model bench", ""]
        for r in model:
            inference = ", ".join(f"batch {b}: {ms:.1f} ms ({ips:.1f} images/s)" for b, ms, ips in r["inference"])
            md.append(f"- {r['backend']} {r['preset']} {r['image_size']}²: inference {inference}")
            if r.get("train_step"):
                b, ms, ips = r["train_step"]
                md.append(f"  training step batch {b}: {ms:.0f} ms ({ips:.1f} images/s)")
            top = ", ".join(f"{o['op']} {100 * o['share']:.0f} %" for o in r.get("ops", [])[:5])
            md.append(f"  top ops: {top}")

    (results / "summary.md").write_text("\n".join(md) + "\n")
    (results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
