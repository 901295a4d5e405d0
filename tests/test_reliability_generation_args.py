"""Issue 15, category 2: generation arguments are checked once (`mu.generation.check_generation_args`), by the
Python API and by the CLI verbs before a model loads, with messages naming the argument as the user typed it."""

import math

import pytest
import torch

import mu
from mu.data.tasks import fit_prompt
from mu.generation import CLI_NAMES, check_generation_args
from mu.tokenizer import byte_tokenizer
from tests.reliability_util import MU_BIN, assert_refused, run_cli, run_subprocess, save_tiny

BAD = [  # (keyword arguments, the argument the message must name, its value as printed)
    (dict(max_new_tokens=0), "max_new_tokens", "0"),
    (dict(max_new_tokens=-3), "max_new_tokens", "-3"),
    (dict(max_new_tokens=2.5), "max_new_tokens", "2.5"),
    (dict(num_beams=0), "num_beams", "0"),
    (dict(num_beams=-1), "num_beams", "-1"),
    (dict(do_sample=True, temperature=0.0), "temperature", "0.0"),
    (dict(do_sample=True, temperature=-1.0), "temperature", "-1.0"),
    (dict(do_sample=True, temperature=math.nan), "temperature", "nan"),
    (dict(do_sample=True, top_p=0.0), "top_p", "0.0"),
    (dict(do_sample=True, top_p=1.5), "top_p", "1.5"),
    (dict(do_sample=True, top_p=-0.1), "top_p", "-0.1"),
    (dict(top_k=0), "top_k", "0"),
    (dict(do_sample=True, top_k=-5), "top_k", "-5"),
    (dict(length_penalty=math.inf), "length_penalty", "inf"),
    (dict(do_sample=True, num_beams=3), "num_beams", "3"),
    (dict(streaming=True, num_beams=2), "num_beams", "2"),
]


@pytest.mark.parametrize("kwargs,name,value", BAD, ids=[str(b[0]) for b in BAD])
def test_check_generation_args_names_the_argument(kwargs, name, value):
    with pytest.raises(mu.MuError) as e:
        check_generation_args(**kwargs)
    assert name in str(e.value) and value in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(mu.MuError) as e:  # the CLI's spelling
        check_generation_args(**kwargs, names=CLI_NAMES)
    assert CLI_NAMES[name] in str(e.value)


def test_good_arguments_pass():
    check_generation_args()
    check_generation_args(max_new_tokens=1, do_sample=True, temperature=0.7, top_k=1, top_p=1.0)
    check_generation_args(temperature=0.0)  # greedy ignores the temperature
    check_generation_args(num_beams=4, length_penalty=0.6)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("gen") / "enc")


def test_the_python_api_refuses_before_generating(model_dir):
    model = mu.load_model(model_dir)
    ids = torch.tensor([[5, 6, 7]])
    for kwargs, name, _ in BAD[:13]:
        with pytest.raises(mu.MuError, match=name):
            model.generate(ids, **kwargs)
    with pytest.raises(mu.MuError, match="999.*vocab_size 512"):
        model.generate(torch.tensor([[5, 999]]), max_new_tokens=2)
    with pytest.raises(mu.MuError, match="cuda_graph=True .* on cpu"):
        model.generate(ids, max_new_tokens=2, cuda_graph=True)
    assert model.generate(ids, max_new_tokens=2, do_sample=True, top_p=0.9, top_k=5).shape == (1, 3)


CLI_BAD = [(["--max-new-tokens", "0"], "--max-new-tokens"), (["--num-beams", "0"], "--num-beams"),
           (["--sample", "--temperature", "0"], "--temperature"), (["--sample", "--top-p", "1.5"], "--top-p"),
           (["--top-k", "0"], "--top-k"), (["--sample", "--num-beams", "2"], "--sample"),
           (["--stream", "--num-beams", "2"], "--stream"), (["--dtype", "float8"], "float8"),
           (["--device", "tpu"], "tpu"), (["--device", "cuda:99"], "cuda:99"),
           (["--cuda-graph", "--device", "cpu"], "--cuda-graph")]


@pytest.mark.parametrize("extra,name", CLI_BAD, ids=[" ".join(c[0]) for c in CLI_BAD])
def test_mu_generate_refuses_bad_arguments_before_loading_the_model(tmp_path, capsys, extra, name):
    # the model path does not exist: the argument must be what is reported, so it was checked first
    rc, err = run_cli(capsys, "generate", "--model", tmp_path / "no_model", "--prompt", "hi", *extra)
    assert_refused(rc, err, name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_on_a_cpu_machine(model_dir, capsys):
    rc, err = run_cli(capsys, "generate", "--model", model_dir, "--prompt", "hi", "--device", "cuda")
    assert_refused(rc, err, "'cuda'", "not available")


def test_prompts_and_tokenizers(model_dir, tmp_path, capsys):
    rc, err = run_cli(capsys, "generate", "--model", model_dir, "--prompt", "")
    assert_refused(rc, err, "empty prompt")
    rc, err = run_cli(capsys, "generate", "--model", model_dir, "--tokenizer", tmp_path / "no_tok", "--prompt", "hi")
    assert_refused(rc, err, "no_tok", "does not exist")
    (tmp_path / "empty_tok").mkdir()
    rc, err = run_cli(capsys, "generate", "--model", model_dir, "--tokenizer", tmp_path / "empty_tok", "--prompt", "x")
    assert_refused(rc, err, "empty_tok", "no tokenizer files")
    small = save_tiny(tmp_path / "small_vocab", vocab_size=128)  # the byte tokenizer has 260 tokens
    rc, err = run_cli(capsys, "generate", "--model", small, "--prompt", "\u00ff hello", "--max-new-tokens", "2")
    assert_refused(rc, err, "vocab_size 128")


def test_a_prompt_longer_than_the_context_is_truncated_with_a_warning(model_dir, tmp_path, capsys):
    prompt = "word " * 100 + "\n###Answer\n"  # ~510 byte tokens > block_size 64
    rc, err = run_cli(capsys, "generate", "--model", model_dir, "--prompt", prompt, "--max-new-tokens", "2")
    assert rc == 0 and "warning: the prompt has 511 tokens" in err and "truncated to 64 tokens" in err
    tok = byte_tokenizer()
    ids, n = fit_prompt(tok, prompt, 64)
    text = tok.decode(ids)
    assert n == 511 and len(ids) == 64 and text.startswith("word word") and text.endswith("wor\n###Answer\n")
    assert fit_prompt(tok, "short", 64) == (tok("short")["input_ids"], 5)
    dec = save_tiny(tmp_path / "dec", arch="deconly")  # decoder-only: the prompt leaves room for the new tokens
    rc, err = run_cli(capsys, "generate", "--model", dec, "--prompt", prompt, "--max-new-tokens", "4")
    assert rc == 0 and "block_size 64 minus 4 new tokens): truncated to 60 tokens" in err


def test_seed_entry_point_and_vqa_check_the_same_way(model_dir, tmp_path, capsys):
    from mu.generate_text2text import main

    for argv, name in [(["--max_new_tokens", "0"], "--max_new_tokens"),
                       (["--sample", "--temperature", "0"], "--temperature"), (["--top_k", "0"], "--top_k")]:
        rc = main(["--model_path", str(model_dir), *argv])
        assert_refused(rc, capsys.readouterr().err, name)
    rc, err = run_cli(capsys, "vqa", "--model", tmp_path / "no_vlm", "--image", tmp_path / "x.png", "--question",
                      "q", "--num-beams", "0")
    assert_refused(rc, err, "--num-beams", "0")


def test_real_process_exit_status(model_dir):
    rc, err = run_subprocess(MU_BIN, "generate", "--model", model_dir, "--prompt", "hi", "--sample", "--top-p", "0")
    assert_refused(rc, err, "--top-p 0.0")
