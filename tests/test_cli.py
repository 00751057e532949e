"""Each CLI command on tiny inputs: exit codes, output shape, one-line errors (exit 2, no traceback)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from offload.cli import main
from conftest import make_model


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "offload.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args", [["run", "/no/such/model"], ["info", "/no/such/store"], ["convert", "/no/such", "/tmp/x"],
                                  ["run", "--random", "no-such-model"], ["bench-disk", "/no/such/dir/file"]])
def test_bad_input_is_one_line_exit_2(args):
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip() and "deprecated" not in x]
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in r.stderr


def test_convert_and_info(tmp_path, capsys):
    model = make_model("bloom")
    model.save_pretrained(tmp_path / "ckpt", safe_serialization=True)
    assert main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "store"), "-q"]) == 0
    assert "4 units" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "store"), "--verify", "--units", "-q"]) == 0
    out = capsys.readouterr().out
    assert "checksum ok (5 files)" in out and "transformer.h.3" in out
    # damage one unit's data: --verify names it and exits 2
    victim = sorted((tmp_path / "store").glob("00002.*.safetensors"))[0]
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0xFF
    victim.write_bytes(bytes(raw))
    assert main(["info", str(tmp_path / "store"), "--verify", "-q"]) == 2
    assert victim.name in capsys.readouterr().err
    # converting into a folder that holds something else is refused
    assert main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "ckpt"), "-q"]) == 2


def test_run_random_prints_tokens_and_summary(tmp_path):
    r = run_cli("run", "--random", "tiny-bloom", "--max-new-tokens", "5", "--dtype", "fp32", "--cpu-memory", "1MiB", "-q")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("placement")
    assert any(x.startswith("streamed from disk") and x.split()[-1] == "4" for x in lines)  # 1 MiB: no RAM tier
    tokens = [x for x in lines if x.strip() and x.strip().split()[0].isdigit() and "tokens" not in x]
    assert len(tokens[0].split()) == 5
    summary = lines[-1]
    assert "5 tokens x batch 1" in summary and "s/token" in summary and "read/token" in summary and "peak RSS" in summary


def test_run_dry_run_plans_the_176b_shape():
    r = run_cli("run", "--random", "bloom", "--dry-run", "--dtype", "bf16", "--cpu-memory", "64GiB")
    assert r.returncode == 0, r.stderr
    assert "in 70 units" in r.stdout and "328.29 GiB" in r.stdout  # 352.5 GB


def test_bench_disk_small(tmp_path):
    out = tmp_path / "r.json"
    r = run_cli("bench-disk", str(tmp_path), "--size", "8MiB", "--repeats", "1", "--block-size", "1MiB", "--depth", "2",
                "--pages", "4k", "--json", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    names = {s["backend"] for s in report["summary"]}
    assert {"python-direct", "python-buffered", "mmap"} <= names
    assert all(s["gbps_median"] > 0 and s["cpu_s_per_gb"] >= 0 for s in report["summary"])
    assert "offload.enable" in r.stdout and "reader=" in r.stdout and "| backend" in r.stdout
    assert report["buffer_pages"] == "4 KiB"
    assert not (tmp_path / "offload-bench-disk.bin").exists()  # the file it created is removed


def test_bench_disk_recommendation_names_a_reader_enable_accepts():
    from offload.cli.benchdisk import ENABLE_NAMES, recommend
    from offload.io import READERS

    assert set(ENABLE_NAMES.values()) <= set(READERS)

    def row(backend, gbps):
        return {"backend": backend, "block_bytes": 1 << 20, "depth": 16, "gbps_median": gbps, "cpu_s_per_gb": 0.01}

    close = recommend([row("native-threads", 1.96), row("python-direct", 2.0), row("aiofiles", 3.0)], native_ok=True)
    assert close.startswith("fastest here: aiofiles") and "reader='native' is within 5% of the best: keep it" in close
    slower = recommend([row("native-threads", 1.5), row("native-uring", 2.0)], native_ok=True)
    assert "pass offload.enable(..., reader='native-uring')" in slower
    no_native = recommend([row("python-direct", 1.0), row("mmap", 1.5)], native_ok=False)
    assert "default reader='python' read 1.00 GB/s" in no_native and "reader='mmap'" in no_native


def test_two_writers_of_one_random_checkpoint_take_turns(tmp_path):
    """Two `offload run --random NAME` at once on a fresh cache: the second waits for the first's checkpoint
    and uses it (they used to write one `.partial` folder together, and one removed it under the other)."""
    import logging
    import os
    import threading

    import torch
    from offload.cli import models
    from offload.convert import _build_lock

    folder = str(tmp_path / "tiny-bloom-bf16")
    waiting = threading.Event()

    class Seen(logging.Handler):
        def emit(self, record):
            if "waiting for another process" in record.getMessage():
                waiting.set()
    seen = Seen()
    logging.getLogger("offload").addHandler(seen)
    old_level = logging.getLogger("offload").level
    logging.getLogger("offload").setLevel(logging.INFO)
    out: dict[str, object] = {}
    try:
        with _build_lock(folder, lambda m: None):  # the first writer
            second = threading.Thread(target=lambda: out.setdefault(
                "folder", models.random_checkpoint("tiny-bloom", torch.bfloat16, folder, progress=False)))
            second.start()
            assert waiting.wait(60), "the second writer did not wait for the first"
            models._write_random("tiny-bloom", torch.bfloat16, folder, False, 2 << 30)
            index = os.stat(os.path.join(folder, "model.safetensors.index.json")).st_ino
        second.join(60)
    finally:
        logging.getLogger("offload").removeHandler(seen)
        logging.getLogger("offload").setLevel(old_level)
    assert out["folder"] == folder and not os.path.exists(folder + ".partial")
    assert os.stat(os.path.join(folder, "model.safetensors.index.json")).st_ino == index  # not written again


def test_an_encoder_decoder_runs_summary_counts_the_tokens_it_generated(tmp_path, capsys):
    """T5's output starts with the decoder's start token, which was counted as a generated token (5 for 4)."""
    make_model("t5").save_pretrained(tmp_path / "t5")
    capsys.readouterr()
    assert main(["run", str(tmp_path / "t5"), "--max-new-tokens", "4", "-q"]) == 0
    summary = [x for x in capsys.readouterr().out.splitlines() if "tokens x batch" in x]
    assert summary and summary[0].startswith("4 tokens x batch 1"), summary


def test_a_speech_model_is_refused_in_one_line_before_anything_is_read(tmp_path, capsys):
    """Whisper's input is audio features: ``offload run`` generates from text, and ended in an IndexError
    traceback from Transformers after loading."""
    import transformers as tf
    cfg = tf.WhisperConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
                           max_source_positions=32, max_target_positions=64, decoder_start_token_id=1,
                           eos_token_id=0, pad_token_id=0)
    tf.WhisperForConditionalGeneration(cfg).save_pretrained(tmp_path / "w")
    capsys.readouterr()
    assert main(["run", str(tmp_path / "w"), "--prompt", "A", "-q"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    assert len(err) == 1 and "input_features, not text" in err[0], err


@pytest.mark.parametrize("blocked", ["the cache folder", "its random/ folder"])
def test_an_unwritable_cache_folder_is_one_line_naming_it(blocked, tmp_path, monkeypatch, capsys):
    """OFFLOAD_CACHE where nothing can be written (here: a file where a folder must be; a read-only mount gives
    EROFS the same way, at the same two places) says which folder and what to do, not a bare errno."""
    if blocked == "the cache folder":
        (tmp_path / "file").write_text("")
        monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "file" / "cache"))
    else:
        (tmp_path / "cache").mkdir()
        (tmp_path / "cache" / "random").write_text("")
        monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "cache"))
    assert main(["run", "--random", "bloom-560m:1", "--max-new-tokens", "1", "-q"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    assert len(err) == 1 and "set OFFLOAD_CACHE to a writable folder" in err[0], err
