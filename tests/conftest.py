"""Fixtures: a tiny random Llama built from a config and a tiny BPE tokenizer, both made on the spot (no hub)."""

from __future__ import annotations

import pytest
import torch

TEXT_WORDS = ("the of and to in is was for on that with as by at from his her it an were which are this be "
              "river city king war music film school house party team church century north south league").split()


def make_text(n_words: int = 40000, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(TEXT_WORDS), (n_words,), generator=g).tolist()
    words = [TEXT_WORDS[i] for i in idx]
    paras = [" ".join(words[i:i + 120]) + "." for i in range(0, len(words), 120)]
    return "\n\n".join(paras)


def make_tokenizer(text: str, vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def make_llama(vocab_size: int = 300, seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "corpus.txt"
    p.write_text(make_text())
    return str(p)


@pytest.fixture(scope="session")
def tokenizer(text_file):
    return make_tokenizer(open(text_file).read())


@pytest.fixture
def tiny_model(tokenizer):
    return make_llama(len(tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("tiny-llama")
    make_llama(len(tokenizer)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return str(d)


@pytest.fixture
def calib(tokenizer, text_file):
    from svdpress.data import calibration_samples

    samples, _ = calibration_samples(tokenizer, text_file, 8, 64, seed=0)
    return samples
