"""Turn the benchmark JSON files (benchmarks/results/*.json) into the Markdown tables of docs/PERFORMANCE.md.

    python benchmarks/make_table.py                                  # print the tables
    python benchmarks/make_table.py --write docs/PERFORMANCE.md      # replace the generated part of the document

Only the text between ``<!-- BEGIN GENERATED TABLES -->`` and ``<!-- END GENERATED TABLES -->`` is rewritten; the
hand-written analysis around it is kept.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

BEGIN = "<!-- BEGIN GENERATED TABLES (benchmarks/make_table.py) -->"
END = "<!-- END GENERATED TABLES -->"
SMALL_BATCH = 2  # "small batch" for the GPU samples=4 target: batch <= this


def load(results: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(results.glob("*.json")):
        data = json.loads(path.read_text())
        kinds = ("train_step", "ensemble", "cpu_page_faults", "op_count")
        if isinstance(data, dict) and data.get("benchmark") in kinds:
            data["_file"] = path.as_posix()
            out.append(data)
    return out


def ms(seconds: float | None, digits: int = 1) -> str:
    return "–" if seconds is None else f"{1e3 * seconds:.{digits}f}"


def x(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}×"


def mib(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def device_label(data: dict[str, Any]) -> str:
    hw = data["hardware"]
    if hw.get("gpu"):
        return f"{hw['gpu']}"
    return f"CPU ({hw['cpu']}, {hw['cpu_cores']} cores, {hw['torch_threads']} threads)"


def provenance(data: dict[str, Any]) -> list[str]:
    v, hw = data["versions"], data["hardware"]
    load_start = hw.get("load_avg_at_start")
    load_end = data.get("load_avg_at_end")
    lines = [
        f"- Hardware: {device_label(data)}; host CPU {hw['cpu']} ({hw['cpu_cores']} cores)"
        + (f", {hw['ram_gib']} GiB RAM" if hw.get("ram_gib") else ""),
        f"- Versions: torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, "
        f"loradrop {v['loradrop']}, Python {v['python']}",
        f"- Command: `{data['command']}` (file `{data['_file']}`, {data['created']})",
    ]
    if data.get("env"):
        lines.append("- Environment: " + ", ".join(f"`{k}={v}`" for k, v in data["env"].items()))
    if load_start is not None:
        lines.append(f"- Load average (1/5/15 min) at start {'/'.join(f'{a:.1f}' for a in load_start)}"
                     + (f", at end {'/'.join(f'{a:.1f}' for a in load_end)}" if load_end else ""))
    return lines


# ------------------------------------------------------------------------------------------------ train step
def train_tables(data: dict[str, Any]) -> list[str]:
    s = data["settings"]
    out = [f"### Training step: {device_label(data)}, {s['dtype']}"
           + (" (autocast)" if s.get("autocast") else "") + (f", {s['compile']}" if s.get("compile") else ""), ""]
    out += provenance(data)
    out.append(f"- {s['repeats']} interleaved rounds × {s['steps']} timed steps per configuration "
               f"(+{s['warmup']} untimed per block); memory over {s['mem_steps']} step(s)"
               + (f", {s['mem_repeats']} fresh processes per configuration (smallest peak kept)"
                  if s.get("mem_repeats") else "") + ".")
    out.append("")
    for run in data["runs"]:
        info = run["model_info"]
        out.append(f"**{info['name']}** ({info['weights']}, {info['params_m']}M parameters, "
                   f"{info['trainable_params']:,} trainable), seq len {run['seq_len']}, batch {run['batch']}")
        out.append("")
        cpu = not data["hardware"].get("gpu")
        peak_name = "peak RSS MiB" if cpu else "peak alloc MiB"
        out.append(f"| configuration | median ms | IQR ms | × plain | × plain per round (IQR) | {peak_name} | × plain "
                   "| training MiB | × plain |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for row in run["configs"]:
            t, pr = row["time_s"], row["ratio_per_round"]
            mem = row.get("memory", {})
            peak = mem.get("peak_rss_mib", mem.get("peak_mib"))
            out.append(
                f"| {row['label']} | {ms(t['median'])} | {ms(t['iqr'])} | {x(row['ratio_vs_plain'])} | "
                f"{x(pr.get('median'))} ({x(pr.get('q1'))}–{x(pr.get('q3'))}) | {mib(peak)} | "
                f"{x(row.get('memory_ratio_vs_plain'), 3)} | {mib(mem.get('step_mib'))} | "
                f"{x(row.get('step_memory_ratio_vs_plain'))} |")
        out.append("")
    if data["hardware"].get("gpu"):
        note = ("peak allocated minus allocated before the measured steps (activations and gradients; weights and "
                "optimizer state excluded).")
    else:
        note = ("peak RSS minus the RSS after the model build (optimizer state, activations, allocator slack, and "
                "library code pages first touched by the step).")
    out.append("*training MiB*: " + note)
    out.append("")
    return out


# ------------------------------------------------------------------------------------------------ ensemble
def find(rows: list[dict[str, Any]], **keys: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in keys.items())), None)


def ensemble_tables(data: dict[str, Any]) -> list[str]:
    s = data["settings"]
    out = [f"### Test-time ensembles: {device_label(data)}, {s['dtype']}", ""]
    out += provenance(data)
    out.append(f"- {s['repeats']} interleaved rounds; each cell timed for about {s['cell_seconds']} s per round "
               f"(at most {s['max_iters']} calls). loradrop p={s['loradrop']['p']} strategy "
               f"{s['loradrop']['strategy']}; MC dropout: PEFT lora_dropout={s['mc_dropout_p']}, model.train().")
    out.append("")
    cls = data.get("classifier")
    if cls:
        info = cls["model_info"]
        out.append(f"**Classifier**: {info['name']} ({info['weights']}), seq len {cls['seq_len']}. Latency of one "
                   "call (median ms) and its ratio to one plain PEFT forward (× single) or to N sequential passes "
                   "(× seq).")
        out.append("")
        rows = cls["rows"]
        for batch in sorted({r["batch"] for r in rows}):
            single = find(rows, method="single", batch=batch)
            out.append(f"batch {batch}: single-model forward {ms(single['latency_s']['median'], 2)} ms "
                       f"(IQR {ms(single['latency_s']['iqr'], 2)})")
            out.append("")
            out.append("| N | batched ms | × single | × seq | sequential ms | × single | MC dropout ms | × single "
                       "| batched examples/s |")
            out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for n in sorted({r["n"] for r in rows if r["batch"] == batch and r["method"] != "single"}):
                b = find(rows, method="batched", batch=batch, n=n)
                q = find(rows, method="sequential", batch=batch, n=n)
                m = find(rows, method="mc_dropout", batch=batch, n=n)
                out.append(f"| {n} | {ms(b['latency_s']['median'], 2)} | {x(b['ratio_vs_single'])} | "
                           f"{x(b.get('ratio_vs_sequential'))} | {ms(q['latency_s']['median'], 2)} | "
                           f"{x(q['ratio_vs_single'])} | {ms(m['latency_s']['median'], 2)} | "
                           f"{x(m['ratio_vs_single'])} | {b['throughput_examples_per_s']:.1f} |")
            out.append("")
    gen = data.get("generation")
    if gen:
        info = gen["model_info"]
        out.append(f"**Generation**: {info['name']} ({info['weights']}, {info['params_m']}M parameters), prompt "
                   f"{gen['prompt_len']} tokens, {gen['new_tokens']} new tokens, greedy, KV cache. Decode ms/token = "
                   "(time for T tokens - time for 1 token) / (T - 1); first token = prefill + 1 token.")
        out.append("")
        rows = gen["rows"]
        gpu = bool(data["hardware"].get("gpu"))
        for batch in sorted({r["batch"] for r in rows}):
            out.append(f"batch {batch}")
            out.append("")
            loop = find(rows, method="greedy_loop", batch=batch)
            out.append("| method | N | total ms | total IQR ms | first token ms | decode ms/token | × best single | "
                       "× hf_generate | × greedy_loop | × greedy_loop (total) | tokens/s |"
                       + (" peak MiB |" if gpu else ""))
            out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else ""))
            for r in rows:
                if r["batch"] != batch:
                    continue
                out.append(f"| {r['method']} | {r['n']} | {ms(r['latency_s']['median'])} | "
                           f"{ms(r['latency_s']['iqr'])} | {ms(r['first_token_s']['median'])} | "
                           f"{ms(r['decode_per_token_s'], 2)} | "
                           f"{x(r['decode_ratio_vs_best_single'])} | {x(r['decode_ratio_vs_hf_generate'])} | "
                           f"{x(r['decode_per_token_s'] / loop['decode_per_token_s'])} | "
                           f"{x(r['latency_ratio_vs_greedy_loop'])} | {r['tokens_per_s']:.1f} |"
                           + (f" {mib(r.get('peak_memory_mib'))} |" if gpu else ""))
            out.append("")
    return out


# ------------------------------------------------------------------------------------------------ page faults
def page_fault_tables(data: dict[str, Any]) -> list[str]:
    out = [f"### CPU page faults per call: {device_label(data)}", ""]
    out += provenance(data)
    out.append(f"- {data['settings']['calls']} measured calls per case after one warm-up, one fresh process per "
               "allocator setting; getrusage deltas per call.")
    out.append("")
    out.append("| case | allocator | wall s | user CPU s | system CPU s | minor page faults |")
    out.append("|---|---|---:|---:|---:|---:|")
    cases = list(next(iter(data["allocators"].values()))["cases"])
    for case in cases:
        for label, alloc in data["allocators"].items():
            r = alloc["cases"][case]
            out.append(f"| {case} | {label} | {r['wall_s']:.2f} | {r['user_s']:.2f} | {r['sys_s']:.2f} | "
                       f"{r['minor_faults']:,.0f} |")
    out.append("")
    return out


def op_count_tables(data: dict[str, Any]) -> list[str]:
    s = data["settings"]
    gpu = bool(data["hardware"].get("gpu"))
    out = [f"### Operators dispatched per training step: {device_label(data)}, {s['dtype']}", ""]
    out += provenance(data)
    out.append(f"- One profiled optimizer step (forward + backward + AdamW) after two warm-up steps, seq len "
               f"{s['seq_len']}, batch {s['batch']}: `aten::` operator events"
               + (" and GPU kernels" if gpu else "") + " counted by `torch.profiler`.")
    out.append("")
    models = [run["model"] for run in data["runs"]]
    header = "| configuration | " + " | ".join(
        f"{m} aten ops | × plain" + (" | kernels | × plain" if gpu else "") for m in models) + " |"
    cols = 2 + (2 if gpu else 0)
    out += [header, "|---|" + "---:|" * (cols * len(models))]
    by_model = [{c["name"]: c for c in run["configs"]} for run in data["runs"]]
    for cfg in data["runs"][0]["configs"]:
        cells = []
        for rows in by_model:
            r = rows[cfg["name"]]
            cells += [f"{r['aten_ops']:,}", x(r["aten_ops_vs_plain"], 3)]
            if gpu:
                cells += [f"{r['gpu_kernels']:,}", x(r.get("gpu_kernels_vs_plain"), 3)]
        out.append(f"| {cfg['label']} | " + " | ".join(cells) + " |")
    out.append("")
    return out


# ------------------------------------------------------------------------------------------------ targets
def verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def targets(all_data: list[dict[str, Any]]) -> list[str]:
    rows: list[tuple[str, str, str, str]] = []
    for data in all_data:
        gpu = bool(data["hardware"].get("gpu"))
        where = "GPU" if gpu else "CPU"
        if data.get("settings", {}).get("compile"):
            where += " compiled"
        if data["benchmark"] in ("cpu_page_faults", "op_count"):
            continue
        if data["benchmark"] == "train_step":
            for run in data["runs"]:
                c = {r["name"]: r for r in run["configs"]}
                label = f"{where} {run['model']} seq {run['seq_len']} batch {run['batch']}"
                s1, plain, pd = c.get("ab_s1_batch"), c.get("peft_lora"), c.get("peft_dropout")
                if s1:
                    r = s1["ratio_vs_plain"]
                    rows.append(("samples=1 time ≤ 1.05× plain LoRA", label,
                                 f"{r:.3f}× (per-round median {s1['ratio_per_round'].get('median', 0):.3f}×)",
                                 verdict(r <= 1.05)))
                    if "memory_ratio_vs_plain" in s1:
                        m = s1["memory_ratio_vs_plain"]
                        rows.append(("samples=1 peak memory ≤ 1.02× plain LoRA", label,
                                     f"{m:.3f}× (training part {x(s1.get('step_memory_ratio_vs_plain'), 3)})",
                                     verdict(m <= 1.02)))
                if s1 and pd:
                    faster = s1["time_s"]["median"] < pd["time_s"]["median"]
                    rows.append(("samples=1 faster than PEFT lora_dropout=0.1", label,
                                 f"{ms(s1['time_s']['median'])} vs {ms(pd['time_s']['median'])} ms",
                                 verdict(faster)))
                    if "memory" in s1 and "memory" in pd and "error" not in s1["memory"]:
                        key = "peak_mib" if gpu else "peak_rss_mib"
                        lighter = s1["memory"][key] < pd["memory"][key]
                        rows.append(("samples=1 lighter than PEFT lora_dropout=0.1", label,
                                     f"{mib(s1['memory'][key])} vs {mib(pd['memory'][key])} MiB", verdict(lighter)))
                s4, acc = c.get("ab_s4_batched"), c.get("ab_s4_accum")
                if s4 and acc:
                    rows.append(("samples=4 batched no slower than 4 sequential passes", label,
                                 f"{ms(s4['time_s']['median'])} vs {ms(acc['time_s']['median'])} ms "
                                 f"({s4['time_s']['median'] / acc['time_s']['median']:.2f}×)",
                                 verdict(s4["time_s"]["median"] <= acc["time_s"]["median"])))
                if s4 and gpu and plain and run["batch"] <= SMALL_BATCH:
                    r = s4["ratio_vs_plain"]
                    rows.append(("GPU small batch: samples=4 < 3.2× plain LoRA", label, f"{r:.2f}×",
                                 verdict(r < 3.2)))
        else:
            cls, gen = data.get("classifier"), data.get("generation")
            if cls:
                for batch in sorted({r["batch"] for r in cls["rows"]}):
                    b = find(cls["rows"], method="batched", batch=batch, n=8)
                    if b is None:
                        continue
                    label = f"{where} MiniLM batch {batch}, N=8"
                    if gpu and batch == 1:
                        rows.append(("GPU ensemble N=8, batch 1 ≤ 2× single-model latency", label,
                                     f"{b['ratio_vs_single']:.2f}×", verdict(b["ratio_vs_single"] <= 2.0)))
                    if not gpu:
                        r = b.get("ratio_vs_sequential")
                        rows.append(("CPU batched N=8 clearly faster than 8 sequential passes (≤ 0.8×)", label,
                                     f"{r:.2f}× of sequential", verdict(r is not None and r <= 0.8)))
            if gen and gpu:
                e = find(gen["rows"], method="ensemble", batch=1, n=8)
                loop = find(gen["rows"], method="greedy_loop", batch=1)
                if e is not None and loop is not None:
                    rows.append(("GPU generation N=8, batch 1 ≤ 1.5× single-model per token",
                                 f"{where} Llama batch 1, N=8",
                                 f"{e['decode_ratio_vs_best_single']:.2f}× the faster single model "
                                 f"({e['decode_ratio_vs_hf_generate']:.2f}× hf_generate, "
                                 f"{e['decode_per_token_s'] / loop['decode_per_token_s']:.2f}× greedy_loop)",
                                 verdict(e["decode_ratio_vs_best_single"] <= 1.5)))
    out = ["### Targets (computed from the JSON files)", "",
           "| target | where | measured | verdict |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    out.append("")
    return out


def render(all_data: list[dict[str, Any]]) -> str:
    lines = [BEGIN, "", "<!-- Do not edit by hand: rerun `python benchmarks/make_table.py --write "
             "docs/PERFORMANCE.md`. -->", ""]
    lines += targets(all_data)
    kinds = {"train_step": 0, "op_count": 1, "ensemble": 2, "cpu_page_faults": 3}
    order = sorted(all_data, key=lambda d: (kinds[d["benchmark"]], bool(d["hardware"].get("gpu")), d["_file"]))
    render_one = {"train_step": train_tables, "op_count": op_count_tables, "ensemble": ensemble_tables,
                  "cpu_page_faults": page_fault_tables}
    for data in order:
        lines += render_one[data["benchmark"]](data)
    lines.append(END)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default="benchmarks/results", help="folder of the JSON results")
    ap.add_argument("--write", default=None, help="Markdown file whose generated part is replaced")
    args = ap.parse_args(argv)
    text = render(load(Path(args.results)))
    if not args.write:
        print(text)
        return
    path = Path(args.write)
    doc = path.read_text() if path.is_file() else f"# Performance\n\n{BEGIN}\n{END}\n"
    if BEGIN not in doc or END not in doc:
        doc = doc.rstrip("\n") + f"\n\n{BEGIN}\n{END}\n"
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(head + text.rstrip("\n") + tail)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
