#!/usr/bin/env python3
"""Golden results for moeflow from Hugging Face transformers' own MoE blocks.

For each family (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2, DeepSeek-V3) this builds a tiny
*ForCausalLM model from transformers' config and modeling classes, gives the MoE block of one layer
random bf16-representable weights (the DeepSeek-V3 correction bias stays fp32, as in real
checkpoints), runs that block in fp32 on CPU for several T, and writes under OUT/<family>/:

  model.safetensors  the layer's MoE weights under the Hugging Face *checkpoint* names, as
                     transformers' own save_pretrained writes them (its reverse weight conversion
                     turns the fused experts.gate_up_proj / down_proj back into per-expert tensors);
                     cross-checked against a hand-written split of the fused parameters
  config.json        transformers' own config dictionary of that model (config.to_dict())
  io.safetensors     x_T<T> [T, H] and y_T<T> [T, H] in fp32 for each T
  golden.json        versions, sizes, and what was checked (router vs DESIGN.md, conversion)

and OUT/README.md, OUT/manifest.json. The torch and transformers versions are also in every
safetensors file's __metadata__.

x and the weights are bf16-representable, so an fp32 engine, a bf16 engine (bf16 storage of x and
of the weights) and transformers all read exactly the same numbers. Token rows whose routing lies
within --tie-margin of a tie are redrawn (golden.json says how many), so that a correct engine
cannot pick a different expert set than transformers from rounding alone.

Usage (CPU is enough; needs torch, transformers and safetensors):
    python3 tools/hf_golden.py --out tests/golden_hf
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import traceback

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

# Per family: transformers classes, the layer written, the MoE block's config fields (tiny sizes),
# and the non-MoE fields the tiny model needs to be built at all.
_ATTN = dict(vocab_size=32, max_position_embeddings=64, num_attention_heads=4, rms_norm_eps=1e-6,
             tie_word_embeddings=False)
_MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
FAMILIES = {
    "mixtral": dict(
        config_cls="MixtralConfig", model_cls="MixtralForCausalLM", block_cls="MixtralSparseMoeBlock",
        router_cls="MixtralTopKRouter", layer=1, prefix="model.layers.{L}.block_sparse_moe.",
        moe=dict(hidden_size=128, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2,
                 hidden_act="silu", router_jitter_noise=0.0),
        model=dict(_ATTN, num_hidden_layers=2, num_key_value_heads=2),
        design=dict(scoring="softmax", method="greedy", renorm="always", scale="never")),
    "qwen2_moe": dict(
        config_cls="Qwen2MoeConfig", model_cls="Qwen2MoeForCausalLM", block_cls="Qwen2MoeSparseMoeBlock",
        router_cls="Qwen2MoeTopKRouter", layer=0, prefix="model.layers.{L}.mlp.",
        moe=dict(hidden_size=128, moe_intermediate_size=24, num_experts=16, num_experts_per_tok=4,
                 shared_expert_intermediate_size=64, norm_topk_prob=False, hidden_act="silu",
                 decoder_sparse_step=1, mlp_only_layers=[]),
        model=dict(_ATTN, num_hidden_layers=1, num_key_value_heads=2, intermediate_size=64),
        design=dict(scoring="softmax", method="greedy", renorm="norm_topk_prob", scale="never")),
    "qwen3_moe": dict(
        config_cls="Qwen3MoeConfig", model_cls="Qwen3MoeForCausalLM", block_cls="Qwen3MoeSparseMoeBlock",
        router_cls="Qwen3MoeTopKRouter", layer=2, prefix="model.layers.{L}.mlp.",
        moe=dict(hidden_size=64, moe_intermediate_size=24, num_experts=32, num_experts_per_tok=8,
                 norm_topk_prob=True, hidden_act="silu", decoder_sparse_step=1, mlp_only_layers=[]),
        model=dict(_ATTN, num_hidden_layers=3, num_key_value_heads=2, intermediate_size=64, head_dim=16),
        design=dict(scoring="softmax", method="greedy", renorm="norm_topk_prob", scale="never")),
    "deepseek_v2": dict(
        config_cls="DeepseekV2Config", model_cls="DeepseekV2ForCausalLM", block_cls="DeepseekV2Moe",
        router_cls="DeepseekV2TopkRouter", layer=1, prefix="model.layers.{L}.mlp.",
        moe=dict(hidden_size=64, moe_intermediate_size=16, n_routed_experts=32, num_experts_per_tok=6,
                 n_shared_experts=2, scoring_func="softmax", topk_method="group_limited_greedy", n_group=8,
                 topk_group=3, norm_topk_prob=False, routed_scaling_factor=16.0, hidden_act="silu",
                 first_k_dense_replace=1),
        model=dict(_ATTN, **_MLA, num_hidden_layers=2, q_lora_rank=None, intermediate_size=64),
        design=dict(scoring="softmax", method="group_limited_greedy", renorm="deepseek", scale="v2")),
    "deepseek_v3": dict(
        config_cls="DeepseekV3Config", model_cls="DeepseekV3ForCausalLM", block_cls="DeepseekV3MoE",
        router_cls="DeepseekV3TopkRouter", layer=3, prefix="model.layers.{L}.mlp.",
        moe=dict(hidden_size=64, moe_intermediate_size=24, n_routed_experts=32, num_experts_per_tok=8,
                 n_shared_experts=1, scoring_func="sigmoid", topk_method="noaux_tc", n_group=8, topk_group=4,
                 norm_topk_prob=True, routed_scaling_factor=2.5, hidden_act="silu", first_k_dense_replace=3),
        model=dict(_ATTN, **_MLA, num_hidden_layers=4, q_lora_rank=16, intermediate_size=64),
        design=dict(scoring="sigmoid", method="noaux_tc", renorm="deepseek", scale="v3")),
}

ROUTER_SCALE = 2.0  # router weights ~ U(±ROUTER_SCALE/sqrt(H)): routing decisive enough to be a test
BIAS_SCALE = 0.1    # e_score_correction_bias ~ U(±BIAS_SCALE), fp32


def bf16_exact(t):
    return t.to(torch.bfloat16).to(torch.float32)


def uniform(gen, shape, scale):
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2.0 - 1.0).mul(scale).to(torch.float32)


def nonzero_uniform_bf16(gen, shape, scale):
    t = bf16_exact(uniform(gen, shape, scale))
    while (t == 0).any():  # never zeros (DESIGN.md, random data)
        z = t == 0
        t[z] = bf16_exact(uniform(gen, (int(z.sum()),), scale))
    return t


def cfg_get(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def routing_fields(cfg, fam):
    """The routing as DESIGN.md reads it from a config."""
    d = fam["design"]
    return dict(
        E=int(cfg_get(cfg, "num_local_experts", "num_experts", "n_routed_experts")), k=int(cfg.num_experts_per_tok),
        scoring=d["scoring"], method=d["method"], n_group=int(cfg_get(cfg, "n_group", default=1) or 1),
        topk_group=int(cfg_get(cfg, "topk_group", default=1) or 1),
        norm=bool(cfg_get(cfg, "norm_topk_prob", default=False)),
        scale=float(cfg_get(cfg, "routed_scaling_factor", default=1.0)), renorm=d["renorm"], scale_rule=d["scale"])


def design_route(x, router, bias, r):
    """DESIGN.md's gate in fp64: ids [T,k] (sorted per token), weights [T,k] in that order, and each
    token's margin (how far the choice is from a tie: expert and group score gaps)."""
    logits = x.double() @ router.double().T
    T, E = logits.shape
    s = torch.softmax(logits, dim=-1) if r["scoring"] == "softmax" else torch.sigmoid(logits)
    choice = s + bias.double() if (r["method"] == "noaux_tc" and bias is not None) else s.clone()
    margin = torch.full((T,), float("inf"), dtype=torch.float64)
    allowed = torch.ones_like(choice, dtype=torch.bool)
    if r["method"] in ("group_limited_greedy", "noaux_tc"):
        G = r["n_group"]
        grouped = (s if r["method"] == "group_limited_greedy" else choice).view(T, G, E // G)
        gs = grouped.max(dim=-1).values if r["method"] == "group_limited_greedy" else grouped.topk(2, dim=-1).values.sum(-1)
        order = gs.sort(dim=-1, descending=True)
        if r["topk_group"] < G:
            margin = torch.minimum(margin, order.values[:, r["topk_group"] - 1] - order.values[:, r["topk_group"]])
        kept = torch.zeros(T, G, dtype=torch.bool)
        kept.scatter_(1, order.indices[:, : r["topk_group"]], True)
        allowed = kept.repeat_interleave(E // G, dim=1)
    masked = choice.masked_fill(~allowed, float("-inf"))
    top = masked.sort(dim=-1, descending=True)
    k = r["k"]
    if k < int(allowed.sum(-1).min()):
        margin = torch.minimum(margin, top.values[:, k - 1] - top.values[:, k])
    ids = top.indices[:, :k]
    w = s.gather(1, ids)
    renorm = {"always": True, "norm_topk_prob": r["norm"], "deepseek": r["norm"] and k > 1,
              "deepseek_any_k": r["norm"]}[r["renorm"]]
    if renorm:
        w = w / (w.sum(-1, keepdim=True) + (1e-20 if r["renorm"].startswith("deepseek") else 0.0))
    if r["scale_rule"] == "v3" or (r["scale_rule"] == "v2" and not renorm):
        w = w * r["scale"]
    ids_sorted, perm = ids.sort(dim=-1)
    return ids_sorted, w.gather(1, perm), margin


def greedy_ids(x, router, bias, r, use_groups=True, use_bias=True):
    """Selections with the group limit or the bias switched off: do they matter for this data?"""
    rr = dict(r)
    if not use_groups:
        rr["method"] = "greedy" if r["method"] != "noaux_tc" else "noaux_tc"
        if r["method"] == "noaux_tc":
            rr["n_group"], rr["topk_group"] = 1, 1
    return design_route(x, router, bias if use_bias else (torch.zeros_like(bias) if bias is not None else None), rr)[0]


def transformers_route(gate, x):
    out = gate(x)
    w, ids = out[1], out[2]
    ids_sorted, perm = ids.sort(dim=-1)
    return ids_sorted, w.gather(1, perm).double()


def compare_routes(tf, design):
    same_sets = bool(torch.equal(tf[0], design[0]))
    diff = float((tf[1] - design[1]).abs().max() / design[1].abs().max()) if same_sets else float("nan")
    return same_sets, diff


def build(fam, seed, overrides=None):
    config_cls = getattr(transformers, fam["config_cls"])
    fields = dict(fam["model"])
    fields.update(fam["moe"])
    fields.update(overrides or {})
    cfg = config_cls(**fields, experts_implementation="eager")
    torch.manual_seed(seed)
    model = getattr(transformers, fam["model_cls"])(cfg).to(torch.float32).eval()
    return cfg, model


def make_family(name, fam, out_dir, tokens, seed, tie_margin):
    L = fam["layer"]
    cfg, model = build(fam, seed)
    block = model.model.layers[L].mlp
    block_cls = getattr(transformers, fam["block_cls"]) if hasattr(transformers, fam["block_cls"]) else None
    if block_cls is None:
        import importlib
        block_cls = getattr(importlib.import_module(type(block).__module__), fam["block_cls"])
    assert isinstance(block, block_cls), f"{name}: layer {L}'s mlp is {type(block).__name__}, not {fam['block_cls']}"
    notes = []

    # Random weights: bf16-representable, never zero; the correction bias fp32.
    gen = torch.Generator().manual_seed(seed)
    H = cfg.hidden_size
    with torch.no_grad():
        for pname, p in list(block.named_parameters()) + list(block.named_buffers()):
            if pname.endswith("e_score_correction_bias"):
                p.copy_(uniform(gen, p.shape, BIAS_SCALE))
                continue
            scale = (ROUTER_SCALE if pname == "gate.weight" else 1.0) / p.shape[-1] ** 0.5
            p.copy_(nonzero_uniform_bf16(gen, p.shape, scale))
    params = {n: tuple(p.shape) for n, p in list(block.named_parameters()) + list(block.named_buffers())}

    # Checkpoint names exactly as transformers writes them: save_pretrained (reverse conversion).
    prefix_ckpt = fam["prefix"].format(L=L)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        files = sorted(f for f in os.listdir(tmp) if f.endswith(".safetensors"))
        saved = {}
        for f in files:
            with safe_open(os.path.join(tmp, f), framework="pt") as st:
                for key in st.keys():
                    if key.startswith(prefix_ckpt):
                        saved[key] = st.get_tensor(key).to(torch.float32)
        # Round trip: transformers' own loader (forward conversion) gives back the same block.
        reloaded = getattr(transformers, fam["model_cls"]).from_pretrained(tmp, experts_implementation="eager")
        rb = reloaded.model.layers[L].mlp
        rt = {n: v for n, v in list(rb.named_parameters()) + list(rb.named_buffers())}
        for n, v in list(block.named_parameters()) + list(block.named_buffers()):
            assert torch.equal(rt[n].to(torch.float32), v), f"{name}: {n} differs after save_pretrained/from_pretrained"
    if not saved:
        raise RuntimeError(f"{name}: save_pretrained wrote no tensor under {prefix_ckpt}")

    # The same split by hand, from the modeling code: gate_up_proj [E, 2I, H] is [gate; up] along
    # dim 1 (forward: linear(x, gate_up_proj[e]).chunk(2) -> gate, up); down_proj [E, H, I].
    ex = block.experts
    gate_up, down = ex.gate_up_proj.detach(), ex.down_proj.detach()
    E, twoI, Hh = gate_up.shape
    I = twoI // 2
    assert Hh == H and tuple(down.shape) == (E, H, I), f"{name}: fused shapes {gate_up.shape} {down.shape}"
    g_name, u_name, d_name = ("w1", "w3", "w2") if name == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    manual = {prefix_ckpt + "gate.weight": block.gate.weight.detach()}
    if hasattr(block.gate, "e_score_correction_bias"):
        manual[prefix_ckpt + "gate.e_score_correction_bias"] = block.gate.e_score_correction_bias.detach()
    for e in range(E):
        base = f"{prefix_ckpt}experts.{e}."
        manual[base + g_name + ".weight"] = gate_up[e, :I]
        manual[base + u_name + ".weight"] = gate_up[e, I:]
        manual[base + d_name + ".weight"] = down[e]
    for sub in ("shared_expert", "shared_experts"):
        if hasattr(block, sub):
            m = getattr(block, sub)
            for proj in ("gate_proj", "up_proj", "down_proj"):
                manual[f"{prefix_ckpt}{sub}.{proj}.weight"] = getattr(m, proj).weight.detach()
    if hasattr(block, "shared_expert_gate"):
        manual[prefix_ckpt + "shared_expert_gate.weight"] = block.shared_expert_gate.weight.detach()
    if set(manual) != set(saved):
        raise RuntimeError(f"{name}: save_pretrained names differ from the expected checkpoint names:\n"
                           f"  only saved: {sorted(set(saved) - set(manual))[:8]}\n"
                           f"  only expected: {sorted(set(manual) - set(saved))[:8]}")
    for key, v in manual.items():
        assert torch.equal(saved[key], v.to(torch.float32)), f"{name}: {key} differs from the hand-written split"

    versions = dict(transformers_version=transformers.__version__, torch_version=torch.__version__,
                    python_version=platform.python_version())
    meta = dict(format="pt", generator="tools/hf_golden.py", family=name, layer=str(L), block_class=fam["block_cls"],
                **versions)
    ckpt = {k: (v.contiguous() if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16).contiguous())
            for k, v in sorted(saved.items())}
    for k, v in ckpt.items():
        assert torch.equal(v.to(torch.float32), saved[k]), f"{name}: {k} is not bf16-exact"
    fam_dir = os.path.join(out_dir, name)
    os.makedirs(fam_dir, exist_ok=True)
    save_file(ckpt, os.path.join(fam_dir, "model.safetensors"), metadata=meta)
    config_dict = cfg.to_dict()
    with open(os.path.join(fam_dir, "config.json"), "w") as f:
        json.dump(config_dict, f, indent=2, sort_keys=True)
        f.write("\n")

    # Inputs and outputs. The router is checked against DESIGN.md on the same x.
    r = routing_fields(cfg, fam)
    router = block.gate.weight.detach()
    bias = block.gate.e_score_correction_bias.detach() if hasattr(block.gate, "e_score_correction_bias") else None
    io, per_t = {}, []
    for T in tokens:
        xgen = torch.Generator().manual_seed(seed * 7919 + T)
        x = nonzero_uniform_bf16(xgen, (T, H), 1.0)
        redrawn = 0
        for _ in range(10000):
            margin = design_route(x, router, bias, r)[2]
            bad = margin < tie_margin
            if not bad.any():
                break
            redrawn += int(bad.sum())
            x[bad] = nonzero_uniform_bf16(xgen, (int(bad.sum()), H), 1.0)
        else:
            raise RuntimeError(f"{name}: could not draw T={T} rows away from routing ties")
        with torch.no_grad():
            y = block(x.view(1, T, H))
            y = (y[0] if isinstance(y, tuple) else y).reshape(T, H).contiguous()
            tf = transformers_route(block.gate, x)
        design = design_route(x, router, bias, r)
        same, wdiff = compare_routes(tf, design)
        assert torch.isfinite(y).all() and (y != 0).any(), f"{name}: y is not finite or all zero"
        entry = dict(T=T, rows_redrawn=redrawn, min_margin=float(design[2].min()),
                     router_sets_match_design=same, router_weights_rel_max_diff_vs_design=wdiff,
                     y_norm=float(y.norm()))
        if r["method"] != "greedy":
            entry["tokens_where_group_limit_changes_choice"] = int(
                (greedy_ids(x, router, bias, r, use_groups=False) != design[0]).any(-1).sum())
        if bias is not None:
            entry["tokens_where_bias_changes_choice"] = int(
                (greedy_ids(x, router, bias, r, use_bias=False) != design[0]).any(-1).sum())
        # The default experts implementation (what from_pretrained picks) against the eager loop.
        ecfg = block.experts.config
        try:
            ecfg._experts_implementation = "grouped_mm"
            with torch.no_grad():
                y2 = block(x.view(1, T, H))
                y2 = (y2[0] if isinstance(y2, tuple) else y2).reshape(T, H)
            entry["grouped_mm_rel_norm_diff_vs_eager"] = float((y2 - y).norm() / y.norm())
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            entry["grouped_mm_rel_norm_diff_vs_eager"] = f"not run: {type(e).__name__}: {str(e)[:120]}"
        finally:
            ecfg._experts_implementation = "eager"
        if not same or wdiff > 1e-5:
            notes.append(f"T={T}: transformers' router differs from DESIGN.md's rule (sets equal: {same}, "
                         f"weights rel diff {wdiff})")
        io[f"x_T{T}"] = x.contiguous()
        io[f"y_T{T}"] = y.to(torch.float32).contiguous()
        per_t.append(entry)
    save_file(io, os.path.join(fam_dir, "io.safetensors"),
              metadata=dict(meta, tokens=",".join(str(t) for t in tokens), tie_margin=str(tie_margin)))

    # Router semantics probes: the family's router class under other routing settings, on the
    # largest x, against DESIGN.md. Mismatches are reported (golden.json, README), not hidden.
    probes = []
    x = io[f"x_T{tokens[-1]}"]
    variants = []
    if r["renorm"] != "always":
        variants += [dict(norm_topk_prob=v) for v in (False, True)]
    if r["renorm"] == "deepseek":
        variants += [dict(norm_topk_prob=True, num_experts_per_tok=1)]
    if r["method"] == "group_limited_greedy":
        variants += [dict(topk_method="greedy")]
    router_cls = type(block.gate)
    for v in variants:
        try:
            vfields = dict(fam["model"])
            vfields.update(fam["moe"])
            vfields.update(v)
            vcfg = getattr(transformers, fam["config_cls"])(**vfields, experts_implementation="eager")
            gate = router_cls(vcfg).to(torch.float32)
            with torch.no_grad():
                gate.weight.copy_(router)
                if bias is not None:
                    gate.e_score_correction_bias.copy_(bias)
                tfv = transformers_route(gate, x)
            rv = routing_fields(vcfg, fam)
            if v.get("topk_method") == "greedy":
                rv["method"] = "greedy"
            same_v, diff_v = compare_routes(tfv, design_route(x, router, bias, rv))
            ok = same_v and diff_v < 1e-5
            probe = dict(variant=v, matches_design=ok, sets_equal=same_v, weights_rel_max_diff=diff_v)
            if not ok:
                # Which small change of DESIGN.md's rule does transformers follow instead?
                alternatives = {
                    "ignores norm_topk_prob (never renormalises; scales by routed_scaling_factor)":
                        dict(rv, norm=False),
                    "renormalises whenever norm_topk_prob, also for k = 1": dict(rv, renorm="deepseek_any_k"),
                }
                probe["transformers_behaves_as"] = [
                    label for label, alt in alternatives.items()
                    if (lambda c: c[0] and c[1] < 1e-5)(compare_routes(tfv, design_route(x, router, bias, alt)))]
                notes.append(f"{fam['router_cls']} with {v}: differs from DESIGN.md (weights rel diff {diff_v:.3g}); "
                             f"transformers {' / '.join(probe['transformers_behaves_as']) or 'does something else'}")
            probes.append(probe)
        except Exception as e:  # noqa: BLE001
            probes.append(dict(variant=v, error=f"{type(e).__name__}: {str(e)[:200]}"))

    info = dict(family=name, layer=L, **versions, block_class=fam["block_cls"],
                block_module=type(block).__module__, model_class=fam["model_cls"],
                checkpoint_prefix=prefix_ckpt, checkpoint_tensors=len(ckpt),
                checkpoint_names_from="transformers save_pretrained (reverse weight conversion), equal to the "
                                      "hand-written split of experts.gate_up_proj [E,2I,H] = [gate; up] and "
                                      "experts.down_proj [E,H,I]; save_pretrained/from_pretrained round trip exact",
                module_params=params, routing=r, tokens=list(tokens), per_T=per_t, router_probes=probes,
                notes=notes, weights_dtype="bf16 (e_score_correction_bias f32)", io_dtype="f32",
                seed=seed, router_scale=f"U(+-{ROUTER_SCALE}/sqrt(H))", bias_scale=f"U(+-{BIAS_SCALE})",
                weight_scale="U(+-1/sqrt(fan_in)), bf16-exact", x="U(-1,1), bf16-exact")
    with open(os.path.join(fam_dir, "golden.json"), "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)
        f.write("\n")
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (tests/golden_hf in the repository)")
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of " + ",".join(FAMILIES))
    ap.add_argument("--tokens", default="1,7,32")
    ap.add_argument("--seed", type=int, default=20240611)
    ap.add_argument("--tie-margin", type=float, default=1e-4,
                    help="redraw token rows whose routing score gap (expert or group) is below this")
    a = ap.parse_args()
    torch.set_default_dtype(torch.float32)
    tokens = [int(t) for t in a.tokens.split(",")]
    os.makedirs(a.out, exist_ok=True)
    infos, failed = {}, {}
    for i, name in enumerate(a.families.split(",")):
        try:
            infos[name] = make_family(name, FAMILIES[name], a.out, tokens, a.seed + 1000 * i, a.tie_margin)
            print(f"{name}: ok  " + json.dumps({k: infos[name][k] for k in ("per_T", "router_probes", "notes")}))
        except Exception:  # noqa: BLE001 - go on with the other families, fail at the end
            failed[name] = traceback.format_exc()
            print(f"{name}: FAILED\n{failed[name]}", file=sys.stderr)
    manifest = dict(transformers_version=transformers.__version__, torch_version=torch.__version__,
                    python_version=platform.python_version(), command=" ".join(["python3"] + sys.argv),
                    families={n: dict(layer=v["layer"], block_class=v["block_class"], notes=v["notes"])
                              for n, v in infos.items()})
    with open(os.path.join(a.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(os.path.join(a.out, "README.md"), "w") as f:
        f.write(README.format(tv=transformers.__version__, pv=torch.__version__, tokens=a.tokens,
                              rows="\n".join(f"| {n} | {v['block_class']} | {v['layer']} | "
                                             f"{'; '.join(v['notes']) or 'router matches DESIGN.md'} |"
                                             for n, v in infos.items())))
    if failed:
        sys.exit(1)


README = """# Golden MoE layers from Hugging Face transformers

Written by `tools/hf_golden.py` with transformers {tv} and torch {pv} (fp32, CPU); do not edit.
Each folder holds one layer of a tiny model of that family: `model.safetensors` (the layer's MoE
weights under the Hugging Face checkpoint names, bf16; the DeepSeek-V3 correction bias f32),
`config.json` (transformers' own config dictionary), `io.safetensors` (`x_T<T>`, `y_T<T>` in fp32
for T = {tokens}: the input and transformers' output of that layer's MoE block) and `golden.json`
(sizes, what was checked, per-T routing margins, router probes against DESIGN.md).

Regenerate (any machine with torch, transformers and safetensors; CPU is enough):

    python3 tools/hf_golden.py --out tests/golden_hf

| family | transformers block | layer | router vs DESIGN.md |
|---|---|---|---|
{rows}
"""

if __name__ == "__main__":
    main()
