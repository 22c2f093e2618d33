"""Tiny tokenizers and a tiny random LLaMA, built locally (no download) for tests and benchmarks.

- :func:`byte_tokenizer`: 256 byte tokens + ChatML specials, ChatML template (SmolLM2-style chat).
- :func:`llama2_tokenizer`: a SentencePiece BPE model (byte fallback) trained here, wrapped as
  transformers' ``LlamaTokenizer`` with LLaMA-2's chat template (``[INST]``, ``<<SYS>>``).
- :func:`llama3_tokenizer`: a byte-level BPE trained here with Llama-3's split pattern, special
  tokens and instruct chat template (turns end with ``<|eot_id|>``).

The trained ones learn their vocabulary from generated English-like text, so prompts and replies
split into multi-character pieces as with the real models, and are built once per process.
"""
from __future__ import annotations

import copy
import functools
import io
import random

import torch

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# meta-llama/Llama-2-7b-chat-hf's template, verbatim.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")
LLAMA3_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|eot_id|>")
# meta-llama/Meta-Llama-3-8B-Instruct's template, verbatim.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
# Llama-3's pre-tokenizer split pattern (tiktoken cl100k-style).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TINY_DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512,
                 initializer_range=0.1)  # wide enough that training can move the logits far

_WORDS = ("the a an is are was be of to in on at by for from with and or but not it this that what who how "
          "why which when one two three four five ten cat dog sky blue green grass colour answer question "
          "name age city lives Oslo Paris Lima Tokyo Ines Hana translate add brief reply user assistant "
          "system please thanks hello world contact card water river mountain number word sentence model "
          "learn small large fast slow mostly always never you your we our they their helpful").split()


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + ChatML specials) with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for s in SPECIAL_TOKENS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def llama2_tokenizer(vocab_size: int = 1024):
    """A LLaMA-2-style tokenizer: SentencePiece BPE with byte fallback, ``<unk>``/``<s>``/``</s>`` at
    ids 0-2, BOS added by ``tokenizer(text)``, no pad token, and LLaMA-2's chat template.

    The generated text supports ``vocab_size`` up to about 1100; a model with a larger embedding
    (LLaMA-2's 32000) can still use it, every id being in range."""
    return copy.deepcopy(_llama2_tokenizer(vocab_size))


@functools.lru_cache(maxsize=4)
def llama2_sentencepiece_model(vocab_size: int = 1024) -> bytes:
    """The serialized SentencePiece model behind :func:`llama2_tokenizer` (``tokenizer.model``)."""
    import sentencepiece as spm

    model = io.BytesIO()
    # LLaMA-2's trainer settings that shape tokenization; one thread keeps the result deterministic.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    return model.getvalue()


@functools.lru_cache(maxsize=4)
def _llama2_tokenizer(vocab_size: int):
    import sentencepiece as spm
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_proto=llama2_sentencepiece_model(vocab_size))
    # What transformers' SentencePieceExtractor reads from the model proto, without needing protobuf.
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    tok = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), add_bos_token=True, add_eos_token=False)
    tok.chat_template = LLAMA2_TEMPLATE
    return tok


def llama3_tokenizer(vocab_size: int = 1024):
    """A Llama-3-style tokenizer: byte-level BPE with Llama-3's split pattern and special tokens,
    ``<|begin_of_text|>`` added by ``tokenizer(text)``, eos ``<|eot_id|>``, no pad token, and the
    Llama-3 instruct chat template."""
    return copy.deepcopy(_llama3_tokenizer(vocab_size))


@functools.lru_cache(maxsize=4)
def _llama3_tokenizer(vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"), byte_level])
    tok.decoder = decoders.ByteLevel()
    lines = _corpus()
    paragraphs = ["\n\n".join(lines[i:i + 4]) for i in range(0, len(lines), 4)]  # learn "\n\n" too
    tok.train_from_iterator(paragraphs, trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens(list(LLAMA3_SPECIAL_TOKENS))  # after the learned vocabulary, as in Llama-3
    bos = LLAMA3_SPECIAL_TOKENS[0]
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, tok.token_to_id(bos))])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>")
    fast.chat_template = LLAMA3_TEMPLATE
    return fast


def _corpus(lines: int = 2000, seed: int = 0) -> list[str]:
    """Deterministic English-like lines: sentences with numbers and punctuation, and contact cards."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        if rng.random() < 0.1:
            out.append(f'{{"name": "{rng.choice(_WORDS).capitalize()}", "age": {rng.randint(18, 90)}, '
                       f'"city": "{rng.choice(_WORDS).capitalize()}"}}')
            continue
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        words[0] = words[0].capitalize()
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 2024)))
        if rng.random() < 0.2:
            words[rng.randrange(len(words))] += ","
        out.append(" ".join(words) + rng.choice(".?!:"))
    return out


def tiny_random_llama(seed: int = 0, tokenizer=None, **overrides):
    """A 2-layer random ``LlamaForCausalLM`` and its tokenizer (default :func:`byte_tokenizer`),
    the vocabulary sized to the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer() if tokenizer is None else tokenizer
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
                         **{**TINY_DIMS, **overrides})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok
