"""On a CUDA device: what runs differently there (device placement of caches, masks and sampling, the CUDA RNG in
checkpoints, fused AdamW, bf16 autocast, torch.compile's GPU backend). Skipped on machines without CUDA;
`benchmarks/gpu_check.sh` runs them (`-k cuda`), with test_speed_paths.py's two."""

from __future__ import annotations

import json

import pytest
import torch

import mu
from mu.cli import main as cli_main
from mu.tokenizer import byte_tokenizer
from mu.train import TrainConfig, train
from mu.vision import VisionTowerConfig, build_vlm
from tests.test_train import EXAMPLES, train_until_killed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_check.sh)")
CUDA = "cuda"


def _pair(arch: str):
    """The same tiny random model on the CPU and on the GPU (fp32)."""
    torch.manual_seed(0)
    cpu = mu.build_model("tiny", arch=arch, dropout=0.0).eval()
    gpu = mu.build_model("tiny", arch=arch, dropout=0.0).eval()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.to(CUDA)


def _prompts(seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 9 and 6 tokens, right-padded, and their mask."""
    ids = torch.randint(4, 300, (2, 9), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ["encdec", "deconly"])
def test_cuda_greedy_and_beam_search_match_the_cpu_and_sampling_repeats(arch):
    cpu, gpu = _pair(arch)
    ids, mask = _prompts()
    for kw in (dict(), dict(num_beams=3)):
        want = cpu.generate(ids, attention_mask=mask, max_new_tokens=6, **kw)
        got = gpu.generate(ids.to(CUDA), attention_mask=mask.to(CUDA), max_new_tokens=6, **kw)
        assert got.device.type == CUDA and got.cpu().tolist() == want.tolist(), kw
    runs = []
    for _ in range(2):  # a seeded sample on the GPU draws from the CUDA generator: the same seed, the same tokens
        torch.manual_seed(3)
        runs.append(gpu.generate(ids.to(CUDA), attention_mask=mask.to(CUDA), max_new_tokens=6, do_sample=True,
                                 top_k=20, top_p=0.9, temperature=0.8).cpu())
    assert torch.equal(*runs) and runs[0].shape == want.shape


@pytest.mark.parametrize("arch", ["encdec", "deconly"])
def test_cuda_compiled_decode_replays_a_cuda_graph_and_matches_eager(arch, monkeypatch):
    """compile=True on a GPU: the first step records a CUDA graph of the compiled step, the rest replay it; the
    tokens are eager decoding's (padded rows, an EOS, seeded sampling), and beam search (rows reordered) runs
    without a graph."""
    from mu.model import cuda_graph

    replays = []
    replay = cuda_graph.DecodeGraph.replay
    monkeypatch.setattr(cuda_graph.DecodeGraph, "replay", lambda self, *a: replays.append(1) or replay(self, *a))
    _, gpu = _pair(arch)
    ids, mask = (t.to(CUDA) for t in _prompts())
    eager = gpu.generate(ids, attention_mask=mask, max_new_tokens=10)
    compiled = gpu.generate(ids, attention_mask=mask, max_new_tokens=10, compile=True)
    assert torch.equal(compiled, eager) and len(replays) == 8  # 10 tokens: 1 from the prefill, 1 recorded step
    eos = int(eager[0, -4])  # a token row 0 picks late: that row stops there, the other runs on
    kw = dict(attention_mask=mask, max_new_tokens=10, eos_token_id=eos)
    assert torch.equal(gpu.generate(ids, compile=True, **kw), gpu.generate(ids, **kw))
    sampled = []
    for compile in (False, True):
        torch.manual_seed(3)
        sampled.append(gpu.generate(ids, compile=compile, do_sample=True, top_k=20, **kw))
    assert torch.equal(*sampled)
    replays.clear()
    kw = dict(attention_mask=mask, max_new_tokens=6, num_beams=3)
    assert torch.equal(gpu.generate(ids, compile=True, **kw), gpu.generate(ids, **kw)) and not replays


def test_cuda_graph_of_the_eager_step_matches_eager(monkeypatch):
    """cuda_graph=True: the eager static step recorded and replayed (nothing compiled), eager decoding's tokens."""
    from mu.model import cuda_graph, fast

    replays, compiles = [], []
    replay = cuda_graph.DecodeGraph.replay
    monkeypatch.setattr(cuda_graph.DecodeGraph, "replay", lambda self, *a: replays.append(1) or replay(self, *a))
    monkeypatch.setattr(fast, "compile_decode_", lambda model: compiles.append(1))
    for arch in ("encdec", "deconly"):
        _, gpu = _pair(arch)
        ids, mask = (t.to(CUDA) for t in _prompts())
        eager = gpu.generate(ids, attention_mask=mask, max_new_tokens=10)
        assert torch.equal(gpu.generate(ids, attention_mask=mask, max_new_tokens=10, cuda_graph=True), eager)
    assert len(replays) == 16 and not compiles


def test_cuda_bf16_model_logits_stay_close_to_fp32():
    _, gpu = _pair("encdec")
    ids = _prompts()[0].to(CUDA)
    with torch.no_grad():  # a teacher-forced pass: the encoder, and the decoder over 4 tokens
        ref = gpu(ids, ids[:, :4]).logits.float()
        low = gpu.to(torch.bfloat16)(ids, ids[:, :4]).logits.float()
    assert torch.isfinite(low).all()
    assert ((low - ref).norm() / ref.norm()).item() < 3e-2


def test_cuda_vision_generation_matches_the_cpu():
    tower = VisionTowerConfig(image_size=32, patch_size=8, width=32, depth=2, n_head=2)
    torch.manual_seed(0)
    cpu = build_vlm("tiny", tower=tower, n_encoder_layer=2, n_decoder_layer=2, dropout=0.0).eval()
    gpu = build_vlm("tiny", tower=tower, n_encoder_layer=2, n_decoder_layer=2, dropout=0.0).eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu.to(CUDA)
    ids, mask = cpu.tokenize_prompts(["what shape is in the image?", "colour?"])
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    want = cpu.generate(ids, images=images, attention_mask=mask, max_new_tokens=5)
    got = gpu.generate(ids.to(CUDA), images=images.to(CUDA), attention_mask=mask.to(CUDA), max_new_tokens=5)
    assert got.cpu().tolist() == want.tolist()


def _cfg(out, **kw):
    base = dict(out=str(out), arch="encdec", preset="tiny", model_overrides={"dropout": 0.0}, tokenizer="byte",
                batch_size=4, lr=3e-3, warmup=5, max_steps=10, log_every=1, eval_every=0, save_every=0,
                num_samples=0, progress=False, precision="fp32", device=CUDA)
    return TrainConfig(**{**base, **kw})


def _losses(run_dir):
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in rows if r.get("event") == "train"]


def test_cuda_bf16_training_learns_and_the_model_answers(tmp_path):
    result = train(_cfg(tmp_path / "run", precision="bf16", max_steps=150, lr=5e-3), train_examples=EXAMPLES)
    losses = _losses(tmp_path / "run")
    assert losses[-1] < 0.1 * losses[0], losses
    model = mu.load_model(result.final_dir, device=CUDA)
    tok = model.tokenizer
    for ex in EXAMPLES:
        ids = torch.tensor([tok(ex.source, add_special_tokens=False)["input_ids"]], device=CUDA)
        out = model.generate(ids, max_new_tokens=8, eos_token_id=tok.eos_token_id)
        assert tok.decode(out[0, 1:], skip_special_tokens=True) == ex.target


def test_cuda_killed_run_resumes_with_the_cuda_rng(tmp_path):
    """Dropout draws from the CUDA generator: a resumed run repeats the uninterrupted one only if the checkpoint
    carried that generator's state."""
    kw = dict(max_steps=7, save_every=3, model_overrides={"dropout": 0.1})
    train(_cfg(tmp_path / "a", **kw), train_examples=EXAMPLES * 2)
    cfg = _cfg(tmp_path / "b", **kw)
    train_until_killed(cfg, 5, EXAMPLES * 2)
    torch.cuda.manual_seed(1234)  # what the resume must not see
    result = train(cfg, train_examples=EXAMPLES * 2)
    assert result.resumed_from == 3
    assert _losses(tmp_path / "b") == pytest.approx(_losses(tmp_path / "a"), abs=1e-4)


def test_cuda_cli_generate_prints_the_cpu_text(tmp_path, capsys):
    torch.manual_seed(0)
    model = mu.build_model("tiny")
    model.tokenizer = byte_tokenizer()
    model.save_pretrained(tmp_path / "m")
    argv = ["generate", "--model", str(tmp_path / "m"), "--prompt", "hello", "--max-new-tokens", "8"]
    assert cli_main(argv + ["--device", "cpu"]) == 0
    on_cpu = capsys.readouterr().out
    assert cli_main(argv + ["--device", CUDA]) == 0
    assert capsys.readouterr().out == on_cpu
