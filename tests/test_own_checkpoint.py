"""A user's own checkpoint, start to finish: a tiny Llama with a tokenizer trained here (no hub).

The right weights every time (provenance-checked store cache), text decoded as the tokenizer
decodes it, the same text from the folder and from its store, and bad input refused in one line
with exit code 2 before anything is converted.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import random

import pytest
import torch

from offload.cli import build_parser, main

CORPUS = ["the naïve café serves crème brûlée", "a model reads its weights from the disk\nline two",
          "streaming blocks from disk while computing", "naïve café, naïve idea."] * 4


@pytest.fixture(scope="module")
def tokenizers():
    """A byte-level BPE (GPT-2 style) and a SentencePiece-style (Metaspace) tokenizer, trained on a few lines.

    The byte-level vocabulary is tiny, so 'ï' and 'é' are two tokens each (half a character per token)."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    byte = Tokenizer(models.BPE())
    byte.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte.decoder = decoders.ByteLevel()
    byte.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=262, show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    meta = Tokenizer(models.BPE(unk_token="<unk>"))
    meta.pre_tokenizer = pre_tokenizers.Metaspace()
    meta.decoder = decoders.Metaspace()
    meta.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=90, special_tokens=["<unk>"], show_progress=False))
    return {"byte-level": tf.PreTrainedTokenizerFast(tokenizer_object=byte),
            "metaspace": tf.PreTrainedTokenizerFast(tokenizer_object=meta, unk_token="<unk>")}


def save_llama(folder, tokenizer, seed: int, safetensors: bool = True):
    """A 2-layer Llama in ``folder``, with the tokenizer saved beside it (``save_pretrained``)."""
    import transformers as tf
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = tf.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    if not safetensors:  # what older checkpoints ship (Transformers 5 saves safetensors only)
        os.unlink(os.path.join(folder, "model.safetensors"))
        torch.save(model.state_dict(), os.path.join(folder, "pytorch_model.bin"))
    tokenizer.save_pretrained(folder)
    return model


def expected_text(model, tokenizer, prompt: str, n: int) -> str:
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


NOISE = ("torchao", "triton", "_pytree.py", "deprecated")  # third-party import chatter, not ours


def run(capsys, *args: str) -> tuple[int, str, list[str]]:
    capsys.readouterr()  # drop what came before (save_pretrained's progress bars)
    code = main(list(args))
    cap = capsys.readouterr()
    return code, cap.out, [x for x in cap.err.splitlines() if x.strip() and not any(n in x for n in NOISE)]


def generated(out: str) -> str:
    """The streamed text: after the plan (its last line names the RAM for weights), before the summary line."""
    lines = out.split("\n")
    start = next(i for i, x in enumerate(lines) if "RAM for weights" in x) + 1
    assert lines[-1] == "" and "tokens x batch" in lines[-2], out
    return "\n".join(lines[start:-2])


RUN = ("--prompt", "naïve café", "--max-new-tokens", "6", "-q")


def test_same_folder_name_each_runs_its_own_weights(tmp_path, tokenizers, capsys):
    tok = tokenizers["byte-level"]
    a = save_llama(tmp_path / "a" / "tiny-llama", tok, seed=0)
    b = save_llama(tmp_path / "b" / "tiny-llama", tok, seed=1)
    want = [expected_text(m, tok, "naïve café", 6) for m in (a, b)]
    assert want[0] != want[1]
    for folder, text in zip(("a", "b"), want):
        code, out, _ = run(capsys, "run", str(tmp_path / folder / "tiny-llama"), *RUN)
        assert code == 0 and generated(out) == text
    # each keeps its own cached store: running the first again reuses it
    code, out, err = run(capsys, "run", str(tmp_path / "a" / "tiny-llama"), *RUN)
    assert code == 0 and generated(out) == want[0] and any(x.startswith("offload: reusing store") for x in err)


def test_resaved_weights_are_picked_up(tmp_path, tokenizers, capsys):
    tok = tokenizers["byte-level"]
    folder = tmp_path / "tiny-llama"
    old = save_llama(folder, tok, seed=0)
    code, out, err = run(capsys, "run", str(folder), *RUN)
    assert code == 0 and generated(out) == expected_text(old, tok, "naïve café", 6)
    assert any("offload: indexing" in x for x in err)  # a folder in its own dtype is read in place
    code, out, err = run(capsys, "run", str(folder), *RUN)
    assert code == 0 and [x for x in err if "store" in x][0].startswith("offload: reusing store")
    code, out, err = run(capsys, "run", str(folder), "--rebuild", *RUN)
    assert code == 0 and any("offload: indexing" in x and "(--rebuild)" in x for x in err)
    new = save_llama(folder, tok, seed=1)
    code, out, err = run(capsys, "run", str(folder), *RUN)
    assert code == 0 and generated(out) == expected_text(new, tok, "naïve café", 6)
    assert any("offload: indexing" in x and "model.safetensors" in x for x in err)


def test_pickle_only_folder_is_refused_even_when_a_store_is_cached(tmp_path, tokenizers, capsys):
    tok = tokenizers["byte-level"]
    folder = tmp_path / "tiny-llama"
    save_llama(folder, tok, seed=0)
    assert run(capsys, "run", str(folder), *RUN)[0] == 0  # a store is cached now
    model = save_llama(folder, tok, seed=2, safetensors=False)
    assert (folder / "pytorch_model.bin").exists()
    code, out, err = run(capsys, "run", str(folder), *RUN)
    assert code == 2 and len(err) == 1 and "pickle" in err[0] and out == ""
    code, out, _ = run(capsys, "run", str(folder), "--allow-pickle", *RUN)
    assert code == 0 and generated(out) == expected_text(model, tok, "naïve café", 6)


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_streamed_text_equals_decode(kind, tokenizers):
    """Token by token, as generate() feeds a streamer: the printed pieces add up to decode(all ids)."""
    from offload.cli.run import make_streamer
    tok = tokenizers[kind]
    rng = random.Random(0)
    ids = tok.encode("naïve café serves crème brûlée\nthe model reads, naïve idea.")
    ids += [rng.randrange(len(tok)) for _ in range(40)]  # what a random model says: half characters, newlines
    out = io.StringIO()
    streamer = make_streamer(tok, skip_prompt=True, out=out)
    writes = []
    streamer.on_finalized_text = (lambda f: lambda text, stream_end=False: (writes.append(text), f(text, stream_end)))(
        streamer.on_finalized_text)
    streamer.put(torch.tensor([tok.encode("the prompt")]))  # the prompt: skipped
    for i in ids:
        streamer.put(torch.tensor([i]))
    streamer.end()
    assert out.getvalue() == tok.decode(ids, skip_special_tokens=True) + "\n"
    assert sum(1 for w in writes if w) > 5  # it streamed, not all at the end
    assert len(streamer.times) == len(ids)
    # Decoding one token at a time, as before, garbles this text.
    assert "".join(tok.decode([i]) for i in ids) != tok.decode(ids)


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_store_and_folder_print_the_same_text(kind, tmp_path, tokenizers, capsys):
    tok = tokenizers[kind]
    folder = tmp_path / "tiny-llama"
    model = save_llama(folder, tok, seed=0)
    # convert then run, both with their defaults: the store keeps the checkpoint's fp32 and runs in it
    code, out, _ = run(capsys, "convert", str(folder), str(tmp_path / "store"), "-q")
    assert code == 0 and "float32" in out
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "store" / name).read_bytes() == (folder / name).read_bytes()
    source = json.loads((tmp_path / "store" / "manifest.json").read_text())["source"]
    assert source["dtype"] == "float32" and source["quantization"] is None
    [entry] = source["files"]
    assert entry["name"] == "model.safetensors" and entry["size"] == os.path.getsize(folder / "model.safetensors")
    assert len(entry["header_sha256"]) == 64 and entry["mtime_ns"] == os.stat(folder / "model.safetensors").st_mtime_ns
    code, from_store, _ = run(capsys, "run", str(tmp_path / "store"), *RUN, "--cpu-memory", "1MiB")
    assert code == 0
    code, from_folder, _ = run(capsys, "run", str(folder), *RUN, "--cpu-memory", "1MiB")
    assert code == 0
    assert from_store.split("\n")[:-2] == from_folder.split("\n")[:-2]  # all but the timing line
    assert generated(from_store) == expected_text(model, tok, "naïve café", 6)
    code, batched, _ = run(capsys, "run", str(tmp_path / "store"), *RUN, "--batch-size", "2")
    assert code == 0 and generated(batched) == generated(from_store)  # the first row, as a batch of one
    # a store of another dtype is refused with the command that makes the right one
    code, out, err = run(capsys, "run", str(tmp_path / "store"), "--dtype", "bf16", *RUN)
    assert code == 2 and len(err) == 1 and out == ""
    assert f"`offload convert {folder} {tmp_path / 'store'}-bf16 --dtype bf16`" in err[0]


def test_dry_run_on_a_folder_plans_from_headers_without_converting(tmp_path, tokenizers, capsys):
    folder = tmp_path / "tiny-llama"
    save_llama(folder, tokenizers["byte-level"], seed=0)
    code, out, _ = run(capsys, "run", str(folder), "--dry-run", "--cpu-memory", "10MiB", "--prefetch", "1")
    assert code == 0 and "placement" in out and "fp32 weights" in out and " KiB" in out and " GB" not in out
    assert not os.path.exists(os.path.join(os.environ["OFFLOAD_CACHE"], "stores"))


def test_tokenizer_that_fails_to_load_is_an_error_and_none_is_said(tmp_path, tokenizers, capsys):
    folder = tmp_path / "tiny-llama"
    save_llama(folder, tokenizers["byte-level"], seed=0)
    (folder / "tokenizer.json").write_text("{ not json")
    code, out, err = run(capsys, "run", str(folder), *RUN)
    assert code == 2 and len(err) == 1 and "tokenizer" in err[0]
    assert not os.path.exists(os.path.join(os.environ["OFFLOAD_CACHE"], "stores"))  # refused before converting
    for f in ("tokenizer.json", "tokenizer_config.json"):
        os.unlink(folder / f)
    code, out, err = run(capsys, "run", str(folder), *RUN)
    assert code == 0 and sum("no tokenizer files" in x for x in err) == 1
    assert all(x.isdigit() for x in generated(out).split())  # ids, said so, not text


def _bad_inputs(folder: str, tmp: str) -> list[list[str]]:
    missing = os.path.join(tmp, "no-such-folder", "out.json")
    return [["run", folder, "--batch-size", "0"], ["run", folder, "--prompt", ""], ["run", folder, "--prefetch", "0"],
            ["run", folder, "--max-new-tokens", "0"], ["run", folder, "--cpu-memory", "4KiB"],
            ["run", folder, "--cpu-memory", "lots"], ["run", "--random", "tiny-bloom", "--batch-size", "0"],
            ["run", "--random", "tiny-bloom", "--cpu-memory", "1KiB"],
            ["bench-disk", tmp, "--repeats", "0"], ["bench-disk", tmp, "--json", missing],
            ["bench-disk", tmp, "--size", "1000"],
            ["bench", "--random", "tiny-bloom", "--runs", "bogus"], ["bench", "--random", "tiny-bloom", "--runs", ""],
            ["bench", "--random", "tiny-bloom", "--json", missing], ["bench", "--random", "tiny-bloom", "--prefetch", "1,x"],
            ["bench", "--random", "tiny-bloom", "--new-tokens", "1"]]


def test_bad_input_is_one_line_exit_2_before_anything_is_written(tmp_path, tokenizers, capsys):
    folder = tmp_path / "tiny-llama"
    save_llama(folder, tokenizers["byte-level"], seed=0)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    cache = os.environ["OFFLOAD_CACHE"]
    for args in _bad_inputs(str(folder), str(scratch)):
        code, out, err = run(capsys, *args)
        assert code == 2 and len(err) == 1 and "error" in err[0], (args, err)
        assert not os.path.exists(os.path.join(cache, "stores")) and not os.path.exists(os.path.join(cache, "random"))
        assert os.listdir(scratch) == [], args
    assert "pass --cpu-memory" in run(capsys, "run", str(folder), "--cpu-memory", "4KiB")[2][0]


def test_soak_json_folder_is_created_up_front(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("soak", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "soak.py"))
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    a = soak.parse_args(["--json", str(tmp_path / "bench-out" / "soak.json")])
    assert (tmp_path / "bench-out").is_dir() and a.json.endswith("soak.json")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        soak.parse_args(["--json", str(tmp_path / "file" / "soak.json")])
    assert e.value.code == 2


def test_bench_disk_refuses_a_file_that_is_not_its_own(tmp_path, capsys):
    victim = tmp_path / "data.bin"
    victim.write_bytes(os.urandom(12345))
    before = victim.read_bytes()
    code, _, err = run(capsys, "bench-disk", str(victim), "--size", "1MiB", "--repeats", "1")
    assert code == 2 and len(err) == 1 and "not a bench-disk test file" in err[0]
    assert victim.read_bytes() == before
    # the same inside a folder, under the name bench-disk would use
    (tmp_path / "d").mkdir()
    squatter = tmp_path / "d" / "offload-bench-disk.bin"
    squatter.write_bytes(b"mine")
    assert run(capsys, "bench-disk", str(tmp_path / "d"), "--size", "1MiB", "--repeats", "1")[0] == 2
    assert squatter.read_bytes() == b"mine" and os.listdir(tmp_path / "d") == ["offload-bench-disk.bin"]


def test_bench_fio_file_only_with_fio_and_always_removed(tmp_path, monkeypatch, capsys):
    from offload.cli import bench
    seen = []

    def failing_run_bench(checkpoint, workdir, dtype, bs, prefetch, new_tokens, include, fio_file, log, **kwargs):
        seen.append(fio_file and os.path.getsize(fio_file))
        raise RuntimeError("the model failed to load")

    monkeypatch.setattr(bench, "run_bench", failing_run_bench)
    monkeypatch.setattr(bench, "FIO_FILE_BYTES", 1 << 20)
    (tmp_path / "model").mkdir()
    args = ["bench", str(tmp_path / "model"), "--workdir", str(tmp_path / "work")]
    monkeypatch.setattr(bench.shutil, "which", lambda name: None)  # no fio: no file
    with pytest.raises(RuntimeError):
        main(args)
    monkeypatch.setattr(bench.shutil, "which", lambda name: "/usr/bin/" + name)
    with pytest.raises(RuntimeError):
        main(args)
    assert seen == [None, 1 << 20] and os.listdir(tmp_path / "work") == []


def test_options_help_defaults_version_and_verbose_after_the_command(capsys):
    import argparse
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        text = p.format_help()
        for act in p._actions:
            if act.option_strings and act.dest != "help":
                assert act.help, (name, act.option_strings)
                shown = act.default in (None, False, argparse.SUPPRESS) or "(default:" in text.split(act.option_strings[-1], 1)[1]
                assert shown or "default" in act.help, (name, act.option_strings)
    assert parser.parse_args(["run", "x", "-v"]).verbose and not parser.parse_args(["run", "x"]).verbose
    assert parser.parse_args(["run", "x", "--no-verify"]).no_verify and not parser.parse_args(["run", "x"]).no_verify
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("offload 0.")


def test_main_job_needs_no_extra():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip() for d in deps}
    assert {"torch", "transformers", "accelerate", "safetensors"} <= names
    assert "torch>=2.1" in deps  # unpinned: CI pins torch itself
