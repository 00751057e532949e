"""Issue 21: a checkpoint folder is read where it is, through an index of byte ranges, not copied.

Every model here is compared bit for bit with ``from_pretrained`` of the same folder.
"""
from __future__ import annotations

import os
import re

import pytest
import torch
import transformers as tf

import offload
from conftest import make_model, moe_config
from offload.in_place import in_place_units, write_index


def save(arch: str, folder, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model = make_model(arch, seed) if arch in ("bloom", "opt", "gptneox") else \
        tf.AutoModelForCausalLM.from_config(moe_config(arch)).eval()
    model.save_pretrained(folder, **kwargs)
    return tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def folder_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


IDS = torch.tensor([[1, 5, 9, 30, 7, 100]])


@pytest.mark.parametrize("arch", ["bloom", "opt", "gptneox", "llama", "qwen3_moe", "mixtral", "olmoe", "deepseek_v3"])
def test_a_folder_is_read_in_place_exactly(arch, tmp_path, capfd, no_thread_leak):
    """Renamed keys (GPT-NeoX's embed_out) and per-expert tensors fused into 3-D ones (MoE) included; the
    cache holds an index, not a copy."""
    ref = save(arch, tmp_path / arch)
    cache = os.path.join(os.environ["OFFLOAD_CACHE"], "stores")
    model, h = offload.load(tmp_path / arch, ram_tier=0)
    try:
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, ref(IDS).logits)
            assert torch.equal(model.generate(IDS, max_new_tokens=6, do_sample=False),
                               ref.generate(IDS, max_new_tokens=6, do_sample=False))
    finally:
        h.disable()
    assert "to read it in place, no copy" in capfd.readouterr().err
    weights = sum(os.path.getsize(p) for p in (tmp_path / arch).glob("*.safetensors"))
    side = sum(os.path.getsize(p) for p in (tmp_path / arch).glob("*.json"))
    assert folder_bytes(cache) - side <= 0.01 * weights + 16_384, "the cache holds more than an index"


class _Failing:
    """The python reader, but reads of ``path`` starting inside ``span`` raise EIO (armed by setting both)."""

    def __init__(self):
        from offload.io import PythonReader
        self.inner, self.path, self.span = PythonReader(), None, range(0)
        self.name, self.task_bytes = "failing", self.inner.task_bytes

    def open(self, path):
        return self.inner.open(path)

    def read(self, h, offset, dest):
        if self.path is not None and h.path == self.path and offset in self.span:
            raise OSError(5, "Input/output error", h.path)
        return self.inner.read(h, offset, dest)

    def close(self, h):
        return self.inner.close(h)


def test_a_sharded_checkpoint_with_a_block_across_two_shards(tmp_path, no_thread_leak):
    """Exact; and a failed read of the block's second shard names that shard (the error named the block's
    first file, whatever file failed)."""
    ref = save("bloom", tmp_path / "b", max_shard_size="300KB")
    shards = list((tmp_path / "b").glob("*.safetensors"))
    assert len(shards) > 2
    reader = _Failing()
    model, h = offload.load(tmp_path / "b", ram_tier=0, progress=False, reader=reader)
    try:
        spanning = [u for u in h._store.units if len({e.file for e in u.extents}) == 2]
        assert spanning, "no block spans two shards"
        unit = spanning[0]  # armed before the first forward: after one, the next pass's first units are read ahead
        second = h._store.path_of(unit, unit.extents[-1].file)
        assert second != h._store.path_of(unit, unit.extents[0].file)
        streamed = next(u for u in h._prefetcher.units if u.name == unit.name)  # its reads as the prefetcher has them
        first_read = next(e for e in streamed.reads if h._store.path_of(unit, e.file) == second)
        reader.path, reader.span = second, range(first_read.offset, first_read.offset + 1)  # this unit's own read
        with pytest.raises(offload.UnitReadError, match=f"unit {unit.name} from {re.escape(second)} failed"):
            with torch.no_grad():
                model(IDS)
        reader.path = None
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, ref(IDS).logits)
    finally:
        h.disable()


def test_unaligned_tensors_and_an_odd_length_u8_tensor_read_exactly(tmp_path):
    """Ranges at offsets not aligned to 4 KiB, a unit across two shards, a 4097-byte U8 tensor and a
    shard whose end is not page aligned: every tensor read through the prefetcher equals safetensors'."""
    from safetensors.torch import load_file, save_file

    from offload.config import StagingConfig
    from offload.io import PythonReader
    from offload.prefetch import Prefetcher
    torch.manual_seed(0)
    src = tmp_path / "ckpt"
    src.mkdir()
    a = {"blocks.0.w": torch.randn(33, 7), "blocks.0.u8": torch.randint(0, 255, (4097,), dtype=torch.uint8),
         "blocks.1.w": torch.randn(1000, 3), "head": torch.randn(5)}
    b = {"blocks.1.b": torch.randn(3), "blocks.2.w": torch.randn(50, 50), "blocks.2.u8": torch.arange(7, dtype=torch.uint8)}
    save_file(a, src / "model-00001-of-00002.safetensors")
    save_file(b, src / "model-00002-of-00002.safetensors")
    units, resident = in_place_units(str(src), torch.float32)
    store = write_index(str(src), str(tmp_path / "idx"), units, resident, torch.float32)
    assert any(e.offset % 4096 == 0 and e.length % 4096 for u in store.units for e in u.extents), "no partial tail"
    truth = {**load_file(src / "model-00001-of-00002.safetensors"), **load_file(src / "model-00002-of-00002.safetensors")}
    cfg = StagingConfig(prefetch=1, slot_bytes=max(u.data_bytes for u in store.units), streamed_units=len(store.units))
    for reader in (PythonReader(), offload.io.get_reader()):
        pf = Prefetcher(store, store.units, reader, cfg, verify=True)
        try:
            for i, u in enumerate(store.units):
                lease = pf.acquire(i)
                for t in u.tensors:
                    got = lease.tensor[t.offset:t.offset + t.nbytes].view(t.torch_dtype).view(t.shape)
                    assert torch.equal(got, truth[f"{u.name}.{t.name}"]), (u.name, t.name)
                lease.release()
        finally:
            pf.close()
    assert len(store.recorded) == len(store.units)  # first reads recorded their checksums


def test_a_changed_shard_rebuilds_the_index_and_a_damaged_byte_is_a_named_error(tmp_path, capfd, no_thread_leak):
    save("bloom", tmp_path / "b", seed=0)
    model, h = offload.load(tmp_path / "b", ram_tier=0, progress=True)
    with torch.no_grad():
        model(IDS)  # first reads record each unit's checksum
    h.disable()
    shard = tmp_path / "b" / "model.safetensors"
    # a changed file (new mtime): the index is rebuilt, and the new weights are what runs
    ref = save("bloom", tmp_path / "b", seed=1)
    model, h = offload.load(tmp_path / "b", ram_tier=0, progress=True)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref(IDS).logits)
    h.disable()
    assert "source files changed: model.safetensors" in capfd.readouterr().err
    # a damaged byte that keeps size and mtime: the checksum recorded on the first read catches it
    st = os.stat(shard)
    unit = h._store.units[2]
    with open(shard, "r+b") as f:
        f.seek(unit.extents[0].offset + unit.extents[0].length // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x55]))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    model, h = offload.load(tmp_path / "b", ram_tier=0, progress=False)
    try:
        with pytest.raises(offload.ChecksumError, match=rf"model.safetensors: unit {unit.name} is damaged: its bytes differ from its first read"):
            with torch.no_grad():
                model(IDS)
    finally:
        h.disable()


def test_a_cast_is_a_copy_and_says_so(tmp_path, capfd, no_thread_leak):
    ref = save("bloom", tmp_path / "b")
    model, h = offload.load(tmp_path / "b", ram_tier=0, dtype="bf16")
    h.disable()
    err = capfd.readouterr().err
    assert "a copy, cast from float32" in err and "no copy" not in err
    del ref


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_a_copy_of_a_per_expert_checkpoint_holds_the_experts_as_the_model_does(arch, tmp_path, capfd,
                                                                              no_thread_leak):
    """A cast (and int8) copies the checkpoint into a store: its per-expert tensors are written stacked, as the
    model holds them and as reading in place indexes them (the copy was refused: "tensors differ")."""
    save(arch, tmp_path / arch)
    ref = tf.AutoModelForCausalLM.from_pretrained(tmp_path / arch, dtype=torch.bfloat16).eval()
    model, h = offload.load(tmp_path / arch, ram_tier=0, dtype="bf16")
    try:
        assert "a copy, cast from float32" in capfd.readouterr().err
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, ref(IDS).logits)
    finally:
        h.disable()
    model, h = offload.load(tmp_path / arch, ram_tier=0, quantize="int8")
    try:
        with torch.no_grad():
            assert model.generate(IDS, max_new_tokens=3, do_sample=False).shape == (1, IDS.shape[1] + 3)
    finally:
        h.disable()


@pytest.mark.parametrize("route", ["from_pretrained", "dispatch_model"])
def test_a_dispatched_model_is_read_where_accelerate_put_it(route, tmp_path, no_thread_leak):
    """enable() on an Accelerate-dispatched model: the original shards (from_pretrained) or Accelerate's own
    .dat files (dispatch_model) are read in place; what enable writes is an index, <= 1% of those bytes."""
    from accelerate import dispatch_model

    from conftest import block_device_map
    ref = save("bloom", tmp_path / "b")
    disk = [f"transformer.h.{i}" for i in range(4)]
    if route == "from_pretrained":
        model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "b", device_map=block_device_map(ref, disk),
                                                        offload_folder=str(tmp_path / "off"), dtype=torch.float32)
    else:
        model = dispatch_model(make_model("bloom"), device_map=block_device_map(ref, disk),
                               offload_dir=str(tmp_path / "off"))
    before = folder_bytes(tmp_path / "off")
    offloaded = sum(p.numel() * p.element_size() for n in disk for p in ref.get_submodule(n).parameters())
    with offload.enable(model, prefetch=1, ram_tier=0, progress=False) as h:
        assert all(u.extents for u in h._store.units), "the offloaded weights were copied into a store"
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, ref(IDS).logits)
        written = folder_bytes(tmp_path / "off") - before
        assert written <= 0.01 * offloaded + 16_384, (written, offloaded)


def _non_lm(arch: str):
    if arch == "bert":
        c = tf.BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96)
        return tf.BertForMaskedLM(c), {"input_ids": torch.tensor([[1, 5, 9, 30]])}
    if arch == "vit":
        c = tf.ViTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96, image_size=32,
                         patch_size=8, num_labels=5)
        return tf.ViTForImageClassification(c), {"pixel_values": torch.randn(1, 3, 32, 32)}
    c = tf.WhisperConfig(vocab_size=256, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, num_mel_bins=16,
                         max_source_positions=32, max_target_positions=32, decoder_start_token_id=1, pad_token_id=0)
    return tf.WhisperForConditionalGeneration(c), {"input_features": torch.randn(1, 16, 64),
                                                   "decoder_input_ids": torch.tensor([[1, 5, 9]])}


@pytest.mark.parametrize("arch", ["bert", "vit", "whisper"])
def test_a_folder_builds_its_own_model_class(arch, tmp_path, no_thread_leak):
    """config.json's ``architectures`` decides the class (a masked LM, an image classifier, a speech
    seq2seq), not AutoModelForCausalLM."""
    torch.manual_seed(0)
    model, inputs = _non_lm(arch)
    model.eval().save_pretrained(tmp_path / arch)
    ref = type(model).from_pretrained(tmp_path / arch).eval()
    loaded, h = offload.load(tmp_path / arch, ram_tier=0, progress=False)
    try:
        assert type(loaded) is type(model)
        with torch.no_grad():
            assert torch.equal(loaded(**inputs).logits, ref(**inputs).logits)
    finally:
        h.disable()


def test_a_block_shared_by_several_layers_is_read_once(tmp_path, no_thread_leak):
    """Zamba2 reuses one transformer block in several layers: tied into one Parameter, saved once."""
    torch.manual_seed(0)
    cfg = tf.Zamba2Config(vocab_size=256, hidden_size=64, num_hidden_layers=4,
                          layers_block_type=["mamba", "hybrid", "mamba", "hybrid"], mamba_d_state=16, mamba_expand=2,
                          n_mamba_heads=8, mamba_ngroups=1, chunk_size=8, num_attention_heads=4, num_key_value_heads=4,
                          intermediate_size=96, num_mem_blocks=1, adapter_rank=8, use_mamba_kernels=False,
                          max_position_embeddings=128)
    tf.AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(tmp_path / "z")
    ref = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "z").eval()
    model, h = offload.load(tmp_path / "z", ram_tier=0, progress=False)
    try:
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, ref(IDS).logits)
    finally:
        h.disable()


def test_one_tensor_read_in_place_reads_its_own_bytes_not_its_units(tmp_path, monkeypatch, no_thread_leak):
    """``Store.read_tensor`` on a checkpoint read in place (a MoE router at enable, a stray use of a weight) reads
    that tensor's bytes, a fused expert tensor's pieces included, not its whole block: enabling a Qwen3-30B-A3B
    folder once read every block whole for its router: the whole checkpoint at load, and a block's worth of
    peak memory."""
    from offload.store import Store
    save("qwen3_moe", tmp_path / "m")
    model, h = offload.load(tmp_path / "m", ram_tier=0)
    try:
        st = h._store
        spans: list[int] = []
        read_span = Store._read_span
        monkeypatch.setattr(Store, "_read_span", lambda self, u, at, dest: (spans.append(len(dest)),
                                                                           read_span(self, u, at, dest))[1])
        units = [u for u in st.units if u.extents]
        fused = 0
        for u in units:
            whole = st.read_unit(u)
            for t in u.tensors:
                spans.clear()
                got = st.read_tensor(u, t.name)
                assert torch.equal(got.view(torch.uint8).flatten(), whole[t.offset:t.offset + t.nbytes]), t.name
                assert sum(spans) == t.nbytes, (t.name, sum(spans), t.nbytes)
                fused += bool(t.pieces)
        assert units and fused, "no unit read in place, or no fused expert tensor among them"
    finally:
        h.disable()


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_shard_is_one_line_naming_it(damage, tmp_path, capsys):
    """A shard cut short or empty (an interrupted download): a one-line error naming the file, exit 2, not
    safetensors' traceback."""
    from offload.cli import main
    from offload.errors import OffloadError
    save("llama", tmp_path / "m", max_shard_size="100KB")
    shard = sorted((tmp_path / "m").glob("*.safetensors"))[-1]
    os.truncate(shard, os.path.getsize(shard) - 5000 if damage == "truncated" else 0)
    with pytest.raises(OffloadError, match=re.escape(str(shard))):
        offload.load(tmp_path / "m", ram_tier=0)
    capsys.readouterr()
    assert main(["run", str(tmp_path / "m"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and shard.name in err[0] and "truncated" in err[0], err


def test_a_shard_whose_header_disagrees_with_the_config_points_at_the_checkpoint(tmp_path, no_thread_leak):
    """A shard's header claiming I32 for a float32 tensor: read in place, the store is the checkpoint, so the advice
    is to download it again, not to delete a store (which would be rebuilt the same)."""
    from offload.errors import StoreMismatchError
    save("llama", tmp_path / "m")
    shard = next((tmp_path / "m").glob("*.safetensors"))
    raw = bytearray(shard.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + n].decode()
    at = header.index('"dtype":"F32"', header.index("layers.0."))
    raw[8 + at:8 + at + 13] = b'"dtype":"I32"'
    shard.write_bytes(bytes(raw))
    with pytest.raises(StoreMismatchError, match="download the checkpoint again"):
        offload.load(tmp_path / "m", ram_tier=0)


def _edit_checkpoint(folder, edit) -> None:
    from safetensors.torch import load_file, save_file
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_tensors_the_model_has_no_place_for_are_left_as_transformers_leaves_them(tmp_path, no_thread_leak):
    """A stale rotary inv_freq, or a multi-token-prediction layer past the model's last (DeepSeek-V3 and
    GLM-4.5 ship model.layers.<N>): Transformers loads the checkpoint without them; offload refused it
    ('tensors differ ... download the checkpoint again', or 'units ... are not modules of this model')."""
    save("qwen3_moe", tmp_path / "q")
    from safetensors.torch import load_file
    layer0 = load_file(os.path.join(tmp_path / "q", "model.safetensors"))
    extra_layer = {k.replace("model.layers.0.", "model.layers.3."): v.clone() for k, v in layer0.items()
                   if k.startswith("model.layers.0.")}  # the model has layers 0-2

    def edit(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.randn(8)
        t.update(extra_layer)
    _edit_checkpoint(tmp_path / "q", edit)
    ref = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32).eval()
    offload.convert(tmp_path / "q", tmp_path / "store", progress=False)  # a copy: its store loads too
    for source in (tmp_path / "q", tmp_path / "store"):
        model, h = offload.load(source, ram_tier=0, progress=False, tune=False)
        try:
            with torch.no_grad():
                assert torch.equal(model(IDS).logits, ref(IDS).logits)
        finally:
            h.disable()


@pytest.mark.parametrize("damage", ["one expert in another dtype", "one expert's tensor missing"])
def test_a_stacked_tensors_pieces_that_do_not_fit_together_are_named(damage, tmp_path):
    """Per-expert pieces are joined as bytes: a piece in another dtype of the same size (fp16 in a bf16
    checkpoint) was read as the others' dtype, silently wrong weights; a missing piece gave an error about
    another unit's healthy tensors. Both name the tensor now."""
    save("qwen3_moe", tmp_path / "q")
    key = "model.layers.1.mlp.experts.3.up_proj.weight"

    def edit(t):
        if damage.startswith("one expert in"):
            t[key] = t[key].half()
        else:
            del t[key]
    _edit_checkpoint(tmp_path / "q", edit)
    with pytest.raises(offload.CheckpointError, match=re.escape(key)):
        offload.load(tmp_path / "q", ram_tier=0, progress=False, tune=False)


def test_a_checkpoint_whose_names_are_not_the_models_says_so(tmp_path):
    """Tensors the model has no place for are left out (as Transformers does); when that is most of the
    checkpoint (a prefix the checkpoint adds), the load said 'nothing to stream: all tied or shared'."""
    save("llama", tmp_path / "l")
    _edit_checkpoint(tmp_path / "l", lambda t: t.update({"transformer." + k: t.pop(k) for k in list(t)}))
    with pytest.raises(offload.CheckpointError, match=r"no place in LlamaForCausalLM \(e.g. transformer\..*names do not match"):
        offload.load(tmp_path / "l", ram_tier=0, progress=False, tune=False)
