"""The text of `mpqc compare`: rendered from its result alone, computing nothing."""

from __future__ import annotations


def render_comparison(result: dict) -> str:
    lines = [f"{result['build']}: {result['model']} on {result['target']}, {result['quantized_layers']} quantized layer(s), "
             f"compared with FP32 on {result['data']} ({result['samples']} samples), worst first"]
    if result["layers"]:
        width = max(len(row["name"]) for row in result["layers"])
        lines.append(f"  {'layer':<{width}}  {'precision':<9}  {'sqnr dB':>8}  {'cosine':>8}  {'input sqnr dB':>13}")
        for row in result["layers"]:
            given = "-" if row["input_sqnr_db"] is None else f"{row['input_sqnr_db']:.2f}"
            lines.append(f"  {row['name']:<{width}}  {row['precision']:<9}  {row['sqnr_db']:8.2f}  {row['cosine_mean']:8.5f}  "
                         f"{given:>13}")
        effect = result["probe_effect"]
        lines.append(f"  (read out as extra outputs, layers run as float ops on dequantized values, not as fused integer kernels; "
                     f"that model's output is {effect['sqnr_db']:.1f} dB SQNR from the built model's own)")
    keep = result.get("keep_float")
    if keep is not None:
        lines.append("fidelity against FP32 of the whole model, with layers kept fp32:")
        if not keep["relowered_matches_build"]:
            lines.append(f"  {'model.qdq.onnx':<32} {_numbers(keep['built'])}")
        label = "as built" if keep["relowered_matches_build"] else "its policy, lowered here"
        lines.append(f"  {label:<32} {_numbers(keep['before'])}")
        for trial in keep["trials"]:
            label = trial["requested"][0] if len(trial["requested"]) == 1 else f"all {len(trial['requested'])} above"
            tied = len(trial["fp32_layers"]) - len(trial["requested"])
            label += f" (+{tied} tied)" if tied > 0 else ""
            lines.append(f"  {label:<32} {_numbers(trial['fidelity'], trial['change'])}")
        if not keep["relowered_matches_build"]:
            lines.append("  note: this mpqc lowers the build's policy to another model than model.qdq.onnx; "
                         "the changes are against its own lowering of that policy")
    return "\n".join(lines)


def _numbers(fidelity: dict, change: dict | None = None) -> str:
    """Every number of the fidelity; with `change`, only those that changed, each with its change."""
    if change is None:
        return ", ".join(f"{key} {value:.4g}" for key, value in fidelity.items() if isinstance(value, float))
    shown = [f"{key} {fidelity[key]:.4g} ({delta:+.4g})" for key, delta in change.items() if delta != 0]
    return ", ".join(shown) or "no change"
