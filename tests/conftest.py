"""Test setup: one-process DeepSpeed without MPI discovery or the shm op build; seeded tests; gpu marker."""
import os
import socket
import sys

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
if not torch.cuda.is_available():  # Triton kernels run interpreted on CPU tensors (small sizes only)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                   ("MASTER_PORT", str(_free_port()))):
    os.environ.setdefault(key, value)

try:  # skip the 34 s JIT build of deepspeed_shm_comm: go through sys.modules, see ENVIRONMENT notes
    import deepspeed.comm.torch  # noqa: F401
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
except ImportError:
    pass


def pytest_configure(config):
    if torch.cuda.is_available() and "gpu" not in (config.getoption("markexpr") or ""):
        # shown in the warnings summary, which -q keeps
        config.issue_config_time_warning(pytest.PytestWarning(
            "CUDA is visible: the tests not marked gpu were written for the CPU, and DeepSpeed moves their models "
            "to the GPU; run the CPU suite with CUDA_VISIBLE_DEVICES= (README) and the GPU's with -m gpu"),
            stacklevel=2)
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it")
    config.addinivalue_line("markers", "slow: end-to-end runs of more than a few seconds")
    config.addinivalue_line("markers", "network: needs PyPI (downloads); run with QFT_DS_NETWORK_TESTS=1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_tiny_llama(vocab=128, hidden=64, layers=2, tie=True, seed=0):
    """A random-init LlamaForCausalLM: real code paths, fake weights."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama


WORDS = "the king queen a play of and to is fool lord".split()


def make_word_tokenizer():
    """A word-level tokenizer built in memory (no hub): one id per word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "<eos>", *WORDS])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", unk_token="[UNK]", pad_token="<eos>")


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A saved tiny random LLaMA + word tokenizer, loadable with --model PATH."""
    path = tmp_path / "tiny-llama"
    make_tiny_llama(vocab=len(WORDS) + 2).save_pretrained(path)
    make_word_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def tiny_text_file(tmp_path):
    """A .txt corpus of many short paragraphs built from WORDS."""
    g = torch.Generator().manual_seed(0)
    paras = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (40,), generator=g).tolist())
             for _ in range(60)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paras))
    return path


@pytest.fixture(scope="module")
def tb():
    """The triton backend of the kernel tests: compiled on CUDA, else interpreted (TRITON_INTERPRET=1, set
    above). Here rather than in a tests/ops/conftest.py: a second conftest module would shadow this one for
    the tests that `from conftest import make_tiny_llama`."""
    pytest.importorskip("triton")
    from qft_ds.ops import triton_backend
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ok, why = triton_backend.is_compatible(dev)
    if not ok:
        pytest.skip(why)
    return triton_backend, dev
