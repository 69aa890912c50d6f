"""The text tables ``lightning-tp plan`` prints (:func:`format_report`) for a
:class:`~lightning_tp.planner.report.PlanReport`; ``PlanReport.to_json`` is the machine-readable
form."""

from __future__ import annotations

from typing import Any

from lightning_tp.planner.report import PlanReport

__all__ = ["format_crossover", "format_report"]


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def _ms(seconds: float, digits: int = 1) -> str:
    return f"{seconds * 1e3:,.{digits}f} ms"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _heading(i: dict[str, Any]) -> str:
    dp_link = i["intra_link"] if i["world"] <= i["devices_per_node"] else i["inter_link"]
    return (f"Plan: {i['model_name']} ({i['num_params'] / 1e9:.2f}B parameters) on {i['world']} x"
            f" {i['accelerator']} = dp {i['dp']} x tp {i['tp']} ({i['devices_per_node']} per node;"
            f" tp over {i['intra_link']}, dp over {dp_link}), {i['precision']}, seq"
            f" {i['seq_len']}, micro-batch {i['batch_size']} x {i['accumulate']},"
            f" SP={i['sequence_parallel']}, loss parallel={i['loss_parallel']}, FSDP={i['fsdp']},"
            f" activation checkpointing={i['activation_checkpointing']}, float8={i['float8']},"
            f" async TP={i['async_tp']}{_peft(i['lora'])}{_grid(i.get('grid'))}\nPlan source:"
            f" {i['plan_source']}")


def _grid(grid: Any) -> str:
    if not grid:
        return ""
    return (f"\n2D grid {grid[0]}x{grid[1]} (tp_row x tp_col): the applied-plan table shows the 1D"
            " plan's per-rank shapes (the same 1/tp of every weight); activations and the"
            " decoder layers' TP collectives are the grid's")


def _peft(lora: Any) -> str:
    if not lora:
        return ""
    return (f", LoRA r={lora['rank']} alpha={lora['alpha']:g} dropout={lora['dropout']:g} on"
            f" {','.join(lora['target_modules'])}")


def _estimate_table(e: dict[str, Any]) -> str:
    adapters = ([["  of which LoRA adapters (memory-bound)", _ms(e["adapter_s"])]]
                if e.get("adapter_s") else [])
    return _table(["", "value"], [
        ["compute", _ms(e["compute_s"])], *adapters,
        ["TP communication (exposed)", _ms(e["tp_comm_s"])],
        ["FSDP communication (total / exposed)",
         f"{e['fsdp_comm_s'] * 1e3:,.1f} / {_ms(e['fsdp_exposed_s'])}"],
        ["optimizer step", _ms(e["optimizer_s"])], ["step time", _ms(e["step_s"])],
        ["tokens per step", f"{e['tokens_per_step']:,}"],
        ["tokens/s per device", f"{e['tokens_per_s_per_device']:,.0f}"],
        ["MFU", f"{e['mfu']:.1%}"]])


def _recommendation(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    header = ["#", "tp", "dp", "activation ckpt", "memory", "fits", "step", "tokens/s/device",
              "MFU"]
    grid = any(c.get("grid") for c in rows)
    if grid:
        header.insert(2, "grid")
    out = ["", "Recommendation (same devices and micro-batch; fitting layouts first, fastest"
               " first):",
           _table(header, [[n + 1, c["tp"]]
                           + ([f"{c['grid'][0]}x{c['grid'][1]}" if c.get("grid") else "1D"]
                              if grid else [])
                           + [c["dp"], c["activation_checkpointing"]
                              + (" + sharded inputs" if c.get("save_sharded_inputs") else ""),
                              _gib(c["memory"]), c["fits"], _ms(c["step_s"], 0),
                              f"{c['tokens_per_s_per_device']:,.0f}", f"{c['mfu']:.1%}"]
                           for n, c in enumerate(rows)])]
    if not rows[0]["fits"]:
        out.append("No layout fits: add devices (strategy.data_parallel_size), shorten data.seq_len"
                   " or data.batch_size, or pick an accelerator with more memory.")
    return out


def _pct(x: float) -> str:
    return f"{x:+.1%}"


def _waste(w: dict[str, Any], least: dict[str, Any]) -> list[str]:
    if not w:
        return []
    rows = ([[f"{r['projections']} replicated", r["reason"]] for r in w["replicated"]]
            or [["replicated projections", "none"]])
    rows += [["query heads (busiest / even)",
              f"{w['q_heads']} / {w['q_heads_even']:g} ({_pct(w['head_imbalance'])})"],
             ["KV heads computed (busiest / even)", f"{w['kv_heads']} / {w['kv_heads_even']:g}"],
             ["vocab rows (busiest / even)",
              f"{w['vocab_rows']:,} / {w['vocab_rows_even']:,.6g} ({_pct(w['vocab_imbalance'])})"]]
    rows += [[f"memory: {k}", f"+{v / 2**20:,.1f} MiB"] for k, v in w["memory_bytes"].items()]
    rows += [["extra all-reduces (weight grads, bwd)",
              f"{w['all_reduces_per_layer']} per layer, {w['all_reduces_per_step']} per step,"
              f" {w['all_reduce_bytes_per_rank'] / 2**20:,.1f} MiB sent per rank,"
              f" {_ms(w['all_reduce_s'], 2)}"],
             ["compute imbalance", f"+{_ms(w['compute_extra_s'], 2)}"
                                   f" ({_pct(w['compute_imbalance'])})"],
             ["step time beyond even", f"+{_ms(w['step_extra_s'], 2)} ({w['time_fraction']:.2%})"],
             ["waste (memory + step fractions)",
              f"{w['memory_fraction']:.2%} + {w['time_fraction']:.2%} = {w['score']:.2%}"]]
    out = ["", f"Head layout and waste at tp {w['tp']} (busiest rank against an even split):",
           _table(["", "value"], rows)]
    if least:
        out.append(f"Least waste on these devices: {least['reason']}.")
    return out


def _lora(lora: dict[str, Any]) -> list[str]:
    if not lora:
        return []
    return ["", f"LoRA: {len(lora['adapted_per_layer'])} adapted projections per layer"
                f" ({', '.join(lora['adapted_per_layer'])}), {lora['adapted_projections']} in all;"
                f" {lora['trainable_parameters']:,} trainable parameters"
                f" ({lora['trainable_fraction']:.2%} of the model with adapters):",
            _table(["", "per rank"], [
                ["frozen base (TP shards only, no gradient, no optimizer state)",
                 _gib(lora["frozen_base_bytes"])],
                ["adapter parameters / gradients / AdamW (FSDP2-sharded)",
                 " / ".join(_gib(lora[k]) for k in ("adapter_parameter_bytes",
                                                    "adapter_gradient_bytes",
                                                    "adapter_optimizer_bytes"))],
                ["adapter activations per layer", _gib(lora["adapter_activation_bytes_per_layer"])],
                ["all-reduces of replicated factors' gradients (tp, per step)",
                 f"{lora['tp_all_reduces_per_step']},"
                 f" {lora['tp_all_reduce_bytes_per_rank'] / 2**20:,.1f} MiB sent"]])]


def format_report(report: PlanReport) -> str:
    """The report as the text tables ``lightning-tp plan`` prints."""
    i = report.inputs
    tp_only = "; at tp=1 the strategy applies no TP style, only FSDP2):" if i["tp"] == 1 else "):"
    out = [_heading(i), "", "Applied plan (block 0 shown; every block is the same" + tp_only]
    out.append(_table(["module", "style", "layouts", "shape", "tp-local", "rank 0 (tp+fsdp)"], [
        [r["module"], r["style"], " ".join(f"{k}={v}" for k, v in r["layouts"].items()),
         r["shape"] or "-", r["tp_local"] or "-", r["rank0_local"] or "-"] for r in report.plan]))
    out += ["", f"Memory per rank (device {_gib(i['device_memory'])}, headroom"
                f" {i['memory_headroom']:.0%}):"]
    out.append(_table(["part", "bytes"], [[k, _gib(v)] for k, v in report.memory.items()]
                      + [["total", _gib(sum(report.memory.values()))]]))
    out.append(_table(["ranks", "local params (unpadded)", "stored (padded)", "total", "fits"], [
        [g["ranks"], f"{g['local_parameters']:,}", f"{g['stored_parameters_padded']:,}",
         _gib(g["memory_total"]), g["fits"]] for g in report.ranks]))
    out += _lora(report.lora)
    out += ["", "Activations saved per decoder layer per micro-batch:"]
    out.append(_table(["tensor", "bytes"],
                      [[k, _gib(v)] for k, v in report.activations_per_layer.items()]))
    out += ["", "Communication per optimizer step per rank:"]
    out.append(_table(["group", "collective", "where", "calls", "bytes/call", "sent/rank", "link",
                       "time"], [
        [c["group"], c["kind"], c["where"], c["calls"], _gib(c["tensor_bytes"]),
         _gib(c["bytes_per_rank"]), c["link"], _ms(c["seconds"])] for c in report.communication]
        or [["-"] * 8]))
    out += ["", f"Estimate ({i['accelerator']}, efficiency {i['efficiency']}; TP comm exposed, FSDP"
                " overlapped):", _estimate_table(report.estimate)]
    out += _waste(report.waste, report.least_waste)
    out += _recommendation(report.recommendation)
    if report.two_d:
        out += ["", f"2D: {report.two_d}"]
    return "\n".join(out + ["", f"Verdict: {report.verdict}"])


def format_crossover(rows: list[Any]) -> str:
    """The table ``lightning-tp plan compare_2d=true`` prints: for each model and grid, 2D/1D
    bytes per layer, calls, TP time per layer at the inputs' tokens and the crossover in tokens
    (:func:`~lightning_tp.planner.crossover.compare_2d`)."""
    if not rows:
        return "No grid to compare."
    first = rows[0]
    head = (f"2D against 1D per decoder layer per micro-batch (forward + backward) at"
            f" {first.tokens:,} tokens; time = bytes / (bandwidth x efficiency) + calls x latency:")
    table = _table(
        ["model", "h", "tp", "grid", "bytes 2D/1D", "sent/device 1D / 2D", "calls 1D / 2D",
         "TP time 1D / 2D", "links (R, C)", "2D faster above", "2D runs"],
        [[x.model, x.hidden, x.tp, f"{x.grid[0]}x{x.grid[1]}", f"{x.bytes_ratio:.2f}",
          f"{x.sent_1d / 2**20:,.1f} / {x.sent_2d / 2**20:,.1f} MiB",
          f"{x.calls_1d} / {x.calls_2d}",
          f"{x.time_1d_s * 1e6:,.0f} / {x.time_2d_s * 1e6:,.0f} us", x.links,
          ("never" if x.crossover_tokens is None else f"{x.crossover_tokens:,.0f} tokens"),
          "yes" if not x.refused else "no: " + x.refused.split(": ", 1)[-1].split(";")[0]]
         for x in rows])
    return head + "\n" + table
