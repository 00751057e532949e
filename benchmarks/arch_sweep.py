"""Issue 21's sweep: does ``offload.load(FOLDER)`` give what ``from_pretrained(FOLDER)`` gives, bit for bit?

For each architecture: a tiny random model (hidden 64, 2-4 layers, vocab 256) saved with ``save_pretrained``
into a temporary folder; the reference is the folder's own class ``from_pretrained`` (fp32); then
``offload.load(FOLDER, ram_tier=0, progress=False)`` (every block streamed, ``$OFFLOAD_CACHE`` inside the
temporary folder). Compared: the logits of one forward on a fixed input (token ids, pixel values or
log-mel features) with ``torch.equal``, and for generative models the 6 greedy tokens of ``generate``.
Every exception is caught per architecture. Writes a JSON file and a markdown table.

    python benchmarks/arch_sweep.py --json bench-out/arch-sweep.json --md bench-out/arch-sweep.md
    python benchmarks/arch_sweep.py --only llama,mamba2     # a subset
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from typing import Any, Callable

IDS = [[1, 5, 9, 30, 7, 100, 42, 17]]
NEW_TOKENS = 6
H = 64  # hidden size everywhere


def _common(layers: int = 2, **kw: Any) -> dict[str, Any]:
    c = dict(vocab_size=256, hidden_size=H, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, max_position_embeddings=128)
    c.update(kw)
    return c


def specs() -> dict[str, Callable[[Any, Any], tuple[str, Any, dict[str, Any], str | None]]]:
    """arch -> builder(tf, torch) returning (model class name, config, forward inputs, generation kind).

    Generation kinds: "ids" (generate(input_ids)), "features" (Whisper: generate(input_features)),
    "image" (LLaVA: generate(input_ids, pixel_values)), None (not generative: logits only)."""
    def ids(torch):
        return {"input_ids": torch.tensor(IDS)}

    def dec(torch, name, cfg):  # a decoder-only LM: token ids in, greedy tokens out
        return name, cfg, ids(torch), "ids"

    def seq2seq(torch):
        return {"input_ids": torch.tensor(IDS), "decoder_input_ids": torch.tensor([[2, 5, 9]])}

    s: dict[str, Callable] = {}
    # --- dense decoder-only
    s["llama"] = lambda tf, torch: dec(torch, "LlamaForCausalLM", tf.LlamaConfig(**_common()))
    s["mistral"] = lambda tf, torch: dec(torch, "MistralForCausalLM", tf.MistralConfig(**_common()))
    s["qwen2"] = lambda tf, torch: dec(torch, "Qwen2ForCausalLM", tf.Qwen2Config(**_common()))
    s["qwen3"] = lambda tf, torch: dec(torch, "Qwen3ForCausalLM", tf.Qwen3Config(**_common(head_dim=16)))
    s["gemma"] = lambda tf, torch: dec(torch, "GemmaForCausalLM", tf.GemmaConfig(**_common(head_dim=16)))
    s["gemma2"] = lambda tf, torch: dec(torch, "Gemma2ForCausalLM", tf.Gemma2Config(
        **_common(head_dim=16, sliding_window=4)))
    s["gemma3_text"] = lambda tf, torch: dec(torch, "Gemma3ForCausalLM", tf.Gemma3TextConfig(
        **_common(head_dim=16, sliding_window=4)))
    s["phi"] = lambda tf, torch: dec(torch, "PhiForCausalLM", tf.PhiConfig(**_common(num_key_value_heads=4)))
    s["phi3"] = lambda tf, torch: dec(torch, "Phi3ForCausalLM", tf.Phi3Config(**_common(pad_token_id=0)))
    s["falcon"] = lambda tf, torch: dec(torch, "FalconForCausalLM", tf.FalconConfig(
        vocab_size=256, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=False))
    s["gpt2"] = lambda tf, torch: dec(torch, "GPT2LMHeadModel", tf.GPT2Config(
        vocab_size=256, n_embd=H, n_layer=2, n_head=4, n_positions=128))
    s["gpt_neox"] = lambda tf, torch: dec(torch, "GPTNeoXForCausalLM", tf.GPTNeoXConfig(
        vocab_size=256, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=128))
    s["gptj"] = lambda tf, torch: dec(torch, "GPTJForCausalLM", tf.GPTJConfig(
        vocab_size=256, n_embd=H, n_layer=2, n_head=4, rotary_dim=8, n_positions=128))
    s["opt"] = lambda tf, torch: dec(torch, "OPTForCausalLM", tf.OPTConfig(
        vocab_size=256, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96,
        word_embed_proj_dim=H, max_position_embeddings=128))
    s["bloom"] = lambda tf, torch: dec(torch, "BloomForCausalLM", tf.BloomConfig(
        vocab_size=256, hidden_size=H, n_layer=2, n_head=4))
    s["mpt"] = lambda tf, torch: dec(torch, "MptForCausalLM", tf.MptConfig(
        vocab_size=256, d_model=H, n_layers=2, n_heads=4, max_seq_len=128))
    s["starcoder2"] = lambda tf, torch: dec(torch, "Starcoder2ForCausalLM", tf.Starcoder2Config(**_common()))
    s["stablelm"] = lambda tf, torch: dec(torch, "StableLmForCausalLM", tf.StableLmConfig(**_common()))
    s["olmo"] = lambda tf, torch: dec(torch, "OlmoForCausalLM", tf.OlmoConfig(**_common(pad_token_id=0)))
    s["olmo2"] = lambda tf, torch: dec(torch, "Olmo2ForCausalLM", tf.Olmo2Config(**_common(pad_token_id=0)))
    s["cohere"] = lambda tf, torch: dec(torch, "CohereForCausalLM", tf.CohereConfig(**_common(pad_token_id=0)))
    s["granite"] = lambda tf, torch: dec(torch, "GraniteForCausalLM", tf.GraniteConfig(**_common()))
    # --- encoder-decoder, speech, vision, encoders
    s["t5"] = lambda tf, torch: ("T5ForConditionalGeneration", tf.T5Config(
        vocab_size=256, d_model=H, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1), seq2seq(torch), "ids")
    s["bart"] = lambda tf, torch: ("BartForConditionalGeneration", tf.BartConfig(
        vocab_size=256, d_model=H, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, max_position_embeddings=128),
        seq2seq(torch), "ids")
    s["mbart"] = lambda tf, torch: ("MBartForConditionalGeneration", tf.MBartConfig(
        vocab_size=256, d_model=H, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, max_position_embeddings=128),
        seq2seq(torch), "ids")
    s["whisper"] = lambda tf, torch: ("WhisperForConditionalGeneration", tf.WhisperConfig(
        vocab_size=256, d_model=H, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, num_mel_bins=16,
        max_source_positions=32, max_target_positions=32, decoder_start_token_id=1, pad_token_id=0,
        eos_token_id=2, bos_token_id=1),
        {"input_features": torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(1)),
         "decoder_input_ids": torch.tensor([[1, 5, 9]])}, "features")
    s["vit"] = lambda tf, torch: ("ViTForImageClassification", tf.ViTConfig(
        hidden_size=H, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=32,
        patch_size=8, num_labels=5),
        {"pixel_values": torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))}, None)
    s["bert"] = lambda tf, torch: ("BertForMaskedLM", tf.BertConfig(
        vocab_size=256, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=128), ids(torch), None)
    s["roberta"] = lambda tf, torch: ("RobertaForMaskedLM", tf.RobertaConfig(
        vocab_size=256, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=130, pad_token_id=0), {"input_ids": torch.tensor([[3] + IDS[0][1:]])}, None)
    # --- state-space and hybrids
    s["mamba"] = lambda tf, torch: dec(torch, "MambaForCausalLM", tf.MambaConfig(
        vocab_size=256, hidden_size=H, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4,
        use_mambapy=False))
    s["mamba2"] = lambda tf, torch: dec(torch, "Mamba2ForCausalLM", tf.Mamba2Config(
        vocab_size=256, hidden_size=H, num_hidden_layers=2, num_heads=8, head_dim=16, expand=2, n_groups=1,
        state_size=16, conv_kernel=4, chunk_size=8))
    s["jamba"] = lambda tf, torch: dec(torch, "JambaForCausalLM", tf.JambaConfig(
        **_common(layers=4), num_experts=4, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
        attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8, mamba_dt_rank=8, mamba_expand=2,
        use_mamba_kernels=False))
    s["zamba2"] = lambda tf, torch: dec(torch, "Zamba2ForCausalLM", tf.Zamba2Config(
        vocab_size=256, hidden_size=H, num_hidden_layers=4, layers_block_type=["mamba", "hybrid", "mamba", "hybrid"],
        mamba_d_state=16, mamba_expand=2, n_mamba_heads=8, mamba_ngroups=1, chunk_size=8, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=96, num_mem_blocks=1, adapter_rank=8, use_mamba_kernels=False,
        max_position_embeddings=128))
    s["falcon_h1"] = lambda tf, torch: dec(torch, "FalconH1ForCausalLM", tf.FalconH1Config(
        **_common(), mamba_d_ssm=128, mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16,
        mamba_expand=2, mamba_chunk_size=8))
    s["bamba"] = lambda tf, torch: dec(torch, "BambaForCausalLM", tf.BambaConfig(
        **_common(layers=2), attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1,
        mamba_d_state=16, mamba_expand=2, mamba_chunk_size=8))
    s["granitemoehybrid"] = lambda tf, torch: dec(torch, "GraniteMoeHybridForCausalLM", tf.GraniteMoeHybridConfig(
        **_common(layers=2), layer_types=["mamba", "attention"], num_local_experts=4, num_experts_per_tok=2,
        shared_intermediate_size=96, mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16,
        mamba_expand=2, mamba_chunk_size=8))
    s["qwen3_next"] = lambda tf, torch: dec(torch, "Qwen3NextForCausalLM", tf.Qwen3NextConfig(
        **_common(layers=4), head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        num_experts=8, num_experts_per_tok=2,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"]))
    # --- mixture of experts
    s["qwen2_moe"] = lambda tf, torch: dec(torch, "Qwen2MoeForCausalLM", tf.Qwen2MoeConfig(
        **_common(), moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2))
    s["qwen3_moe"] = lambda tf, torch: dec(torch, "Qwen3MoeForCausalLM", tf.Qwen3MoeConfig(
        **_common(), moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, head_dim=16))
    s["mixtral"] = lambda tf, torch: dec(torch, "MixtralForCausalLM", tf.MixtralConfig(
        **_common(), num_local_experts=4, num_experts_per_tok=2))
    s["olmoe"] = lambda tf, torch: dec(torch, "OlmoeForCausalLM", tf.OlmoeConfig(
        **_common(pad_token_id=0), num_experts=8, num_experts_per_tok=2))
    s["deepseek_v3"] = lambda tf, torch: dec(torch, "DeepseekV3ForCausalLM", tf.DeepseekV3Config(
        **_common(layers=3), moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, n_group=2, topk_group=1))
    s["gpt_oss"] = lambda tf, torch: dec(torch, "GptOssForCausalLM", tf.GptOssConfig(
        **_common(), num_local_experts=4, num_experts_per_tok=2, head_dim=16,
        layer_types=["sliding_attention", "full_attention"], sliding_window=4))
    # --- vision-language
    s["llava"] = lambda tf, torch: ("LlavaForConditionalGeneration", tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, image_size=16, patch_size=8, projection_dim=32),
        text_config=tf.LlamaConfig(**_common()), image_token_index=255, image_seq_length=4,
        vision_feature_select_strategy="default", vision_feature_layer=-1),
        {"input_ids": torch.tensor([[1, 255, 255, 255, 255, 9, 30, 7]]),
         "pixel_values": torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))}, "image")
    return s


class _Timeout(Exception):
    pass


def _alarm(signum, frame):  # noqa: ARG001
    raise _Timeout("timed out")


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def _generate(model, kind: str, inputs: dict[str, Any], torch) -> Any:
    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    with torch.no_grad():
        if kind == "features":
            return model.generate(input_features=inputs["input_features"], **kw)
        if kind == "image":
            return model.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], **kw)
        return model.generate(inputs["input_ids"], **kw)


def run_one(arch: str, build, work: str, timeout: int) -> dict[str, Any]:
    import torch
    import transformers as tf
    import offload

    row: dict[str, Any] = {"arch": arch, "class": None, "loaded_class": None, "exact_logits": None,
                           "exact_greedy": None, "max_abs_diff": None, "streamed_units": None, "in_place": None,
                           "error": None, "stage": "config", "seconds": None}
    folder = os.path.join(work, arch)
    t0 = time.perf_counter()
    handle = None
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        cls_name, config, inputs, gen = build(tf, torch)
        row["class"], row["generative"] = cls_name, bool(gen)
        cls = getattr(tf, cls_name)
        row["stage"] = "save"
        torch.manual_seed(0)
        model = cls(config).eval()
        model.save_pretrained(folder)
        del model
        row["stage"] = "reference"
        ref = cls.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            want = ref(**inputs).logits
        want_tokens = _generate(ref, gen, inputs, torch) if gen else None
        row["stage"] = "offload.load"
        loaded, handle = offload.load(folder, ram_tier=0, progress=False)
        row["loaded_class"] = type(loaded).__name__
        row["streamed_units"] = handle.stats().streamed_units
        row["in_place"] = bool(handle._store.units) and all(getattr(u, "extents", None) for u in handle._store.units)
        row["stage"] = "forward"
        with torch.no_grad():
            got = loaded(**inputs).logits
        row["exact_logits"] = bool(got.shape == want.shape and torch.equal(got, want))
        if got.shape == want.shape:
            row["max_abs_diff"] = float((got - want).abs().max())
        else:
            row["max_abs_diff"] = f"shape {tuple(got.shape)} vs {tuple(want.shape)}"
        if gen:
            row["stage"] = "generate"
            got_tokens = _generate(loaded, gen, inputs, torch)
            row["exact_greedy"] = bool(got_tokens.shape == want_tokens.shape and torch.equal(got_tokens, want_tokens))
            row["tokens_ref"] = want_tokens.tolist()
            row["tokens_offload"] = got_tokens.tolist()
        row["stage"] = "done"
    except BaseException as e:  # noqa: BLE001  (every architecture's failure is a row, not the end of the sweep)
        if isinstance(e, KeyboardInterrupt):
            raise
        row["error"] = _first_line(e).replace(work, "$TMP")
        row["traceback"] = traceback.format_exc(limit=12)[-4000:]
    finally:
        signal.alarm(0)
        if handle is not None:
            try:
                handle.disable()
            except Exception as e:  # noqa: BLE001
                row["error"] = row["error"] or f"disable: {_first_line(e)}"
        row["seconds"] = round(time.perf_counter() - t0, 2)
        shutil.rmtree(folder, ignore_errors=True)
    return row


def _yn(v: Any) -> str:
    return "n.a." if v is None else ("yes" if v else "**no**")


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| architecture | class | exact logits | exact greedy | streamed units | error (first line) |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        logits = "—" if r["exact_logits"] is None else _yn(r["exact_logits"])
        greedy = ("—" if r.get("generative") else "n.a.") if r["exact_greedy"] is None else _yn(r["exact_greedy"])
        err = (r["error"] or "").replace("|", "\\|")
        if err:
            err = f"({r['stage']}) {err}"
        out.append(f"| {r['arch']} | `{r['class']}` | {logits} | {greedy} | "
                   f"{'' if r['streamed_units'] is None else r['streamed_units']} | {err} |")
    return "\n".join(out)


def summary(rows: list[dict[str, Any]]) -> dict[str, int]:
    ok = [r for r in rows if r["error"] is None and r["exact_logits"] and r["exact_greedy"] in (True, None)]
    return {"architectures": len(rows), "exact": len(ok),
            "mismatch": sum(1 for r in rows if r["error"] is None and not (r["exact_logits"] and r["exact_greedy"] in (True, None))),
            "error": sum(1 for r in rows if r["error"] is not None)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="bench-out/arch-sweep.json")
    ap.add_argument("--md", default="bench-out/arch-sweep.md")
    ap.add_argument("--only", default=None, help="comma-separated architectures (default: all)")
    ap.add_argument("--timeout", type=int, default=120, help="seconds per architecture")
    ap.add_argument("--workdir", default=None, help="where the temporary folders go (default: $TMPDIR)")
    args = ap.parse_args(argv)

    work = tempfile.mkdtemp(prefix="arch-sweep-", dir=args.workdir)
    os.environ["OFFLOAD_CACHE"] = os.path.join(work, "cache")  # before offload is imported
    warnings.filterwarnings("ignore")
    import torch
    import transformers as tf
    tf.logging.set_verbosity_error()
    tf.logging.disable_progress_bar()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    all_specs = specs()
    names = list(all_specs) if not args.only else [a.strip() for a in args.only.split(",") if a.strip()]
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    try:
        for arch in names:
            if arch not in all_specs:
                rows.append({"arch": arch, "class": None, "exact_logits": None, "exact_greedy": None,
                             "streamed_units": None, "error": "unknown architecture in this sweep", "stage": "config"})
                continue
            r = run_one(arch, all_specs[arch], work, args.timeout)
            rows.append(r)
            status = "ok" if r["error"] is None and r["exact_logits"] and r["exact_greedy"] in (True, None) else \
                (r["error"] or f"logits exact={r['exact_logits']} greedy exact={r['exact_greedy']}")
            print(f"{arch:18s} {r['seconds']:7.1f}s  {status}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    s = summary(rows)
    result = {"summary": s, "seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__,
              "transformers": tf.__version__, "python": platform.python_version(), "new_tokens": NEW_TOKENS,
              "input_ids": IDS, "rows": rows}
    for p in (args.json, args.md):
        if os.path.dirname(p):
            os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    md = table(rows) + (f"\n\n**{s['exact']} of {s['architectures']}** bit-identical "
                        f"({s['mismatch']} mismatched, {s['error']} errors).\n")
    with open(args.md, "w") as f:
        f.write(md)
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
