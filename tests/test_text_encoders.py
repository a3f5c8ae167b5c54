import warnings

import pytest
import torch

from skyloom.kinds import TextEmbedding, TextEncoder
from skyloom.plugins.text_encoder import hf, minilm
from skyloom.registry import Registry

PROMPTS = ["a red fox runs through fresh snow", "", "waves crash on black rocks at dusk"]


@pytest.fixture(scope="module")
def encoder():
    """One MiniLM encoder for the module: the weights load once (a few seconds)."""
    enc = minilm.MiniLMTextEncoder(max_length=16)
    enc.encode(["warm up"])
    return enc


def fresh(encoder, **overrides):
    """Another encoder over the same (already loaded) weights, with an empty prompt cache."""
    config = dict(max_length=encoder.max_length, cache_size=0)
    config.update(overrides)
    return minilm.MiniLMTextEncoder(**config)


# --- registry ------------------------------------------------------------------------------


def test_both_encoders_register_with_their_names():
    registry = Registry.load(builtins=("skyloom.plugins.text_encoder.minilm", "skyloom.plugins.text_encoder.hf"), entry_points=False)
    assert registry.load_errors == []
    assert {"minilm", "hf"} <= set(registry.names("text_encoder"))
    assert registry.get("text_encoder", "all-minilm-l6-v2").name == "minilm"
    assert registry.get("text_encoder", "hf").factory is hf.HFTextEncoder
    enc = registry.create("text_encoder", "minilm", max_length=16)
    assert isinstance(enc, TextEncoder) and enc.dim == 384 and enc.max_length == 16


# --- minilm --------------------------------------------------------------------------------


def test_minilm_shapes_dtypes_and_mask(encoder):
    out = encoder.encode(PROMPTS)
    assert isinstance(out, TextEmbedding)
    assert out.tokens.shape == (3, 16, 384) and out.tokens.dtype == torch.float32
    assert out.mask.shape == (3, 16) and out.mask.dtype == torch.bool
    assert out.pooled.shape == (3, 384) and out.pooled.dtype == torch.float32
    tokenizer, _ = minilm.load_model()
    lengths = [len(ids) for ids in tokenizer(PROMPTS)["input_ids"]]
    assert out.mask.sum(1).tolist() == lengths
    assert lengths[1] == 2  # the unconditional prompt is [CLS] [SEP]
    assert out.mask[:, 0].all() and not out.mask[:, -1].any()  # real tokens first, then padding
    assert (out.tokens[~out.mask] == 0).all()  # padding rows carry nothing
    assert (out.tokens[out.mask].abs().sum(-1) > 0).all()


def test_minilm_pooled_matches_sentence_transformers(encoder):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm.default_model_path()), device="cpu", local_files_only=True)
    expected = reference.encode(PROMPTS, convert_to_tensor=True)
    pooled = encoder.encode(PROMPTS).pooled
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(encoder.embed_sentences(PROMPTS), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(minilm.embed_sentences(PROMPTS, batch_size=2), expected, atol=1e-5, rtol=1e-4)


def test_minilm_embeddings_carry_meaning(encoder):
    a, b, c = minilm.embed_sentences(
        ["a cat sleeping on a sofa", "a kitten napping on a couch", "quarterly earnings beat analyst forecasts"]
    )
    assert a @ b > 0.6
    assert a @ b > a @ c + 0.4


def test_minilm_a_prompt_encodes_the_same_alone_or_in_a_batch(encoder):
    enc = fresh(encoder)
    together = enc.encode(PROMPTS)
    for i in (0, 1):
        alone = enc.encode([PROMPTS[i]])
        torch.testing.assert_close(alone.tokens[0], together.tokens[i], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(alone.pooled[0], together.pooled[i], atol=1e-5, rtol=1e-4)
        assert torch.equal(alone.mask[0], together.mask[i])


def test_minilm_caches_prompts_and_evicts_the_least_recent(encoder, monkeypatch):
    enc = fresh(encoder, cache_size=2)
    calls = []
    real_forward = minilm.encode_batch
    monkeypatch.setattr(minilm, "encode_batch", lambda tok, model, texts, *a, **k: calls.append(list(texts)) or real_forward(tok, model, texts, *a, **k))
    first = enc.encode(["one", "two", "one"])
    assert calls == [["one", "two"]]  # duplicates in a batch are encoded once
    again = enc.encode(["two", "one"])
    assert calls == [["one", "two"]]  # both cached: no model call
    torch.testing.assert_close(again.tokens, first.tokens[[1, 0]])
    enc.encode(["three"])  # evicts "two", the least recently used
    enc.encode(["one"])
    assert calls[-1] == ["three"]
    enc.encode(["two"])
    assert calls[-1] == ["two"]
    assert len(enc._cache) == 2


def test_minilm_loads_once_per_process(encoder, monkeypatch):
    loads = []
    import transformers

    real = transformers.AutoModel.from_pretrained
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", lambda *a, **k: loads.append(a) or real(*a, **k))
    a, b = fresh(encoder), fresh(encoder, max_length=8)
    a.encode(["shared weights"])
    b.encode(["shared weights"])
    assert loads == []
    assert a._loaded()[1] is b._loaded()[1]


def test_minilm_loads_nothing_until_the_first_encode_and_only_locally(monkeypatch):
    import transformers

    requests = []

    def refuse(*args, **kwargs):
        requests.append(kwargs)
        raise RuntimeError("weights requested")

    monkeypatch.setattr(minilm.shared_model, "LOADED_MODELS", {})
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", refuse)
    enc = minilm.MiniLMTextEncoder(max_length=8)
    enc.to("cpu")
    assert minilm.shared_model.LOADED_MODELS == {} and requests == []
    with pytest.raises(RuntimeError, match="weights requested"):
        enc.encode(["hello"])
    assert requests and requests[0]["local_files_only"] is True


def test_minilm_warns_when_a_prompt_is_truncated(encoder):
    enc = fresh(encoder, max_length=8)
    with pytest.warns(UserWarning, match=r"truncated to max_length=8"):
        out = enc.encode(["a very long prompt about a fox that runs across a field of snow at dawn"])
    assert out.mask.all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc.encode(["short"])


def test_minilm_empty_batch_and_bad_arguments(encoder):
    out = encoder.encode([])
    assert out.tokens.shape == (0, 16, 384) and out.mask.shape == (0, 16) and out.pooled.shape == (0, 384)
    with pytest.raises(TypeError, match="list of prompts"):
        encoder.encode("a bare string")
    with pytest.raises(ValueError, match="max_length"):
        minilm.MiniLMTextEncoder(max_length=600)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        minilm.MiniLMTextEncoder(path="/nowhere/minilm")


def test_minilm_to_moves_the_model_and_the_outputs(encoder):
    enc = fresh(encoder)
    assert enc.to("cpu") is enc
    assert enc.encode(["x"]).tokens.device.type == "cpu"
    assert next(enc._loaded()[1].parameters()).device.type == "cpu"


@pytest.mark.cuda
def test_minilm_on_cuda_matches_cpu(encoder):
    enc = fresh(encoder)
    cpu = enc.encode(PROMPTS)
    gpu = enc.to("cuda").encode(PROMPTS)
    enc.to("cpu")
    assert gpu.tokens.device.type == "cuda"
    torch.testing.assert_close(gpu.pooled.cpu(), cpu.pooled, atol=1e-4, rtol=1e-3)


# --- hf: tiny random models saved to disk ----------------------------------------------------

SENTENCES = ["a red fox runs through snow", "a cat sleeps on a warm mat", "waves crash on the rocks at dusk"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A word-level tokenizer trained on three sentences, appending </s> like T5's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>")
    directory = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(directory)
    return directory, tok.get_vocab_size()


def save_tiny(tmp_path_factory, tokenizer_dir, name, build):
    import shutil

    source, vocab = tokenizer_dir
    directory = tmp_path_factory.mktemp(name)
    for file in source.iterdir():
        shutil.copy(file, directory)
    torch.manual_seed(0)
    build(vocab).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory, tokenizer_dir):
    from transformers import T5Config, T5EncoderModel

    config = lambda vocab: T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=2)
    return save_tiny(tmp_path_factory, tokenizer_dir, "t5", lambda vocab: T5EncoderModel(config(vocab)))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, tokenizer_dir):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = lambda vocab: CLIPTextConfig(
        vocab_size=vocab, hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return save_tiny(tmp_path_factory, tokenizer_dir, "clip", lambda vocab: CLIPTextModel(config(vocab)))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, tokenizer_dir):
    from transformers import BertConfig, BertModel

    config = lambda vocab: BertConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64)
    return save_tiny(tmp_path_factory, tokenizer_dir, "bert", lambda vocab: BertModel(config(vocab), add_pooling_layer=False))


def reference_hidden(directory, model_class, prompts, max_length):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    model = model_class.from_pretrained(str(directory), local_files_only=True).eval()
    batch = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out, batch["attention_mask"].bool()


def test_hf_t5_encoder_matches_transformers(t5_dir):
    from transformers import T5EncoderModel

    enc = hf.HFTextEncoder(path=t5_dir, max_length=10)
    assert enc.dim == 32 and isinstance(enc, TextEncoder)
    prompts = ["a cat sleeps on snow", "", "waves at dusk"]
    out = enc.encode(prompts)
    assert type(hf.load_model(t5_dir)[1]) is T5EncoderModel  # the encoder alone, no decoder weights
    assert out.tokens.shape == (3, 10, 32) and out.mask.shape == (3, 10) and out.pooled.shape == (3, 32)
    assert out.mask.sum(1).tolist() == [6, 1, 4]  # words + </s>
    reference, mask = reference_hidden(t5_dir, T5EncoderModel, prompts, 10)
    assert torch.equal(out.mask, mask)
    torch.testing.assert_close(out.tokens[mask], reference.last_hidden_state[mask])
    assert (out.tokens[~mask] == 0).all()
    mean = (reference.last_hidden_state * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(out.pooled, mean)


def test_hf_clip_uses_clip_text_model_and_its_pooled_output(clip_dir):
    from transformers import CLIPTextModel

    enc = hf.HFTextEncoder(path=clip_dir)
    assert enc.max_length == 16 and enc.dim == 24  # capped at the model's 16 positions
    prompts = ["a red fox runs", "a warm mat"]
    out = enc.encode(prompts)
    assert type(hf.load_model(clip_dir)[1]) is CLIPTextModel
    reference, mask = reference_hidden(clip_dir, CLIPTextModel, prompts, 16)
    torch.testing.assert_close(out.tokens[mask], reference.last_hidden_state[mask])
    torch.testing.assert_close(out.pooled, reference.pooler_output)
    with pytest.raises(ValueError, match=r"max_length.*\[1, 16\]"):
        hf.HFTextEncoder(path=clip_dir, max_length=77)


def test_hf_full_clip_checkpoint_loads_only_the_text_tower(tmp_path_factory, tokenizer_dir):
    from transformers import CLIPConfig, CLIPModel, CLIPTextModel

    text = dict(vocab_size=tokenizer_dir[1], hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16)
    build = lambda vocab: CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    directory = save_tiny(tmp_path_factory, tokenizer_dir, "clip-full", build)
    enc = hf.HFTextEncoder(path=directory)
    assert enc.dim == 24 and enc.max_length == 16
    out = enc.encode(["a red fox runs"])
    assert type(hf.load_model(directory)[1]) is CLIPTextModel
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(str(directory))(["a red fox runs"], padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():  # the reference: the full CLIP model's own text tower
        expected = CLIPModel.from_pretrained(str(directory)).eval().text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    torch.testing.assert_close(out.pooled, expected.pooler_output)
    torch.testing.assert_close(out.tokens[0, :5], expected.last_hidden_state[0, :5])


def test_hf_bert_like_models_load_through_automodel(bert_dir):
    from transformers import BertModel

    out = hf.HFTextEncoder(path=bert_dir, max_length=12).encode(["a cat sleeps"])
    assert type(hf.load_model(bert_dir)[1]) is BertModel
    assert out.tokens.shape == (1, 12, 16) and out.mask.sum().item() == 4


def test_hf_dtype_is_applied(t5_dir):
    out = hf.HFTextEncoder(path=t5_dir, max_length=8, dtype="bfloat16").encode(["a cat"])
    assert out.tokens.dtype == torch.bfloat16 and out.pooled.dtype == torch.bfloat16
    assert next(hf.load_model(t5_dir, torch.bfloat16)[1].parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of float32, float16, bfloat16"):
        hf.HFTextEncoder(path=t5_dir, dtype="int8")


def test_hf_caches_and_shares_weights(t5_dir, monkeypatch):
    a, b = hf.HFTextEncoder(path=t5_dir, max_length=8), hf.HFTextEncoder(path=t5_dir, max_length=8, cache_size=1)
    assert a._loaded()[1] is b._loaded()[1]
    calls = []
    real = hf.HFTextEncoder.encode_uncached
    monkeypatch.setattr(hf.HFTextEncoder, "encode_uncached", lambda self, prompts: calls.append(prompts) or real(self, prompts))
    first = b.encode(["a cat"])
    second = b.encode(["a cat"])
    b.encode(["a fox"])
    b.encode(["a cat"])
    assert calls == [["a cat"], ["a fox"], ["a cat"]]  # cache of one: "a fox" evicted "a cat"
    assert torch.equal(first.tokens, second.tokens)


def test_hf_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no-model-here.*does not exist"):
        hf.HFTextEncoder(path=tmp_path / "no-model-here")


def test_hf_directory_without_config_is_not_a_model(tmp_path):
    (tmp_path / "readme.txt").write_text("not a model")
    with pytest.raises(ValueError, match="not a transformers model directory.*config.json"):
        hf.HFTextEncoder(path=tmp_path)


def test_hf_directory_without_weights_says_so(tmp_path, t5_dir):
    (tmp_path / "config.json").write_text((t5_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="no weights"):
        hf.HFTextEncoder(path=tmp_path)


def test_hf_directory_without_tokenizer_says_so(tmp_path, t5_dir):
    import shutil

    for name in ("config.json", "model.safetensors"):
        shutil.copy(t5_dir / name, tmp_path)
    with pytest.raises(ValueError, match="no tokenizer.*save_pretrained"):
        hf.HFTextEncoder(path=tmp_path)


def test_hf_unknown_model_type_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="cannot read the config"):
        hf.HFTextEncoder(path=tmp_path)


def test_minilm_cache_smaller_than_one_call(encoder):
    enc = fresh(encoder, cache_size=1)
    enc.encode(["a"])
    out = enc.encode(["a", "b", "a"])  # "a" must not be evicted while the call still needs it
    torch.testing.assert_close(out.tokens[0], out.tokens[2])
    assert len(enc._cache) == 1
