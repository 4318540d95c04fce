"""Checkpoint load/save: round trips with the reference, every layout in the wild, dtypes, bad files, memory."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import lfm2vl
import reference
from lfm2vl.weights import CheckpointError

IDS = torch.tensor([[1, 6, 300, 301, 302, 303, 7, 6, 400, 401]])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wckpt")
    ref = reference.make_reference_checkpoint(folder, seed=3)
    with torch.no_grad():
        logits = ref(input_ids=IDS).logits
    return folder, logits


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite(folder, fn):
    """Apply fn to the state dict stored in folder/model.safetensors."""
    path = folder / "model.safetensors"
    sd = fn(load_file(str(path)))
    save_file(sd, str(path), metadata={"format": "pt"})


def test_reference_save_loads_into_ours(ckpt):
    folder, logits = ckpt
    torch.testing.assert_close(lfm2vl.load(folder)(input_ids=IDS), logits, atol=1e-5, rtol=0)


def test_our_save_loads_into_reference(ckpt, tmp_path):
    folder, logits = ckpt
    lfm2vl.load(folder).save_pretrained(tmp_path / "out")
    keys = load_file(str(tmp_path / "out" / "model.safetensors")).keys()
    assert any(k.startswith("model.vision_tower.vision_model.") for k in keys), "Hub layout expected"
    assert "lm_head.weight" not in keys
    for name in ("tokenizer.json", "chat_template.jinja", "processor_config.json", "generation_config.json"):
        assert (tmp_path / "out" / name).exists(), name
    tf = reference.transformers()
    theirs = tf.Lfm2VlForConditionalGeneration.from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=IDS).logits, logits, atol=1e-5, rtol=0)
    # and back again
    torch.testing.assert_close(lfm2vl.load(tmp_path / "out")(input_ids=IDS), logits, atol=1e-5, rtol=0)


def test_sharded_save_round_trip(ckpt, tmp_path):
    folder, logits = ckpt
    out = tmp_path / "sharded"
    lfm2vl.load(folder).save_pretrained(out, max_shard_size=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    torch.testing.assert_close(lfm2vl.load(out)(input_ids=IDS), logits, atol=1e-5, rtol=0)
    theirs = reference.transformers().Lfm2VlForConditionalGeneration.from_pretrained(str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=IDS).logits, logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["hub_vision_model", "nested_language_model", "explicit_lm_head"])
def test_layouts_in_the_wild(ckpt, tmp_path, layout):
    folder, logits = ckpt
    f = _copy(folder, tmp_path / layout)

    def rename(sd):
        out = {}
        for k, v in sd.items():
            if layout == "hub_vision_model":
                k = k.replace("model.vision_tower.", "model.vision_tower.vision_model.")
            elif layout == "nested_language_model":
                k = k.replace("model.language_model.", "model.language_model.model.")
            out[k] = v
        if layout == "explicit_lm_head":
            out["lm_head.weight"] = sd["model.language_model.embed_tokens.weight"].clone()
        return out

    _rewrite(f, rename)
    torch.testing.assert_close(lfm2vl.load(f)(input_ids=IDS), logits, atol=1e-5, rtol=0)


def test_untied_lm_head(tmp_path):
    ref = reference.make_reference_checkpoint(tmp_path, seed=4)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["tie_word_embeddings"] = cfg["text_config"]["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    head = torch.randn_like(ref.lm_head.weight)
    _rewrite(tmp_path, lambda sd: sd | {"lm_head.weight": head})
    ours = lfm2vl.load(tmp_path)
    assert ours.module.lm_head is not None
    torch.testing.assert_close(ours.module.lm_head.weight, head)


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_any_requested_dtype(tmp_path, stored):
    ref = reference.make_reference_checkpoint(tmp_path, seed=5, dtype=stored)
    ref = ref.float()
    with torch.no_grad():
        expected = ref(input_ids=IDS).logits
    default = lfm2vl.load(tmp_path)  # stored half -> float32 on the CPU (documented)
    assert default.dtype == torch.float32
    torch.testing.assert_close(default(input_ids=IDS), expected, atol=1e-4, rtol=0)
    for dt in (torch.bfloat16, "fp16", "float32"):
        m = lfm2vl.load(tmp_path, dtype=dt)
        assert m.dtype == lfm2vl.api.parse_dtype(dt)
        out = m(input_ids=IDS).float()
        assert (out - expected).abs().max() < 0.1 and torch.isfinite(out).all()


# -- bad checkpoints: each a clear error naming the file and the key ---------------------------------

def test_missing_tensor(ckpt, tmp_path):
    f = _copy(ckpt[0], tmp_path / "c")
    _rewrite(f, lambda sd: {k: v for k, v in sd.items() if k != "model.language_model.layers.1.self_attn.q_proj.weight"})
    with pytest.raises(CheckpointError, match=r"1 missing: language_model\.layers\.1\.self_attn\.q_proj\.weight"):
        lfm2vl.load(f)


def test_extra_tensor(ckpt, tmp_path):
    f = _copy(ckpt[0], tmp_path / "c")
    _rewrite(f, lambda sd: sd | {"model.language_model.layers.0.conv.extra.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"1 unexpected: model\.language_model\.layers\.0\.conv\.extra\.weight \(model\.safetensors\)"):
        lfm2vl.load(f)


def test_wrong_shape(ckpt, tmp_path):
    f = _copy(ckpt[0], tmp_path / "c")
    key = "model.multi_modal_projector.linear_1.weight"
    _rewrite(f, lambda sd: sd | {key: torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match=rf"wrong shape: {key} \(model\.safetensors\): stored \(3, 3\)"):
        lfm2vl.load(f)


@pytest.mark.parametrize("keep", [4, 100, -1000])
def test_truncated_safetensors(ckpt, tmp_path, keep):
    f = _copy(ckpt[0], tmp_path / "c")
    data = (f / "model.safetensors").read_bytes()
    (f / "model.safetensors").write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(truncated|corrupt)"):
        lfm2vl.load(f)


def test_missing_config_json(ckpt, tmp_path):
    f = _copy(ckpt[0], tmp_path / "c")
    (f / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        lfm2vl.load(f)


def test_missing_weights_file_and_missing_shard(ckpt, tmp_path):
    f = _copy(ckpt[0], tmp_path / "c")
    (f / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        lfm2vl.load(f)
    (f / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors"):
        lfm2vl.load(f)


def test_config_that_does_not_match_weights(ckpt, tmp_path):
    f = _copy(ckpt[0], tmp_path / "c")
    cfg = json.loads((f / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] = 3
    cfg["text_config"]["layer_types"] = cfg["text_config"]["layer_types"][:3]
    (f / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unexpected: model\.language_model\.layers\.3\."):
        lfm2vl.load(f)


# -- memory: loading must not hold two copies of the weights ------------------------------------------

def _peak_load_growth(folder) -> tuple[int, int]:
    """(peak RSS growth while loading in a fresh process, bytes of weights on disk)."""
    # VmHWM (this process's own high-water mark; ru_maxrss would carry the parent's peak across exec)
    script = textwrap.dedent(f"""
        import torch, lfm2vl
        def hwm():
            line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM:"))
            return int(line.split()[1]) * 1024
        base = hwm()
        m = lfm2vl.load({str(folder)!r}, dtype=torch.bfloat16)
        print(hwm() - base)
    """)
    grown = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    return grown, sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _random_checkpoint(folder, cfg):
    from lfm2vl.model.lfm2vl import Lfm2Vl
    from lfm2vl.weights import save_weights

    torch.manual_seed(0)
    with torch.device("meta"):
        model = Lfm2Vl(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)  # contents do not matter here, only sizes
    save_weights(model, folder)
    del model


def test_peak_memory_is_one_copy(tmp_path):
    """A ~240 MB checkpoint: peak RSS growth while loading stays well under two copies."""
    _random_checkpoint(tmp_path, lfm2vl.model_config("LFM2-VL-450M").with_text(num_hidden_layers=2, layer_types=("conv", "full_attention")))
    grown, size = _peak_load_growth(tmp_path)
    assert 0.8 * size < grown < 1.3 * size, f"loading grew peak RSS by {grown / size:.2f}x the weights"


@pytest.mark.slow
def test_peak_memory_full_450m(tmp_path):
    """The real size: a 450M checkpoint (901.6 MB bf16) loads with peak RSS growth < 1.3x the file."""
    _random_checkpoint(tmp_path, lfm2vl.model_config("LFM2-VL-450M"))
    grown, size = _peak_load_growth(tmp_path)
    print(f"450M: {size / 1e6:.1f} MB on disk, peak RSS growth {grown / 1e6:.1f} MB ({grown / size:.2f}x)")
    assert 0.8 * size < grown < 1.3 * size, f"loading grew RSS by {grown / size:.2f}x the weights"


# -- the Hub path, against a cache laid out as huggingface_hub lays it out -------------------------------

def _hub_cache(tmp_path, src, repo="LiquidAI/LFM2-VL-tiny"):
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    blobs = root / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, p in enumerate(sorted(src.iterdir())):
        blob = blobs / f"blob{i:04d}"
        shutil.copyfile(p, blob)
        os.symlink(os.path.relpath(blob, snap), snap / p.name)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return tmp_path / "hub"


def _run_offline(cache, code):
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


def test_hub_id_from_local_cache_offline(ckpt, tmp_path):
    cache = _hub_cache(tmp_path, ckpt[0])
    r = _run_offline(cache, "import lfm2vl; m = lfm2vl.load('LiquidAI/LFM2-VL-tiny'); print(m.source)")
    assert r.returncode == 0, r.stderr
    assert "snapshots/0123456789abcdef" in r.stdout


def test_hub_id_not_cached_offline_says_how_to_fix(ckpt, tmp_path):
    cache = _hub_cache(tmp_path, ckpt[0])
    r = _run_offline(cache, "import lfm2vl; lfm2vl.load('LiquidAI/LFM2-VL-450M')")
    assert r.returncode != 0
    assert "not in the Hugging Face cache" in r.stderr and "HF_HUB_OFFLINE" in r.stderr and "hf download" in r.stderr


def test_missing_local_folder():
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        lfm2vl.load("./does/not/exist")
